"""salunet.SaluPin: the trainer's measured-best pin (reference images + projected gradient) in a loop of your own.

The strongest check is the first: a hand-written loop with SaluPin, fed the trainer's own batches, ends at the
trainer's weights (``--salu-recalibrate 0.15 --salu-recalibrate-every 1 --salu-recalibrate-measure reference
--salu-project-grad``) to float rounding. The others check what the pin sets, the projection, the refusals and the
sums over processes (2 processes, gloo)."""
import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import salunet
from salunet import SALU, create_model
from salunet.train.recalibrate import salu_input_rms, salu_sites

REF = dict(model="salunet_c18_v2", width=4, data="digits", train_subset=192, test_subset=50, batch_size=32, epochs=2,
           ema_decay=0.0, progress=False, weight_decay=8e-3, model_overrides={"conv_ws": "scaled", "salu_b0": 0.012},
           salu_recalibrate=0.15, salu_recalibrate_every=1, salu_recalibrate_measure="reference",
           salu_project_grad=True, device="cpu")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return create_model("salunet_c18_v2", num_classes=10, in_chans=3, width=4, **kw)


def _images(n=16, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _pinned_args(model, x):
    rms = salu_input_rms(model, [x])
    out = {}
    for name, (_, salu) in salu_sites(model).items():
        sab = torch.exp(0.5 * (salu.log_a.detach().double() + salu.log_b.detach().double())).reshape(rms[name].shape)
        out[name] = sab * rms[name]
    return out


def test_a_loop_of_your_own_with_salupin_trains_as_the_trainer(tmp_path):
    from salunet.data import mixed_cross_entropy
    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints, load_checkpoint
    from salunet.train.config import build_model, resolve_config
    from salunet.train.distributed import DistInfo
    from salunet.train.optim import lr_at, make_optimizer, set_lr
    from salunet.train.sources import load_source

    train(dict(REF, out=str(tmp_path), name="trainer"))
    trained = load_checkpoint(list_checkpoints(tmp_path / "trainer")[-1])[0]["model"]

    cfg = resolve_config(None, dict(REF))
    source = load_source(cfg, DistInfo(device=torch.device("cpu")))
    model = build_model(cfg, source.num_classes, source.in_chans, source.image_size)
    opt = make_optimizer(model, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay)
    reference = torch.cat([b[0] for b in itertools.islice(source.train_batches(0), 4)])  # the first 128 images
    pin = salunet.SaluPin(model, reference, 0.15)
    total, warmup = source.steps * cfg.epochs, int(round(cfg.warmup_epochs * source.steps))
    step = 0
    for epoch in range(cfg.epochs):
        pin.reset()
        model.train()
        for x, ya, yb, lam in source.train_batches(epoch):
            set_lr(opt, lr_at(step, total, warmup, cfg.lr, cfg.min_lr))
            pin.step()
            loss = mixed_cross_entropy(model(x), ya, yb, lam, 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        pin.step()  # before the evaluation (and the checkpoint), at the epoch's final weights
    mine = model.state_dict()
    assert set(mine) == set(trained)
    worst = max((mine[k].double() - trained[k].double()).abs().max().item()
                for k in mine if mine[k].is_floating_point())
    assert worst < 1e-5, worst


def test_step_pins_every_site_to_the_target_on_the_reference_and_keeps_the_amplitude():
    model, x = _model(), _images()
    amp = {n: (s.log_a - s.log_b).detach().clone() for n, (_, s) in salu_sites(model).items()}
    before = _pinned_args(model, x)
    assert max(abs(float(a.mean()) - 0.3) for a in before.values()) > 0.05  # not already there
    with salunet.SaluPin(model, x, 0.3, project_grad=False) as pin:
        factors = pin.step()
    assert set(factors) == set(salu_sites(model)) and all(f.dtype == torch.float64 for f in factors.values())
    for name, arg in _pinned_args(model, x).items():
        torch.testing.assert_close(arg, torch.full_like(arg, 0.3), rtol=1e-5, atol=0)
    for n, (_, s) in salu_sites(model).items():  # sqrt(a / b) untouched: a and b moved by the same factor
        torch.testing.assert_close((s.log_a - s.log_b).detach(), amp[n], rtol=0, atol=1e-6)
    # on a batch of its own instead (BatchNorm's way)
    y = _images(seed=2)
    salunet.SaluPin(model, None, 0.3, project_grad=False).step(y)
    assert all(torch.allclose(a, torch.full_like(a, 0.3), rtol=1e-5) for a in _pinned_args(model, y).values())


def _salu_input_grads(model, x, y):
    """The gradient that reaches every 4-d SALU input (kept by hooks that run before any other, so before the
    projection's), after one training forward and backward."""
    inputs, handles = {}, []
    for n, (m, _) in salu_sites(model).items():
        def keep(mod, args, n=n):
            if args[0].requires_grad and args[0].dim() == 4:
                args[0].retain_grad()
                inputs[n] = args[0]
        handles.append(m.register_forward_pre_hook(keep, prepend=True))
    model.train()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for h in handles:
        h.remove()
    assert inputs
    return {n: (i.grad * i).sum((0, 2, 3)).abs().max() / (i.grad.abs() * i.abs()).sum((0, 2, 3)).max()
            for n, i in inputs.items()}


def test_the_projection_removes_each_channels_radial_gradient_until_removed():
    """Per channel, sum(x * dL/dx) over the batch and positions is 0 with the projection (to rounding), and clearly
    not without it: the projection on, then off after remove(); the forward's values are the same either way."""
    x, y = _images(), torch.arange(16) % 10
    model = _model()
    pin = salunet.SaluPin(model, x)
    pin.step()
    model.train()
    logits = model(x).detach()
    assert max(_salu_input_grads(model, x, y).values()) < 1e-5
    projected = [p.grad.clone() for p in model.parameters()]
    pin.remove()
    assert pin.projection is None
    assert torch.equal(model(x).detach(), logits)
    assert max(_salu_input_grads(model, x, y).values()) > 1e-3
    assert any(not torch.allclose(a, p.grad) for a, p in zip(projected, model.parameters()))


@pytest.mark.slow
def test_under_torch_compile_the_pin_and_the_projection_trace_whole_and_match_eager(monkeypatch):
    """``pin.forward = torch.compile(model)`` and a compiled training step (aot_eager: dynamo and AOTAutograd, the
    graphs inductor would get; fullgraph, so a graph break fails): two steps give the eager loop's parameters and
    gradients (the projection's backward traced op by op there, the C++ kernel in the eager loop: called once per
    site and step, all of them the eager loop's)."""
    import copy

    from salunet.nn import kernels

    calls = []
    cpp = kernels.radial_project
    monkeypatch.setattr(kernels, "radial_project", lambda *a, **k: calls.append(1) or cpp(*a, **k))
    torch._dynamo.reset()
    x, y = _images(8), torch.arange(8) % 10
    model = _model(layers=(1, 1, 1, 1))  # one block a stage: every kind of site, half the tracing
    twin = copy.deepcopy(model)
    pins = [salunet.SaluPin(model, x), salunet.SaluPin(twin, x)]
    pins[0].forward = torch.compile(model, backend="aot_eager", fullgraph=True)
    steps = [torch.compile(model, backend="aot_eager", fullgraph=True), twin]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    for _ in range(2):
        for pin, step, opt in zip(pins, steps, opts):
            pin.step()
            nn.functional.cross_entropy(step(x), y).backward()
            opt.step()
    assert len(calls) == 2 * len(salu_sites(twin))
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_input_is_refused_with_the_fix():
    model, x = _model(), _images()
    with pytest.raises(ValueError, match="build SaluPin on the bare model first"):
        salunet.SaluPin(nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel), x)
    with pytest.raises(ValueError, match="no SALU to pin"):
        salunet.SaluPin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), x)
    with pytest.raises(ValueError, match="positive number"):
        salunet.SaluPin(model, x, 0.0)
    with pytest.raises(ValueError, match="holds no images"):
        salunet.SaluPin(model, x[:0])
    with pytest.raises(ValueError, match=r"reference is on meta, the model on cpu; move it with reference.to\('cpu'\)"):
        salunet.SaluPin(model, x.to("meta"))
    with pytest.raises(ValueError, match="reduce must be"):
        salunet.SaluPin(model, x, reduce="sum")
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):  # checked also with the projection off
        salunet.SaluPin(model, x, project_grad=False, project_grad_rate=7.0)
    from torch.distributed.fsdp import FSDPModule
    sharded = _model()  # what fully_shard does to the model's class (FSDP2), without a process group
    sharded.__class__ = type(f"FSDP{type(sharded).__name__}", (FSDPModule, type(sharded)), {})
    with pytest.raises(ValueError, match="sharded by FSDP, which SaluPin does not support"):
        salunet.SaluPin(sharded, x)
    pin = salunet.SaluPin(model, None, project_grad=False)
    with pytest.raises(ValueError, match="no images to pin on"):
        pin.step()
    for forward in (nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel),
                    torch.compile(nn.DataParallel(model)), torch.compile(_model(1))):
        pin.forward = forward
        with pytest.raises(ValueError, match="forward must be the model or torch.compile"):
            pin.step(x)
    with pytest.raises(ValueError, match="wrapped by torch.compile"):
        salunet.SaluPin(torch.compile(model), x)
    with pytest.raises(ValueError, match="wrapped by DataParallel"):
        salunet.SaluPin(nn.DataParallel(model), x)
    moved = salunet.SaluPin(model, x, project_grad=False)
    model.to("meta")  # moved after SaluPin was built: said at the next step, not deep inside a conv
    with pytest.raises(ValueError, match="the model moved after SaluPin was built; build SaluPin after moving"):
        moved.step()
    assert isinstance(next(iter(salu_sites(model).values()))[1], SALU)  # (the model itself was pinnable)


