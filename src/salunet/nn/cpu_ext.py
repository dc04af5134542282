"""Build (once per torch install) and load the fused C++ CPU kernels of ``csrc/`` (salu_cpu.cpp and salu_bind.cpp).

Sources (``SOURCES``): ``salu_cpu.cpp`` holds the kernels and needs only ATen's headers; ``salu_bind.cpp`` holds the
pybind11 module and the C++ autograd node, with only the autograd API and torch's pybind11 casters (not
``<torch/extension.h>``, the whole C++ frontend, whose parsing was most of the old one-file build); ``salu_cpu.h``
is their interface. Two translation units let ninja compile them in parallel.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (about 25-30 s on 2 free cores) into a
folder of ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes import the cached
library directly (no ninja run, no lock) in well under a second. It is compiled for the vector ISA that this
PyTorch build reports for the running CPU (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or portable
code otherwise), exactly as ATen's own CPU kernels select ``at::vec::Vectorized``. Building needs a C++ compiler
and ninja (a dependency of the package). ``salunet doctor`` shows the state of all of this.

Cache key. The folder (and module) name is ``salunet_cpu_<isa>_torch<version>_<abi>_<python>_<digest>``, the digest
covering the sources, the compiler flags, torch's version and git revision, its C++ ABI, the Python ABI tag and the
folder torch is installed in. So a torch upgrade gets a new folder and rebuilds on its own (a library built against
another libtorch fails with "undefined symbol"), and two environments sharing one cache each keep their own build
instead of rebuilding on every switch. A folder's library counts as *current* when its marker file
(``salunet_build.json``, written after a successful build, holding the key) matches this process's key.

Locking. torch guards a build with a ``lock`` file that it deletes when done; a build killed part-way leaves it
behind and every later build of that folder waits for it forever. Here a build first takes an ``flock`` on
``salunet.lock`` in the folder, which the operating system releases when its holder dies, however it dies. Whoever
holds it is the only live builder of that folder, so a torch ``lock`` found then is stale: it is removed, with a
message, and the build proceeds. A second process that finds the ``flock`` taken says that it waits for the
holder's pid and waits (that holder is alive and building). Platforms without ``fcntl`` keep torch's own lock;
there a leftover one is named in a message.

Self-healing. A current build that fails to import (a file damaged on disk, a library of a foreign torch) is
rebuilt once, with a message; if the library still does not load, or the build fails, :func:`load` returns None
and :func:`load_error` says what failed and how to fix it (install a compiler, clear the named folder).

Messages (**[decided]**): the lines before and after a build, the wait for another builder and a stale lock taken
over go to the ``salunet.kernels`` logger. When no logging is configured anywhere (no handler on that logger or
above it) they are printed to stderr instead, because a 40-s build that says nothing looks like a hang; a program
that configures logging decides itself (so ``logging.getLogger("salunet.kernels").addHandler(logging.NullHandler())``
silences them, as does any logging setup whose level is above INFO). ``salunet`` (the CLI) configures no logging,
so it prints them. ``SALUNET_VERBOSE_BUILD=1`` shows the compiler's own output.

Why C++ rather than ``torch.compile``: the parameter gradients are reductions over every dimension but the
channel. Inductor splits such a backward into a pointwise loop that materialises three full-size intermediates
and a second, strided reduction loop that recomputes the math (about 2x the time of a single pass), and it
compiles once per input shape (seconds each, for every layer shape of a network). The C++ kernel does each
direction in one pass over memory for every shape.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: torch's own lock only
    fcntl = None

__all__ = ["load", "load_error", "capability", "build_key", "build_name", "cache_root", "build_folder", "status",
           "SOURCE", "SOURCES", "MARKER", "LOCK"]

log = logging.getLogger("salunet.kernels")

SOURCE = Path(__file__).with_name("csrc") / "salu_cpu.cpp"  # the kernels
SOURCES = (SOURCE, SOURCE.with_name("salu_bind.cpp"))  # compiled, in parallel
_HEADERS = (SOURCE.with_name("salu_cpu.h"),)
MARKER = "salunet_build.json"  # written into the build folder after a successful build: the key it was built for
LOCK = "salunet.lock"  # the flock that serialises builders of one folder
_TORCH_LOCK = "lock"  # torch.utils.cpp_extension's FileBaton file (deleted by its holder when done)
_BUILD_SECONDS = "~25-30 s on 2 free cores"

_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl",
               "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_module = None
_error: str | None = None


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says what failed and how to fix it."""


