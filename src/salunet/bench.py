"""Benchmarks (never timed tests): every figure is a ratio against a baseline measured in the same process
run, median of several interleaved repeats, so that a noisy shared machine slows both sides alike.

``salunet bench ops``: SALU+SWALU vs BatchNorm2d+ReLU on NCHW, the fused residual tail vs BatchNorm2d+add+ReLU,
SALU+GALU vs LayerNorm+GELU on tokens, and
the fused / eager / reference / torch.compile variants of SALU alone; forward+backward time and the bytes
saved for backward (unique storages kept by autograd, parameters excluded since they live anyway).

``salunet bench folder``: training images/s on a generated 28 px grayscale image folder with no data flag but the
path, against the same images as an .npz, in one process (data/folders.py: a small folder is decoded once and
trains like the .npz).
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .nn import GALU, SALU, SALUAct, SWALU, kernels
from .nn import functional as F

__all__ = ["saved_bytes", "time_fwd_bwd", "bench_ops", "OpResult", "bench_models", "ModelResult", "bench_train",
           "TrainBenchResult", "fold_batchnorm", "fold_for_inference"]


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                params: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``fn(x)``, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def time_fwd_bwd(fn: Callable, x: torch.Tensor, grad: torch.Tensor) -> float:
    t0 = time.perf_counter()
    y = fn(x)
    y.backward(grad)
    return time.perf_counter() - t0


@dataclass
class OpResult:
    case: str
    variant: str
    baseline: str
    median_ms: float
    ratio_time: float  # median time / median time of the baseline
    saved_bytes: int
    ratio_saved: float  # saved bytes / input bytes
    path: str


def _path(variant: str) -> str:
    if "reference" in variant or not any(op in variant for op in ("salu", "swalu", "galu")):
        return "torch"
    for key, mode in (("eager", "eager"), ("C++", "cpp"), ("inductor", "compiled")):
        if key in variant:
            return "salunet " + mode
    return "salunet " + kernels.kernel_path("cpu")


def _measure(case: str, shape: tuple[int, ...], variants: dict[str, tuple[nn.Module | Callable, list]],
             baseline: str, repeats: int, warmup: int) -> list[OpResult]:
    torch.manual_seed(0)
    x0 = torch.randn(shape)
    grad = torch.randn(shape)
    in_bytes = x0.numel() * x0.element_size()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, (fn, _) in variants.items():  # warm-up (and compilation) outside the timed loop
        for _ in range(warmup):
            time_fwd_bwd(fn, x0.clone().requires_grad_(), grad)
    for _ in range(repeats):  # interleaved so that machine noise hits every variant alike
        for name, (fn, _) in variants.items():
            times[name].append(time_fwd_bwd(fn, x0.clone().requires_grad_(), grad))
    base = statistics.median(times[baseline])
    out = []
    for name, (fn, params) in variants.items():
        med = statistics.median(times[name])
        sb = saved_bytes(fn, x0.clone().requires_grad_(), params)
        out.append(OpResult(case, name, baseline, med * 1e3, med / base, sb, sb / in_bytes, _path(name)))
    return out


def bench_ops(repeats: int = 15, warmup: int = 3, threads: int = 2,
              progress: Callable[[str], None] = print) -> list[OpResult]:
    """Run the operator benchmark; return one :class:`OpResult` per (case, variant)."""
    torch.set_num_threads(threads)
    results: list[OpResult] = []
    mode = kernels.get_kernel_mode()
    try:
        for label, case, shape, variants, baseline in (_nchw_case(), _tail_case(), _token_case(), _salu_alone_case()):
            progress(f"ops: {label} ...")
            results += _measure(case, shape, variants, baseline, repeats, warmup)
    finally:
        kernels.set_kernel_mode(mode)
    return results


def _params(*mods):
    return [p for m in mods for p in m.parameters()]


_C, _D = 64, 384  # channels of the NCHW cases, hidden size of the token case


def _nchw_case():
    """SALU + SWALU (two modules, fused) vs BatchNorm2d + ReLU on NCHW."""
    bn, relu = nn.BatchNorm2d(_C), nn.ReLU()
    s1, w1 = SALU(_C), SWALU(_C)
    pair = SALUAct(SALU(_C), SWALU(_C))
    return "NCHW (64, 64, 32, 32)", "nchw_64x64x32x32", (64, _C, 32, 32), {
        "batchnorm2d+relu": (lambda x: relu(bn(x)), _params(bn)),
        "salu+swalu (two modules)": (lambda x: w1(s1(x)), _params(s1, w1)),
        "salu+swalu (fused SALUAct)": (pair, _params(pair)),
        "swalu alone": (w1, _params(w1)),
    }, "batchnorm2d+relu"


def _tail_case():
    """The residual tail act(norm(x) + shortcut): fused SALUAddAct vs BatchNorm2d + add + ReLU."""
    from .nn import SALUAddAct

    r0 = torch.randn(64, _C, 32, 32)
    bn2, relu, tail = nn.BatchNorm2d(_C), nn.ReLU(), SALUAddAct(SALU(_C), SWALU(_C))
    return "residual tail NCHW (64, 64, 32, 32)", "tail_64x64x32x32", (64, _C, 32, 32), {
        "batchnorm2d+add+relu": (lambda x: relu(bn2(x) + r0), _params(bn2)),
        "salu+add+swalu (fused SALUAddAct)": (lambda x: tail(x, r0), _params(tail)),
    }, "batchnorm2d+add+relu"


def _token_case():
    """Tokens: SALU + GALU (two modules, fused) vs LayerNorm + GELU."""
    ln, gelu = nn.LayerNorm(_D), nn.GELU()
    s2, g2 = SALU(_D, dim=-1), GALU(_D, dim=-1)
    pair2 = SALUAct(SALU(_D, dim=-1), GALU(_D, dim=-1))
    return "tokens (128, 65, 384)", "tokens_128x65x384", (128, 65, _D), {
        "layernorm+gelu": (lambda x: gelu(ln(x)), _params(ln)),
        "salu+galu (two modules)": (lambda x: g2(s2(x)), _params(s2, g2)),
        "salu+galu (fused SALUAct)": (pair2, _params(pair2)),
    }, "layernorm+gelu"


def _salu_alone_case():
    """SALU alone on every path (C++, inductor, eager), the plain-formula reference and its torch.compile."""
    bn, s3 = nn.BatchNorm2d(_C), SALU(_C)
    a = torch.ones(_C, 1, 1, requires_grad=True)
    b = torch.ones(_C, 1, 1, requires_grad=True)
    ref_compiled = torch.compile(F.salu_reference, dynamic=False)

    def in_mode(mode, m):
        """``m`` in kernel mode ``mode``; the path is fixed at forward time, so backward runs the same path."""
        def run(x):
            old = kernels.get_kernel_mode()
            kernels.set_kernel_mode(mode)
            try:
                return m(x)
            finally:
                kernels.set_kernel_mode(old)
        return run

    return "SALU alone, variants", "salu_64x64x32x32", (64, _C, 32, 32), {
        "batchnorm2d": (bn, _params(bn)),
        "salu fused, C++": (in_mode("cpp", s3), _params(s3)),
        "salu fused, inductor": (in_mode("compiled", s3), _params(s3)),
        "salu fused, eager": (in_mode("eager", s3), _params(s3)),
        "salu reference": (lambda x: F.salu_reference(x, a, b), [a, b]),
        "salu reference, torch.compile": (lambda x: ref_compiled(x, a, b), [a, b]),
    }, "batchnorm2d"


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "kernel_path": kernels.kernel_path("cpu")}


def format_table(results: list[OpResult]) -> str:
    lines = ["| case | variant | fwd+bwd ms | time vs baseline | saved for backward | x input bytes |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.case} | {r.variant} | {r.median_ms:.2f} | {r.ratio_time:.2f}x | "
                     f"{r.saved_bytes / 2**20:.1f} MiB | {r.ratio_saved:.2f}x |")
    return "\n".join(lines)


def write_jsonl(path, results, env: dict) -> None:
    """The benchmark's rows, one JSON line each with the environment, written atomically (train/checkpoint.py)."""
    from .train.checkpoint import write_jsonl_atomic

    write_jsonl_atomic(Path(path), [{**asdict(r), "env": env} for r in results])