def test_every_eval_pass_hands_each_submodule_back_its_own_mode():
    """The pin (SaluPin, the hooks' recalibration), evaluation and stage capture run the model in eval mode and
    then restore every submodule's own mode: a part the user froze (eval) inside a training model stays frozen, as
    ``model.train(was_training)`` would not leave it."""
    from salunet.analysis.capture import capture_batches
    from salunet.train.evaluate import evaluate
    from salunet.train.recalibrate import recalibrate_salu

    model, x = _model(), _images()
    model.train()
    model.stem.eval()
    site = next(iter(salu_sites(model).values()))[0]
    site.eval()
    frozen = {m for m in model.modules() if not m.training}
    assert model.stem in frozen and site in frozen and model.training
    pin = salunet.SaluPin(model, x)
    runs = {"SaluPin.step": pin.step, "recalibrate_salu": lambda: recalibrate_salu(model, [x], 0.15),
            "evaluate": lambda: evaluate(model, [(x, torch.zeros(len(x), dtype=torch.long))]),
            "capture_batches": lambda: capture_batches(model, [x])}
    for name, run in runs.items():
        run()
        assert {m for m in model.modules() if not m.training} == frozen, name
    with pytest.raises(RuntimeError):  # restored on an error too
        salunet.SaluPin(model, x[:, :1]).step()
    assert {m for m in model.modules() if not m.training} == frozen