class _Unwritable(Exception):
    """The build folder could not be created, locked or cleared (raised from the OSError)."""


def capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - very old torch: portable code
        return "DEFAULT"


# ----------------------------------------------------------------------------------------------------------
# the cache key and where the build lives

def _sources_sha1() -> str:
    """One digest of every compiled file, each framed by its name and length (bytes moved between files count)."""
    h = hashlib.sha1()
    for p in (*SOURCES, *_HEADERS):
        data = p.read_bytes()
        h.update(f"{p.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def build_key() -> dict:
    """Everything the compiled library depends on (see the module docstring); equal keys share a build."""
    cap = capability()
    return {"isa": cap, "flags": [*_CFLAGS, *_ISA_FLAGS.get(cap, [])], "ldflags": _LDFLAGS,
            "source_sha1": _sources_sha1(),
            "torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", None) or "",
            "cxx11_abi": int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))),
            "python": sys.implementation.cache_tag, "torch_dir": str(Path(torch.__file__).resolve().parent)}


def build_name(key: dict | None = None) -> str:
    """The folder and module name of the build for ``key`` (default: this process's), a Python identifier that
    shows the ISA, torch version, C++ ABI and Python tag, e.g. ``salunet_cpu_avx2_torch2_13_0_cpu_cxx11abi_
    cpython311_1a2b3c4d5e``."""
    key = key or build_key()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    version = re.sub(r"[^0-9A-Za-z]+", "_", key["torch"]).strip("_")
    abi = "cxx11abi" if key["cxx11_abi"] else "oldabi"
    python = re.sub(r"[^0-9A-Za-z]+", "_", key["python"] or "py")
    return f"salunet_cpu_{key['isa'].lower()}_torch{version}_{abi}_{python}_{digest}"


def cache_root() -> Path:
    """``TORCH_EXTENSIONS_DIR`` if set, else torch's default (``~/.cache/torch_extensions``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils import cpp_extension

    return Path(cpp_extension.get_default_build_root())


def build_folder(key: dict | None = None) -> Path:
    return cache_root() / build_name(key)


def _library(folder: Path, name: str) -> Path:
    return folder / f"{name}{'.pyd' if os.name == 'nt' else '.so'}"


def _marker(folder: Path) -> dict:
    """The build folder's marker (empty if missing or unreadable)."""
    try:
        m = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def _is_current(folder: Path, name: str, key: dict) -> bool:
    return _library(folder, name).is_file() and _marker(folder).get("key") == key


def status() -> dict:
    """The state of the build for this process, without building anything (``salunet doctor`` prints it)."""
    key = build_key()
    name = build_name(key)
    folder = cache_root() / name
    marker = _marker(folder)
    return {"isa": key["isa"], "torch": key["torch"], "cxx11_abi": key["cxx11_abi"], "python": key["python"],
            "cache_root": str(cache_root()), "folder": str(folder), "name": name,
            "current": _is_current(folder, name, key), "built_at": marker.get("built_at"),
            "build_s": marker.get("build_s"), "stale_torch_lock": (folder / _TORCH_LOCK).exists(),
            "loaded": _module is not None, "error": _error}


# ----------------------------------------------------------------------------------------------------------
# messages

