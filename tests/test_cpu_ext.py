"""The C++ kernel build: its cache key, the lines before and after a build, a stale or live build lock, a cached
build that does not load, and the messages that say how to fix a failure. The build itself is replaced by a fake
(``_compile``) everywhere but in the last test, which checks the real (already built) extension."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import warnings

import pytest
import torch

from salunet.nn import cpu_ext, kernels

KEY = cpu_ext.build_key()


def _fake_compile(calls: list, *, raises: Exception | None = None, seconds: float = 0.0):
    """Stands in for torch's JIT build: takes torch's lock file the way ``cpp_extension.load`` does (and so waits
    forever on a stale one), writes a library file, returns a module object."""
    from torch.utils.file_baton import FileBaton

    def compile_(name, folder, key):
        calls.append(name)
        baton = FileBaton(os.path.join(folder, "lock"))
        if baton.try_acquire():
            try:
                time.sleep(seconds)
                if raises is not None:
                    raise raises
                cpu_ext._library(folder, name).write_bytes(b"fake library")
            finally:
                baton.release()
        else:
            baton.wait()
        return types.SimpleNamespace(name=name)

    return compile_


def _in_thread(fn, timeout: float):
    """Run ``fn`` in a thread; (finished, result or exception). A hang fails the test instead of the suite."""
    out = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return (not t.is_alive()), out, t


@pytest.fixture
def folder(tmp_path):
    return tmp_path / cpu_ext.build_name(KEY)


@pytest.fixture
def kernel_log(caplog):
    caplog.set_level(logging.INFO, logger="salunet.kernels")
    return caplog


def test_the_cache_name_shows_isa_torch_version_and_abi_and_changes_with_them():
    name = cpu_ext.build_name(KEY)
    assert name.isidentifier()
    version = torch.__version__.replace(".", "_").replace("+", "_")
    assert f"_torch{version}_" in name and name.startswith(f"salunet_cpu_{KEY['isa'].lower()}_")
    assert ("_cxx11abi_" if KEY["cxx11_abi"] else "_oldabi_") in name
    names = {name}
    for change in ({"torch": "2.14.0"}, {"torch_git": "0" * 40}, {"cxx11_abi": 1 - KEY["cxx11_abi"]},
                   {"torch_dir": "/other/venv/torch"}, {"python": "cpython-312"}, {"source_sha1": "0" * 40}):
        names.add(cpu_ext.build_name({**KEY, **change}))
    assert len(names) == 7  # a torch upgrade, another env or another ABI never shares (or thrashes) a build


def test_the_key_covers_every_source_file_and_the_header(tmp_path, monkeypatch):
    """Both translation units and the header they share are compiled into the library: an edit to any one of them
    must give a new build folder (a stale kernel or binding would otherwise load)."""
    files = [*cpu_ext.SOURCES, *cpu_ext._HEADERS]
    assert {f.name for f in files} == {"salu_cpu.cpp", "salu_bind.cpp", "salu_cpu.h"} and all(f.is_file() for f in files)
    copies = {f.name: tmp_path / f.name for f in files}
    for f in files:
        copies[f.name].write_bytes(f.read_bytes())
    monkeypatch.setattr(cpu_ext, "SOURCES", (copies["salu_cpu.cpp"], copies["salu_bind.cpp"]))
    monkeypatch.setattr(cpu_ext, "_HEADERS", (copies["salu_cpu.h"],))
    names = {cpu_ext.build_name()}
    assert names == {cpu_ext.build_name(cpu_ext.build_key())}
    for path in copies.values():
        path.write_bytes(path.read_bytes() + b"\n// edited\n")
        names.add(cpu_ext.build_name())
    assert len(names) == 4

def test_the_folder_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_ext.build_folder() == tmp_path / cpu_ext.build_name()


def test_a_first_build_prints_a_line_before_and_after_to_stderr_without_logging_setup(folder, monkeypatch, capsys):
    monkeypatch.setattr(cpu_ext.log, "hasHandlers", lambda: False)  # as in a script that configures no logging
    calls = []
    monkeypatch.setattr(cpu_ext, "_compile", _fake_compile(calls, seconds=0.2))
    cpu_ext.load_or_build(folder.name, folder, KEY)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("salunet kernels: building the C++ CPU kernels") and str(folder) in err[0]
    assert err[1].startswith("salunet kernels: built in ") and " s (" in err[1]
    assert float(err[1].split("built in ")[1].split(" s")[0]) >= 0.2
    assert json.loads((folder / cpu_ext.MARKER).read_text())["key"] == KEY  # current from now on

    monkeypatch.setattr(cpu_ext, "_import_library", lambda f, n: types.SimpleNamespace(name=n))
    assert cpu_ext.load_or_build(folder.name, folder, KEY).name == folder.name
    assert calls == [folder.name] and capsys.readouterr().err == ""  # a current build loads silently


def test_configured_logging_decides_and_a_null_handler_silences(folder, monkeypatch, capsys):
    logger = logging.getLogger("salunet.kernels")
    monkeypatch.setattr(logger, "propagate", False)  # away from pytest's own handlers on the root logger
    null = logging.NullHandler()
    logger.addHandler(null)
    try:
        monkeypatch.setattr(cpu_ext, "_compile", _fake_compile([]))
        cpu_ext.load_or_build(folder.name, folder, KEY)
    finally:
        logger.removeHandler(null)
    assert capsys.readouterr().err == ""


def test_a_stale_build_lock_is_taken_over_with_a_message_instead_of_a_hang(folder, monkeypatch, kernel_log):
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what torch leaves when a build is killed part-way
    calls = []
    monkeypatch.setattr(cpu_ext, "_compile", _fake_compile(calls))
    t0 = time.monotonic()
    done, out, _ = _in_thread(lambda: cpu_ext.load_or_build(folder.name, folder, KEY), timeout=20)
    assert done, "the build waited on a stale lock"
    assert "error" not in out and calls == [folder.name]
    assert time.monotonic() - t0 < 10 and not (folder / "lock").exists()
    msgs = [r.getMessage() for r in kernel_log.records]
    assert any("taking over the build lock" in m and str(folder / "lock") in m for m in msgs), msgs


@pytest.mark.slow
def test_a_live_builder_is_waited_for_and_a_killed_one_never_hangs_the_next_build(folder, monkeypatch, kernel_log):
    """A process that holds the build lock (and torch's lock file) is alive: wait for it, saying so. Killed with
    SIGKILL mid-build, it leaves torch's lock file behind: the waiting build takes it over within seconds."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from torch.utils.file_baton import FileBaton
        from salunet.nn import cpu_ext
        folder = Path({str(folder)!r})
        cpu_ext._BuildLock(folder).__enter__()
        assert FileBaton(os.path.join(folder, "lock")).try_acquire()
        print("building", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "building"
        calls = []
        monkeypatch.setattr(cpu_ext, "_compile", _fake_compile(calls))
        done, out, thread = _in_thread(lambda: cpu_ext.load_or_build(folder.name, folder, KEY), timeout=1.5)
        assert not done and (folder / "lock").exists() and calls == []  # a live holder's lock is respected
        assert any(f"waiting for process {holder.pid}" in r.getMessage() for r in kernel_log.records)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        thread.join(15)
        assert not thread.is_alive(), "the build hung after its holder was killed"
        assert "error" not in out and calls == [folder.name] and not (folder / "lock").exists()
        assert any("taking over the build lock" in r.getMessage() for r in kernel_log.records)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_cached_build_that_does_not_load_is_rebuilt_once(folder, monkeypatch, kernel_log):
    folder.mkdir(parents=True)
    cpu_ext._library(folder, folder.name).write_bytes(b"not an ELF file")
    (folder / "salu_cpu.o").write_bytes(b"stale object")
    cpu_ext._write_marker(folder, KEY, 1.0)
    calls = []
    monkeypatch.setattr(cpu_ext, "_compile", _fake_compile(calls))
    module = cpu_ext.load_or_build(folder.name, folder, KEY)
    assert module.name == folder.name and calls == [folder.name]
    assert not (folder / "salu_cpu.o").exists()  # cleared before the rebuild
    msgs = [r.getMessage() for r in kernel_log.records]
    assert any("does not load" in m and "rebuilding it" in m for m in msgs), msgs


@pytest.mark.parametrize("error, expected", [
    (ImportError("undefined symbol: _ZN3c106detail14torchCheckFail"), "do not load (ImportError: undefined symbol"),
    (RuntimeError("Error building extension 'x'\nc++: fatal error"), "could not be built"),
])
def test_a_failed_build_or_load_names_the_folder_and_the_fix(folder, monkeypatch, error, expected):
    monkeypatch.setattr(cpu_ext, "_compile", _fake_compile([], raises=error))
    with pytest.raises(cpu_ext.BuildError) as info:
        cpu_ext.load_or_build(folder.name, folder, KEY)
    msg = str(info.value)
    assert expected in msg and str(folder) in msg and "delete that folder" in msg and "\n" not in msg
    assert "silence" not in msg


def test_an_unwritable_cache_says_to_choose_another(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    folder = blocker / "build"
    with pytest.raises(cpu_ext.BuildError, match="cannot write the build folder .*TORCH_EXTENSIONS_DIR"):
        cpu_ext.load_or_build(folder.name, folder, KEY)


def test_the_fallback_warning_says_how_to_fix_it_not_how_to_silence_it(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_module", None)
    monkeypatch.setattr(cpu_ext, "_error", "the C++ kernels built in /x/y do not load (ImportError: undefined "
                                           "symbol: f); delete that folder and run again")
    monkeypatch.setattr(kernels, "_reported", set())
    kernels.set_kernel_mode("auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels._path_for(torch.device("cpu")) == "eager"
    (w,) = caught
    assert "delete that folder" in str(w.message) and "silence" not in str(w.message)
    kernels.set_kernel_mode("cpp")
    with pytest.raises(RuntimeError, match="delete that folder"):
        kernels._path_for(torch.device("cpu"))


def test_the_real_build_is_current_and_loaded():
    """The suite runs on the C++ path (conftest): the extension this process loaded is marked current for its key,
    so the next process imports it without a build."""
    assert cpu_ext.load() is not None, cpu_ext.load_error()
    st = cpu_ext.status()
    assert st["current"] and st["loaded"] and st["error"] is None, st
    assert json.loads((cpu_ext.build_folder() / cpu_ext.MARKER).read_text())["key"] == cpu_ext.build_key()
