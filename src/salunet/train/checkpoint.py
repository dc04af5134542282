"""The one owner of salunet's on-disk formats: checkpoints, JSON and JSON-lines files, run-directory locks.

Checkpoint = one ``.safetensors`` file. Tensors (model, EMA, optimizer state, RNG states) are stored as
safetensors; everything else (config, epoch, step, the structure of nested state dicts) is JSON in the
safetensors header metadata, together with a SHA-256 of the tensor payload. Loading never executes code
(no pickle), and a truncated or corrupted file is detected (header parse or checksum) and reported with
its path. Writes go to a temporary file in the same directory, are fsynced, then atomically renamed: a
crash mid-write leaves the previous checkpoint untouched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "write_json_atomic", "append_jsonl",
           "read_jsonl", "RunLock", "atomic_write_bytes", "list_checkpoints", "latest_checkpoint"]

FORMAT = "salunet-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, not ours, or for another model."""


# ---- atomic files -----------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once (at import time)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file; mkstemp's own 0600 is only for the temp name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise OSError(exc.errno, f"no space left on device while writing {path}; free space and "
                                     "resume, the previous checkpoint is intact") from None
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
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
    atomic_write_bytes(Path(path), st_save(tensors, metadata=metadata))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return (state, meta). Raises FileNotFoundError or :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    data = path.read_bytes()  # read once: the header, the tensors and the checksum all come from these bytes
    if data[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK":
        raise CheckpointError(f"{path}: this is a pickle/torch.save file; salunet never unpickles (it could "
                              "run code); checkpoints are .safetensors written by salunet")
    try:
        metadata = _header_metadata(data)
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8 in the header
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({str(exc).splitlines()[0][:120]}); "
                              "use an earlier checkpoint in the same directory") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a salunet checkpoint (format {metadata.get('format')!r})")
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt; use an earlier checkpoint in "
                              "the same directory")
    try:
        state = _unflatten(json.loads(metadata["skeleton"]), tensors)
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError, TypeError) as exc:  # the header is not covered by the tensor checksum
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
    """Epoch checkpoints of a run, oldest first."""
    d = Path(run_dir) / "checkpoints"
    return sorted(d.glob("epoch_*.safetensors")) if d.is_dir() else []


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that loads and verifies; corrupt newer ones are skipped (and reported)."""
    import warnings

    for p in reversed(list_checkpoints(run_dir)):
        try:
            state, meta = load_checkpoint(p)
            return p, state, meta
        except CheckpointError as exc:
            warnings.warn(f"skipping {exc}", RuntimeWarning, stacklevel=2)
    return None


# ---- run-directory lock -----------------------------------------------------------------------------------

class RunLock:
    """Exclusive lock on a run directory (``.lock`` holding the owner's pid). A lock left by a process that
    no longer exists (killed with -9) is taken over; a live owner makes the second run refuse."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise ValueError(f"{self.path.parent}: run directory is in use by process {pid}; wait for it "
                                     "or choose another --name") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return
        raise ValueError(f"{self.path}: could not take the run-directory lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
