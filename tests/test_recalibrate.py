"""--salu-recalibrate (train/recalibrate.py): SALU's operating point pinned between epochs."""
import copy
import sys

import pytest
import torch
from torch import nn

from salunet import SALU, SWALU, SALUAct
from salunet.nn import SALUAddAct
from salunet.nn import modules
from salunet.train.recalibrate import (StepStatistics, pin_in_forward, pin_to_average, recalibrate_salu, salu_input_rms,
                                       salu_sites)


class _Net(nn.Module):
    """A standalone SALU, a fused pair and a fused residual tail, with different input scales per channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.salu = SALU(4)
        self.pair = SALUAct(SALU(4), SWALU(4))
        self.tail = SALUAddAct(SALU(4), SWALU(4))

    def forward(self, x):
        h = self.salu(self.conv(x))
        h = self.pair(h * torch.tensor([1.0, 3.0, 0.1, 10.0]).view(1, 4, 1, 1))
        return self.tail(h * 2, h)


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 6, 6, generator=g) * 2, torch.zeros(8)) for _ in range(n)]


def test_sites_are_every_salu_input_once():
    net = _Net()
    sites = salu_sites(net)
    assert list(sites) == ["salu", "pair", "tail"]
    assert sites["pair"][1] is net.pair.norm and sites["salu"][1] is net.salu


def test_recalibration_pins_the_argument_and_keeps_the_function_up_to_input_scale():
    torch.manual_seed(0)
    net = _Net().double()
    batches = [(x.double(), y) for x, y in _batches()]
    before = {n: (s.log_a.detach().clone(), s.log_b.detach().clone(), s.amplitude.clone())
              for n, (_, s) in salu_sites(net).items()}
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    y_old = net.salu(x)
    recalibrate_salu(net, batches, 0.5)
    for name, rms in salu_input_rms(net, batches).items():
        s = salu_sites(net)[name][1]
        arg = torch.exp(0.5 * (s.log_a + s.log_b)).detach() * rms
        torch.testing.assert_close(arg, torch.full_like(arg, 0.5), rtol=1e-9, atol=0)
        torch.testing.assert_close(s.amplitude, before[name][2], rtol=1e-12, atol=0)  # A = sqrt(a/b) kept
    # a and b both scaled by c per channel: the new SALU at x is the old one at c x
    c = torch.exp(net.salu.log_a.detach() - before["salu"][0]).view(1, 4, 1, 1)
    old = SALU(4).double()
    with torch.no_grad():
        old.log_a.copy_(before["salu"][0])
        old.log_b.copy_(before["salu"][1])
    torch.testing.assert_close(net.salu(x), old(c * x))
    assert not torch.allclose(net.salu(x), y_old)


def test_a_silent_channel_is_left_alone_and_bad_targets_are_refused():
    net = _Net()
    with torch.no_grad():
        net.conv.weight[0].zero_()
        net.conv.bias[0] = 0.0
    la = net.salu.log_a.detach().clone()
    recalibrate_salu(net, _batches(), 0.3)
    assert net.salu.log_a[0].item() == la[0].item() and net.salu.log_a[1].item() != la[1].item()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive number"):
            recalibrate_salu(net, _batches(), bad)


def test_a_channel_whose_scale_is_not_finite_is_left_alone():
    """An overflowed input (inf, as float16 can give) or a NaN in one channel: that channel's a and b stay as they
    were (an infinite rms would set them to 0 for good), the others are pinned to the target."""
    from salunet.train.recalibrate import _set_logs

    salu = SALU(4)
    la, lb = salu.log_a.detach().clone(), salu.log_b.detach().clone()
    rms = torch.tensor([float("inf"), float("nan"), 2.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        _set_logs(salu, rms, 0.3, 1.0)
    assert torch.equal(salu.log_a[:2], la[:2]) and torch.equal(salu.log_b[:2], lb[:2])
    arg = torch.exp(0.5 * (salu.log_a.detach().double() + salu.log_b.detach().double()))[2:] * rms[2:]
    torch.testing.assert_close(arg, torch.full((2,), 0.3, dtype=torch.float64), rtol=1e-6, atol=0)


def test_a_partial_rate_pins_a_running_mean_square_and_repeated_converges():
    """rate r: the pinned mean square is (1 - r) K^2 + r g^2 (g = sqrt(ab) * rms before), so the first site (whose
    input no other site moves) ends at g K / sqrt((1 - r) K^2 + r g^2), A = sqrt(a/b) kept; repeated on the same
    batches, every site converges to K; rates outside (0, 1] refused."""
    torch.manual_seed(0)
    net = _Net().double()
    batches = [(x.double(), y) for x, y in _batches()]

    def args():
        return {n: torch.exp(0.5 * (salu_sites(net)[n][1].log_a + salu_sites(net)[n][1].log_b)).detach() * rms
                for n, rms in salu_input_rms(net, batches).items()}

    amp = net.salu.amplitude.clone()
    g = args()["salu"]
    recalibrate_salu(net, batches, 0.5, rate=0.25)
    torch.testing.assert_close(args()["salu"], g * 0.5 / (0.75 * 0.25 + 0.25 * g ** 2).sqrt(), rtol=1e-9, atol=0)
    assert not torch.allclose(args()["salu"], torch.full((4,), 0.5, dtype=torch.float64), rtol=1e-3)
    torch.testing.assert_close(net.salu.amplitude, amp, rtol=1e-12, atol=0)
    assert not torch.allclose(args()["tail"], torch.full((4,), 0.5, dtype=torch.float64), rtol=1e-3)
    for _ in range(150):  # geometric, slower at the sites whose inputs the earlier sites still move
        recalibrate_salu(net, batches, 0.5, rate=0.25)
    for name, arg in args().items():
        torch.testing.assert_close(arg, torch.full_like(arg, 0.5), rtol=1e-9, atol=0, msg=name)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate must be in"):
            recalibrate_salu(net, batches, 0.5, rate=bad)


def test_pin_to_average_pins_the_mean_of_the_batches_mean_squares():
    """pin_to_average over equal batches: the first site (whose input no SALU moves) ends at sqrt(ab) * rms = K on
    the batches pooled, exactly (float64), where pinning on the last batch alone misses it; A = sqrt(a/b) kept;
    the later sites come close on batches of one distribution; one batch is recalibrate_salu's pin; the factors
    are the total ones; no batch is refused."""
    torch.manual_seed(0)
    net = _Net().double()
    batches = [(x.double(), y) for x, y in _batches(4)]
    amp = {n: s.amplitude.clone() for n, (_, s) in salu_sites(net).items()}
    log_a = {n: s.log_a.detach().clone() for n, (_, s) in salu_sites(net).items()}

    def args():
        return {n: torch.exp(0.5 * (salu_sites(net)[n][1].log_a + salu_sites(net)[n][1].log_b)).detach() * rms
                for n, rms in salu_input_rms(net, batches).items()}

    factors = pin_to_average(net, batches, 0.5)
    torch.testing.assert_close(args()["salu"], torch.full((4,), 0.5, dtype=torch.float64), rtol=1e-9, atol=0)
    for name, arg in args().items():  # the later sites: each batch measured after the earlier sites moved
        torch.testing.assert_close(arg, torch.full_like(arg, 0.5), rtol=0.03, atol=0, msg=name)
    for n, (_, s) in salu_sites(net).items():
        torch.testing.assert_close(s.amplitude, amp[n], rtol=1e-12, atol=0)
        assert factors[n] == pytest.approx(float(torch.exp(s.log_a.detach() - log_a[n]).median()), rel=1e-12)
    recalibrate_salu(net, batches[-1:], 0.5)  # the last batch alone is another pin
    assert not torch.allclose(args()["salu"], torch.full((4,), 0.5, dtype=torch.float64), rtol=0.05)
    twin = _Net().double()
    twin.load_state_dict(net.state_dict())
    pin_to_average(net, batches[:1], 0.5)
    recalibrate_salu(twin, batches[:1], 0.5)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    with pytest.raises(ValueError, match="at least one batch"):
        pin_to_average(net, [], 0.5)


def test_pin_to_average_weights_batches_by_size_and_pins_several_models():
    """Batches of 2, 8 and 5 samples: the first site ends at K on the samples pooled (the mean square weighted by
    count, not the mean of the three); a list of models: each pinned as alone, one dict of factors each."""
    torch.manual_seed(0)
    net = _Net().double()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) * s for n, s in ((2, 3.0), (8, 1.0), (5, 0.5))]
    twin = _Net().double()
    twin.load_state_dict(net.state_dict())
    factors = pin_to_average([net, twin], batches, 0.5)
    assert len(factors) == 2 and factors[0] == factors[1]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    s = net.salu
    arg = torch.exp(0.5 * (s.log_a + s.log_b)).detach() * salu_input_rms(net, [torch.cat(batches)])["salu"]
    torch.testing.assert_close(arg, torch.full((4,), 0.5, dtype=torch.float64), rtol=1e-9, atol=0)


def test_step_statistics_gather_training_forwards_only_and_pin_from_them():
    """--salu-recalibrate-measure step: the hooks add up every site's input squares over the training forwards
    (train mode, autograd on; two batches = their concatenation), eval and no-grad forwards add nothing, and pin()
    sets every site's sqrt(ab) * rms(input as measured) to the target, then starts again."""
    torch.manual_seed(0)
    net = _Net().double()
    (x1, _), (x2, _), (x3, _) = [(x.double(), y) for x, y in _batches()]
    stats = StepStatistics(net)
    net.eval()
    net(x3)
    net.train()
    with torch.no_grad():
        net(x3)
    assert stats.pin(0.5) is None  # nothing a training step did
    measured = salu_input_rms(net, [torch.cat([x1, x2])])  # the inputs the two training forwards below see
    net(x1).sum().backward()
    net(x2).sum().backward()
    factors = stats.pin(0.5)
    assert set(factors) == {"salu", "pair", "tail"} and all(f != 1.0 for f in factors.values())
    for name, rms in measured.items():
        s = salu_sites(net)[name][1]
        arg = torch.exp(0.5 * (s.log_a + s.log_b)).detach() * rms
        torch.testing.assert_close(arg, torch.full_like(arg, 0.5), rtol=1e-9, atol=0, msg=name)
    assert stats.pin(0.5) is None  # started again
    net(x1).sum().backward()
    stats.reset()
    assert stats.pin(0.5) is None
    stats.remove()
    net(x1).sum().backward()
    assert stats.pin(0.5) is None  # no hooks left


