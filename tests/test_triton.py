"""The hand-written Triton kernels (kernel mode ``triton``, :mod:`salunet.nn.triton_kernels`).

Their numerics tests are tests/test_gpu.py's kernel tests (every op against float64 in three dtypes, the edge
cases, float64 gradcheck, autocast, channels_last, the Triton path's own checks), which run them on CUDA as
``cuda-triton``. On CPU they run under Triton's interpreter, which must be switched on before triton is imported,
so this file runs those cases (``cpu-triton``) in a subprocess with ``TRITON_INTERPRET=1``. Skipped where triton
is not installed (``pip install 'salunet[triton]'``; .ci/run installs it)."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salunet.nn import functional as F
from salunet.nn import kernels

TRITON = importlib.util.find_spec("triton") is not None
TESTS = Path(__file__).resolve().parent
# test_gpu.py's cases with a cpu-triton parameter: 21 ops x dtypes, 3 edge-case dtypes, 7 gradchecks (the 7 eager
# ones skip: not this path), 2 autocast dtypes, 2 channels_last modules, 5 checks of the Triton path itself (the
# direct launch's is CUDA's: skipped there)
EXPECTED_PASSED = 21 + 3 + 7 + 2 + 2 + 5


@pytest.mark.skipif(not TRITON, reason="triton is not installed (pip install 'salunet[triton]')")
def test_triton_kernels_pass_the_gpu_kernel_tests_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           str(TESTS / "test_gpu.py"), "-k", "cpu-triton"]
    out = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) == EXPECTED_PASSED, tail
    assert " failed" not in out.stdout and " error" not in out.stdout, tail


def test_triton_mode_is_refused_where_it_cannot_run():
    """CPU tensors without the interpreter (or no triton at all): a clear error that names the fix, never a silent
    fallback to another path."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter runs CPU tensors on this path")
    kernels.set_kernel_mode("triton")
    with pytest.raises(ValueError, match="kernel mode 'triton'") as err:
        F.salu(torch.randn(2, 3), torch.ones(3), torch.ones(3))
    assert ("TRITON_INTERPRET" in str(err.value)) if TRITON else ("pip install" in str(err.value))
    assert "SALUNET_KERNELS=auto" in str(err.value)


def test_triton_is_a_kernel_mode_by_name():
    kernels.set_kernel_mode("TRITON ")
    assert kernels.get_kernel_mode() == "triton"
    with pytest.raises(ValueError, match="triton"):
        kernels.set_kernel_mode("tritno")


