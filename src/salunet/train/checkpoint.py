"""The one owner of salunet's on-disk formats: checkpoints, JSON and JSON-lines files, run-directory locks.
(Which file of a run directory is which: :mod:`.rundir`, the only place that names them.)

Checkpoint = one ``.safetensors`` file. Tensors (model, EMA, optimizer state, RNG states) are stored as
safetensors; everything else (config, epoch, step, the structure of nested state dicts) is JSON in the
safetensors header metadata, together with a SHA-256 of the tensor payload. Loading never executes code
(no pickle), and a truncated or corrupted file is detected (header parse or checksum) and reported with
its path. Writes go to a temporary file in the same directory, are fsynced, then atomically renamed: a
crash mid-write leaves the previous checkpoint untouched (the partial temporary file is removed by the
next run that takes the directory's lock).

The run-directory lock is an ``flock`` on ``RUN_DIR/.lock``: the kernel drops it when its holder exits in
any way (``kill -9`` included), so a lock is never stale and a reused pid cannot keep a directory locked.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "write_json_atomic", "append_jsonl",
           "read_jsonl", "write_jsonl_atomic", "RunLock", "atomic_write_bytes", "list_checkpoints", "latest_checkpoint",
           "state_mismatch", "remove_partial_files"]

FORMAT = "salunet-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, not ours, or for another model."""


# ---- atomic files -----------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once (at import time)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file; mkstemp's own 0600 is only for the temp name


