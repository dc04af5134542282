"""CIFAR-10 / CIFAR-100: the official python format (``.tar.gz`` or its extracted folder), an ``.npz`` with
``x_train, y_train, x_test, y_test`` (uint8 NHWC, the layout of ``shared/data/cifar10.npz``), and download
of the official archive with its published checksum.

Safety: the official format is a Python pickle. It is read with a restricted unpickler that can build only
dicts, lists, strings, bytes and numpy arrays: a crafted file cannot run code. Archives are extracted only
after their checksum matches, member by member, refusing absolute paths, ``..``, links and devices.
Downloads go to a temporary file that is renamed into place once verified (atomic: a failed download
never leaves a half file under the final name).
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CIFAR", "ImageArrays", "load_cifar", "download_cifar", "validate_arrays", "safe_extract",
           "read_npz"]


def _file_mode() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once (at import time)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


MAX_BATCH_BYTES = 256 * 2**20  # the largest official batch file (CIFAR-100 train) is ~155 MB


@dataclass(frozen=True)
class CifarSpec:
    url: str
    md5: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR = {  # published URLs and MD5 sums (Krizhevsky's page)
    "cifar10": CifarSpec("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                         "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                         tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10),
    "cifar100": CifarSpec("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz", "cifar-100-python",
                          ("train",), ("test",), b"fine_labels", 100),
}


@dataclass
class ImageArrays:
    """A classification data set held in memory: uint8 NHWC images and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str


def validate_arrays(d: ImageArrays, where: str) -> ImageArrays:
    """Reject wrong shapes, dtypes and labels with a message naming ``where`` and the problem."""
    for split in ("train", "test"):
        x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
        if x.dtype != np.uint8:
            bad = int(np.size(x) - np.isfinite(x).sum()) if np.issubdtype(x.dtype, np.inexact) else 0
            if bad:
                raise ValueError(f"{where}: x_{split} has {bad} NaN/inf pixel value(s) (dtype {x.dtype}); the "
                                 "images must be uint8 0-255: fix or drop those images and save them as uint8")
            raise ValueError(f"{where}: x_{split} has dtype {x.dtype}, expected uint8 images (0-255); save them as "
                             "uint8 (e.g. np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1])")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"{where}: x_{split} has shape {x.shape}, expected (N, H, W, C) with C = 1 or 3")
        if x.shape[1] != x.shape[2]:
            raise ValueError(f"{where}: x_{split} holds {x.shape[1]} x {x.shape[2]} images; the models take square "
                             "images: crop or pad them to H = W")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{where}: y_{split} has shape {y.shape}, expected ({len(x)},) labels")
        if y.dtype.kind not in "iu":  # (numpy files timedelta64 under the integers)
            raise ValueError(f"{where}: y_{split} has dtype {y.dtype}, expected integer labels")
        if len(x) == 0:
            raise ValueError(f"{where}: x_{split} is empty; it needs at least one image")
        if y.min() < 0:
            raise ValueError(f"{where}: y_{split} has negative labels (min {y.min()}); labels must be class indices "
                             f"0..{d.num_classes - 1}")
        if y.max() >= d.num_classes:
            raise ValueError(f"{where}: y_{split} has labels in [{y.min()}, {y.max()}], "
                             f"expected 0..{d.num_classes - 1}")
    if d.x_train.shape[1:] != d.x_test.shape[1:]:
        raise ValueError(f"{where}: train images {d.x_train.shape[1:]} and test images {d.x_test.shape[1:]} differ; "
                         "save both splits at one size")
    return d


def read_npz(path: str | Path, num_classes: int | None = None) -> ImageArrays:
    path = Path(path)
    with open(path, "rb") as f:  # np.load would try anything that is not a zip as a pickle (and refuse it)
        if f.read(4) != b"PK\x03\x04":
            raise ValueError(f"{path}: not a readable .npz archive (not a zip file); pass an .npz saved by np.savez "
                             "with uint8 x_train, x_test and integer y_train, y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise ValueError(f"{path}: missing array(s) {', '.join(missing)}; an .npz needs x_train, "
                                 "y_train, x_test, y_test")
            arrs = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            declared = f["num_classes"] if "num_classes" in f.files else None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(str(path)):
            raise
        if isinstance(exc, (PermissionError, IsADirectoryError)):  # the file system's answer, not the format's
            raise
        if "pickle" in str(exc) or "Object arrays" in str(exc):
            raise ValueError(f"{path}: holds object arrays (pickled Python objects), which salunet never loads: "
                             "unpickling can run code; save plain uint8 / integer arrays") from None
        raise ValueError(f"{path}: not a readable .npz archive ({str(exc).splitlines()[0][:120]}); pass an .npz "
                         "saved by np.savez with uint8 x_train, x_test and integer y_train, y_test") from None
    if num_classes is None:
        num_classes = _npz_num_classes(path, arrs, declared)
    n = num_classes
    return validate_arrays(ImageArrays(**arrs, num_classes=n, source=str(path)), str(path))


