"""Fault injection for the reliability tests: a test hook, not a feature (``tests/test_reliability_faults.py``).

``SALUNET_FAULT=<point>:<n>[:<action>][@<rank>]`` makes the trainer fail at a deterministic place:

- points: ``step`` (right after the n-th optimizer step of the run, counted from 1 across epochs and
  restarts), ``eval`` (during the evaluation of epoch n, after its first batch), ``checkpoint`` (while
  writing epoch n's checkpoint, half of its bytes in the temporary file);
- actions: ``kill`` (default: SIGKILL itself, as ``kill -9`` or the OOM killer would), ``stop`` (SIGSTOP
  itself: alive and frozen, still holding the run directory), ``enospc`` (raise ``OSError(ENOSPC)``, as a
  full disk does);
- ``@<rank>``: only on that torchrun rank (default: every process).

Under torchrun the hook fires only in the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so that a job
restarted with ``--max-restarts`` gets past the point. Unset (the normal case), every call is one dict lookup.
"""
from __future__ import annotations

import errno
import os
import signal

__all__ = ["hit", "ENV"]

ENV = "SALUNET_FAULT"
_POINTS, _ACTIONS = ("step", "eval", "checkpoint"), ("kill", "stop", "enospc")


def _parse(spec: str) -> tuple[str, int, str, int | None]:
    body, _, rank = spec.partition("@")
    parts = body.split(":")
    try:
        if len(parts) not in (2, 3) or parts[0] not in _POINTS or (parts[2:] and parts[2] not in _ACTIONS):
            raise ValueError
        return parts[0], int(parts[1]), (parts[2:] or ["kill"])[0], int(rank) if rank else None
    except ValueError:
        raise ValueError(f"{ENV}={spec!r}: expected <point>:<n>[:<action>][@<rank>] with point in "
                         f"{'/'.join(_POINTS)} and action in {'/'.join(_ACTIONS)}") from None


def hit(point: str, n: int) -> None:
    """Fail here if ``SALUNET_FAULT`` names this point and count (and this rank, in the first attempt)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, at, action, rank = _parse(spec)
    if where != point or at != n or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return
    if rank is not None and rank != int(os.environ.get("RANK", "0")):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