def atomic_write_bytes(path: Path, data: bytes, midway: Callable[[], None] | None = None) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same directory and an atomic rename.

    Whatever stops the write (an error, a full disk, a signal turned into an exception) removes the temporary
    file and leaves ``path`` as it was. ``midway`` (the fault-injection hook) runs with half the bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            if midway is not None:
                f.write(data[:len(data) // 2])
                f.flush()
                midway()
                f.write(data[len(data) // 2:])
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from None
        raise


def remove_partial_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process never finished (``.<name>.*.tmp`` in the
    run directory and its ``checkpoints/``). Call only while holding the run's :class:`RunLock`."""
    run_dir = Path(run_dir)
    found = [p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """A whole JSON-lines file at once (replacing any old one atomically)."""
    atomic_write_bytes(Path(path), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file. The one tolerance rule of this project: a last line cut short (a crash in
    the middle of an append) is dropped; a damaged line anywhere else is an error naming the file and line."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; repair or delete that line") from None
    return rows


# ---- nested state <-> flat tensors + JSON skeleton -------------------------------------------------------

def _flatten(obj, prefix: str, out: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().cpu().contiguous()
        return {"__t": prefix}
    if isinstance(obj, dict):
        return {"__d": [[_key(k), _flatten(v, f"{prefix}/{k}", out)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__l": [_flatten(v, f"{prefix}/{i}", out) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _key(k):
    if isinstance(k, (bool, int, float, str)) or k is None:
        return [type(k).__name__, k]
    raise TypeError(f"unsupported state-dict key type {type(k).__name__}")


_KEY_TYPES = {"int": int, "str": str, "float": float, "bool": bool, "NoneType": lambda v: None}


def _unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__t" in obj:
            return tensors[obj["__t"]]
        if "__d" in obj:
            return {_KEY_TYPES[t](v): _unflatten(x, tensors) for (t, v), x in obj["__d"]}
        if "__l" in obj:
            items = [_unflatten(x, tensors) for x in obj["__l"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict, meta: dict) -> None:
    """Write ``state`` (nested dicts/lists of tensors and plain values) and ``meta`` (JSON) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    metadata = {"format": FORMAT, "meta": json.dumps(meta), "skeleton": json.dumps(skeleton),
                "sha256": _digest(tensors)}
    from . import faults

    epoch = meta.get("epoch") if isinstance(meta, dict) else None
    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata),
                       midway=lambda: faults.hit("checkpoint", epoch))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return (state, meta). Raises FileNotFoundError or :class:`CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; pass a checkpoint file (RUN_DIR/checkpoints/"
                                "epoch_NNNN.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; pass an existing file (RUN_DIR/checkpoints/"
                                "epoch_NNNN.safetensors)")
    data = path.read_bytes()  # read once: the header, the tensors and the checksum all come from these bytes
    try:  # parsing safetensors runs no code, whatever the bytes are
        metadata = _header_metadata(data)
        tensors = st_load(data)
    except (SafetensorError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8 in the header
        # only now look for a pickle's or a zip's signature, for a better message: a valid safetensors file may
        # start with the same bytes (its first 8 are the header length), so this cannot be tested first
        if (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{path}: this is a pickle/torch.save file, refused unread: unpickling can run "
                                  "code; pass a .safetensors checkpoint written by salunet train") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(exc).splitlines()[0][:120]}); "
                              "use an earlier checkpoint in the same directory") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a salunet checkpoint (format {metadata.get('format')!r}); pass a "
                              "checkpoints/epoch_NNNN.safetensors file written by salunet train")
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; use an earlier checkpoint in "
                              "the same directory")
    try:
        state = _unflatten(json.loads(metadata["skeleton"]), tensors)
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError, TypeError, RecursionError) as exc:  # the header is not under the checksum
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({type(exc).__name__}: {exc}); use an "
                              "earlier checkpoint in the same directory") from None
    if map_location != "cpu":
        state = _to(state, torch.device(map_location))
    return state, meta


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file held in memory (8-byte little-endian header length, then a
    JSON header), so that the file is not opened a second time."""
    if len(data) < 8:
        raise ValueError(f"file of {len(data)} bytes is shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds the file size")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("header is not a JSON object with __metadata__")
    return meta


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Epoch checkpoints of a run, oldest first (:meth:`RunDir.checkpoints`)."""
    from .rundir import RunDir  # rundir.py builds on this module's writers

    return RunDir(run_dir).checkpoints()


def latest_checkpoint(run_dir: Path, skipped: list[str] | None = None) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that loads and verifies. Corrupt newer ones are skipped: their messages are
    appended to ``skipped`` if given, else issued as warnings."""
    import warnings

    for p in reversed(list_checkpoints(run_dir)):
        try:
            state, meta = load_checkpoint(p)
            return p, state, meta
        except CheckpointError as exc:
            if skipped is not None:
                skipped.append(str(exc))
            else:
                warnings.warn(f"skipping {exc}", RuntimeWarning, stacklevel=2)
    return None


def state_mismatch(expected: dict, got) -> str | None:
    """Why the state dict ``got`` cannot be loaded into a module whose state dict is ``expected`` (missing or
    unexpected tensors, other shapes), or None if it fits. One line, for error messages."""
    if not isinstance(got, dict):
        return f"the weights are a {type(got).__name__}, not a dict of tensors"
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and not (isinstance(got[k], torch.Tensor)
                                                      and got[k].shape == expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
    if wrong:
        k = wrong[0]
        have = tuple(got[k].shape) if isinstance(got[k], torch.Tensor) else type(got[k]).__name__
        parts.append(f"{len(wrong)} of another shape, e.g. {k!r} {have} instead of {tuple(expected[k].shape)}")
    return "; ".join(parts) or None


# ---- run-directory lock -----------------------------------------------------------------------------------

class RunLock:
    """Exclusive lock on a run directory: ``flock`` on ``RUN_DIR/.lock``, which holds the owner's pid for
    messages. The kernel releases it when the owner dies, however it dies; a live owner makes a second run
    refuse with a message naming it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise ValueError(_in_use(self.path.parent, pid)) from None
            try:  # the owner we raced with may have unlinked the file before we locked it: retry on the new one
                st, cur = os.fstat(fd), os.stat(self.path)
                same = (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd
            return

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked (see acquire), then drop the lock
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(run_dir: Path) -> int | None:
        """The pid holding ``run_dir``'s lock (0 if it cannot be read), or None if nobody holds it."""
        try:
            fd = os.open(Path(run_dir) / ".lock", os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        finally:
            os.close(fd)  # also drops the shared lock just taken, if it was
        return None

    @staticmethod
    def refuse_if_held(run_dir: Path) -> None:
        """Raise the "in use" error if a live process holds ``run_dir`` (a check before any work; the lock
        itself is taken by :meth:`acquire`)."""
        pid = RunLock.holder(run_dir)
        if pid is not None:
            raise ValueError(_in_use(Path(run_dir), pid))

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


def _in_use(run_dir: Path, pid: int) -> str:
    who = f"process {pid}" if pid else "another process"
    return f"{run_dir}: run directory is in use by {who} (a run is writing there); wait for it or choose another --name"
