"""salunet: train, evaluate, export and benchmark normalization-free networks; analyses of the paper.

Commands: ``salunet bench ops|models|train|folder``, ``salunet train``, ``salunet eval``, ``salunet experiment``,
``salunet doctor``, ``salunet export`` (ONNX) and ``salunet export-weights``.

Errors a user can fix (bad names, paths, values) print one line ``salunet: error: ...`` and exit with code 2;
a run that stops part-way (non-finite loss, full disk, SIGTERM, a lost torchrun worker) prints one line
``salunet: stopped: ...`` naming what was kept and exits with code 1. ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

__all__ = ["main", "UserError"]


class UserError(Exception):
    """An error caused by the user's input: reported as one line, exit code 2."""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _cmd_bench(args) -> int:
    from . import bench

    on_device = args.device != "cpu" or args.dtype != "fp32"
    if args.what not in ("ops", "models") and (on_device or args.batch or args.channels_last or args.cases):
        raise UserError(f"bench {args.what}: --device, --dtype, --batch, --channels-last and --cases apply to "
                        "bench ops / models only; drop them")
    if args.what == "models" and args.cases:
        raise UserError("bench models: --cases selects op cases (bench ops); use --pairs for models")
    if args.what == "ops" and (args.pairs or args.channels_last):
        raise UserError("bench ops: --pairs and --channels-last apply to bench models; use --cases for ops")
    if args.what in ("ops", "models"):
        bench.resolve_device(args.device)  # refused before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "ops":
        results = bench.bench_ops(repeats=args.repeats or 15, warmup=args.warmup or 3, threads=args.threads,
                                  device=args.device,
                                  dtype=args.dtype, batch=args.batch, cases=args.cases)
        table = bench.format_table(results)
    elif args.what == "models":
        results = bench.bench_models(repeats=args.repeats or 7, warmup=args.warmup or 3, threads=args.threads,
                                     full=args.full,
                                     pairs=args.pairs, device=args.device, dtype=args.dtype, batch=args.batch,
                                     channels_last=args.channels_last)
        table = bench.format_model_table(results)
    elif args.what == "folder":
        results = bench.bench_folder(repeats=args.repeats or 3, threads=args.threads)
        table = bench.format_folder_table(results)
    else:
        if not args.data_path:
            raise UserError("bench train needs --data-path (CIFAR-10 as an .npz or the official archive)")
        results = bench.bench_train(args.data_path, repeats=args.repeats or 3, threads=args.threads, full=args.full)
        table = bench.format_train_table(results)
    env = bench.environment(args.device if args.what in ("ops", "models") else "cpu")
    # the CPU fp32 file keeps its name; other devices / dtypes get their own, so that runs do not overwrite each other
    suffix = f"_{args.device.replace(':', '')}_{args.dtype}" if on_device else ""
    path = out / f"bench_{args.what}{suffix}.jsonl"
    bench.write_jsonl(path, results, env)
    print(table)
    print(f"environment: {json.dumps(env)}")
    print(f"wrote {path}")
    return 0


def _cmd_models(args) -> int:
    import json
    import textwrap

    from .models import describe_model, list_models

    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no registered model matches {args.pattern!r}; the models: {', '.join(list_models())}")
    for d in map(describe_model, names):
        if args.json:
            print(json.dumps(d))
            continue
        print(f"{d['name']}  ({d['architecture']}, {d['norm_layer']} + {d['act_layer']})")
        print(textwrap.fill(d["summary"], 110, initial_indent="    ", subsequent_indent="    "))
        if d["declares"]:
            flags = " ".join(f"--{k.replace('_', '-')} {str(v).lower() if isinstance(v, bool) else v}"
                             for k, v in d["declares"].items())
            print(textwrap.fill("trains by name with: " + flags, 110, initial_indent="    ",
                                subsequent_indent="      ", break_on_hyphens=False, break_long_words=False))
    return 0


def _cmd_experiment(args) -> int:
    from .analysis.experiments import run_experiment

    values = {k[4:]: v for k, v in vars(args).items() if k.startswith("exp_") and v is not None}
    run_experiment(args.experiment, **values)
    return 0


