"""salunet.nn modules: parameters, shapes, errors, round trips, positivity."""
import io
import pickle

import pytest
import torch

from salunet import GALU, SALU, SALUAct, SWALU


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