# ----------------------------------------------------------------------------------------------------------
# models: training-step and inference throughput, SaluNet vs its normalized twin

@dataclass
class ModelResult:
    pair: str
    model: str
    baseline: str
    width: str
    batch: int
    image: int
    train_img_s: float
    train_ratio: float  # model / baseline images per second (>1 = faster)
    infer_img_s: float
    infer_ratio: float  # against the baseline with BatchNorm folded into its convolutions when it has BN
    infer_baseline: str


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Eval-mode copy of ``model`` with every Conv->BatchNorm folded into the conv (what a deployment runs)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def fold_for_inference(model: nn.Module) -> nn.Module:
    """Eval-mode copy of a norm-free model with weight-standardised convs folded into plain ones (models/nf.py):
    what a deployment runs, like the twin's BN folding."""
    from .models import fold_nf_convs

    m = copy.deepcopy(model).eval()
    fold_nf_convs(m)
    return m


def _train_step(model, opt, x, y):
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def _infer(model, x):
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - t0


MODEL_PAIRS = [  # (pair, salunet, twin, width or None, batch, image side, full?)
    ("resnet18 cpu-width", "salunet_c18", "resnet18_bn", 16, 64, 32, False),
    ("resnet18 v2 cpu-width", "salunet_c18_v2", "resnet18_bn", 16, 64, 32, False),
    ("vit cpu-width", "salunet_t", "vit_ln", 96, 64, 32, False),
    ("resnet50 cpu-width", "salunet_c50", "resnet50_bn", 16, 8, 64, False),
    ("resnet18 full", "salunet_c18", "resnet18_bn", None, 32, 32, True),
    ("resnet18 v2 full", "salunet_c18_v2", "resnet18_bn", None, 32, 32, True),
    ("vit full", "salunet_t", "vit_ln", None, 32, 32, True),
    ("resnet50 full", "salunet_c50", "resnet50_bn", None, 4, 224, True),
]


