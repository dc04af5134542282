"""What a training run logs besides ``metrics.jsonl`` (one line per epoch, always written by the loop):

- ``log_steps``: one JSON line per optimizer step in ``RUN/steps.jsonl``: ``step`` (1-based, global),
  ``epoch`` (1-based), ``loss`` and ``acc`` (the step's batch, averaged over ranks; accuracy against the first
  mixing target), ``lr`` (used by that step), ``grad_norm`` (global, before clipping), ``time`` (Unix seconds).
  Lines are written in batches (at most every :data:`FLUSH_S` seconds, at each epoch's end and when the run
  stops), so that logging costs no fsync per step; a killed run loses at most those seconds, and a resumed run
  first drops the lines past its checkpoint's step, like ``metrics.jsonl``.
- ``logger="tensorboard"``: TensorBoard event files in ``RUN/tensorboard/``: ``step/loss``, ``step/acc``,
  ``step/lr``, ``step/grad_norm`` every optimizer step, and ``epoch/<key>`` for every number of the epoch's
  metrics line (``train_loss``, ``test_acc``, ``lr``, ...). Every scalar's x-axis is the global optimizer step,
  so per-step and per-epoch curves line up (an epoch's point sits at its last step). A resumed run opens the
  writer with ``purge_step`` = the checkpoint's step + 1, so TensorBoard hides the events that an interrupted
  attempt wrote past the checkpoint (the resumed run writes those steps again). Needs the optional ``tensorboard``
  package (``pip install 'salunet[tensorboard]'``); asking for it without the package is refused before the run
  writes anything.

Only rank 0 logs. File names come from :class:`~salunet.train.rundir.RunDir`.
"""
from __future__ import annotations

import time
from pathlib import Path

from .config import TrainConfig
from .rundir import RunDir

__all__ = ["RunLoggers", "check_logger", "FLUSH_S"]

FLUSH_S = 10.0  # most seconds between two writes of buffered per-step lines


def _summary_writer():
    """TensorBoard's writer class, or a ValueError with the fix."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError(f"--logger tensorboard needs the tensorboard package ({exc}); install it with "
                         "pip install 'salunet[tensorboard]', or drop --logger") from None
    return SummaryWriter


def check_logger(cfg: TrainConfig) -> None:
    """Refuse, before anything is written, a logger this environment cannot run."""
    if cfg.logger == "tensorboard":
        _summary_writer()


class RunLoggers:
    """The optional per-step and TensorBoard logs of one run (rank 0). ``start_step``: the step the run starts
    from (0 for a new run; the checkpoint's step on resume)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, start_step: int = 0) -> None:
        self.files = RunDir(run_dir)
        self.log_steps = cfg.log_steps
        self._rows: list[dict] = []
        self._last_write = time.monotonic()
        if self.log_steps:
            self.files.trim_steps(start_step)
        self.tb = None
        if cfg.logger == "tensorboard":
            # purge_step: TensorBoard hides older events at steps >= it (an interrupted attempt's, past the
            # checkpoint); the checkpoint's own step was completed, so its events stay
            self.tb = _summary_writer()(log_dir=str(self.files.tensorboard_dir),
                                        purge_step=start_step + 1 if start_step > 0 else None)

    @property
    def active(self) -> bool:
        return self.log_steps or self.tb is not None

    def step(self, step: int, epoch: int, *, loss: float, acc: float, lr: float, grad_norm: float) -> None:
        """Log optimizer step ``step`` (1-based, global) of epoch ``epoch`` (1-based)."""
        values = {"loss": loss, "acc": acc, "lr": lr, "grad_norm": grad_norm}
        if self.log_steps:
            self._rows.append({"step": step, "epoch": epoch, **values, "time": round(time.time(), 3)})
            if time.monotonic() - self._last_write >= FLUSH_S:
                self._write_rows()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"step/{k}", v, step)

    def epoch(self, row: dict) -> None:
        """Log an epoch's metrics line (as written to metrics.jsonl) and write everything buffered."""
        self._write_rows()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"epoch/{k}", v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        """Write what is buffered and close the event file (also when the run stopped part-way)."""
        try:
            self._write_rows()
        finally:
            if self.tb is not None:
                self.tb.close()
                self.tb = None

    def _write_rows(self) -> None:
        if self._rows:
            rows, self._rows = self._rows, []
            self.files.append_steps(rows)
        self._last_write = time.monotonic()
