"""The one owner of salunet's on-disk formats: checkpoints, JSON and JSON-lines files, run-directory locks.
(Which file of a run directory is which: :mod:`.rundir`, the only place that names them.)

Checkpoint = one ``.safetensors`` file. Tensors (model, EMA, optimizer state, RNG states) are stored as
safetensors; everything else (config, epoch, step, the structure of nested state dicts) is JSON in the
safetensors header metadata. Format 2 (``salunet-checkpoint/2``) stores in that metadata a SHA-256 of the
*whole file*: every byte (length prefix, JSON header with dtypes, shapes and offsets, metadata, tensors) with
the checksum's own 64 hex digits read as ``0``. It is verified before anything in the file is parsed or
used, so no flipped bit anywhere can change what a checkpoint says (a configuration, an epoch, a mean) and
still load. Format 1 files (salunet before 2026-11-28: a checksum of the tensors only) still load, with a
warning that their header is unprotected. Loading never executes code (no pickle), and a truncated or
corrupted file is reported with its path. Writes go to a temporary file in the same directory, are fsynced, then atomically renamed: a
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
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "write_json_atomic", "append_jsonl",
           "append_jsonl_rows", "read_jsonl", "write_jsonl_atomic", "RunLock", "atomic_write_bytes", "list_checkpoints",
           "latest_checkpoint", "state_mismatch", "remove_partial_files", "checkpoint_from_bytes", "seal",
           "WEIGHTS_FORMAT", "save_weights", "weights_from_bytes", "weights_config_path", "safetensors_format"]

FORMAT = "salunet-checkpoint/2"
FORMAT_V1 = "salunet-checkpoint/1"  # tensors-only checksum: loaded with a warning
_SUM_KEY = b'"sha256":"'  # in the header JSON; inside the JSON-encoded meta strings a quote is escaped as \"
_SUM_LEN = 64
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


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


def refuse_to_overwrite_inputs(out: Path, inputs: dict[str, Path | str | None], flag: str = "--out") -> None:
    """Refuse an output path that is one of the command's inputs (``{"the checkpoint": path, ...}``), the same file
    under another name (a hard or symbolic link) included, or a directory: writing it would destroy the input."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"{out}: {flag} is a directory; pass a file name (e.g. {out / 'result.json'})")
    for what, p in inputs.items():
        if p is None:
            continue
        p = Path(p).expanduser()
        same = out.resolve() == p.resolve()
        if not same and out.exists() and p.exists():
            same = os.path.samefile(out, p)
        if same:
            raise ValueError(f"{out}: {flag} is {what}, which writing the result would destroy; pass another "
                             f"{flag} file")


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
    fd = _open_no_follow(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (a run directory received from someone else could
    point its files anywhere the user can write). Files replaced by :func:`atomic_write_bytes` need no such
    care: a rename replaces a link itself, never its target."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, FILE_MODE)  # (O_NONBLOCK: a FIFO never hangs us)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path}: is a symbolic link, refused (writing through it would change "
                             f"{os.path.realpath(path)}); remove the link") from None
        if exc.errno == errno.ENXIO:
            raise ValueError(f"{path}: is not a regular file (a FIFO?); remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: is not a regular file; remove it")
    return fd


def append_jsonl_rows(path: Path, rows: list[dict]) -> None:
    """Several JSON lines in one write and one fsync (per-step logs, written in batches)."""
    if rows:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
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
                "sha256": "0" * _SUM_LEN}
    from . import faults

    epoch = meta.get("epoch") if isinstance(meta, dict) else None
    atomic_write_bytes(Path(path), seal(st_save(tensors, metadata=metadata)),
                       midway=lambda: faults.hit("checkpoint", epoch))


def seal(data: bytes) -> bytes:
    """Fill in the whole-file checksum of safetensors bytes whose metadata holds ``"sha256": "000...0"``."""
    at = _checksum_offset(data)
    if at is None or data[at:at + _SUM_LEN] != b"0" * _SUM_LEN:
        raise ValueError("no checksum placeholder in the safetensors header")
    return data[:at] + hashlib.sha256(data).hexdigest().encode() + data[at + _SUM_LEN:]


