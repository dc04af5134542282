"""The layout of a training run's directory: :class:`RunDir` names every file in it and reads and writes them
through the writers of :mod:`.checkpoint` (atomic, fsynced); nothing else in the package spells these names.
:func:`timestamped` names new run and experiment directories."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import (append_jsonl, append_jsonl_rows, atomic_write_bytes, read_jsonl, remove_partial_files,
                         write_json_atomic, write_jsonl_atomic)

__all__ = ["RunDir", "timestamped"]


def timestamped(prefix: str) -> str:
    """A directory name ``<prefix>-<YYYYmmdd-HHMMSS>``: how runs and experiments are named by default."""
    import time

    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """The files of one training run's directory, named here and nowhere else, and read and written through
    these methods::

        RUN/config.json        the resolved config (written when the run starts or resumes)
        RUN/metrics.jsonl      one JSON line per finished epoch
        RUN/summary.json       final metrics, best accuracy, newest checkpoint (written when the run ends)
        RUN/curves.png         loss and accuracy per epoch (drawn by the caller's on_finish hook)
        RUN/checkpoints/epoch_NNNN.safetensors
        RUN/eval/<checkpoint>-<data>.json    what ``salunet eval`` wrote
        RUN/.torchrun_run_id   the torchrun job that created the directory (finds it again on a restart): JSON,
                               torchrun's run id and the identities of the job's launchers
        RUN/.lock              the run lock (:class:`RunLock`)
        RUN/steps.jsonl        one JSON line per optimizer step (``log_steps``; train/loggers.py)
        RUN/tensorboard/       TensorBoard event files (``logger="tensorboard"``; train/loggers.py)
    """

    CONFIG, METRICS, SUMMARY, CURVES = "config.json", "metrics.jsonl", "summary.json", "curves.png"
    CHECKPOINTS, EVAL, RUN_ID, LOCK = "checkpoints", "eval", ".torchrun_run_id", ".lock"
    STEPS, TENSORBOARD = "steps.jsonl", "tensorboard"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES

    @property
    def run_id_file(self) -> Path:
        return self.path / self.RUN_ID

    @property
    def steps(self) -> Path:
        return self.path / self.STEPS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoint_dir / f"epoch_{epoch:04d}.safetensors"

    def checkpoints(self) -> list[Path]:
        """Epoch checkpoints, oldest first: ordered by the epoch number in their names (as numbers: epoch_10000
        after epoch_9999), which :func:`.resume.resume_config` checks against the epoch each one records."""
        d = self.checkpoint_dir
        found = [(self.epoch_of(p), p) for p in d.glob("epoch_*.safetensors")] if d.is_dir() else []
        return [p for n, p in sorted(f for f in found if f[0] is not None)]

    @staticmethod
    def epoch_of(path: Path) -> int | None:
        """The epoch in a checkpoint's name (``epoch_0012.safetensors`` -> 12), or None for other names."""
        m = re.fullmatch(r"epoch_(\d+)\.safetensors", Path(path).name)
        return int(m.group(1)) if m else None

    @staticmethod
    def of_checkpoint(path: Path) -> RunDir | None:
        """The run directory a checkpoint file sits in (``RUN/checkpoints/x``), or None."""
        path = Path(path)
        return RunDir(path.parent.parent) if path.parent.name == RunDir.CHECKPOINTS else None

    def eval_file(self, name: str) -> Path:
        return self.path / self.EVAL / name

    def refuse_links(self) -> None:
        """Refuse ``checkpoints/``, ``eval/`` or ``metrics.jsonl`` as symbolic links, before anything is written:
        checkpoint rotation deletes files in there and metrics are appended, and a directory received from someone
        else could point them anywhere (the writers never follow links either: see :mod:`.checkpoint`)."""
        for d in (self.checkpoint_dir, self.path / self.EVAL, self.metrics):
            if d.is_symlink():
                raise ValueError(f"{d}: is a symbolic link (to {d.resolve()}), refused: the trainer writes (and deletes) "
                                 "there; replace it with a real file or directory")

    # ---- reading and writing ----
    def read_config(self) -> dict | None:
        """config.json as a dict, None if there is none; an unreadable one is an error with the fix."""
        if not self.config.is_file():
            return None
        try:
            saved = json.loads(self.config.read_text())
        except (ValueError, OSError) as exc:
            raise ValueError(f"{self.config}: unreadable ({exc}); restore it from a checkpoint's config or start a "
                             "new run") from None
        if not isinstance(saved, dict):
            raise ValueError(f"{self.config}: not a JSON object; restore it or start a new run")
        return saved

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config, config)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics) if self.metrics.is_file() else []

    def append_metrics(self, row: dict) -> None:
        append_jsonl(self.metrics, row)

    def trim_metrics(self, epochs_done: int) -> None:
        """Keep exactly the lines of epochs ``<= epochs_done`` (on resume: the ones the checkpoint contains;
        later ones are redone), and drop a line a crash cut short."""
        if not self.metrics.is_file():
            return
        rows = read_jsonl(self.metrics)
        keep = [r for r in rows if isinstance(r, dict) and r.get("epoch", 0) <= epochs_done]
        if len(keep) != len([line for line in self.metrics.read_text().splitlines() if line.strip()]):
            atomic_write_bytes(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode())

    def append_steps(self, rows: list[dict]) -> None:
        append_jsonl_rows(self.steps, rows)

    def read_steps(self) -> list[dict]:
        return read_jsonl(self.steps) if self.steps.is_file() else []

    def trim_steps(self, steps_done: int) -> None:
        """Keep exactly the per-step lines of steps ``<= steps_done`` (on resume: later ones are redone)."""
        if not self.steps.is_file():
            return
        rows = read_jsonl(self.steps)
        keep = [r for r in rows if isinstance(r, dict) and r.get("step", 0) <= steps_done]
        if len(keep) != len([line for line in self.steps.read_text().splitlines() if line.strip()]):
            write_jsonl_atomic(self.steps, keep)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary, summary)

    def read_run_id(self) -> dict | None:
        """``{"run_id": ..., "agents": [...]}`` as written by :meth:`write_run_id`; None if absent or not in that
        form (a file of salunet before 2026-11-28 held the bare run id, which alone cannot tell jobs apart)."""
        try:
            got = json.loads(self.run_id_file.read_text())
        except (OSError, ValueError, RecursionError):
            return None
        ok = isinstance(got, dict) and isinstance(got.get("run_id"), str) and isinstance(got.get("agents"), list)
        return got if ok else None

    def write_run_id(self, run_id: str, agents: list[str]) -> None:
        write_json_atomic(self.run_id_file, {"run_id": run_id, "agents": sorted(set(agents))})

    def is_started(self) -> bool:
        """Whether a run wrote anything worth continuing here (a config or a checkpoint)."""
        return self.config.is_file() or bool(self.checkpoints())

    def discard_new_files(self) -> None:
        """Remove what a new run wrote before finishing its first epoch (call while holding the lock): nothing
        worth keeping, and a leftover config.json would block re-running with the same name."""
        for p in (self.config, self.metrics, self.run_id_file, self.steps):
            p.unlink(missing_ok=True)
        if self.tensorboard_dir.is_dir():
            import shutil

            shutil.rmtree(self.tensorboard_dir, ignore_errors=True)
        remove_partial_files(self.path)