def test_step_statistics_refuse_a_site_the_forward_skipped():
    class Skips(_Net):
        def forward(self, x):
            return self.salu(self.conv(x))

    net = Skips()
    stats = StepStatistics(net)
    net(_batches()[0][0]).sum().backward()
    with pytest.raises(RuntimeError, match="did not reach pair, tail"):
        stats.pin(0.5)


def _assert_resume_repeats_the_last_epoch(run_dir):
    """Delete the run's last checkpoint, resume: the last epoch trained again gives exactly the same weights."""
    from safetensors.torch import load_file

    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    full = load_file(str(ckpts[-1]))
    ckpts[-1].unlink()
    train(resume=str(run_dir))
    resumed = load_file(str(list_checkpoints(run_dir)[-1]))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_training_with_recalibration_resumes_bit_for_bit(tmp_path):
    """The recalibration after epoch 1 uses epoch 2's seeded batches and lands in epoch 1's checkpoint, so a run
    that dies after epoch 1 and resumes ends with exactly the weights of one that did not."""
    from salunet.train import train

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=128, test_subset=50, batch_size=32,
               epochs=3, ema_decay=0.0, progress=False, salu_recalibrate=0.5, out=str(tmp_path), name="r")
    train(cfg)
    rows = [__import__("json").loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [("salu_recal_factor" in r) for r in rows] == [True, True, False]  # never after the last epoch
    assert rows[0]["salu_recal_factor"] != 1.0
    _assert_resume_repeats_the_last_epoch(tmp_path / "r")


def test_a_model_without_salu_is_refused_before_anything_is_written(tmp_path):
    from salunet.train import train

    with pytest.raises(ValueError, match="has no SALU to act on"):
        train(dict(model="resnet18_bn", width=4, data="digits", train_subset=64, test_subset=20, epochs=1,
                   salu_recalibrate=0.5, out=str(tmp_path), name="bn", progress=False))
    assert not (tmp_path / "bn").exists()


def test_calibration_forward_compiles_nothing(monkeypatch):
    """On the compiled path (CUDA's default) the calibration's one forward of an unseen shape runs op by op instead
    of compiling a kernel per op for it; the kernel mode is restored afterwards."""
    from salunet.nn import kernels

    kernels.set_kernel_mode("compiled")
    monkeypatch.setattr(kernels, "_get_compiled", lambda *a, **k: pytest.fail("compiled during calibration"))
    net = _Net()
    recalibrate_salu(net, _batches(), 0.5)
    assert kernels.get_kernel_mode() == "compiled"


def _script(name):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_training_batch_keeps_the_compiled_path(monkeypatch):
    """--salu-recalibrate-every calibrates on a training batch, whose shape training has compiled: the compiled
    kernels are used (not an op-by-op forward per step), and the result is the eager path's."""
    from salunet.nn import kernels

    used = []

    def uncompiled(direction, op, log_params, args):  # stands in for inductor: the same math, no compilation
        used.append(direction)
        return kernels._MATH[direction]

    torch.manual_seed(0)
    net, batch = _Net(), _batches(1)
    ref = _Net()
    ref.load_state_dict(net.state_dict())
    recalibrate_salu(ref, batch, 0.5)  # eager (the default mode on CPU is cpp or eager; the same math)
    kernels.set_kernel_mode("compiled")  # (conftest restores the mode after each test)
    monkeypatch.setattr(kernels, "_get_compiled", uncompiled)
    recalibrate_salu(net, batch, 0.5, training_shape=True)
    assert used and set(used) == {"fwd"}  # three sites, each a forward only
    for (_, s), (_, r) in zip(salu_sites(net).values(), salu_sites(ref).values()):
        torch.testing.assert_close(s.log_a, r.log_a, rtol=1e-5, atol=1e-6)


def test_operating_point_script(tmp_path, capsys):
    """scripts/salu_operating_point.py: one median per SALU site of a model at init (CIFAR-10-shaped .npz, the
    embedded digits); a missing data file exits 2."""
    import numpy as np

    mod = _script("salu_operating_point")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    assert mod.main(["--data-path", str(tmp_path / "c.npz"), "--images", "64", "init:salunet_c18_v2"]) == 0
    values = [float(v) for v in capsys.readouterr().out.rsplit(":", 1)[1].split()]
    assert len(values) == 20 and all(0.05 < v < 1.0 for v in values)
    assert mod.main(["--data-path", str(tmp_path / "none.npz"), "init:salunet_c18_v2"]) == 2
    assert mod.main(["--data-path", "digits", "--width", "2", "--images", "32", "init:salunet_c18_v2"]) == 0
    assert len(capsys.readouterr().out.rsplit(":", 1)[1].split()) == 20  # the embedded digits: 1 channel, 8x8


def test_recalibration_every_n_steps_counts_and_resumes_bit_for_bit(tmp_path):
    """--salu-recalibrate-every 3: on the step's own batch before steps 0, 3, 6 (global), none at the epoch's end;
    the resumed run repeats the same recalibrations, so its weights are those of the run that did not stop."""
    import json

    from salunet.train import train

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=128, test_subset=50, batch_size=32,
               epochs=2, ema_decay=0.0, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=3,
               out=str(tmp_path), name="r")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["salu_recalibrations"] for r in rows] == [2, 1]  # 4 steps an epoch: global steps 0, 3 | 6
    assert all(r["salu_recal_factor"] > 0 for r in rows)
    _assert_resume_repeats_the_last_epoch(tmp_path / "r")


