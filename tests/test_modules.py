"""salunet.nn modules: parameters, shapes, errors, round trips, positivity."""
import io
import pickle

import pytest
import torch

from salunet import GALU, SALU, SALUAct, SALUAddAct, SWALU
from salunet.nn import functional as F


@pytest.mark.parametrize("cls", [SALU, SWALU, GALU])
def test_per_channel_dims(cls):
    m = cls(6)
    assert m.log_a.shape == (6,)
    assert m(torch.randn(2, 6, 3, 3)).shape == (2, 6, 3, 3)
    assert m(torch.randn(2, 6)).shape == (2, 6)
    t = cls(6, dim=-1)
    assert t(torch.randn(2, 5, 6)).shape == (2, 5, 6)
    s = cls()
    assert s.log_a.shape == () and s(torch.randn(3, 4, 5)).shape == (3, 4, 5)


def test_per_channel_parameters_act_per_channel():
    m = SALU(2, a_init=1.0, b_init=1.0)
    with torch.no_grad():
        m.log_a[1] = torch.log(torch.tensor(3.0))
    x = torch.full((1, 2, 1, 1), 1e-6)
    y = m(x)
    assert y[0, 0].item() == pytest.approx(1e-6, rel=1e-4) and y[0, 1].item() == pytest.approx(3e-6, rel=1e-4)


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match="expected 8 channels along dim 1, got 4"):
        SALU(8)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="out of range"):
        SALU(8, dim=3)(torch.randn(2, 8))


@pytest.mark.parametrize("kw", [{"num_features": 0}, {"num_features": -3}, {"num_features": 2.5},
                                {"a_init": 0.0}, {"b_init": -1.0}, {"a_init": float("nan")}])
def test_bad_construction(kw):
    with pytest.raises(ValueError):
        SALU(**kw)


def test_properties_and_repr():
    m = SALU(3, a_init=4.0, b_init=1.0)
    torch.testing.assert_close(m.amplitude, torch.full((3,), 2.0))
    torch.testing.assert_close(m.width, torch.full((3,), 0.5))
    torch.testing.assert_close(m.a, torch.full((3,), 4.0))
    assert "3, dim=1" in repr(m) and "a_init=4" in repr(m)
    with pytest.raises(AttributeError):
        m.amplitude = 3
    g = GALU(5)
    torch.testing.assert_close(g.amplitude, torch.full((5,), 10.0))  # defaults: a0 = 1, b0 = 1e-2


@pytest.mark.parametrize("cls", [SALU, SWALU, GALU])
def test_state_dict_and_pickle_round_trip(cls):
    m = cls(4, dim=-1, a_init=0.5, b_init=0.25)
    with torch.no_grad():
        m.log_a.add_(torch.randn(4))
    x = torch.randn(3, 4)
    m2 = cls(4, dim=-1)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(x), m(x))
    m3 = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(m3(x), m(x))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(m2(x), m(x))


@pytest.mark.parametrize("cls", [SALU, SWALU, GALU])
def test_positive_after_huge_gradient_step(cls):
    m = cls(4)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    x = torch.randn(2, 4, 3, 3)
    (m(x).sum() * 1e12).backward()
    m.log_a.grad.fill_(1e12)
    m.log_b.grad.fill_(-1e12)
    opt.step()
    assert (m.a > 0).all() and torch.isfinite(m.a).all()
    assert (m.b > 0).all() and torch.isfinite(m.b).all()
    y = m(x)
    assert torch.isfinite(y).all()
    opt.zero_grad()
    m(x).square().sum().backward()
    assert torch.isfinite(m.log_a.grad).all() and torch.isfinite(m.log_b.grad).all()


def test_salu_act_matches_pair_and_validates():
    pair = SALUAct(SALU(4, a_init=2.0, b_init=0.3), GALU(4))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = pair(x)
    y2 = pair.act(pair.norm(x))
    torch.testing.assert_close(y, y2)
    assert set(pair.state_dict()) == {"norm.log_a", "norm.log_b", "act.log_a", "act.log_b"}
    with pytest.raises(ValueError, match="same channels"):
        SALUAct(SALU(4), SWALU(5))
    with pytest.raises(ValueError, match="needs a SALU"):
        SALUAct(SWALU(4), SWALU(4))