def bench_models(repeats: int = 7, warmup: int = 3, threads: int = 2, full: bool = False,
                 progress: Callable[[str], None] = print, pairs: str | None = None) -> list[ModelResult]:
    """Images/s of a training step (SGD) and of inference, SaluNet vs its twin, interleaved repeats. ``pairs``
    (comma-separated names of :data:`MODEL_PAIRS`) runs only those, whatever ``full`` says."""
    from .models import create_model

    wanted = None if pairs is None else {p.strip() for p in pairs.split(",") if p.strip()}
    unknown = sorted((wanted or set()) - {p[0] for p in MODEL_PAIRS})
    if unknown:
        raise ValueError(f"unknown model pair(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(repr(p[0]) for p in MODEL_PAIRS)}")
    torch.set_num_threads(threads)
    out = []
    for pair, name, twin, width, batch, side, is_full in MODEL_PAIRS:
        if (wanted is not None and pair not in wanted) or (wanted is None and is_full and not full):
            continue
        progress(f"models: {pair} ({name} vs {twin}, batch {batch}, {side}x{side}) ...")
        torch.manual_seed(0)
        x = torch.randn(batch, 3, side, side)
        y = torch.randint(0, 10, (batch,))
        models = {n: create_model(n, num_classes=10, width=width) for n in (name, twin)}
        opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in models.items()}
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in models[twin].modules())
        # separate eval-mode copies: the training models stay in train mode (SaluNets behave the same in both,
        # the twin's BatchNorm does not)
        infer_models = {name: fold_for_inference(models[name]),
                        twin: fold_batchnorm(models[twin]) if has_bn else copy.deepcopy(models[twin]).eval()}
        times = {k: [] for k in ("train_" + name, "train_" + twin, "infer_" + name, "infer_" + twin)}
        for m in models.values():
            m.train()
        # training and inference are timed in separate phases, each interleaving the two models: a training
        # step between inference calls changes the machine's state (caches, OpenMP threads kept awake) and
        # with it the inference ratio (measured 0.82x interleaved vs 1.04x for resnet18 cpu-width)
        for i in range(warmup + repeats):
            for n, m in models.items():
                t = _train_step(m, opts[n], x, y)
                if i >= warmup:
                    times["train_" + n].append(t)
        for i in range(warmup + repeats):
            for n, m in infer_models.items():
                t = _infer(m, x)
                if i >= warmup:
                    times["infer_" + n].append(t)
        med = {k: batch / statistics.median(v) for k, v in times.items()}
        out.append(ModelResult(pair, name, twin, str(width or "paper"), batch, side, med["train_" + name],
                               med["train_" + name] / med["train_" + twin], med["infer_" + name],
                               med["infer_" + name] / med["infer_" + twin],
                               twin + (" (BN folded)" if has_bn else "")))
    return out