def test_the_trainers_pin_in_forward_trains_as_the_hooks_pin(tmp_path, monkeypatch, capsys):
    """The trainer's per-step pin is pin_in_forward (and says so); the run's weights are bitwise those of the same
    run pinned by the hooks' forward (recalibrate_salu, the path before the sites pinned themselves), with the
    same ``reduce`` (one process: the identity)."""
    from safetensors.torch import load_file

    from salunet.train import loop, train
    from salunet.train.checkpoint import list_checkpoints

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=96, test_subset=50, batch_size=32,
               epochs=1, ema_decay=0.0, progress=False, salu_recalibrate=0.4, salu_recalibrate_every=1,
               out=str(tmp_path))
    train({**cfg, "name": "inner"})
    assert ("pin: every 1 step(s), by the SALU sites in the model's own forward; measured on each training batch, "
            "in one more forward") in capsys.readouterr().out
    calls = []

    def hooks(model, x, target, rate, forward, reduce):
        calls.append(forward is model)  # uncompiled: the model itself
        return recalibrate_salu(model, [x], target, rate=rate, training_shape=True, sync=False, reduce=reduce)

    monkeypatch.setattr(loop, "pin_in_forward", hooks)
    train({**cfg, "name": "hooks"})
    assert calls == [True] * 3
    a, b = (load_file(str(list_checkpoints(tmp_path / n)[-1])) for n in ("inner", "hooks"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_per_step_pinning_from_the_training_forward_resumes_bit_for_bit(tmp_path):
    """--salu-recalibrate-measure step, every 2 steps: the first due step of an epoch has nothing gathered (the
    statistics never cross an epoch) and pins with the extra forward; the others pin from the steps since
    the last; the trained weights differ from the extra-forward measure's; a resumed run repeats it exactly."""
    import json

    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints, load_checkpoint

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=192, test_subset=50, batch_size=32,
               epochs=2, ema_decay=0.0, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=2,
               out=str(tmp_path))
    train(cfg, name="step", salu_recalibrate_measure="step", salu_recalibrate_rate=0.5)
    train(cfg, name="fwd")
    rows = [json.loads(line) for line in (tmp_path / "step" / "metrics.jsonl").read_text().splitlines()]
    assert [r["salu_recalibrations"] for r in rows] == [3, 3]  # 6 steps an epoch: due at 0, 2, 4 | 6, 8, 10
    a, b = (load_checkpoint(list_checkpoints(tmp_path / n)[-1])[0]["model"] for n in ("step", "fwd"))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.endswith("log_b"))
    _assert_resume_repeats_the_last_epoch(tmp_path / "step")


def test_eval_pin_holds_the_average_pin_leaves_training_and_resumes_bit_for_bit(tmp_path):
    """--salu-eval-pin 3 with a pin every step: each epoch records the factors of the raw and EMA weights; the
    checkpoint holds the pin on the average of the epoch's first 3 batches (pinning it again on them moves
    nothing, where the run without it moves); training is the run's without it up to rounding (the next step's
    pin overrides sqrt(ab)); a resumed run repeats it exactly."""
    import itertools
    import json

    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints
    from salunet.train.distributed import DistInfo
    from salunet.train.evaluate import model_from_checkpoint
    from salunet.train.resume import checkpoint_config
    from salunet.train.sources import load_source

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=192, test_subset=50, batch_size=32,
               epochs=2, ema_decay=0.9, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1,
               out=str(tmp_path))
    train(cfg, name="pin", salu_eval_pin=3)
    train(cfg, name="last")
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("pin", "last")}
    assert all({"salu_eval_pin_factor", "ema_salu_eval_pin_factor"} <= set(r) for r in rows["pin"])
    assert all("salu_eval_pin_factor" not in r for r in rows["last"])
    for a, b in zip(rows["pin"], rows["last"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    for name, moved in (("pin", False), ("last", True)):
        ckpt = list_checkpoints(tmp_path / name)[-1]
        for ema in (False, True):  # the EMA weights are pinned on the same batches, as the raw ones
            model, meta, _ = model_from_checkpoint(ckpt, ema=ema)
            run_cfg = checkpoint_config(ckpt, meta)
            source = load_source(run_cfg, DistInfo(device=torch.device("cpu")))
            factors = pin_to_average(model, [b[0] for b in itertools.islice(source.train_batches(1), 3)], 0.5)
            worst = max(abs(f - 1) for f in factors.values())
            assert (worst > 1e-3) if moved else (worst < 1e-5), (name, ema, worst)
    _assert_resume_repeats_the_last_epoch(tmp_path / "pin")


def _reference(run_dir, n):
    """The reference images a run with --salu-recalibrate-measure reference pinned on: its epoch-1 batches' first n."""
    import itertools

    from salunet.train.checkpoint import list_checkpoints
    from salunet.train.distributed import DistInfo
    from salunet.train.evaluate import model_from_checkpoint
    from salunet.train.resume import checkpoint_config
    from salunet.train.sources import load_source

    ckpt = list_checkpoints(run_dir)[-1]
    _, meta, _ = model_from_checkpoint(ckpt)
    source = load_source(checkpoint_config(ckpt, meta), DistInfo(device=torch.device("cpu")))
    return ckpt, torch.cat([b[0] for b in itertools.islice(source.train_batches(0), n)])


def test_reference_pinning_pins_every_step_on_fixed_images_and_resumes_bit_for_bit(tmp_path):
    """--salu-recalibrate-measure reference: every step is pinned on the same images (the first 128 of epoch 1,
    here 4 batches of 32), and the raw and EMA weights again before each evaluation, so the checkpoint holds that
    pin (pinning it again on those images moves nothing; the run pinned on each step's own batch moves); the
    trained weights differ from that run's; a resumed run repeats it exactly."""
    import json

    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints, load_checkpoint
    from salunet.train.evaluate import model_from_checkpoint

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=192, test_subset=50, batch_size=32,
               epochs=2, ema_decay=0.9, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1,
               out=str(tmp_path))
    train(cfg, name="ref", salu_recalibrate_measure="reference")
    train(cfg, name="own")
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["salu_recalibrations"] for r in rows] == [6, 6]
    assert all({"salu_eval_pin_factor", "ema_salu_eval_pin_factor"} <= set(r) for r in rows)
    a, b = (load_checkpoint(list_checkpoints(tmp_path / n)[-1])[0]["model"] for n in ("ref", "own"))
    convs = [k for k in a if k.endswith("conv1.weight")]
    assert convs and max((a[k] - b[k]).abs().max().item() for k in convs) > 1e-4  # the steps pinned on the
    # reference (the evaluation's pin alone would leave the kernels as the own-batch run's, up to rounding)
    for name, moved in (("ref", False), ("own", True)):
        ckpt, reference = _reference(tmp_path / name, 4)
        assert reference.shape == (128, 1, 8, 8)
        for ema in (False, True):
            model, _, _ = model_from_checkpoint(ckpt, ema=ema)
            worst = max(abs(f - 1) for f in recalibrate_salu(model, [reference], 0.5).values())
            assert (worst > 1e-3) if moved else (worst < 1e-5), (name, ema, worst)
    _assert_resume_repeats_the_last_epoch(tmp_path / "ref")


def test_reference_pinning_at_batch_size_one_pins_on_many_images_and_does_not_warn(tmp_path, capsys):
    """At batch size 1 the reference is the first 128 images (here all 6 the epoch has), not the step's one: no
    warning, and the checkpoint is pinned on all of them."""
    from salunet.train import train
    from salunet.train.evaluate import model_from_checkpoint

    train(dict(model="salunet_c18_v2", width=2, data="digits", train_subset=6, test_subset=10, batch_size=1, epochs=1,
               progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1, salu_recalibrate_measure="reference",
               out=str(tmp_path), name="b1"))
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    assert "measured on epoch 1's first 128 training images (all, if it has fewer)" in printed.out  # what it pins on
    ckpt, reference = _reference(tmp_path / "b1", 128)
    assert len(reference) == 6
    model, _, _ = model_from_checkpoint(ckpt)
    assert max(abs(f - 1) for f in recalibrate_salu(model, [reference], 0.5).values()) < 1e-5
    assert max(abs(f - 1) for f in recalibrate_salu(model, [reference[:1]], 0.5).values()) > 1e-3  # not one image's