def _npz_num_classes(path: Path, arrs: dict, declared) -> int:
    """The class count of an .npz: its ``num_classes`` array when it has one (labels are then checked against
    it), else max label + 1, provided that at least half of the classes up to it have an image: one stray label
    100000 must not make a 100,001-way model (nor a label 1e9 a 4 GB classifier)."""
    if declared is not None:
        if declared.shape != () or not np.issubdtype(declared.dtype, np.integer) or int(declared) < 1:
            raise ValueError(f"{path}: num_classes must be one positive integer, got {declared!r}; save it as "
                             "np.savez(..., num_classes=K)")
        return int(declared)
    ys = [a for a in (arrs["y_train"], arrs["y_test"]) if a.size]
    if not ys or any(a.ndim != 1 or a.dtype.kind not in "iu" for a in ys):
        return 1  # malformed labels: validate_arrays reports them
    lo = min(int(a.min()) for a in ys)
    top = max(int(a.max()) for a in ys)
    if lo < 0:
        return top + 1 if top >= 0 else 1  # validate_arrays names the negative labels
    present = np.unique(np.concatenate([a.astype(np.int64) for a in ys])).size
    if present * 2 < top + 1:  # most classes without a single image: a stray label, not a class count
        raise ValueError(f"{path}: labels span 0..{top} ({top + 1} classes) but only {present} distinct values occur; "
                         "relabel the classes as 0..K-1, or store the class count: np.savez(..., num_classes=K)")
    return top + 1


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python format: numpy arrays and builtin containers only."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def __init__(self, file, *, size: int, **kw) -> None:
        super().__init__(file, **kw)
        self._size = size  # bytes of the pickle: no array it describes can hold more

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR format")
        found = super().find_class(module, name)
        if name != "_reconstruct":
            return found

        def reconstruct(cls, shape, dtype):  # numpy allocates `shape` before any data is read: bound it first
            n = int(np.prod(shape, dtype=np.float64)) if isinstance(shape, tuple) else -1
            if n < 0 or n > self._size:
                raise pickle.UnpicklingError(f"an array of shape {shape} in {self._size} bytes of pickle")
            return found(cls, shape, dtype)
        return reconstruct


def _read_batch(data: bytes, where: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _SafeUnpickler(io.BytesIO(data), size=len(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad file
        raise ValueError(f"{where}: not a CIFAR python batch ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); "
                         "replace it with the official file (or use --download)") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise ValueError(f"{where}: not a CIFAR python batch (keys b'data' and {label_key!r} expected)")
    x = np.asarray(d[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{where}: b'data' has shape {x.shape} and dtype {x.dtype}, expected (N, 3072) uint8")
    try:
        y = np.asarray(d[label_key])
    except (ValueError, TypeError, OverflowError):
        y = np.asarray([])
    if y.ndim != 1 or len(y) != len(x) or not (y.dtype.kind in "iu" or y.size == 0):
        raise ValueError(f"{where}: {len(x)} images but labels of shape {y.shape} ({y.dtype}); each batch file needs "
                         "one integer label per image: replace it with the official file")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{where}: labels in [{y.min()}, {y.max()}], expected 0..{num_classes - 1}; replace it with "
                         "the official file")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), y.astype(np.int64)


def _load_official(root: Path, spec: CifarSpec, name: str) -> ImageArrays:
    """From the extracted folder (``root/<folder>`` or ``root`` itself) or the ``.tar.gz``."""
    def read_all(get):
        xs, ys = {}, {}
        for split, files in (("train", spec.train_files), ("test", spec.test_files)):
            parts = [_read_batch(*get(f), spec.label_key, spec.num_classes) for f in files]
            xs[split] = np.concatenate([p[0] for p in parts])
            ys[split] = np.concatenate([p[1] for p in parts])
        return ImageArrays(xs["train"], ys["train"], xs["test"], ys["test"], spec.num_classes, str(root))

    if root.is_file():
        try:
            tf = tarfile.open(root, "r:*")
        except PermissionError:
            raise
        except (tarfile.TarError, OSError) as exc:
            raise ValueError(f"{root}: not a readable {name} archive ({str(exc).splitlines()[0][:120]}); pass the "
                             f"official {spec.archive}, its extracted '{spec.folder}' folder, or an .npz") from None
        with tf:
            def get(f):
                try:
                    member = tf.getmember(f"{spec.folder}/{f}")
                except KeyError:
                    raise ValueError(f"{root}: archive has no {spec.folder}/{f}; is it the official {name} "
                                     "python archive?") from None
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise ValueError(f"{root}: corrupt or truncated archive ({exc}); download it again") from None
                if member.size > MAX_BATCH_BYTES:
                    raise ValueError(f"{root}: member {member.name} claims {member.size:,} bytes, more than any "
                                     f"{name} batch file ({MAX_BATCH_BYTES:,}); not the official archive")
                try:
                    return tf.extractfile(member).read(), f"{root}:{member.name}"
                except (tarfile.TarError, OSError, EOFError, AttributeError) as exc:
                    raise ValueError(f"{root}: corrupt archive member {f} ({exc}); download it again") from None
            return validate_arrays(read_all(get), str(root))
    folder = root / spec.folder if (root / spec.folder).is_dir() else root

    def get(f):
        p = folder / f
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing {name} batch file; point --data-path at the extracted "
                                    f"'{spec.folder}' folder, the .tar.gz, or use --download")
        if p.stat().st_size > MAX_BATCH_BYTES:
            raise ValueError(f"{p}: {p.stat().st_size:,} bytes, more than any {name} batch file ({MAX_BATCH_BYTES:,}); "
                             "replace it with the official file")
        return p.read_bytes(), str(p)
    return validate_arrays(read_all(get), str(folder))


def load_cifar(name: str, path: str | Path) -> ImageArrays:
    """Load CIFAR ``name`` ("cifar10" | "cifar100") from an .npz, the official archive or its folder (or a
    directory containing one of those)."""
    if name not in CIFAR:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(CIFAR)}")
    spec = CIFAR[name]
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory; pass the .npz, the official archive or its "
                                "folder, or add --download")
    if p.is_file() and p.suffix == ".npz":
        d = _check_num_classes(read_npz(p, spec.num_classes), name, str(p))
        if d.x_train.shape[1:] != (32, 32, 3):
            raise ValueError(f"{p}: images of shape {d.x_train.shape[1:]} (H, W, C), but {name} images are 32 x 32 x 3; "
                             "use --data npz for other image sets")
        return d
    if p.is_dir():
        for candidate in (p / f"{name}.npz", p / spec.archive):
            if candidate.is_file() and not (p / spec.folder).is_dir():
                return load_cifar(name, candidate)
    d = _load_official(p, spec, name)
    return _check_num_classes(d, name, d.source)


