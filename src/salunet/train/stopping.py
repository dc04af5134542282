"""How a run stops early: divergence (:class:`TrainingDiverged`), and stops from outside (SIGTERM, a full disk, a
lost torchrun worker) turned into :class:`RunStopped`, whose message names the checkpoint to continue from."""
from __future__ import annotations

import os
from pathlib import Path

from . import distributed as D
from .checkpoint import list_checkpoints

__all__ = ["TrainingDiverged", "RunStopped", "Terminated", "stop_on_sigterm", "raise_if_terminated", "as_run_stopped",
           "last_good"]


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite; the run stopped before saving them,
    and its last good checkpoint is kept."""


class RunStopped(RuntimeError):
    """The run stopped before finishing for a reason outside training itself: a full disk, SIGTERM, a lost
    torchrun worker. Every finished epoch is in the last good checkpoint; ``--resume`` continues the run."""


class Terminated(BaseException):
    """Raised by :func:`stop_on_sigterm`'s handler (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it)."""


_STOPPING = [False]  # once a run is stopping, further SIGTERMs (torchrun sends one to every worker) are ignored
_PENDING = [False]  # a SIGTERM raised Terminated and no stop has been reported yet (see raise_if_terminated)


def stop_on_sigterm():
    """Make SIGTERM stop a run cleanly: the current write is abandoned (its temporary file removed), the lock
    released, and a message says what was kept. Installed by ``salunet train``; returns the previous handler
    (for ``signal.signal``) so that the caller can restore it once the message is out.

    Python runs the handler at whatever line the main thread is at, and some of those cannot pass an exception
    on: an at-fork hook (logging's, while a DataLoader forks its workers), a ``__del__`` or a weakref callback (a
    loader iterator's worker shutdown, a queue's finalizer). There Python prints ``Exception ignored in ...`` with
    a traceback and carries on: the stop was lost, later SIGTERMs were ignored, and the run trained on (a group
    SIGTERM in CI, the workers forked after it never got it). So the handler also leaves the stop pending, the
    training loop calls :func:`raise_if_terminated` before each batch, and such a swallowed Terminated is not
    printed."""
    import signal
    import sys

    def handler(signum, frame):
        if not _STOPPING[0]:
            _STOPPING[0] = _PENDING[0] = True
            raise Terminated()

    if not getattr(sys.unraisablehook, "drops_terminated", False):  # once; it passes on everything else
        previous = sys.unraisablehook

        def hook(unraisable):
            if not isinstance(unraisable.exc_value, Terminated):
                previous(unraisable)

        hook.drops_terminated = True
        sys.unraisablehook = hook
    _STOPPING[0] = _PENDING[0] = False
    return signal.signal(signal.SIGTERM, handler)


def raise_if_terminated() -> None:
    """Raise the Terminated of a SIGTERM whose own raise was swallowed (see :func:`stop_on_sigterm`); a no-op
    otherwise (one list lookup). Called between batches: where a Terminated that is on its way up never runs."""
    if _PENDING[0]:
        raise Terminated()


def _is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL")))


def _worker_terminated(exc: BaseException) -> bool:
    """A DataLoader worker ended by SIGTERM, reported by torch in the main process: a SIGTERM to the whole process
    group (a scheduler's stop) can reach a worker that is just starting, before its quiet handler is installed
    (data/imagefolder.py ``quiet_worker``), and torch's check then fires before the main process's own handler.
    Also a worker that left quietly (exit 0, "exited unexpectedly") once this process has had its SIGTERM."""
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc) and (
        "Terminated" in str(exc) or _PENDING[0])


def _short(exc: BaseException) -> str:
    """A communication error in a few words: gloo's text without its source location and advice."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return text.split(". ")[0][:120]


def as_run_stopped(exc: BaseException, run_dir: Path, info: D.DistInfo, epoch: int, kept: bool) -> RunStopped | None:
    """The RunStopped that ``exc`` (raised during epoch ``epoch``) amounts to, or None if it is not one."""
    import errno

    if isinstance(exc, Terminated) or _worker_terminated(exc):
        why = f"terminated (SIGTERM) during epoch {epoch}"
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        why = f"no space left on device while writing {exc.filename or 'to ' + str(run_dir)} (epoch {epoch})"
    elif info.enabled and _is_comm_error(exc) and "timed out" in str(exc).lower():
        why = (f"rank {info.rank} waited longer than dist_timeout for the other ranks during epoch {epoch} (one is "
               f"stopped or hung; --dist-timeout sets the wait): {_short(exc)}")
    elif info.enabled and _is_comm_error(exc):
        why = f"rank {info.rank} lost contact with the other ranks during epoch {epoch} (a worker died?): {_short(exc)}"
    else:
        return None
    _STOPPING[0], _PENDING[0] = True, False
    good = list_checkpoints(run_dir)
    if not kept:
        then = "nothing was kept; run the same command again"
    elif not good:
        then = f"no checkpoint yet; continue with --resume {run_dir}"
    else:
        then = f"the last good checkpoint is {good[-1]}; continue with --resume {run_dir}"
    restart, most = D.restart_count(), D.max_restarts()
    if info.enabled and os.environ.get("TORCHELASTIC_RUN_ID"):
        if restart < most:
            then = (f"torchrun restarts the job (restart {restart + 1} of {most}), which continues from "
                    f"{good[-1] if (kept and good) else 'the start'}")
        else:
            then += (" (under torchrun as before; torchrun --max-restarts N restarts automatically)" if most == 0
                     else f" (under torchrun as before; its {most} restart(s) are used up)")
    if isinstance(exc, OSError):
        then = "free some space; " + then
    return RunStopped(f"{why}; {then}")



def last_good(run_dir: Path) -> str:
    good = list_checkpoints(run_dir)
    return str(good[-1]) if good else "none yet"