@pytest.mark.parametrize("images, batch", [(40, 32), (16, 32)])
def test_a_smaller_reference_pins_on_exactly_that_many_images(tmp_path, capsys, images, batch):
    """--salu-reference-images N: every step and the checkpoint are pinned on epoch 1's first N images (part of a
    batch, or of the batches ceil(N / B) covers), which the per-step pin line names; the first N + 8 or the first
    N - 8 give another pin."""
    from salunet.train import train
    from salunet.train.evaluate import model_from_checkpoint

    train(dict(model="salunet_c18_v2", width=2, data="digits", train_subset=96, test_subset=10, batch_size=batch,
               epochs=1, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1,
               salu_recalibrate_measure="reference", salu_reference_images=images, out=str(tmp_path), name="r"))
    assert f"measured on epoch 1's first {images} training images" in capsys.readouterr().out
    ckpt, first = _reference(tmp_path / "r", 2)
    model, _, _ = model_from_checkpoint(ckpt)
    assert max(abs(f - 1) for f in recalibrate_salu(model, [first[:images]], 0.5).values()) < 1e-5
    for other in (first[:images + 8], first[:images - 8]):
        assert max(abs(f - 1) for f in recalibrate_salu(model, [other], 0.5).values()) > 1e-4


def test_a_reference_the_processes_do_not_divide_is_refused_before_anything_is_written(tmp_path):
    """Under DDP each process pins on an equal share of the --salu-reference-images: 64 images on 3 processes are
    refused by the run's build (the process group's size known, nothing written yet), 63 are not."""
    import dataclasses

    from salunet.train.distributed import DistInfo
    from salunet.train.loop import _build, _pin_measure
    from salunet.train.resume import plan_run

    cfg = dict(model="salunet_c18_v2", width=2, data="digits", train_subset=96, test_subset=12, batch_size=48,
               epochs=1, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1,
               salu_recalibrate_measure="reference", out=str(tmp_path), name="r")
    three = DistInfo(rank=0, world=3)
    with pytest.raises(ValueError, match=r"--salu-reference-images 64 must be divisible by the number of processes "
                                         r"\(3\).*with a multiple of 3"):
        _build(plan_run(dict(cfg, salu_reference_images=64), None, {}), three)
    with pytest.raises(ValueError, match=r"--salu-reference-images 32 \(what salunet_c18_v3 declares\) must be "
                                         r"divisible by the number of processes \(3\)"):
        _build(plan_run(dict(cfg, model="salunet_c18_v3", model_overrides={}), None, {}), three)
    run, epoch, step = _build(plan_run(dict(cfg, salu_reference_images=63), None, {}), three)
    assert (epoch, step) == (0, 0) and not (tmp_path / "r").exists()
    # the line the run prints names those images: not epoch 1's first 63 (batch 48 does not divide 63)
    assert _pin_measure(run.cfg, 3).startswith("on 63 training images of epoch 1's first 2 batch(es), the first 21 of "
                                               "each rank's share")
    assert _pin_measure(run.cfg, 1).startswith("on epoch 1's first 63 training images")
    assert _pin_measure(dataclasses.replace(run.cfg, salu_reference_images=96), 3).startswith("on epoch 1's first 96")


@pytest.mark.parametrize("over, match", [({"salu_recalibrate_every": 5}, "needs a target"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": -1}, "whole number"),
                                         ({"salu_recalibrate_rate": 0.1}, "rate needs a target"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_rate": 0.0}, r"in \(0, 1\]"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_rate": 2.0}, r"in \(0, 1\]"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_measure": "step"},
                                          "per-step recalibration's"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": 1,
                                           "salu_recalibrate_measure": "step"}, "needs --salu-recalibrate-rate <= 0.5"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": 1,
                                           "salu_recalibrate_measure": "batch"}, "not one of forward, step"),
                                         ({"salu_recalibrate": 0.5, "salu_eval_pin": 4}, "applies to per-step"),
                                         ({"salu_project_grad_rate": 0.5}, "needs the projection"),
                                         ({"salu_project_grad": True, "salu_project_grad_rate": 1.5}, r"in \(0, 1\]"),
                                         ({"salu_project_grad": True, "salu_project_grad_rate": 0.5, "amp": "fp16"},
                                          "fp16's loss scaling"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_measure": "reference"},
                                          "per-step recalibration's"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": 1,
                                           "salu_recalibrate_rate": 0.1, "salu_recalibrate_measure": "reference"},
                                          "no batch noise to average"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": 1, "salu_eval_pin": 2,
                                           "salu_recalibrate_measure": "reference"}, "drop --salu-eval-pin"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": 1,
                                           "salu_eval_pin": -1}, "whole number of batches"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": 1,
                                           "salu_recalibrate_measure": "reference", "salu_reference_images": 0},
                                          "whole number of images >= 1"),
                                         ({"salu_recalibrate": 0.5, "salu_recalibrate_every": 1,
                                           "salu_reference_images": 64}, "add that, or drop --salu-reference-images")])
def test_recalibration_every_is_checked(over, match):
    from salunet.train.config import resolve_config

    with pytest.raises(ValueError, match=match):
        resolve_config(overrides=over)


def test_recal_cost_script(capsys):
    """scripts/recal_cost.py: a time per step and a ratio for every setting (no recalibration is the 1.0 base);
    bad --every exits 2 (argparse)."""
    import json

    mod = _script("recal_cost")
    assert mod.main(["--width", "2", "--batch", "4", "--size", "8", "--every", "1,3", "--steps", "1",
                     "--repeats", "1", "--measure", "forward,step,project,module,recipe",
                     "--overrides", '{"conv_ws": "scaled"}']) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["ms_per_step"]) == set(out["ratio_to_off"]) == {"0", "1", "3", "1:step", "3:step",
                                                                "1:project", "3:project", "1:module", "3:module",
                                                                "1:recipe", "3:recipe"}
    assert out["overrides"] == {"conv_ws": "scaled"}
    assert out["ratio_to_off"]["0"] == 1.0 and all(v > 0 for v in out["ms_per_step"].values())
    assert out["compile"] is False and out["reference"] is None
    for bad in (["--every", "x"], ["--every", "0"], ["--device", "nodevice"], ["--measure", "forward,later"],
                ["--compile", "--measure", "forward,step"], ["--compile", "--measure", "recipe"],
                ["--overrides", "{stem"], ["--overrides", "[1]"], ["--reference", "0"]):
        with pytest.raises(SystemExit) as exc:
            mod.main(bad)
        assert exc.value.code == 2