def _say(msg: str, level: int = logging.INFO) -> None:
    """Log ``msg``; with no logging configured at all, print it to stderr (see the module docstring)."""
    if log.hasHandlers():
        log.log(level, msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# ----------------------------------------------------------------------------------------------------------
# the build lock

class _BuildLock:
    """Exclusive right to build in ``folder``: an ``flock`` on ``folder/salunet.lock`` (released by the operating
    system when the holder exits or is killed). On entry, a torch ``lock`` file left in the folder is stale (its
    writer is dead, since no live builder holds the flock) and is removed with a message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self) -> "_BuildLock":
        try:
            return self._acquire()
        except OSError as exc:
            self.__exit__()
            raise _Unwritable() from exc

    def _acquire(self) -> "_BuildLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        torch_lock = self.folder / _TORCH_LOCK
        if fcntl is None:
            if torch_lock.exists():
                _say(f"salunet kernels: waiting for the build lock {torch_lock}; if no other process is building "
                     "the kernels, delete that file", logging.WARNING)
            return self
        self.fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            _say(f"salunet kernels: waiting for process {holder}, which is building the C++ kernels in {self.folder}")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        if torch_lock.exists():
            _say(f"salunet kernels: taking over the build lock {torch_lock}: the build that left it is gone "
                 "(killed part-way); removing it and building", logging.WARNING)
            torch_lock.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


# ----------------------------------------------------------------------------------------------------------
# loading and building

def _import_library(folder: Path, name: str):
    """Import the compiled module from ``folder`` (as torch's loader does, without its ninja run and lock)."""
    path = _library(folder, name)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, folder: Path, key: dict):
    """Compile and import the extension into ``folder`` (torch's JIT loader: ninja, incremental)."""
    from torch.utils import cpp_extension

    # copies: torch appends its own flags to the lists it is given, and ``key`` is written to the marker
    return cpp_extension.load(name=name, sources=[str(p) for p in SOURCES], extra_cflags=list(key["flags"]),
                              extra_ldflags=list(key["ldflags"]), build_directory=str(folder),
                              verbose=os.environ.get("SALUNET_VERBOSE_BUILD") == "1")


def _clear(folder: Path) -> None:
    """Remove a build's outputs (keeps the lock file, which the caller holds)."""
    import shutil

    for p in folder.iterdir():
        if p.name == LOCK:
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _write_marker(folder: Path, key: dict, seconds: float) -> None:
    tmp = folder / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"key": key, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "build_s": round(seconds, 1)}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MARKER)


def load_or_build(name: str, folder: Path, key: dict):
    """The extension module built for ``key`` in ``folder``: imported if current, else built (once, under the
    build lock) with a line before and after; raises :class:`BuildError` with the fix."""
    broken = None
    if _is_current(folder, name, key):
        try:
            return _import_library(folder, name)
        except (ImportError, OSError) as exc:  # undefined symbol, truncated file, ...: rebuild once
            broken = _first_line(exc)
            _say(f"salunet kernels: the cached build in {folder} does not load ({broken}); rebuilding it",
                 logging.WARNING)
    try:
        with _BuildLock(folder):
            if broken is None and _is_current(folder, name, key):  # another process built it while we waited
                return _import_library(folder, name)
            if broken is not None:
                try:
                    _clear(folder)
                except OSError as exc:
                    raise _Unwritable() from exc
            _say(f"salunet kernels: building the C++ CPU kernels ({key['isa']}, torch {key['torch']}) in {folder}; "
                 f"{_BUILD_SECONDS}, once per torch install")
            t0 = time.perf_counter()
            module = _compile(name, folder, key)
            seconds = time.perf_counter() - t0
            try:
                _write_marker(folder, key, seconds)
            except OSError as exc:
                raise _Unwritable() from exc
    except _Unwritable as exc:
        raise BuildError(f"cannot write the build folder {folder} ({_first_line(exc.__cause__)}); set "
                         "TORCH_EXTENSIONS_DIR to a writable folder") from exc.__cause__
    except ImportError as exc:
        raise BuildError(f"the C++ kernels built in {folder} do not load ({_first_line(exc)}); delete that folder "
                         "and run again (`salunet doctor` shows the build state)") from exc
    except Exception as exc:  # noqa: BLE001 - compiler errors arrive as RuntimeError, a missing compiler as others
        raise BuildError(f"the C++ kernels could not be built in {folder} ({_first_line(exc)}); install a C++ "
                         "compiler (g++ or clang++) and ninja, delete that folder, and run again with "
                         "SALUNET_VERBOSE_BUILD=1 to see the compiler's output") from exc
    _say(f"salunet kernels: built in {seconds:.1f} s ({folder.name})")
    return module


def load():
    """Return the compiled extension module, building it on first use; ``None`` if it cannot be built or loaded
    (the reason and its fix are then in :func:`load_error`)."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        key = build_key()
        name = build_name(key)
        try:
            _module = load_or_build(name, cache_root() / name, key)
        except BuildError as exc:
            _error = str(exc)
        return _module


def load_error() -> str | None:
    """Why the extension could not be built or loaded, with the fix; ``None`` if it loaded (or was not tried)."""
    return _error
