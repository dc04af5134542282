"""Command line: ``salunet bench ops|models``, ``salunet train``, ``salunet eval``, ``salunet experiment``.

Errors a user can fix (bad names, paths, values) print one line ``salunet: error: ...`` and exit with code 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
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

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "ops":
        results = bench.bench_ops(repeats=args.repeats, threads=args.threads)
        table = bench.format_table(results)
    else:
        results = bench.bench_models(repeats=args.repeats, threads=args.threads, full=args.full)
        table = bench.format_model_table(results)
    env = bench.environment()
    path = out / f"bench_{args.what}.jsonl"
    bench.write_jsonl(path, results, env)
    print(table)
    print(f"environment: {json.dumps(env)}")
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salunet", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="operator / model benchmarks (ratios against baselines, same run)")
    b.add_argument("what", choices=["ops", "models"])
    b.add_argument("--repeats", type=_positive_int, default=15, help="timed repeats per variant (median)")
    b.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads")
    b.add_argument("--full", action="store_true", help="models: also full-width models (slow on CPU)")
    b.add_argument("--out", default="runs/bench", help="directory for the JSON-lines results")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"salunet: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("salunet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