def test_train_and_eval_identical():
    m = SALUAct(SALU(4), SWALU(4))
    x = torch.randn(1, 4, 3, 3)
    y_train = m.train()(x)
    torch.testing.assert_close(m.eval()(x), y_train)


# ---- the module path: log-parametrised a, b, as training runs it ----------------------------------------------

def _module_cases():
    return {
        "salu_tokens": (lambda: SALU(4, dim=-1), (3, 5, 4), False),
        "swalu_nchw": (lambda: SWALU(4), (2, 4, 3, 3), False),
        "galu_tokens": (lambda: GALU(4, dim=-1), (3, 5, 4), False),
        "salu_swalu_nchw": (lambda: SALUAct(SALU(4), SWALU(4)), (2, 4, 3, 3), False),
        "salu_galu_tokens": (lambda: SALUAct(SALU(4, dim=-1), GALU(4, dim=-1)), (3, 5, 4), False),
        "salu_add_swalu_nchw": (lambda: SALUAddAct(SALU(4), SWALU(4)), (2, 4, 3, 3), True),
    }


def _spread_params(m):
    """Move every log-parameter away from its init, channel by channel, so that a chain-rule slip cannot hide
    behind equal values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


@pytest.mark.parametrize("case", list(_module_cases()), ids=str)
def test_module_gradcheck_log_parameters(case, path):
    """gradcheck in float64 of what a module runs (log_a, log_b through exp and the kernels' chain rule),
    with respect to the input, the residual and every log-parameter."""
    make, shape, residual = _module_cases()[case]
    m = _spread_params(make().double())
    names = [n for n, _ in m.named_parameters()]
    x = (2 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    extra = (torch.randn(shape, dtype=torch.float64, requires_grad=True),) if residual else ()
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, *rest):
        ps = dict(zip(names, rest[len(extra):]))
        return torch.func.functional_call(m, ps, (x, *rest[:len(extra)]))

    assert torch.autograd.gradcheck(f, (x, *extra, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def _reference_of(m, x, residual=None):
    """The float64 plain-formula value of module ``m`` (SALU / SWALU / GALU / SALUAct / SALUAddAct)."""
    def one(mod, t):
        shape = (-1,) + (1,) * (t.dim() - mod.channel_axis(t) - 1)
        a, b = mod.log_a.double().exp().view(shape), mod.log_b.double().exp().view(shape)
        ref = {SALU: F.salu_reference, SWALU: F.swalu_reference, GALU: F.galu_reference}[type(mod)]
        return ref(t, a, b)

    if isinstance(m, SALUAct):
        z = one(m.norm, x)
        return one(m.act, z if residual is None else z + residual)
    return one(m, x)


@pytest.mark.parametrize("case", list(_module_cases()), ids=str)
def test_module_float32_gradients_match_float64_reference(case, path):
    """The float32 kernels (hardware rsqrt / rcp estimates with a Newton step, polynomial exp, A-S normal CDF)
    against the plain formula in float64: values and the gradients of x, residual and every log-parameter."""
    make, shape, residual = _module_cases()[case]
    m32 = _spread_params(make())
    m64 = _spread_params(make()).double()
    x = 2 * torch.randn(shape)
    r = torch.randn(shape) if residual else None
    g = torch.randn(shape)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    r32 = r.clone().requires_grad_() if residual else None
    r64 = r.double().requires_grad_() if residual else None
    y32 = m32(x32, r32) if residual else m32(x32)
    y64 = _reference_of(m64, x64, r64)
    y32.backward(g)
    y64.backward(g.double())
    torch.testing.assert_close(y32.double(), y64, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=2e-5, atol=2e-6)
    if residual:
        torch.testing.assert_close(r32.grad.double(), r64.grad, rtol=2e-5, atol=2e-6)
    for (n, p32), (_, p64) in zip(m32.named_parameters(), m64.named_parameters()):
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-5, msg=n)