def format_model_table(results: list[ModelResult]) -> str:
    lines = ["| pair | batch x image | train img/s | train vs twin | infer img/s | infer vs | twin at inference |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.pair} | {r.batch} x {r.image}² | {r.train_img_s:.1f} | {r.train_ratio:.2f}x | "
                     f"{r.infer_img_s:.1f} | {r.infer_ratio:.2f}x | {r.infer_baseline} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# training through the real trainer: images/s, peak memory, data-pipeline share

@dataclass
class TrainBenchResult:
    width: str
    model: str
    baseline: str
    images_per_s: float
    ratio_speed: float  # model / baseline images per second (>1 = faster)
    peak_rss_mib: float
    ratio_memory: float  # model / baseline peak resident memory (<1 = leaner)
    data_share: float  # share of training time spent producing batches (loading + augmentation)
    repeats: int


TRAIN_PAIRS = [("salunet_c18", "resnet18_bn")]


def _train_child(cfg: dict, queue) -> None:
    """Child process of :func:`_train_once`: one training run, then its last epoch's metrics and peak RSS."""
    import resource

    from .train import train

    try:
        last = train(cfg)["final"]
        queue.put({"images_per_s": last["images_per_s"], "data_share": last["data_share"],
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})  # KiB on Linux
    except Exception as exc:  # noqa: BLE001 - reported by the parent with the config that failed
        queue.put({"error": f"{type(exc).__name__}: {exc}", "bad_input": isinstance(exc, (ValueError, OSError))})


def train_config(model: str, width: int | None, data_path: str, subset: int, epochs: int, out: str,
                 name: str) -> dict:
    """The training config of one benchmark run: CIFAR-10, batch 128, SGD lr 0.05, crop + flip, no EMA."""
    return {"model": model, "width": width, "data": "cifar10", "data_path": data_path, "train_subset": subset,
            "test_subset": 500, "epochs": epochs, "batch_size": 128, "lr": 0.05, "ema_decay": 0.0, "crop_padding": 4,
            "flip": True, "progress": False, "out": out, "name": name}


def _train_once(cfg: dict, threads: int) -> dict:
    """One training run of ``cfg`` (:func:`salunet.train.train`) in a fresh process, so that its peak RSS is its
    own; returns its last epoch's metrics and peak RSS."""
    import multiprocessing as mp
    import os

    ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's memory or threads
    queue = ctx.Queue()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the child's torch at import
    try:
        proc = ctx.Process(target=_train_child, args=(cfg, queue))
        proc.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    import queue as queue_mod

    while True:  # never wait forever on a child that died without reporting
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"training benchmark run exited with code {proc.exitcode} before reporting ({cfg})")
    proc.join()
    if result.get("bad_input"):  # the data or a path: the user's to fix, said in one line
        raise ValueError(f"bench train: {result['error'].split(': ', 1)[1]}")
    if "error" in result:
        raise RuntimeError(f"training benchmark run failed ({cfg}): {result['error']}")
    return result


def bench_train(data_path: str, repeats: int = 3, threads: int = 2, full: bool = False,
                progress: Callable[[str], None] = print) -> list[TrainBenchResult]:
    """Training images/s and peak memory of each SaluNet vs its BN twin through ``salunet train`` (fresh
    processes, interleaved repeats, medians), at CPU width 16 and, with ``full``, at the paper's width."""
    import tempfile

    if not Path(data_path).expanduser().exists():
        raise FileNotFoundError(f"{data_path}: no such file; bench train needs CIFAR-10 (--data-path, an .npz "
                                "or the official archive)")
    settings = [(16, 2560, 2)] + ([(None, 512, 2)] if full else [])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, subset, epochs in settings:
            for model, twin in TRAIN_PAIRS:
                runs: dict[str, list[dict]] = {model: [], twin: []}
                for r in range(repeats):
                    for m in (model, twin):  # interleaved: machine noise hits both alike
                        progress(f"train: {m} width {width or 'paper'} repeat {r + 1}/{repeats} ...")
                        cfg = train_config(m, width, data_path, subset, epochs, tmp, f"{m}-{width}-{r}")
                        runs[m].append(_train_once(cfg, threads))
                med = {m: {k: statistics.median(x[k] for x in v) for k in v[0]} for m, v in runs.items()}
                for m in (model, twin):
                    out.append(TrainBenchResult(str(width or "paper"), m, twin, med[m]["images_per_s"],
                                                med[m]["images_per_s"] / med[twin]["images_per_s"],
                                                med[m]["peak_rss_mib"], med[m]["peak_rss_mib"] / med[twin]["peak_rss_mib"],
                                                med[m]["data_share"], repeats))
    return out