def _add_experiment_parsers(sub) -> None:
    """``salunet experiment NAME --option value``: options come from each experiment's args dataclass."""
    from .analysis.experiments import EXPERIMENTS

    x = sub.add_parser("experiment", help="the paper's analyses, the controlled ablation, the init study",
                       description="Each experiment writes results.json, PNG figures and (those that train) runs.jsonl into "
                                   "<out>/<name>-<time>/. CPU-scale defaults; --full for the paper's scale.")
    xs = x.add_subparsers(dest="experiment", required=True)
    for name, (cls, fn) in EXPERIMENTS.items():
        e = _one_line_errors(xs.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0],
                                           description=(fn.__doc__ or "").strip()))
        actions = _dataclass_options(e, cls, "exp_")
        e.set_defaults(func=_cmd_experiment, cli_parser=e, cli_options=[o for a in actions for o in a.option_strings])


def _dataclass_options(parser: argparse.ArgumentParser, cls, prefix: str, skip: tuple = (), docs: dict | None = None,
                       choices=None) -> list:
    """One ``--field-name V`` option per field of dataclass ``cls`` (stored as ``prefix + field``, default None so
    that only what was given reaches the config); booleans also work as bare flags. Values stay strings here:
    the config's one parser (``train.config.coerce_value``) type-checks them. The help line of each option is
    ``docs[field]`` (if given), then ``choices(field)`` (if it returns any; listed, not enforced here, so that a bad
    value gets the config's one-line error), then the default."""
    import typing

    hints = typing.get_type_hints(cls)
    actions = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag, dest = "--" + f.name.replace("_", "-"), prefix + f.name
        known = choices(f.name) if choices is not None else None
        notes = [f"one of: {', '.join(known)}"] if known else []
        if hints[f.name] is bool:
            notes.append(f"default {str(default).lower()}; the bare flag means true")
            metavar, extra = "true|false", dict(nargs="?", const="true")
        else:
            notes.append(f"default {'none' if default is None else repr(default)}")
            metavar, extra = "V", {}
        doc = (docs or {}).get(f.name, "")
        text = f"{doc} ({'; '.join(notes)})" if doc else f"({'; '.join(notes)})"
        text = text.replace("%", "%%")  # argparse formats help strings with %
        actions.append(parser.add_argument(flag, dest=dest, metavar=metavar, help=text, **extra))
    return actions


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` report errors as one line (``salunet train: error: ...``, exit code 2) instead of its
    usage block, which for ``train`` lists every config key."""
    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")

    parser.error = error
    return _debug_flag(parser)


def _debug_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug`` after the subcommand too (``salunet train --debug``); SUPPRESS keeps the top-level default."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    return parser


def _unknown_arguments(args, extra: list[str]) -> None:
    """Report unrecognised arguments of a subcommand (``train``, ``eval``, ...) in one line, with the closest
    known option (``args.cli_options``)."""
    import difflib

    hints = []
    for arg in extra:
        close = difflib.get_close_matches(arg.split("=")[0], args.cli_options, n=1) if arg.startswith("--") else []
        hints += [f"{close[0]} instead of {arg}"] if close else []
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    args.cli_parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def _cmd_train(args) -> int:
    from .train import config as C
    from .train import train
    from .analysis.plots import draw_run_curves
    from .train.stopping import stop_on_sigterm

    # SIGTERM (a scheduler, torchrun stopping a job) ends the run cleanly, with a message; main() restores the
    # previous handler once that message is printed
    args.previous_sigterm = stop_on_sigterm()

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.accept_data_change and not args.resume:
        raise UserError("--accept-data-change applies to --resume RUN_DIR only; drop it for a new run")
    if args.resume:
        if args.recipe or args.config:
            raise UserError("--resume continues a run with its saved config; drop --recipe/--config")
        train(resume=args.resume, on_finish=draw_run_curves, accept_data_change=args.accept_data_change,
              **{k: C.parse_value(k, v) for k, v in overrides.items()})
        return 0
    base = C.config_from_json(args.config) if args.config else {}
    train(C.resolve_config(args.recipe, overrides, base=base), on_finish=draw_run_curves)
    return 0


def _cmd_doctor(args) -> int:
    from .doctor import format_report, report

    r = report(build=args.build)
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 1 if args.build and r["kernel_error"] else 0


def _cmd_eval(args) -> int:
    from .train.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, data_path=args.data_path,
                                 batch_size=args.batch_size, device=args.device, out=args.out,
                                 eval_size=args.eval_size)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_export(args) -> int:
    import torch

    from .export import export_onnx
    from .weights import load_model_with_info

    model, info = load_model_with_info(args.source, ema=args.ema or None)
    c, size = info["input"]["in_chans"], info["input"]["image_size"]
    example = torch.randn(args.batch_size, c, size, size, generator=torch.Generator().manual_seed(0))
    result = export_onnx(model, example, args.out, exporter=args.exporter, opset=args.opset,
                         dynamic_batch=not args.static_batch)
    print(f"{result}; input 'input' (batch, {c}, {size}, {size}) normalised with mean {info['input']['mean']} "
          f"std {info['input']['std']}; {info['weights']} weights of {info['source']}")
    return 0


def _cmd_export_weights(args) -> int:
    from .weights import export_weights

    out, side = export_weights(args.source, args.out, ema=args.ema or None)
    print(f"wrote {out} and {side}; load with salunet.load_model({str(out)!r}), or without salunet's trainer: "
          f"create_model(**json.load(open({str(side)!r}))['create_model']).load_state_dict("
          f"safetensors.torch.load_file({str(out)!r}))")
    return 0


def _add_export_parsers(sub) -> None:
    """``salunet export`` (ONNX, checked with onnxruntime) and ``salunet export-weights`` (README: Deployment)."""
    from .export import EXPORTERS

    src = "run directory, checkpoint, or (export only) a file written by export-weights"
    x = _one_line_errors(sub.add_parser("export", help="write a trained model as ONNX, checked against the model "
                                                       "with onnxruntime when it is installed"))
    actions = [x.add_argument("source", help=src),
               x.add_argument("--out", required=True, help="the .onnx file to write"),
               x.add_argument("--ema", action="store_true", help="the EMA weights (default: the raw weights)"),
               x.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                              help="torch.onnx exporter (dynamo needs onnxscript; default dynamo)"),
               x.add_argument("--opset", type=_positive_int, help="ONNX opset (default: the exporter's)"),
               x.add_argument("--batch-size", type=_positive_int, default=2, help="batch of the example input"),
               x.add_argument("--static-batch", action="store_true", help="fix the batch size (default: dynamic)")]
    x.set_defaults(func=_cmd_export, cli_parser=x, cli_options=[o for a in actions for o in a.option_strings])
    w = _one_line_errors(sub.add_parser("export-weights", help="write a plain safetensors state dict and the JSON "
                                                               "config that create_model takes"))
    actions = [w.add_argument("source", help="run directory or checkpoint"),
               w.add_argument("--out", required=True, help="the .safetensors file to write (config: same name, .json)"),
               w.add_argument("--ema", action="store_true", help="the EMA weights (default: the raw weights)")]
    w.set_defaults(func=_cmd_export_weights, cli_parser=w, cli_options=[o for a in actions for o in a.option_strings])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salunet", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    b = _debug_flag(sub.add_parser("bench", help="operator / model benchmarks (ratios against baselines, same run)"))
    b.add_argument("what", choices=["ops", "models", "train", "folder"])
    b.add_argument("--repeats", type=_positive_int, help="timed repeats per variant, median (default: ops 15, "
                   "models 7, train 3)")
    b.add_argument("--warmup", type=_positive_int, help="ops/models: untimed calls per variant first (default 3)")
    b.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads")
    b.add_argument("--full", action="store_true", help="models/train: also full-width models (slow on CPU)")
    b.add_argument("--data-path", help="train: CIFAR-10 (.npz or the official archive)")
    b.add_argument("--pairs", help="models: comma-separated pair names to run (default: all of the chosen scale), "
                   "e.g. 'resnet18 v2 full'")
    b.add_argument("--device", default="cpu", help="ops/models: cpu, cuda or cuda:N (GPU timing with CUDA events; "
                   "rows add peak memory and, for ops, achieved GB/s)")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="ops/models: activation dtype (models: the autocast dtype); parameters stay float32")
    b.add_argument("--batch", type=_positive_int, help="ops/models: batch size of every case / pair (default: ops "
                   "64 NCHW and 128 tokens, 4x that on CUDA; models: each pair's own)")
    b.add_argument("--cases", help="ops: comma-separated cases to run (nchw, tail, tokens, salu; default all)")
    b.add_argument("--channels-last", action="store_true", help="models: channels-last model and input")
    b.add_argument("--out", default="runs/bench", help="directory for the JSON-lines results")
    b.set_defaults(func=_cmd_bench)

    from .train.config import FIELD_HELP, RECIPES, TrainConfig, field_choices

    t = _one_line_errors(sub.add_parser(
        "train", help="train a registered model (recipes, resume, torchrun)",
        description="Train (with no arguments: SaluNet-C-18 at width 16 on the embedded digits set, well under "
                    "two minutes on 2 CPU cores). Precedence: defaults < --recipe < --config FILE < --KEY VALUE "
                    "flags. Boolean keys work as bare flags (--download) or with a value (--flip false)."))
    actions = [t.add_argument("--recipe", choices=sorted(RECIPES), help="named recipe (overrides of the defaults)"),
               t.add_argument("--config", help="JSON file of config keys"),
               t.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest valid checkpoint"),
               t.add_argument("--accept-data-change", action="store_true",
                              help="with --resume: continue although the data differs from the data the checkpoint "
                                   "was trained on (refused by default)")]
    actions += _dataclass_options(t, TrainConfig, "cfg_", skip=("recipe",), docs=FIELD_HELP, choices=field_choices)
    t.set_defaults(func=_cmd_train, cli_parser=t, cli_options=[o for a in actions for o in a.option_strings])

    e = _one_line_errors(sub.add_parser("eval", help="top-1/top-5 of a checkpoint's raw and EMA weights"))
    actions = [
        e.add_argument("checkpoint"),
        e.add_argument("--data", help="data set (default: the checkpoint's)"),
        e.add_argument("--data-path", help="data path (default: the checkpoint's)"),
        e.add_argument("--batch-size", type=_positive_int, default=500),
        e.add_argument("--eval-size", type=_positive_int,
                       help="image folders: evaluate at this size (e.g. 288; default: the checkpoint's eval_size)"),
        e.add_argument("--device", default="auto"),
        e.add_argument("--out", help="JSON result file (default: <run>/eval/<checkpoint>-<data>[-<size>].json)")]
    e.set_defaults(func=_cmd_eval, cli_parser=e, cli_options=[o for a in actions for o in a.option_strings])

    _add_export_parsers(sub)
    _add_experiment_parsers(sub)

    m = _debug_flag(sub.add_parser("models", help="the registered models: what each is and the trainer settings it "
                                                  "declares"))
    m.add_argument("pattern", nargs="?", help="a glob over the names, e.g. 'salunet_*' (default: all)")
    m.add_argument("--json", action="store_true", help="print one JSON object per model, a line each")
    m.set_defaults(func=_cmd_models)

    d = _debug_flag(sub.add_parser("doctor", help="versions, kernel path, CPU ISA, kernel cache folder and whether "
                                                  "the C++ build is current"))
    d.add_argument("--build", action="store_true", help="build the C++ kernels now if they are not current "
                   "(about 25 s; exit code 1 if that fails)")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=_cmd_doctor)
    return p


def _one_line(exc: BaseException) -> str:
    """The first line of an error message. An error raised in a DataLoader worker arrives wrapped ("Caught
    ValueError in DataLoader worker process 0." + the worker's traceback): its last line is the message."""
    import errno

    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror and "\n" not in exc.strerror:
        fix = {errno.EACCES: "; make it readable (and its directory writable) for this user or choose another path",
               errno.EROFS: "; choose a writable --out"}.get(exc.errno, "")
        return f"{exc.filename}: {exc.strerror.lower()}{fix}"  # instead of "[Errno 13] Permission denied: 'x'"
    text = str(exc)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        last = lines[-1].strip()
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # train / eval: one line naming the closest option; other commands: argparse's own message
        if hasattr(args, "cli_options"):
            _unknown_arguments(args, extra)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .train.stopping import RunStopped, Terminated, TrainingDiverged

    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError) as exc:
        if args.debug:
            raise
        print(f"salunet: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (MemoryError, RecursionError) as exc:  # an input too big or too deep for this machine
        if args.debug:
            raise
        what = "out of memory" if isinstance(exc, MemoryError) else "input nested too deeply"
        print(f"salunet: error: {what} ({_one_line(exc)}); use smaller inputs (--width, --batch-size, image size) "
              "or --debug for the traceback", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the run stopped (divergence, full disk, SIGTERM, a lost torchrun worker)
        if args.debug or not isinstance(exc, (TrainingDiverged, RunStopped)):
            raise
        print(f"salunet: stopped: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full and the like: say it in one line, keep exit code 1
        if args.debug:
            raise
        print(f"salunet: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("salunet: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("salunet: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if getattr(args, "previous_sigterm", None) is not None:
            import signal

            signal.signal(signal.SIGTERM, args.previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
