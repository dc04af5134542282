"""salunet.nn.functional: gradients against float64 finite differences, fused == reference."""
import pytest
import torch
from torch.autograd import gradcheck

from salunet.nn import functional as F

OPS = {"salu": (F.salu, F.salu_reference), "swalu": (F.swalu, F.swalu_reference),
       "galu": (F.galu, F.galu_reference)}
PAIRS = {"salu_swalu": (F.salu_swalu, lambda x, a1, b1, a2, b2: F.swalu_reference(F.salu_reference(x, a1, b1), a2, b2)),
         "salu_galu": (F.salu_galu, lambda x, a1, b1, a2, b2: F.galu_reference(F.salu_reference(x, a1, b1), a2, b2))}


def _params(shape, lo=0.3, hi=2.0, dtype=torch.float64):
    return (torch.rand(shape, dtype=dtype) * (hi - lo) + lo).requires_grad_()


LAYOUTS = {  # x shape, parameter shape
    "scalar": ((3, 4, 5, 5), ()),
    "per-channel dim=1": ((3, 4, 5, 5), (4, 1, 1)),
    "per-channel dim=-1": ((3, 7, 6), (6,)),
    "full": ((2, 3), (2, 3)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(op, layout, path):
    xs, ps = LAYOUTS[layout]
    x = (torch.randn(xs, dtype=torch.float64) * 2).requires_grad_()
    a, b = _params(ps), _params(ps)
    assert gradcheck(lambda x, a, b: OPS[op][0](x, a, b), (x, a, b))


@pytest.mark.parametrize("op", PAIRS)
def test_gradcheck_pairs(op, path):
    x = (torch.randn(2, 3, 4, 4, dtype=torch.float64) * 2).requires_grad_()
    ps = [_params((3, 1, 1)) for _ in range(4)]
    assert gradcheck(lambda *t: PAIRS[op][0](*t), (x, *ps))


@pytest.mark.parametrize("op", list(OPS) + list(PAIRS))
def test_fused_matches_reference(op, path):
    fused, ref = {**OPS, **PAIRS}[op]
    n = 2 if op in OPS else 4
    x = (torch.randn(4, 5, 3, 3, dtype=torch.float64) * 3).requires_grad_()
    ps = [_params((5, 1, 1)) for _ in range(n)]
    g = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    y1 = fused(x, *ps)
    grads1 = torch.autograd.grad(y1, (x, *ps), g)
    y2 = ref(x, *ps)
    grads2 = torch.autograd.grad(y2, (x, *ps), g)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64_reference(path):
    x = torch.randn(8, 16, 4, 4) * 4
    a, b = torch.rand(16, 1, 1) + 0.2, torch.rand(16, 1, 1) + 0.2
    for op, (fused, ref) in OPS.items():
        y = fused(x, a, b)
        yr = ref(x.double(), a.double(), b.double())
        torch.testing.assert_close(y.double(), yr, rtol=2e-6, atol=2e-6, msg=op)


def test_slope_and_saturation():
    a, b = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    x = torch.tensor([1e-8, 1e8], dtype=torch.float64)
    y = F.salu(x, a, b)
    assert y[0].item() == pytest.approx(2e-8, rel=1e-9)  # slope a at 0
    assert y[1].item() == pytest.approx(2.0, rel=1e-9)  # amplitude sqrt(a/b) = 2


def test_swalu_galu_close_to_silu_gelu_at_default_init():
    x = torch.linspace(-4, 4, 101)
    one, small = torch.tensor(1.0), torch.tensor(1e-2)
    # measured maxima on [-4, 4]: 0.023 (SWALU vs SiLU) and 0.0044 (GALU vs GELU)
    assert (F.swalu(x, one, small) - torch.nn.functional.silu(x)).abs().max() < 0.03
    assert (F.galu(x, one, small) - torch.nn.functional.gelu(x)).abs().max() < 0.006


def test_bad_inputs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        F.salu(x, torch.ones(5), torch.ones(5))
    with pytest.raises(ValueError, match="unknown impl"):
        F.salu(x, torch.ones(()), torch.ones(()), impl="nope")
    with pytest.raises(TypeError, match="floating-point"):
        F.salu(torch.ones(3, dtype=torch.long), torch.ones(()), torch.ones(()))


RESIDUAL = {"salu_add_swalu": (F.salu_add_swalu, F.swalu_reference), "salu_add_galu": (F.salu_add_galu, F.galu_reference)}


@pytest.mark.parametrize("op", RESIDUAL)
def test_residual_tail_gradcheck_and_reference(op, path):
    """gate(SALU(x) + r) in one pass: float64 gradcheck for x, r and all four parameters, and equality with the
    plain formula in value and gradient."""
    fused, gate_ref = RESIDUAL[op]
    x = (torch.randn(2, 3, 4, 4, dtype=torch.float64) * 2).requires_grad_()
    r = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    ps = [_params((3, 1, 1)) for _ in range(4)]
    assert gradcheck(lambda *t: fused(*t), (x, r, *ps))
    g = torch.randn_like(x)
    y1 = fused(x, r, *ps)
    y2 = gate_ref(F.salu_reference(x, ps[0], ps[1]) + r, ps[2], ps[3])
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(torch.autograd.grad(y1, (x, r, *ps), g), torch.autograd.grad(y2, (x, r, *ps), g)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_residual_is_checked():
    x, ones = torch.randn(2, 3), torch.ones(())
    with pytest.raises(ValueError, match="residual"):
        F.salu_add_swalu(x, torch.randn(3, 2), ones, ones, ones, ones)
    from salunet.nn import kernels
    with pytest.raises(ValueError, match="residual is required"):
        kernels.fused("salu_add_galu", x, ones, ones, ones, ones)
    with pytest.raises(ValueError, match="not taken"):
        kernels.fused("salu", x, ones, ones, residual=x)