def format_train_table(results: list[TrainBenchResult]) -> str:
    lines = ["| width | model | train img/s | vs twin | peak RSS MiB | vs twin | data-pipeline share |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.width} | {r.model} | {r.images_per_s:.0f} | {r.ratio_speed:.2f}x | {r.peak_rss_mib:.0f} | "
                     f"{r.ratio_memory:.2f}x | {100 * r.data_share:.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# folder: your own images as an image folder vs the same images as an .npz (issue 15's speed target)

@dataclass
class FolderBenchResult:
    data: str  # "imagefolder" | "npz"
    images_per_s: float  # median over repeats of the last epoch's training images/s (startup excluded)
    ratio_speed: float  # this / the .npz run's images/s (>= 0.9 is the target)
    wall_s: float  # median wall time of the whole train() call (folder: includes its one-time decode)
    in_chans: int
    image_size: int
    repeats: int


def make_gray_folder(root: Path, n_per_class: int, classes: int = 10, size: int = 28, seed: int = 0):
    """A Fashion-MNIST-like image folder (``size`` px grayscale PNGs, ``classes`` classes; val = a fifth as many)
    and the same images as an .npz beside it; returns (folder root, npz path)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_per_class), ("val", max(1, n_per_class // 5))):
        xs, ys = [], []
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, (size, size))  # a class template plus noise: learnable, like real data
            for i in range(n):
                x = np.clip(base + rng.normal(0, 40, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(x).save(d / f"{i:05d}.png")
                xs.append(x[..., None])
                ys.append(c)
        key = "train" if split == "train" else "test"
        arrays[f"x_{key}"], arrays[f"y_{key}"] = np.stack(xs), np.asarray(ys, np.int64)
    npz = root.parent / f"{root.name}.npz"
    np.savez(npz, **arrays)
    return root, npz


def bench_folder(repeats: int = 3, threads: int = 2, n_per_class: int = 400,
                 progress: Callable[[str], None] = print) -> list[FolderBenchResult]:
    """Training images/s of ``salunet train --data imagefolder --data-path DIR`` (no other data flag) on a
    generated 28 px grayscale folder vs the same images as an .npz, in this process, interleaved repeats, medians.
    Both runs use the trainer's defaults (salunet_c18 width 16, batch 64), one epoch, no progress bar."""
    import tempfile

    from .train import train
    from .train.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    runs: dict[str, list[dict]] = {"imagefolder": [], "npz": []}
    with tempfile.TemporaryDirectory() as tmp:
        root, npz = make_gray_folder(Path(tmp) / "fmnist", n_per_class)
        for r in range(repeats):
            for data, path in (("imagefolder", root), ("npz", npz)):  # interleaved: machine noise hits both
                progress(f"folder: {data} repeat {r + 1}/{repeats} ...")
                t = time.perf_counter()
                s = train({"data": data, "data_path": str(path), "epochs": 1, "progress": False,
                           "out": str(Path(tmp) / "runs"), "name": f"{data}-{r}"})
                wall = time.perf_counter() - t
                _, meta = load_checkpoint(s["checkpoint"])
                runs[data].append({"images_per_s": s["final"]["images_per_s"], "wall_s": wall,
                                   "in_chans": meta["in_chans"], "image_size": meta["image_size"]})
    med = {d: {k: statistics.median(x[k] for x in v) for k in v[0]} for d, v in runs.items()}
    return [FolderBenchResult(d, med[d]["images_per_s"], med[d]["images_per_s"] / med["npz"]["images_per_s"],
                              med[d]["wall_s"], int(med[d]["in_chans"]), int(med[d]["image_size"]), repeats)
            for d in ("imagefolder", "npz")]


def format_folder_table(results: list[FolderBenchResult]) -> str:
    lines = ["| data | channels | size | train img/s | vs .npz | wall s (whole run) |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.data} | {r.in_chans} | {r.image_size} | {r.images_per_s:.0f} | {r.ratio_speed:.2f}x | "
                     f"{r.wall_s:.1f} |")
    return "\n".join(lines)