@pytest.mark.skipif(not TRITON, reason="triton is not installed (pip install 'salunet[triton]')")
def test_triton_kernels_compile_for_a_gpu_without_one():
    """The richest specialisations compile to sm_90 cubins (Triton's compiler and ptxas need no device):
    the compiler's typing rules, which the interpreter does not apply (scripts/triton_aot.py compiles them all)."""
    out = subprocess.run([sys.executable, str(TESTS.parent / "scripts" / "triton_aot.py"), "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert re.search(r"(\d+) of \1 specialisations compiled for sm_90", out.stdout), out.stdout


@pytest.mark.skipif(not TRITON, reason="triton is not installed (pip install 'salunet[triton]')")
def test_triton_host_cost_script_times_the_python_side_beside_batchnorm():
    out = subprocess.run([sys.executable, str(TESTS.parent / "scripts" / "triton_host_cost.py"), "--iters", "3",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert row["triton_python_side_us"] > 0 and row["batchnorm2d_relu_us"] > 0 and row["eager_math_us"] > 0


@pytest.mark.skipif(not TRITON, reason="triton is not installed (pip install 'salunet[triton]')")
@pytest.mark.parametrize("layout", [(1, 1, 2**27), (8, 1, 8192 * 8192), (4096, 64, 16), (1024 * 4096, 512, 1),
                                    (1, 7, 1)])
def test_triton_tiling_covers_the_tensor_within_cudas_grid_limit(layout):
    """Every element in one tile (rows x columns cover the view), a 1-D grid under CUDA's 2^31 - 1 blocks, no
    fully masked tile rows for a single row (scalar parameters), and the partial sums a fraction of x's size."""
    from salunet.nn import triton_kernels as tk

    outer, C, inner = layout
    M, N, rows, bm, bn, iters, (gm, gn), P = tk._geometry(outer, C, inner, tk._PROGRAMS, tk._TILES["bwd"])
    assert (M, N) == ((outer * C, inner) if inner > 1 else (outer, C))
    assert gm * bm * iters >= M and gn * bn >= N and (gm - 1) * bm * iters < M and (gn - 1) * bn < N
    assert gm * gn < 2**31 and bm * bn <= tk._TILES["bwd"]
    assert bm <= max(1, 2 * M)  # a view of few rows gets tiles of as few rows
    assert P * C <= outer * C * inner // min(inner, 16) if rows else P * C <= max(outer * C // 16, C)


def test_doctor_reports_the_kernel_paths_in_triton_mode(capsys, monkeypatch):
    """``salunet doctor`` under SALUNET_KERNELS=triton on a CPU: the CPU path's line says why none runs, no crash."""
    from salunet.cli import main

    kernels.set_kernel_mode("triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter runs CPU tensors on this path")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("kernel path (CPU):"))
    assert "none (salunet: kernel mode 'triton'" in line


class _FakeCompiled:
    """Stands in for a Triton CompiledKernel: records its launcher's calls."""
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeKernel:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the call, returns a new compiled one."""

    def __init__(self):
        self.jit_calls, self.compiled = [], []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            self.compiled.append(_FakeCompiled())
            return self.compiled[-1]
        return call


@pytest.fixture
def direct(monkeypatch):
    """triton_kernels with a fake kernel, a fake stream and the direct launch on (as on a GPU with Triton 3.6)."""
    if not TRITON or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("needs triton, without the interpreter (which launches through kernel[grid] only)")
    from salunet.nn import triton_kernels as tk

    monkeypatch.setattr(tk, "_LAUNCHES", {})
    monkeypatch.setattr(tk, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(tk, "_direct_supported", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 1000 + index, raising=False)
    return tk


META = (True, 1, False, True, 30.0, "CDT", 1e18, 8192.0, True, 4, 512, 1)


def test_direct_launch_compiles_once_per_specialisation_then_passes_the_runtime_arguments_only(direct):
    """The first call of a specialisation goes through ``kernel[grid]`` with the constexprs by name and the warps;
    a repeat calls the cached kernel's launcher with the grid, the device's stream, no launch metadata or hooks,
    and the arguments in the kernel's order (runtime ones, then the constexprs, which its launcher skips)."""
    kernel = _FakeKernel()
    x, y = torch.zeros(64), torch.zeros(64)
    direct._launch("fwd", kernel, 7, (x, y), (48, 5), META, 0)
    assert len(kernel.jit_calls) == 1
    grid, args, kwargs = kernel.jit_calls[0]
    assert grid == (7,) and args == (x, y, 48, 5)
    assert kwargs == {**dict(zip(direct._CONSTEXPRS, META)), "num_warps": direct._WARPS}
    x2, y2 = torch.ones(64), torch.ones(64)  # other tensors, the same specialisation
    direct._launch("fwd", kernel, 9, (x2, y2), (96, 7), META, 3)  # another device: its own compiled kernel
    direct._launch("fwd", kernel, 9, (x2, y2), (96, 7), META, 0)
    assert len(kernel.jit_calls) == 2 and len(kernel.compiled[0].launches) == 1
    launch = kernel.compiled[0].launches[0]
    assert launch[:9] == (9, 1, 1, 1000, "function", "packed", None, None, None)
    assert launch[9:11] == (x2, y2) and launch[11:] == (96, 7, *META)


def test_direct_launch_keys_are_at_least_as_fine_as_tritons_specialisation(direct):
    """Two arguments that Triton compiles different kernels for (its binder's native_specialize_impl: dtype,
    16-byte alignment, == 1, divisibility by 16, 32/64-bit) never share a cached kernel."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def key(arg):
        return direct._key("k", 0, META, *(((arg,), ()) if isinstance(arg, torch.Tensor) else ((), (arg,))))

    base = torch.zeros(64)
    values = [0, 1, 2, 15, 16, 17, 32, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40,
              base, base[1:], base[4:], base.double(), base.double()[1:], base.double()[2:], base.half(),
              base.half()[8:], base.bfloat16()[3:]]
    for a in values:
        for b in values:
            triton_same = native_specialize_impl(BaseBackend, a, False, True, True) == \
                native_specialize_impl(BaseBackend, b, False, True, True)
            ours_same = key(a) == key(b)
            assert ours_same <= triton_same, (a if isinstance(a, int) else a.dtype, b if isinstance(b, int) else
                                              b.dtype, key(a), key(b))
            if isinstance(a, int) == isinstance(b, int):
                assert ours_same == triton_same  # and no finer than needed
    kernel = _FakeKernel()
    for t, n in [(base, 16), (base[1:], 16), (base, 17), (base, 1), (base.double(), 16), (base, 16)]:
        direct._launch("bwd", kernel, 1, (t,), (n,), META, 0)
    assert len(kernel.jit_calls) == 5 and len(kernel.compiled[0].launches) == 1  # the last repeats the first


def test_direct_launch_steps_aside_for_hooks_and_unverified_versions(direct, monkeypatch):
    """A profiler's launch hooks, DIRECT_LAUNCH off, or a Triton version the direct launch was not written for:
    every call through ``kernel[grid]``, and launch_path() says which."""
    import triton

    kernel = _FakeKernel()
    x = torch.zeros(8)
    hook = triton.knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hook, "calls", [lambda metadata: None])
    for _ in range(2):
        direct._launch("fwd", kernel, 1, (x,), (16,), META, 0)
    monkeypatch.setattr(hook, "calls", [])
    monkeypatch.setattr(direct, "DIRECT_LAUNCH", False)
    for _ in range(2):
        direct._launch("fwd", kernel, 1, (x,), (16,), META, 0)
    assert "DIRECT_LAUNCH off" in direct.launch_path()
    monkeypatch.setattr(direct, "DIRECT_LAUNCH", True)
    monkeypatch.setattr(direct, "_direct_supported", lambda: False)
    for _ in range(2):
        direct._launch("fwd", kernel, 1, (x,), (16,), META, 0)
    assert "written for Triton 3.6" in direct.launch_path()
    assert len(kernel.jit_calls) == 6 and not any(c.launches for c in kernel.compiled) and not direct._LAUNCHES
    monkeypatch.setattr(direct, "_direct_supported", lambda: True)
    assert direct.launch_path().startswith("direct")


def test_auto_takes_the_triton_kernels_on_cuda_once_chosen(monkeypatch, caplog):
    """kernels.AUTO_CUDA = "triton" (the switch a GPU's timings decide): auto's path for CUDA tensors is the Triton
    kernels where they can run, else the compiled path, said once; CPU tensors keep the C++ kernels."""
    if not TRITON:
        pytest.skip("triton is not installed (pip install 'salunet[triton]')")
    kernels.set_kernel_mode("auto")
    cuda = torch.device("cuda")
    assert kernels._path_for(cuda) == "compiled"  # today's choice
    monkeypatch.setattr(kernels, "AUTO_CUDA", "triton")
    assert kernels._path_for(cuda) == "triton" and kernels.kernel_path(cuda).startswith("triton")
    assert kernels._path_for(torch.device("cpu")) in ("cpp", "eager")
    tk = kernels._triton()
    monkeypatch.setattr(tk, "unavailable_reason", lambda device: "no driver here")
    with caplog.at_level("INFO", logger="salunet"):
        assert kernels._path_for(cuda) == "compiled"
    assert "cannot run (no driver here); CUDA tensors take the compiled path" in caplog.text


def test_auto_sends_what_the_triton_kernels_refuse_to_the_compiled_path(monkeypatch):
    """Under auto with the Triton kernels chosen, parameters varying along two axes (the functional API allows
    them) take the compiled path for that call instead of an error; kernel mode triton still refuses them."""
    seen = []

    def fake_apply(path, op, log_params, x, res, *params):
        seen.append(path)
        return x

    kernels.set_kernel_mode("auto")
    monkeypatch.setattr(kernels, "_path_for", lambda device: "triton")
    monkeypatch.setattr(kernels.FusedFn, "apply", fake_apply)
    x = torch.randn(2, 3, 4, requires_grad=True)  # a call that records a node (FusedFn)
    kernels.fused("salu", x, torch.rand(3, 4) + 0.5, torch.rand(3, 1) + 0.5)
    assert seen == ["compiled"]
    kernels.set_kernel_mode("triton")
    with pytest.raises(ValueError, match="more than one axis"):
        kernels.fused("salu", x, torch.rand(3, 4) + 0.5, torch.rand(3, 1) + 0.5)


def test_direct_launch_keys_follow_tritons_runtime_settings_and_hook_forms(direct, monkeypatch):
    """Triton's debug and instrumentation settings enter its own cache key, so they enter ours: switching one on
    compiles anew. Launch hooks set to None count as none; a plain function set as a hook sends launches through
    Triton's path (which calls it)."""
    import triton

    kernel = _FakeKernel()
    x = torch.zeros(8)
    direct._launch("fwd", kernel, 1, (x,), (16,), META, 0)
    monkeypatch.setattr(triton.knobs.runtime, "debug", True)
    direct._launch("fwd", kernel, 1, (x,), (16,), META, 0)
    assert len(kernel.jit_calls) == 2
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", None)
    direct._launch("fwd", kernel, 1, (x,), (16,), META, 0)
    assert len(kernel.jit_calls) == 2 and len(kernel.compiled[1].launches) == 1  # hooks None: direct
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    direct._launch("fwd", kernel, 1, (x,), (16,), META, 0)
    assert len(kernel.jit_calls) == 3


def test_direct_launch_is_nvidias_only(monkeypatch):
    """ROCm's torch calls its GPUs "cuda" too, but ROCm's Triton specialises pointers on their storage's size as
    well: there the kernels launch Triton's way, and launch_path() says why."""
    if not TRITON or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("needs triton, without the interpreter")
    from salunet.nn import triton_kernels as tk

    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert not tk._direct_supported.__wrapped__()
    monkeypatch.setattr(tk, "_direct_supported", lambda: False)
    assert "ROCm" in tk.launch_path()