def test_recal_cost_script_pins_on_the_reference_images(capsys, monkeypatch):
    """scripts/recal_cost.py --reference N: the module and recipe pins run on N images of their own (what
    --salu-reference-images N costs; more than the batch, as at small batch sizes), the training steps on the
    batch."""
    import json

    mod = _script("recal_cost")
    pinned = []
    real = mod.pin_in_forward
    monkeypatch.setattr(mod, "pin_in_forward", lambda model, x, *args, **kw: (pinned.append(len(x)),
                                                                              real(model, x, *args, **kw))[1])
    assert mod.main(["--width", "2", "--batch", "4", "--size", "8", "--every", "1", "--steps", "1", "--repeats", "1",
                     "--measure", "module,recipe", "--reference", "6"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reference"] == 6 and set(out["ms_per_step"]) == {"0", "1:module", "1:recipe"}
    assert pinned and set(pinned) == {6}


def test_bench_projection_script(capsys):
    """scripts/bench_projection.py: the projection's backward at every SALU site of one step, C++ and op by op, a
    time each and their ratio; bad arguments exit 2 (argparse)."""
    import json

    from salunet import create_model
    from salunet.train.recalibrate import salu_sites

    mod = _script("bench_projection")
    assert mod.main(["--model", "salunet_c18_v2", "--overrides", "{}", "--width", "2", "--batch", "2", "--size", "8",
                     "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["sites"] == len(salu_sites(create_model("salunet_c18_v2", num_classes=10, width=2)))
    assert set(out["ms_per_step"]) == {"cpp", "eager"} and all(v > 0 for v in out["ms_per_step"].values())
    assert out["cpp_to_eager"] > 0 and out["elements"] > 0
    for bad in (["--overrides", "{x"], ["--overrides", "[]"], ["--repeats", "0"]):
        with pytest.raises(SystemExit) as exc:
            mod.main(bad)
        assert exc.value.code == 2


def test_per_step_recalibration_at_batch_size_one_warns(tmp_path, capsys):
    """Pinned to one image's statistics every step, training stayed at chance at batch size 1 (RESULTS.md): the run
    says so, and not with a batch of 2 or a running mean square (--salu-recalibrate-rate < 1); likewise the
    projected gradient with one image's statistics, or a few (32 or fewer per backward), and not with running sums."""
    from salunet.train import train

    train(dict(model="salunet_c18_v2", width=2, data="digits", train_subset=4, test_subset=10, batch_size=1, epochs=1,
               progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1, out=str(tmp_path), name="b1"))
    assert "warning: --salu-recalibrate-every with one image per step" in capsys.readouterr().err
    train(dict(model="salunet_c18_v2", width=2, data="digits", train_subset=4, test_subset=10, batch_size=2, epochs=1,
               progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1, out=str(tmp_path), name="b2"))
    assert "warning" not in capsys.readouterr().err
    train(dict(model="salunet_c18_v2", width=2, data="digits", train_subset=4, test_subset=10, batch_size=1, epochs=1,
               progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1, salu_recalibrate_rate=0.01,
               out=str(tmp_path), name="b1rate"))  # a running mean square: what the warning recommends
    assert "warning" not in capsys.readouterr().err
    from salunet.train.checkpoint import list_checkpoints, load_checkpoint

    states = [load_checkpoint(list_checkpoints(tmp_path / n)[-1])[0]["model"] for n in ("b1", "b1rate")]
    keys = [k for k in states[0] if k.endswith("log_b")]
    assert keys and not all(torch.equal(states[0][k], states[1][k]) for k in keys)  # the rate reached the trainer
    # the projection with one image's own statistics trained near chance at batch size 1: warned, and not with
    # running sums or two images per backward
    common = dict(model="salunet_c18_v2", width=2, data="digits", train_subset=4, test_subset=10, epochs=1,
                  progress=False, salu_project_grad=True, out=str(tmp_path))
    train(dict(common, batch_size=1, name="p1"))
    assert "warning: --salu-project-grad with one image per backward" in capsys.readouterr().err
    # a few images per backward (per micro-batch here: 4 x 2 accumulated) tested below the running sums on CIFAR-10
    train(dict(common, batch_size=4, accum_steps=2, name="p2"))
    assert "warning: --salu-project-grad with 2 images per backward" in capsys.readouterr().err
    train(dict(common, batch_size=32, train_subset=32, name="p32"))  # the largest measured below the running sums
    assert "warning: --salu-project-grad with 32 images per backward" in capsys.readouterr().err
    train(dict(common, batch_size=33, train_subset=33, name="p33"))
    train(dict(common, batch_size=1, salu_project_grad_rate=0.1, name="p1rate"))
    train(dict(common, batch_size=4, accum_steps=2, salu_project_grad_rate=0.1, name="p2rate"))
    assert "warning" not in capsys.readouterr().err


def test_pin_lag_script(tmp_path, capsys):
    """scripts/pin_lag.py: a series per setting (exact and each rate), one value per step; no data file: exit 2."""
    import json

    import numpy as np

    g = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x_train=g.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
             y_train=g.integers(0, 10, 12))
    mod = _script("pin_lag")
    # NCHW in memory: channels_last images reach torch's CPU bug in the width-2 model's 1x1 stride-2 shortcut
    # (a crash with one thread, wrong gradients with two: models/channels_last.py)
    images = sys.modules["salu_operating_point"].training_images  # what pin_lag's labelled_training_images reads
    for x in (images(str(tmp_path / "c.npz"), 12)[0], images("digits", 4)[0]):
        n, c, h, w = x.shape  # NCHW strides; one channel passes is_contiguous() with channels_last's too
        assert x.stride() == (c * h * w, h * w, w, 1), x.stride()
    assert mod.main(["--data-path", str(tmp_path / "c.npz"), "--width", "2", "--steps", "3", "--batch", "4",
                     "--rates", "1,0.5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["series"]) == {"exact", "1.0", "0.5"}
    assert all(len(v["max_abs_log_factor"]) == 3 for v in out["series"].values())
    assert mod.main(["--data-path", str(tmp_path / "none.npz")]) == 2
    with pytest.raises(SystemExit) as exc:
        mod.main(["--rates", "0"])
    assert exc.value.code == 2


def test_projected_gradient_is_the_gradient_through_an_in_graph_scale_normalisation():
    """float64: a SALU pinned to this batch (sqrt(ab) * rms = K per channel) with its input's gradient projected
    gives the layers before it exactly the gradient of the same SALU applied to x / rms(x) with rms in the graph
    (an uncentred batch normalisation); unprojected, the gradient differs. The forward is unchanged."""
    from salunet.nn import SALU
    from salunet.train.recalibrate import project_radial_grad, recalibrate_salu

    torch.manual_seed(0)
    salu = SALU(4).double()
    with torch.no_grad():
        salu.log_a.copy_(torch.randn(4) * 0.3), salu.log_b.copy_(torch.randn(4) * 0.3)
    x0 = torch.randn(6, 4, 3, 5, dtype=torch.float64) * torch.tensor([0.5, 2.0, 1.0, 3.0]).view(1, 4, 1, 1) + 0.3
    w = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    recalibrate_salu(salu, [x0], 0.5)
    rms = x0.square().mean((0, 2, 3)).sqrt()
    torch.testing.assert_close(torch.exp(0.5 * (salu.log_a + salu.log_b)).detach() * rms,
                               torch.full((4,), 0.5, dtype=torch.float64))
    amp = torch.exp(0.5 * (salu.log_a - salu.log_b)).detach().view(1, 4, 1, 1)

    def normalised(x):  # A * t / sqrt(1 + t²), t = K x / rms(x), rms in the graph
        t = 0.5 * x / x.square().mean((0, 2, 3), keepdim=True).sqrt()
        return amp * t / (1 + t.square()).sqrt()

    xs = [x0.clone().requires_grad_() for _ in range(3)]
    y_proj, y_ref, y_plain = salu(project_radial_grad(xs[0], 1)), normalised(xs[1]), salu(xs[2])
    torch.testing.assert_close(y_proj, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(y_proj, y_plain)
    for y in (y_proj, y_ref, y_plain):
        (y * w).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(xs[2].grad, xs[1].grad, rtol=1e-3)
    # the projected gradient has no component along x in any channel
    torch.testing.assert_close((xs[0].grad * x0).sum((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-12,
                               rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens", "scalar", "strided", "large", "large_tokens"])
@pytest.mark.parametrize("running", [False, True])
def test_the_cpp_projection_is_the_op_by_op_one(dtype, layout, running):
    """The C++ kernel of the projected gradient (kernels.radial_project, two passes) against the op-by-op form
    (SALUNET_KERNELS=eager) on the same inputs: the gradient and, with running sums, the sums handed out through the
    probe; in every layout the C++ path takes (NCHW, channels_last with a contiguous gradient, (B, T, C) tokens, one
    scalar SALU, a strided view made dense, and shapes large enough that two threads sum in two chunks), with a
    silent channel (its gradient kept)."""
    from salunet.nn import kernels
    from salunet.train.recalibrate import RunningCoefficient, project_radial_grad

    g0 = torch.Generator().manual_seed(0)
    shape, axis = {"tokens": ((3, 7, 20), -1), "scalar": ((4, 6, 5, 7), None), "large": ((8, 16, 32, 32), 1),
                   "large_tokens": ((64, 64, 20), -1), "strided": ((4, 40, 5, 7), 1)}.get(layout, ((4, 20, 5, 7), 1))
    view = (lambda t: t[:, ::2]) if layout == "strided" else (lambda t: t)
    base = torch.randn(*shape, generator=g0, dtype=torch.float64) * 2 + 0.5
    if axis == 1:
        view(base)[:, 3] = 0  # a silent channel: sum(x²) = 0, its gradient passes unprojected
    base = base.to(dtype)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    w = torch.randn(view(base).shape, generator=g0, dtype=torch.float64).to(dtype)  # contiguous: other strides
    # than a channels_last input
    channels = 1 if axis is None else view(base).shape[axis]
    grads, sums, threads = {}, {}, torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for mode in ("eager", "cpp"):
            run = RunningCoefficient(0.3, channels, torch.float32) if running else None
            leaf = base.clone(memory_format=torch.preserve_format).requires_grad_()
            with kernels.using_kernel_mode(mode):
                assert kernels.radial_project_in_cpp(view(leaf)) == (mode == "cpp")
                if running:  # one earlier batch in the sums, so that the coefficient mixes both
                    (project_radial_grad(view(leaf).detach().flip(0).requires_grad_(), axis, run) * w).sum().backward()
                (project_radial_grad(view(leaf), axis, run) * w).sum().backward()
            grads[mode] = leaf.grad
            sums[mode] = torch.stack([run.num, run.den]) if running else None
    finally:
        torch.set_num_threads(threads)
    assert grads["cpp"].dtype == dtype and grads["cpp"].shape == base.shape
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(grads["cpp"].double(), grads["eager"].double(), rtol=tol, atol=tol)
    if axis == 1:
        assert torch.equal(view(grads["cpp"])[:, 3], w[:, 3])
    if layout == "strided":
        assert not grads["cpp"][:, 1::2].any()  # the elements the view skips get no gradient
    if running:
        torch.testing.assert_close(sums["cpp"], sums["eager"], rtol=1e-5, atol=1e-5)


def test_the_cpp_projection_takes_any_gradient_and_gives_way_to_graphs():
    """The C++ projection with a stride-0 gradient (the backward of a plain .sum()) is the op-by-op one; a double
    backward (create_graph), a forward under a dispatch mode (FlopCounterMode) and an empty batch take or give the
    right thing: a graph to differentiate, ops the mode sees, an empty gradient."""
    from torch.utils.flop_counter import FlopCounterMode

    from salunet.nn import kernels
    from salunet.train.recalibrate import project_radial_grad

    x0 = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    grads = {}
    for mode in ("eager", "cpp"):
        x = x0.clone().requires_grad_()
        with kernels.using_kernel_mode(mode):
            project_radial_grad(x, 1).sum().backward()
        grads[mode] = x.grad
    torch.testing.assert_close(grads["cpp"], grads["eager"], rtol=1e-12, atol=1e-12)
    x = x0.clone().requires_grad_()
    w = torch.randn_like(x0, requires_grad=True)
    (g,) = torch.autograd.grad((project_radial_grad(x, 1) * w).sum(), x, create_graph=True)
    assert g.grad_fn is not None  # the op-by-op form: differentiable again
    (gw,) = torch.autograd.grad(g.square().sum(), w)
    assert torch.isfinite(gw).all() and gw.abs().max() > 0
    with FlopCounterMode(display=False):
        assert not kernels.radial_project_in_cpp(x)
    empty = torch.randn(0, 4, 5, 6, requires_grad=True)
    project_radial_grad(empty, 1).sum().backward()
    assert empty.grad.shape == empty.shape


def test_gradient_projection_hooks_act_only_on_training_forwards_with_autograd():
    """--salu-project-grad's hooks: training forwards get projected input gradients (no component along the input
    per channel at every site, checked at the first); evaluation and no-grad forwards pass the input untouched;
    the forward's values never change; remove() restores plain gradients."""
    from salunet import create_model
    from salunet.train.recalibrate import GradientProjection, salu_sites

    torch.manual_seed(0)
    model = create_model("salunet_c18_v2", num_classes=10, width=4).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    seen = {}
    site, salu = next(iter(salu_sites(model).values()))
    site.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    y_plain = model(x)
    proj = GradientProjection(model)
    y = model(x)
    assert torch.equal(y, y_plain)
    seen["x"].retain_grad()
    y.square().sum().backward()
    g, xin = seen["x"].grad, seen["x"].detach()
    torch.testing.assert_close((g * xin).sum((0, 2, 3)), torch.zeros(g.shape[1], dtype=torch.float64), atol=1e-9,
                               rtol=0)
    model.eval()
    model(x)
    assert seen["x"].grad_fn is None or "ProjectRadial" not in type(seen["x"].grad_fn).__name__
    model.train()
    proj.remove()
    y2 = model(x)
    seen["x"].retain_grad()
    y2.square().sum().backward()
    assert (seen["x"].grad * seen["x"].detach()).sum((0, 2, 3)).abs().max() > 1e-3


def test_running_projection_subtracts_the_coefficient_of_running_sums():
    """float64, --salu-project-grad-rate r: step 1 projects with its own batch's coefficient, step 2 with
    ((1 - r) n1 + n2) / ((1 - r) d1 + d2) (n = sum(g x), d = sum(x²) per channel: running sums, whose bias
    corrections cancel); reset() starts again; a channel silent in a batch keeps its coefficient, and a nearly
    silent one (whose own ratio is huge) does not throw it; a batch of one image is projected (per channel, over
    its positions) without zeroing its gradient."""
    from salunet.train.recalibrate import GradientProjection, RunningCoefficient, project_radial_grad

    g0 = torch.Generator().manual_seed(0)
    r, running = 0.25, RunningCoefficient(0.25, 4, torch.float64)
    xs = [torch.randn(3, 4, 2, 5, dtype=torch.float64, generator=g0) for _ in range(3)]
    ws = [torch.randn(3, 4, 2, 5, dtype=torch.float64, generator=g0) for _ in range(3)]
    ns = [(w * x).sum((0, 2, 3), keepdim=True) for x, w in zip(xs, ws)]
    ds = [x.square().sum((0, 2, 3), keepdim=True) for x in xs]
    expect = [ns[0] / ds[0], ((1 - r) * ns[0] + ns[1]) / ((1 - r) * ds[0] + ds[1]), ns[2] / ds[2]]
    for i, (x, w) in enumerate(zip(xs, ws)):
        if i == 2:
            running.reset()
        x = x.clone().requires_grad_()
        (project_radial_grad(x, 1, running) * w).sum().backward()
        torch.testing.assert_close(x.grad, w - x.detach() * expect[i], rtol=1e-12, atol=1e-12)
    # channel 2 silent, channel 3 nearly silent (its own ratio ~1e20): neither moves its coefficient much
    x = xs[0].clone()
    x[:, 2] = 0
    x[:, 3] *= 1e-20
    running.reset()
    (project_radial_grad(xs[1].clone().requires_grad_(), 1, running) * ws[1]).sum().backward()
    x.requires_grad_()
    (project_radial_grad(x, 1, running) * ws[0]).sum().backward()
    coef = running.coefficient()
    before = (ns[1] / ds[1]).flatten()
    assert coef.flatten()[2] == pytest.approx(before[2].item(), rel=1e-12)
    assert coef.flatten()[3] == pytest.approx(before[3].item(), rel=1e-6)
    assert torch.isfinite(x.grad).all() and x.grad[:, 3].abs().max() < 10 * ws[0][:, 3].abs().max()
    one = torch.randn(1, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(1, 4, 2, 5, dtype=torch.float64)
    running.reset()
    (project_radial_grad(one, 1, running) * w1).sum().backward()  # warm: the first step is its own batch's
    (project_radial_grad(one, 1, running) * (w1 + 1)).sum().backward()
    assert one.grad.abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        GradientProjection(nn.Identity(), rate=0.0)


def test_running_projection_outside_the_trainer():
    """GradientProjection(rate < 1) as a library user calls it: two forwards before their backwards, and a second
    backward of a retained graph, each fold their sums (the folds replace the sums rather than overwrite what a
    pending backward saved); torch.autograd.grad leaves the sums alone unless the probe is among its inputs and
    folded; an input that needs no gradient is left as it is (no projection node)."""
    from salunet.train.recalibrate import GradientProjection

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), SALU(4, a_init=1.5, b_init=2.0)).double()
    proj = GradientProjection(model, rate=0.5)
    run = proj._running["1"]
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def sums(x):  # this batch's raw sums at the SALU input, sum(g x) and sum(x²), for the loss y.square().sum()
        h = model[0](x).detach().requires_grad_()
        (g,) = torch.autograd.grad(model[1].eval()(h).square().sum(), h)  # eval: the hooks pass it through
        model.train()
        return (g * h).sum(0), h.detach().square().sum(0)

    l1, l2 = model(x1).square().sum(), model(x2).square().sum()
    l1.backward()
    l2.backward()
    (n1, d1), (n2, d2) = sums(x1), sums(x2)
    torch.testing.assert_close(run.num, 0.5 * (0.5 * n1) + 0.5 * n2)
    torch.testing.assert_close(run.den, 0.5 * (0.5 * d1) + 0.5 * d2)
    proj.reset()
    loss = model(x1).square().sum()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(run.num, 0.5 * (0.5 * n1) + 0.5 * n1)
    before = run.num.clone()
    torch.autograd.grad(model(x2).square().sum(), list(model.parameters()))
    assert torch.equal(run.num, before) and run.probe.grad is None
    _, g_probe = torch.autograd.grad(model(x2).square().sum(), [model[0].weight, run.probe])
    run.fold(g_probe)
    torch.testing.assert_close(run.num, 0.5 * before + 0.5 * n2)
    seen = {}
    model[1].register_forward_hook(lambda m, a, out: seen.update(x=a[0]))
    model[1](torch.randn(2, 4, dtype=torch.float64))
    assert seen["x"].grad_fn is None


def test_training_with_a_running_projection_under_compile(tmp_path, monkeypatch):
    """--compile true with --salu-project-grad-rate (refused before the sums left the backward as a gradient):
    the run trains (aot_eager standing in for inductor, as in test_train.py) and its weights match the eager run's
    after two epochs to float32 rounding. The pin's reference images (96) are not a training batch's shape (32):
    each shape is compiled once, static (with dynamo's automatic dynamic shapes the training graph was compiled
    again with a symbolic batch size once the pin had run)."""
    from torch._dynamo.backends.registry import lookup_backend

    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints, load_checkpoint

    torch_compile, batch_sizes = torch.compile, []

    def backend(gm, example_inputs):
        batch_sizes.append([e.shape[0] for e in example_inputs  # the images (digits: 1 x 8 x 8)
                            if isinstance(e, torch.Tensor) and tuple(e.shape[1:]) == (1, 8, 8)]
                           + [e for e in example_inputs if not isinstance(e, torch.Tensor)])  # a symbolic size
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(torch, "compile", lambda model, **kw: torch_compile(model, **{**kw, "backend": backend}))
    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=96, test_subset=50, batch_size=32,
               epochs=2, ema_decay=0.0, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1,
               salu_recalibrate_measure="reference", salu_project_grad=True, salu_project_grad_rate=0.1,
               model_overrides={"layers": [1, 1, 1, 1]}, out=str(tmp_path))  # one block a stage: half the tracing
    train(cfg, name="compiled", compile=True)
    # the pin's graph (first: it runs before the first step) and the training graph, each with its images' batch
    # size and no other input than tensors (compiled with dynamic shapes, a graph takes its symbolic sizes as
    # torch.SymInt inputs)
    assert batch_sizes == [[96], [32]], batch_sizes
    train(cfg, name="eager")
    a, b = (load_checkpoint(list_checkpoints(tmp_path / n)[-1])[0]["model"] for n in ("compiled", "eager"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


def test_training_with_a_running_projection_differs_and_resumes_bit_for_bit(tmp_path):
    """--salu-project-grad-rate 0.1 reaches the trainer (weights differ from the batch's own coefficient's) and a
    resumed run repeats the last epoch exactly (the running coefficients restart at every epoch)."""
    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints, load_checkpoint

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=128, test_subset=50, batch_size=32,
               epochs=2, ema_decay=0.0, progress=False, salu_recalibrate=0.5, salu_recalibrate_every=1,
               salu_recalibrate_measure="reference", salu_project_grad=True, out=str(tmp_path))
    train(cfg, name="run", salu_project_grad_rate=0.1)
    train(cfg, name="own")
    a, b = (load_checkpoint(list_checkpoints(tmp_path / n)[-1])[0]["model"] for n in ("run", "own"))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))
    _assert_resume_repeats_the_last_epoch(tmp_path / "run")


def test_radial_share_script_matches_direct_gradients_in_float64(tmp_path, capsys):
    """scripts/radial_share.py: in float64, on a conv -> SALU -> SWALU toy with a curved SALU, the per-channel radial
    shares of the gradient at the SALU input and (from SALU's derivative) at its output equal those measured
    directly at both tensors; the two differ, so the derivative is applied; the CLI prints one pair per stage and
    a missing data file exits 2."""
    import json

    import numpy as np
    import torch.nn.functional as F

    mod = _script("radial_share")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SALU(4, a_init=1.5, b_init=2.0), SWALU(4),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()
    x, y = torch.randn(10, 3, 6, 6, dtype=torch.float64), torch.randint(0, 5, (10,))
    shares = mod.radial_shares(model, x, y, batch=4)  # three batches: the sums run over all of them
    assert list(shares) == ["1"] and shares["1"]["n"] == 10 * 6 * 6

    def direct(site: nn.Module) -> tuple[torch.Tensor, ...]:
        gx, gg, xx, rho = 0, 0, 0, []
        for i in range(0, 10, 4):
            held = {}
            h = site.register_forward_pre_hook(lambda m, a: held.update(t=a[0]))
            hs = model[1].register_forward_pre_hook(lambda m, a: held.update(s=a[0]))
            loss = F.cross_entropy(model(x[i:i + 4]), y[i:i + 4])
            h.remove(), hs.remove()
            (g,) = torch.autograd.grad(loss, held["t"])
            v = held["s"].detach()  # the SALU input: both shares are taken against it
            gx, gg, xx = gx + (g * v).sum((0, 2, 3)), gg + (g * g).sum((0, 2, 3)), xx + (v * v).sum((0, 2, 3))
            if len(v) == 4:  # full batches only
                rho.append((g * v).sum((0, 2, 3)) / (v * v).sum((0, 2, 3)))
        return gx ** 2 / (gg * xx), torch.stack(rho)

    (r_in, rho_in), (r_out, _) = direct(model[1]), direct(model[2])  # rho: per batch, against the SALU input
    torch.testing.assert_close(torch.tensor(shares["1"]["rho"], dtype=torch.float64), rho_in, rtol=1e-9, atol=1e-12)
    t, mean = mod.push_consistency(shares["1"]["rho"])
    r = rho_in.numpy()
    assert r.shape[0] == 2  # batches of 4, 4 and 2: the short one is left out
    np.testing.assert_allclose(t, r.mean(0) / (r.std(0, ddof=1) / np.sqrt(2)), rtol=1e-12)
    np.testing.assert_allclose(mean, r.mean(0), rtol=1e-12)
    entry = mod._record(shares["1"])  # what --json writes: the statistic, not every batch's rho
    assert "rho" not in entry and entry["batches"] == 2 and entry["t"] == t.tolist() and entry["n"] == 10 * 6 * 6
    with pytest.raises(ValueError, match="at least 2 full batches"):
        mod.push_consistency(shares["1"]["rho"][:1])
    t0, _ = mod.push_consistency([[0.0, 1.0, float("nan")], [0.0, 2.0, 1.0]])  # dead channel: 0; NaN stays NaN
    assert t0[0] == 0 and t0[1] == 3.0 and np.isnan(t0[2])
    torch.testing.assert_close(torch.tensor(shares["1"]["in"], dtype=torch.float64), r_in, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(shares["1"]["out"], dtype=torch.float64), r_out, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(r_in, r_out, rtol=1e-3)
    assert ((r_in >= 0) & (r_in <= 1)).all()

    g = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x_train=g.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
             y_train=g.integers(0, 10, 16))
    assert mod.main(["--data-path", str(tmp_path / "c.npz"), "--images", "16", "--width", "4",
                     "--json", str(tmp_path / "r.json"), "init:salunet_c18_v2"]) == 0
    line = capsys.readouterr().out
    assert all(f" {s} " in line for s in ("stem", "layer1", "layer2", "layer3", "layer4"))
    assert "fewer than 2 full batches or no SALU: no radial push statistic" in line  # 16 images: one short batch
    assert len(json.loads((tmp_path / "r.json").read_text())["init:salunet_c18_v2"]) == 20
    assert mod.main(["--data-path", str(tmp_path / "none.npz"), "init:salunet_c18_v2"]) == 2
    assert mod.main(["--data-path", str(tmp_path / "c.npz"), "--images", "16", "--width", "4", "init:resnet18_bn"]) == 0
    assert "no SALU" in capsys.readouterr().out  # a model without SALU sites is reported, not a crash


def test_eval_pin_script(tmp_path, capsys):
    """scripts/eval_pin.py on a per-step pinned run: 'as saved' is the run's last test accuracy (the data rebuilt
    as trained), the average of one batch is that batch's own pin, JSON lines written; a run pinned once an
    epoch and a folder without checkpoints: exit 2 with the reason."""
    import json

    from salunet.train import train

    cfg = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=128, test_subset=60, batch_size=32,
               epochs=1, ema_decay=0.0, progress=False, salu_recalibrate=0.5, out=str(tmp_path))
    train(cfg, name="step", salu_recalibrate_every=1)
    train(cfg, name="epoch")
    train(cfg, name="bn", model="resnet18_bn", salu_recalibrate=0.0)
    mod = _script("eval_pin")
    out = tmp_path / "pins.jsonl"
    assert mod.main([str(tmp_path / "step"), str(tmp_path / "bn"), "--batches", "1,3", "--singles", "2",
                     "--json", str(out), "--plot", str(tmp_path / "pins.png")]) == 0
    assert (tmp_path / "pins.png").read_bytes()[:4] == b"\x89PNG"
    assert mod.main(["salu", "bn", "--replot", "--json", str(out), "--plot", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000
    assert "as saved" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["salu", "batchnorm"]
    for row, name in zip(rows, ("step", "bn")):
        last = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["as_saved"] == last["test_acc"]
        assert len(row["single_batches"]) == 2 and row["average_1"] == row["single_batches"][0]
        assert {"average_1", "average_3"} <= set(row) and row["epoch"] == 1
    assert mod.main([str(tmp_path / "epoch")]) == 2
    assert "without a pin every step" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert mod.main([str(tmp_path / "empty")]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_eval_pin_batchnorm_average_is_the_plain_mean_of_the_batches():
    """scripts/eval_pin.py's BatchNorm pin: running mean and variance = the plain average of the batches' (float64),
    momentum restored, the model left in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3)).double()
    xs = [torch.randn(5, 3, 6, 6, dtype=torch.float64) * s for s in (1.0, 2.0, 0.5)]
    _script("eval_pin")._batchnorm_average(net, [net[1]], xs)
    with torch.no_grad():
        hs = [net[0](x) for x in xs]
    torch.testing.assert_close(net[1].running_mean, torch.stack([h.mean((0, 2, 3)) for h in hs]).mean(0))
    torch.testing.assert_close(net[1].running_var, torch.stack([h.var((0, 2, 3)) for h in hs]).mean(0))
    assert net[1].momentum == 0.3 and not net.training


def test_factors_stay_on_the_device_without_sync_and_equal_the_synchronised_ones():
    """recalibrate_salu / StepStatistics.pin with sync=False (the trainer's per-step pin) return 0-d tensors, read
    once per epoch instead of once per site and step; the values are those sync=True returns as floats."""
    from salunet.models import create_model
    from salunet.train.recalibrate import recalibrate_salu

    torch.manual_seed(0)
    model = create_model("salunet_c18_v2", num_classes=10, width=4)
    x = torch.randn(8, 3, 16, 16)
    clone = copy.deepcopy(model)
    lazy = recalibrate_salu(model, [x], 0.5, sync=False)
    eager = recalibrate_salu(clone, [x], 0.5)
    assert lazy.keys() == eager.keys() and len(lazy) > 5
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in lazy.values())
    assert all(isinstance(v, float) for v in eager.values())
    assert [float(v) for v in lazy.values()] == list(eager.values())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), clone.state_dict().values()))


def _logs(net):
    return [(s.log_a.detach().clone(), s.log_b.detach().clone()) for _, s in salu_sites(net).values()]


@pytest.mark.parametrize("rate", [1.0, 0.25])
def test_pin_in_forward_is_the_hooks_pin_bitwise(rate):
    """pin_in_forward (the sites pin themselves in the model's forward) sets the parameters recalibrate_salu's hooks
    set, bitwise (the same functions in the same order), for a standalone SALU, a fused pair and a residual tail;
    the factors agree to the parameters' rounding; the model's mode and the module slot are restored."""
    torch.manual_seed(0)
    hooks, inner = _Net(), _Net()
    inner.load_state_dict(hooks.state_dict())
    inner.train()
    x = _batches(1)[0][0]
    f_hooks = recalibrate_salu(hooks, [x], 0.3, rate=rate, training_shape=True)
    f_inner = pin_in_forward(inner, x, 0.3, rate=rate)
    for (a1, b1), (a2, b2) in zip(_logs(hooks), _logs(inner)):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert list(f_inner) == list(f_hooks) and all(v.dtype == torch.float64 and v.dim() == 0 for v in f_inner.values())
    for name in f_hooks:
        assert float(f_inner[name]) == pytest.approx(f_hooks[name], rel=1e-6)
    assert any(abs(v - 1) > 0.1 for v in f_hooks.values())  # the pin moved something
    assert inner.training and modules.pin_site is None
    torch.testing.assert_close(inner(x), hooks(x), rtol=0, atol=0)


def test_pin_in_forward_refuses_and_cleans_up():
    net = _Net()
    x = _batches(1)[0][0]
    with pytest.raises(ValueError, match="no SALU"):
        pin_in_forward(nn.Conv2d(3, 4, 3), x, 0.5)
    with pytest.raises(ValueError, match="target"):
        pin_in_forward(net, x, 0.0)
    before = _logs(net)
    with pytest.raises(RuntimeError, match="3 channels"):  # a failing forward leaves no pin behind
        pin_in_forward(net, torch.randn(2, 5, 6, 6), 0.5)
    assert modules.pin_site is None and net.training
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(before, _logs(net)))

    def nested(_x):
        return pin_in_forward(net, x, 0.5)
    with pytest.raises(RuntimeError, match="does not nest"):
        pin_in_forward(net, x, 0.5, forward=nested)
    assert modules.pin_site is None


def test_pin_in_forward_compiles_into_one_graph():
    """Through torch.compile (aot_eager: the functionalisation that carries the in-place parameter updates out of
    the graph), fullgraph: the pin is traced whole, its updates reach the model's parameters (as eager's, to float32
    reduction order), and a second pin reuses the graph. The trainer's --compile path (CUDA inductor:
    tests/test_gpu.py)."""
    torch.manual_seed(0)
    eager, comp = _Net(), _Net()
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, backend="aot_eager", fullgraph=True)
    x = _batches(1)[0][0]
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    for _ in range(2):
        pin_in_forward(eager, x, 0.3)
        pin_in_forward(comp, x, 0.3, forward=compiled)
        for (a1, b1), (a2, b2) in zip(_logs(eager), _logs(comp)):
            torch.testing.assert_close(a2, a1, rtol=0, atol=1e-5)
            torch.testing.assert_close(b2, b1, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert not any(abs(float(v) - 1) > 1e-4 for v in pin_in_forward(comp, x, 0.3, forward=compiled).values())
    assert counters["stats"]["unique_graphs"] == 1
    before = _logs(comp)  # the compiled model's other forwards never reuse the pinning graph (dynamo guards on the
    compiled(x).sum().backward()  # slot): training and evaluation leave the parameters as they were
    comp.eval()
    with torch.no_grad():
        compiled(x)
    assert counters["stats"]["unique_graphs"] == 3
    assert all(torch.equal(a1, a2) and torch.equal(b1, b2) for (a1, b1), (a2, b2) in zip(before, _logs(comp)))