_TWO_PROCESSES = textwrap.dedent("""
    import sys
    import torch, torch.distributed as dist
    import salunet
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    def model():
        torch.manual_seed(0)
        return salunet.create_model("salunet_c18_v2", num_classes=10, in_chans=3, width=4)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    shared = model()
    salunet.SaluPin(shared, x.chunk(2)[rank], 0.3).step()   # each process its half; sums added over both
    mine = torch.cat([p.detach().reshape(-1) for p in shared.parameters()])
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    alone = model()
    salunet.SaluPin(alone, x, 0.3, reduce=None).step()   # one process, all the images
    pooled = torch.cat([p.detach().reshape(-1) for p in alone.parameters()])
    moved = (mine - torch.cat([p.detach().reshape(-1) for p in model().parameters()])).abs().max().item()
    if rank == 0:
        print("RESULT", (both[0] - both[1]).abs().max().item(), (mine - pooled).abs().max().item(), moved)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_under_torch_distributed_each_process_pins_on_the_pooled_images(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    ranks_apart, from_pooled, moved = (float(v) for v in out.stdout.split("RESULT")[1].split())
    assert ranks_apart == 0.0
    assert from_pooled < 1e-5 and moved > 1e-3 and math.isfinite(moved)


def test_a_v3_declares_the_pin_and_one_explicit_flag_turns_it_off_or_changes_its_kind():
    """What ``--model salunet_c18_v3`` resolves to, and each flag that turns the declared pin off or changes its kind
    (the declared keys that depend on a switch given explicitly off fall away with it, train/config.py)."""
    from salunet.train.config import TrainConfig, resolve_config

    keys = ("salu_recalibrate", "salu_recalibrate_every", "salu_recalibrate_measure", "salu_reference_images",
            "salu_project_grad")

    def pin(**flags):
        cfg = resolve_config(None, dict(model="salunet_c18_v3", **flags))
        return tuple(getattr(cfg, k) for k in keys)

    default_images = TrainConfig.salu_reference_images
    assert pin() == (0.15, 1, "reference", 32, True)
    assert resolve_config(None, dict(model="salunet_c50_v3")).salu_reference_images == 128
    assert pin(salu_recalibrate=0) == (0.0, 0, "forward", default_images, False)  # unpinned, no projection
    assert pin(salu_recalibrate=0, salu_project_grad=True) == (0.0, 0, "forward", default_images, True)
    assert pin(salu_recalibrate_every=0) == (0.15, 0, "forward", default_images, True)  # once an epoch
    assert pin(salu_recalibrate_measure="forward") == (0.15, 1, "forward", default_images, True)
    assert pin(salu_reference_images=64) == (0.15, 1, "reference", 64, True)
    assert pin(salu_project_grad=False) == (0.15, 1, "reference", 32, False)
    assert pin(salu_recalibrate=0.5) == (0.5, 1, "reference", 32, True)  # another K, the same kind of pin
    assert resolve_config(None, dict(model="salunet_c18_v2")).salu_recalibrate == 0.0  # v2 declares no pin


@pytest.mark.parametrize("v3,v2,images", [("salunet_c18_v3", "salunet_c18_v2", 32),
                                          ("salunet_c50_v3", "salunet_c50_v2", 128)])
def test_the_v3_models_train_pinned_by_name_as_v2_with_the_flags(tmp_path, capsys, v3, v2, images):
    """``--model salunet_c18_v3`` alone is v2 + scaled WS + salu_b0 0.012 trained with the pin's five flags: bit for
    bit the same weights, and the run says what the model declared. A TrainConfig built directly holds every
    default, so it trains unpinned, and the run says which declared settings it overrides."""
    from salunet.train import train
    from salunet.train.checkpoint import list_checkpoints, load_checkpoint
    from salunet.train.config import TrainConfig

    small = dict(width=4, data="digits", train_subset=160, test_subset=50, batch_size=32, epochs=1, ema_decay=0.0,
                 progress=False, weight_decay=8e-3, device="cpu")
    flags = dict(salu_recalibrate=0.15, salu_recalibrate_every=1, salu_recalibrate_measure="reference",
                 salu_project_grad=True, salu_reference_images=images)
    depth = {"layers": (1, 1, 1, 1)} if "c50" in v3 else {}
    train(dict(small, model=v3, model_overrides=depth, out=str(tmp_path), name="v3"))
    assert (f"model: {v3} trains with the settings it declares: salu_recalibrate 0.15, salu_recalibrate_every 1, "
            f'salu_recalibrate_measure "reference", salu_project_grad true, salu_reference_images {images} '
            "(a flag overrides any)") in capsys.readouterr().out
    train(dict(small, **flags, model=v2, model_overrides={"conv_ws": "scaled", "salu_b0": 0.012, **depth},
               out=str(tmp_path), name="v2"))
    assert "model: " not in capsys.readouterr().out  # v2 declares nothing
    a, b = (load_checkpoint(list_checkpoints(tmp_path / n)[-1])[0]["model"] for n in ("v3", "v2"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["stem.1.norm.log_b"], torch.full_like(a["stem.1.norm.log_b"], math.log(0.012)))  # pinned

    train(TrainConfig(**small, model=v3, model_overrides=depth, out=str(tmp_path), name="direct"))
    out = capsys.readouterr().out
    assert "trains with the settings it declares" not in out
    assert f"model: {v3} declares settings this run overrides, here: salu_recalibrate 0.0 (by flags" in out
