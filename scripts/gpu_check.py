"""Helpers of scripts/gpu_check.sh (the one GPU check of issue 13; docs/GPU.md).

    python scripts/gpu_check.py env OUT.json                    # versions, device, commit
    python scripts/gpu_check.py epochs PROBE_RUN SECONDS_LEFT N # epochs per model that fit the time left
    python scripts/gpu_check.py summary WORK                    # WORK/summary.json and WORK/summary.md

Epoch budget: a 2-epoch probe run of the slowest model (salunet_c18_v2) gives the steady epoch time (training +
evaluation of epoch 2) and the one-time cost (epoch 1's compile, in ``startup_s``). N runs of E epochs then take
about N * (one_time + E * epoch * 1.15); E is the largest that fits the seconds left, at least 1 and at most 300.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a call cut short while this runs still returns the previous complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def env(out: Path) -> None:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "commit": os.environ.get("SALUNET_COMMIT", "unknown")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
    out.write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def epochs(probe_run: Path, seconds_left: float, runs: int) -> int:
    rows = _rows(probe_run / "metrics.jsonl")
    if len(rows) < 2:
        print(1)
        return 1
    steady = rows[-1]["epoch_s"] + rows[-1].get("eval_s", 0.0)
    one_time = rows[0]["startup_s"] + 15.0  # compile (cached on disk after the probe), data load, process start
    e = int((seconds_left / runs - one_time) / (steady * 1.15))
    e = max(1, min(300, e))
    print(e)
    return e


def summary(work: Path) -> dict:
    steps = _rows(work / "steps.jsonl")
    out = {"env": json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {},
           "steps": steps, "failed": [s["step"] for s in steps if s["rc"] not in (0, "skipped")]}
    bench = {}
    for f in sorted((work / "bench").glob("*.jsonl")) if (work / "bench").exists() else []:
        bench[f.stem] = _rows(f)
    out["bench"] = bench
    for name, rows in bench.items():  # the targets, read from the rows
        for r in rows:
            if str(r.get("variant")).startswith(("salu+swalu (fused", "salu+galu (fused", "salu+add+swalu (fused")):
                out.setdefault("targets", {})[f"{name}: {r['variant']} vs {r['baseline']}"] = round(r["ratio_time"], 3)
    training = {}
    for d in sorted((work / "train").iterdir()) if (work / "train").exists() else []:
        rows = _rows(d / "metrics.jsonl")
        if rows:
            last = rows[-1]
            training[d.name] = {"epochs": len(rows), "test_acc": last.get("test_acc"),
                                "ema_test_acc": last.get("ema_test_acc"),
                                "best_test_acc": max(r.get("test_acc", 0) for r in rows),
                                "images_per_s": sorted(r["images_per_s"] for r in rows)[len(rows) // 2],
                                "acc_per_epoch": [round(r.get("test_acc", 0), 4) for r in rows]}
    out["training"] = training
    for base, models in (("resnet18_bn", ("salunet_c18", "salunet_c18_v2", "v2_pinned", "salunet_c18_v3")),
                         ("resnet50_bn", ("salunet_c50", "salunet_c50_v2", "c50_v2_pinned", "salunet_c50_v3"))):
        ref = training.get(base)
        for m in models:
            if ref and m in training:
                out.setdefault("targets", {})[f"{m} images/s vs {base}"] = round(
                    training[m]["images_per_s"] / ref["images_per_s"], 3)
    _write(work / "summary.json", json.dumps(out, indent=1))
    lines = [f"# GPU check: {out['env'].get('device', 'no GPU')} (torch {out['env'].get('torch')}, commit "
             f"{out['env'].get('commit')})", "", "| step | rc | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
    lines += ["", "| target | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in out.get("targets", {}).items()]
    lines += ["", "| model | epochs | test acc | EMA test acc | images/s (median epoch) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {m} | {t['epochs']} | {t['test_acc']} | {t['ema_test_acc']} | {t['images_per_s']:.0f} |"
              for m, t in training.items()]
    _write(work / "summary.md", "\n".join(lines) + "\n")
    return out


def main(argv: list[str]) -> int:
    cmd, *args = argv
    if cmd == "env":
        env(Path(args[0]))
    elif cmd == "epochs":
        epochs(Path(args[0]), float(args[1]), int(args[2]))
    elif cmd == "summary":
        summary(Path(args[0]))
    else:
        raise SystemExit(f"gpu_check.py: unknown command {cmd!r}; use env, epochs or summary")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
