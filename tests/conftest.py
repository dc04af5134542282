"""Shared test setup. Kernels take the C++ CPU path by default (``cpp``: a build failure is an error here,
never a silent fallback); numerics tests run on every path through the ``path`` fixture, and tests of the
inductor path ask for ``compiled_kernels`` (compiling every shape a test meets would dominate the suite)."""
import http.server
import os
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SALUNET_KERNELS", "cpp")

from salunet.nn import kernels  # noqa: E402

CIFAR_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10.npz"


def pytest_configure(config):
    """Under pytest-xdist (the README's ``-n 2``), build the C++ kernels once in the controller, before the workers
    start: otherwise one worker builds them in its first test while the other waits on the build lock in its own
    (~25 s on a cold CI machine). A failed build is left to the tests that need it, which fail with its message."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if kernels.get_kernel_mode() == "cpp":
        from salunet.nn import cpu_ext

        cpu_ext.load()


@pytest.fixture(autouse=True)
def _seed_and_mode():
    torch.manual_seed(0)
    mode = kernels.get_kernel_mode()
    yield
    kernels.set_kernel_mode(mode)


@pytest.fixture
def compiled_kernels():
    kernels.set_kernel_mode("compiled")
    yield


@pytest.fixture(params=["eager", "cpp"])
def path(request):
    """Run the test once on the eager (op-by-op) path and once on the C++ kernels."""
    kernels.set_kernel_mode(request.param)
    return request.param


@pytest.fixture
def cifar_npz():
    if not CIFAR_NPZ.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR_NPZ} (the shared data folder is not beside the repo)")
    return CIFAR_NPZ


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/srv``: (that folder, its base URL). Downloads are tested
    against it; nothing here reaches another address."""
    root = tmp_path / "srv"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