def _check_num_classes(d: ImageArrays, name: str, where: str) -> ImageArrays:
    """The labels must use the data set's classes: CIFAR-10 labels (0..9) are all valid CIFAR-100 labels,
    so without this check cifar10.npz passed as cifar100 would train a 100-way model on 10 classes."""
    top = int(max(d.y_train.max(), d.y_test.max()))
    if top + 1 != CIFAR[name].num_classes:
        other = [k for k, v in CIFAR.items() if v.num_classes == top + 1]
        hint = f"is this {other[0]}? use --data {other[0]}" if other else "use --data npz for another label set"
        raise ValueError(f"{where}: labels span 0..{top} ({top + 1} classes), but {name} has "
                         f"{CIFAR[name].num_classes}; {hint}")
    return d


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, refusing members that would land outside it, links and devices."""
    dest = dest.resolve()
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if m.name.startswith(("/", "\\")) or ".." in Path(m.name).parts or \
                    (target != dest and dest not in target.parents):
                raise ValueError(f"{archive}: refusing member {m.name!r}: it would be written outside {dest}")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing member {m.name!r}: links and special files are not allowed")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(dest, members=members, **kw)


MAX_DOWNLOAD_BYTES = 512 * 2**20  # the official archives are 163-170 MB


def download_cifar(name: str, root: str | Path, *, url: str | None = None, md5: str | None = None,
                   progress: bool = True, timeout: float = 60.0, deadline: float = 3600.0,
                   max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
    """Download the official archive into ``root`` (verified, atomic), extract it safely, return the folder.
    ``url``/``md5`` default to the published ones (tests point them at a local server). ``timeout`` bounds each
    network wait, ``deadline`` the whole download (seconds); a body larger than ``max_bytes`` is abandoned as
    soon as it passes that size, before its checksum is computed."""
    spec = CIFAR[name]
    url, md5 = url or spec.url, md5 or spec.md5
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    archive = root / spec.archive
    if not (archive.is_file() and _md5(archive) == md5):
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".part")
        try:
            os.fchmod(fd, _FILE_MODE)  # the archive is renamed into place: give it a normal file's mode
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0)
                if total > max_bytes:
                    raise ValueError(f"{url}: the server announces {total:,} bytes, more than the {max_bytes:,} of "
                                     f"any {name} archive; not the official archive, nothing was kept")
                bar = _bar(total, f"download {spec.archive}") if progress else None
                start, got_bytes = time.monotonic(), 0
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    got_bytes += len(chunk)
                    if got_bytes > max_bytes:
                        raise ValueError(f"{url}: the download passed {max_bytes:,} bytes, more than any {name} "
                                         "archive; not the official archive, nothing was kept")
                    if time.monotonic() - start > deadline:
                        raise ValueError(f"{url}: the download took more than {deadline:.0f} s; nothing was kept; "
                                         f"try again, or download it by hand into {root}")
                    out.write(chunk)
                    if bar:
                        bar.update(len(chunk))
                if bar:
                    bar.close()
            got = _md5(Path(tmp))
            if got != md5:
                raise ValueError(f"{url}: checksum mismatch (md5 {got}, expected {md5}); the download is "
                                 "corrupt or not the official archive, nothing was kept")
            os.replace(tmp, archive)
        except OSError as exc:
            raise ValueError(f"{url}: download failed ({exc}); check the network or download it by hand "
                             f"into {root}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        safe_extract(archive, staging)
        if not (staging / spec.folder).is_dir():
            raise ValueError(f"{archive}: archive has no '{spec.folder}' folder; not the official {name} archive")
        os.replace(staging / spec.folder, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, leave=False)