def _header_bytes(data) -> bytes | None:
    """The JSON header of safetensors bytes (its length from the first 8 bytes), None if it cannot be there."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        return None
    return bytes(data[8:8 + n])


def _checksum_offset(data) -> int | None:
    """Where the 64 hex digits of the checksum start in ``data``, found without parsing anything: after the one
    ``"sha256":"`` inside the header. None if the header is not there."""
    return _checksum_offset_in(_header_bytes(data))


def _checksum_offset_in(header: bytes | None) -> int | None:
    """:func:`_checksum_offset` for a header already sliced by :func:`_header_bytes`."""
    if header is None:
        return None
    at = header.find(_SUM_KEY)
    if at < 0 or header.find(_SUM_KEY, at + 1) >= 0 or at + len(_SUM_KEY) + _SUM_LEN > len(header):
        return None
    return 8 + at + len(_SUM_KEY)


def _whole_file_digest(data, at: int) -> str:
    h = hashlib.sha256()
    mv = memoryview(data)
    h.update(mv[:at])
    h.update(b"0" * _SUM_LEN)
    h.update(mv[at + _SUM_LEN:])
    return h.hexdigest()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Return (state, meta). Raises FileNotFoundError or :class:`CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; pass a checkpoint file (RUN_DIR/checkpoints/"
                                "epoch_NNNN.safetensors)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; pass an existing file (RUN_DIR/checkpoints/"
                                "epoch_NNNN.safetensors)")
    _refuse_if_larger_than_memory(path)
    # read once: the checksum, the header and the tensors all come from these bytes
    state, meta = checkpoint_from_bytes(path.read_bytes(), str(path))
    if map_location != "cpu":
        state = _to(state, torch.device(map_location))
    return state, meta


def checkpoint_from_bytes(data: bytes, name: str = "checkpoint") -> tuple[dict, dict]:
    """(state, meta) of a checkpoint held in memory (``name`` is used in messages): the whole-file checksum is
    verified before any part of the file is parsed."""
    header = _header_bytes(data)
    at = _checksum_offset_in(header)
    header = header if at is not None else b""
    # a format-1 file is checked by its tensor checksum below (no single flipped bit turns "2" into "1")
    fmt_v1 = f'"format":"{FORMAT_V1}"'.encode() in header
    if at is None or (not fmt_v1 and _whole_file_digest(data, at).encode() != bytes(data[at:at + _SUM_LEN])):
        # only now look for a pickle's or a zip's signature, for a better message: a valid safetensors file may
        # start with the same bytes (its first 8 are the header length), so this cannot be tested first
        if (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or data[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{name}: this is a pickle/torch.save file, refused unread: unpickling can run "
                                  "code; pass a .safetensors checkpoint written by salunet train")
        if at is None and _looks_like_foreign_safetensors(data):
            raise CheckpointError(f"{name}: not a salunet checkpoint (format None); pass a "
                                  "checkpoints/epoch_NNNN.safetensors file written by salunet train")
        why = "" if at is not None else " or truncated (no checksum found in its header)"
        raise CheckpointError(f"{name}: checksum mismatch, the file is corrupt{why}; use an earlier checkpoint in "
                              "the same directory")
    try:  # parsing safetensors runs no code, whatever the bytes are
        metadata = _header_metadata(data)
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RecursionError) as exc:  # only a format-1 file gets here with bad bytes
        raise CheckpointError(f"{name}: corrupt or truncated checkpoint ({str(exc).splitlines()[0][:120]}); "
                              "use an earlier checkpoint in the same directory") from None
    if metadata.get("format") not in (FORMAT, FORMAT_V1):
        raise CheckpointError(f"{name}: not a salunet checkpoint (format {metadata.get('format')!r}); pass a "
                              "checkpoints/epoch_NNNN.safetensors file written by salunet train")
    if metadata["format"] == FORMAT_V1:
        if _digest(tensors) != metadata.get("sha256"):
            raise CheckpointError(f"{name}: checksum mismatch, the file is corrupt; use an earlier checkpoint in "
                                  "the same directory")
        import warnings

        warnings.warn(f"{name}: format 1 checkpoint (salunet before 2026-11-28): its checksum covers the tensors "
                      "but not the header (config, epoch, mean/std); it loads, and checkpoints written from now on "
                      "cover the whole file", RuntimeWarning, stacklevel=3)
    try:
        state = _unflatten(json.loads(metadata["skeleton"]), tensors)
        meta = json.loads(metadata["meta"])
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{name}: corrupt checkpoint metadata ({type(exc).__name__}: {exc}); use an "
                              "earlier checkpoint in the same directory") from None
    return state, meta


def _looks_like_foreign_safetensors(data) -> bool:
    """A well-formed safetensors file that does not claim to be salunet's (someone else's weights): worth its own
    message. One of ours whose checksum key was damaged still names its format, and is reported as corrupt."""
    try:
        return "salunet" not in str(_header_metadata(data).get("format"))
    except (ValueError, RecursionError):
        return False


def _refuse_if_larger_than_memory(path: Path) -> None:
    """Refuse, before reading, a file that cannot fit in memory (a huge or sparse file passed as a checkpoint)."""
    size = path.stat().st_size
    avail = _available_memory()
    if avail is not None and size > avail:
        raise CheckpointError(f"{path}: {size / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB of memory "
                              "available; not a checkpoint of this machine's runs, or free memory first")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file held in memory (8-byte little-endian header length, then a
    JSON header), so that the file is not opened a second time."""
    if len(data) < 8:
        raise ValueError(f"file of {len(data)} bytes is shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds the file size")
    header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
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


# ---- exported weights: a plain state dict + the config that rebuilds the model ------------------------------

WEIGHTS_FORMAT = "salunet-weights/1"


def weights_config_path(path: Path) -> Path:
    """The JSON file written beside an exported weights file (``model.safetensors`` -> ``model.json``)."""
    return Path(path).with_suffix(".json")


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``state_dict`` as a plain safetensors file (keys are the module's own, so any safetensors reader
    and ``model.load_state_dict`` take it as it is) with ``config`` (JSON) in its header and, the same, in
    :func:`weights_config_path`; the header also holds a whole-file checksum, as checkpoints do. Returns the
    JSON file's path."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    metadata = {"format": WEIGHTS_FORMAT, "config": json.dumps(config), "sha256": "0" * _SUM_LEN}
    atomic_write_bytes(Path(path), seal(st_save(tensors, metadata=metadata)))
    side = weights_config_path(path)
    write_json_atomic(side, config)
    return side


def safetensors_format(data: bytes) -> str | None:
    """The ``format`` a salunet file declares in its safetensors header (checkpoint or exported weights),
    None for anything else (not safetensors, someone else's weights)."""
    try:
        fmt = _header_metadata(data).get("format")
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None
    return fmt if isinstance(fmt, str) else None


def weights_from_bytes(data: bytes, name: str = "weights") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config) of an exported weights file held in memory, its checksum verified first."""
    at = _checksum_offset(data)
    if at is None or _whole_file_digest(data, at).encode() != bytes(data[at:at + _SUM_LEN]):
        raise CheckpointError(f"{name}: checksum mismatch, the weights file is corrupt or truncated; export it "
                              "again (salunet export-weights)")
    metadata = _header_metadata(data)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{name}: not a salunet weights file (format {metadata.get('format')!r}); pass a "
                              "file written by salunet export-weights")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{name}: corrupt weights metadata ({type(exc).__name__}: {exc}); export it "
                              "again (salunet export-weights)") from None
    return st_load(bytes(data)), config


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
            fd = _open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
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
            fd = os.open(Path(run_dir) / ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
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
