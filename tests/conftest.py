"""Shared test setup. Kernels run eagerly by default (compiling every shape a test meets would dominate the
suite's time); tests of the compiled path ask for the ``compiled_kernels`` fixture."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SALUNET_KERNELS", "eager")

from salunet.nn import kernels  # noqa: E402

CIFAR_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10.npz"


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
    kernels.set_kernel_mode("eager")


@pytest.fixture
def cifar_npz():
    if not CIFAR_NPZ.exists():
        pytest.skip(f"real CIFAR-10 not found at {CIFAR_NPZ} (the shared data folder is not beside the repo)")
    return CIFAR_NPZ
