"""The training loop: ``train(config) -> dict`` (also ``salunet train``).

Reproducibility and exact resume (CPU, bitwise): the model is built right after ``torch.manual_seed(seed)``;
the data order and every augmentation draw of epoch ``e`` come from a generator seeded with (seed, e), so
an epoch replays identically whether or not the process restarted; the global RNG state (dropout) is saved
in each checkpoint with the model, optimizer, EMA, grad-scaler and step counter.

Data parallelism (torchrun): for in-memory data every rank draws the *global* batch and its augmentation
from the same generator and keeps its own slice, so N ranks see exactly the samples, crops and mixes that
one process with the same global batch sees; DDP averages gradients. The price is deliberate: every rank
indexes, crops, flips, normalises and mixes the whole global batch (N times the augmentation work, and one
global batch of images in memory per rank) to keep only 1/N of it. Mixup and cutmix pair samples across the
global batch, so slicing first would change the run; the batched tensor ops cost little next to forward and
backward. Folder data uses DistributedSampler for training (each rank decodes only its own images; the order
then differs from a 1-process run). Evaluation is sharded: rank r scores test images r, r+N, r+2N, ... (each
image exactly once) and the counts are summed with an all-reduce. Only rank 0 downloads; the others wait for
it and then read what it wrote. Per-step loss, accuracy and the finite checks are all-reduced, so every rank
logs the same numbers and stops at the same step.

``metrics.jsonl`` holds one line per epoch: ``train_loss`` / ``train_acc`` (means over the epoch's optimizer
steps and all ranks, on the augmented and mixed batches, accuracy against the first mixing target),
``test_*`` and ``ema_test_*`` (loss, top-1 ``acc``, ``top5``), ``lr`` (the value used by the epoch's *last*
optimizer step), ``epoch_s`` (wall time of the epoch's training steps), ``eval_s``, ``startup_s`` (the first
step of the first epoch a process runs: lazy initialisation, kernel loading, ``torch.compile``; 0 in other
epochs), ``images_per_s`` (training images per second excluding ``startup_s``), ``data_s`` / ``data_share``
(time spent producing batches: loading and augmentation, and its share of ``epoch_s``; on CUDA the
augmentation kernels run asynchronously, so this is the launch cost), ``wait_s`` / ``wait_share`` (host time
blocked at each step's finiteness check until the device has finished the step, and its share of ``epoch_s``: on
a GPU a share near 0 means the host, issuing work, is the bottleneck, a large one that the device is; ~0 on CPU,
where nothing runs ahead), ``elapsed_s`` (since this process started training), ``salu_recal_factor`` (with
``salu_recalibrate``: the median factor applied to SALU's a and b after the epoch; with ``salu_recalibrate_every``
the median over the epoch's recalibrations, and their count ``salu_recalibrations``), ``salu_eval_pin_factor``
(with ``salu_eval_pin`` or ``salu_recalibrate_measure`` reference: the median factor of the pin before
evaluation; ``ema_salu_eval_pin_factor`` the EMA's). Per-step JSON lines (``log_steps``) and TensorBoard events
(``logger``) come from :mod:`.loggers`, called once per step and once per epoch on rank 0.

Failure behaviour: bad input is rejected before anything is written, and a new run that fails before it
finishes its first epoch removes what it wrote (``config.json``, the run directory it created). A
non-finite loss or gradient stops the run (:class:`TrainingDiverged`) before the optimizer step, and the
parameters are checked to be finite before every checkpoint, so no non-finite weights are ever saved and
the last good checkpoint stays the newest. A full disk, SIGTERM (``salunet train``) or a lost torchrun peer
stop the run with :class:`RunStopped`, whose message names the checkpoint to continue from. Resume skips a
corrupt newest checkpoint for the previous good one (saying so), refuses a checkpoint of another run, and
removes the temporary files of writes a killed process left. Under ``torchrun --max-restarts`` a restarted
attempt continues the run directory of the failed one. docs/RELIABILITY.md lists the faults tested.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import __version__
from ..data import mixed_cross_entropy
from ..models.channels_last import guard_cpu_compile, guarded_convs, to_channels_last, unguardable_cpu_convs
from ..nn import kernels
from . import distributed as D
from . import faults
from .checkpoint import remove_partial_files, save_checkpoint
from .config import TrainConfig, build_model, declared_in_use
from .ema import EMA
from .evaluate import amp_note, autocast_for, evaluate
from .loggers import RunLoggers, check_logger
from .optim import adaptive_clip_, agc_parameters, lr_at, make_optimizer, set_lr
from .recalibrate import (GradientProjection, StepStatistics, pin_in_forward, pin_to_average, recalibrate_salu,
                          salu_sites)
from .resume import RESUME_KEYS, RunPlan, claim_run_dir, load_state, plan_run, remove_empty_dirs
from .rundir import RunDir
from .sources import data_fingerprint, load_source
from .stopping import (RunStopped, Terminated, TrainingDiverged, as_run_stopped, last_good, raise_if_terminated,
                       stop_on_sigterm)

__all__ = ["train", "TrainingDiverged", "RunStopped", "RESUME_KEYS", "stop_on_sigterm", "FinishHook"]

FinishHook = Callable[[Path, list, TrainConfig], None]  # (run_dir, metrics rows, config), rank 0, after the run


@dataclass
class _Run:
    """What every epoch of one run uses: built once by :func:`_build`, read by the epoch and save functions."""

    cfg: TrainConfig
    info: D.DistInfo
    run_dir: Path
    source: object  # MemorySource | FolderSource
    model: nn.Module
    opt: torch.optim.Optimizer
    ema: EMA | None
    scaler: torch.amp.GradScaler | None
    train_model: nn.Module | None = None  # the model wrapped for training (DDP, torch.compile)
    pin_model: nn.Module | None = None  # what --salu-recalibrate-every's per-step pin runs (_prepare_training)
    amp_ctx: object = None
    agc_params: list | None = None
    total: int = 0  # optimizer steps of the whole run
    warmup: int = 0
    loggers: RunLoggers | None = None  # rank 0: steps.jsonl and TensorBoard, if asked for (train/loggers.py)
    wait_s: float = 0.0  # this epoch's host time blocked on the device at the per-step check (metrics: wait_s)
    step_stats: StepStatistics | None = None  # --salu-recalibrate-measure step: the training forward's statistics
    reference: torch.Tensor | None = None  # --salu-recalibrate-measure reference: this rank's fixed pinning images
    projection: GradientProjection | None = None  # --salu-project-grad


def train(config: TrainConfig | dict | None = None, *, resume: str | Path | None = None,
          on_finish: FinishHook | None = None, accept_data_change: bool = False, **overrides) -> dict:
    """Train per ``config`` (a TrainConfig, or a dict of overrides) and return a summary dict.

    ``resume=RUN_DIR`` continues that run from its newest valid checkpoint (``overrides`` may change only
    :data:`RESUME_KEYS`). Under a torchrun restart (``--max-restarts``) a new-run call continues the run
    directory that the failed attempt of the same job created. ``on_finish(run_dir, rows, cfg)`` runs on rank 0
    after ``summary.json`` is written (``salunet train`` draws ``curves.png`` with it). Resume refuses data that
    changed since the checkpoint was written (:func:`.sources.data_fingerprint`) unless ``accept_data_change``."""
    plan = plan_run(config, resume, overrides)  # before init: every rank checks, none wrote yet
    plan.accept_data_change = accept_data_change
    info = D.setup(plan.cfg.device, plan.cfg.dist_timeout)
    try:
        return _train(plan, info, on_finish)
    finally:
        D.teardown(info)


def _build(plan: RunPlan, info: D.DistInfo) -> tuple[_Run, int, int]:
    """Data, model, optimizer, EMA and grad scaler, loaded from the plan's checkpoint if it has one; returns the
    run and (epoch, step) to start from. Everything that can fail on bad input comes here, before any write."""
    cfg = plan.cfg
    if info.is_main:
        check_logger(cfg)
    source = load_source(cfg, info)
    if cfg.salu_recalibrate_measure == "reference" and cfg.salu_reference_images % info.world:
        declared = "salu_reference_images" in declared_in_use(cfg)[0]
        raise ValueError(f"--salu-reference-images {cfg.salu_reference_images}"
                         + (f" (what {cfg.model} declares)" if declared else "")
                         + f" must be divisible by the number of processes ({info.world}): each pins on an equal "
                         f"share; pass --salu-reference-images with a multiple of {info.world}")
    model = build_model(cfg, source.num_classes, source.in_chans, source.image_size).to(info.device)
    if cfg.channels_last:
        model = to_channels_last(model)
    opt = make_optimizer(model, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay, salu_lr_scale=cfg.salu_lr_scale)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(info.device.type) if cfg.amp == "fp16" else None
    run = _Run(cfg, info, plan.run_dir, source, model, opt, ema, scaler, total=source.steps * cfg.epochs,
               warmup=int(round(cfg.warmup_epochs * source.steps)))
    start = (load_state(plan.found, cfg, source, model, opt, ema, scaler, plan.accept_data_change)
             if plan.found is not None else (0, 0))
    return run, *start


def _announce(run: _Run, plan: RunPlan, start_epoch: int, agents: list[str]) -> None:
    """Rank 0, once it holds the lock: notes, clean-up of interrupted writes, config.json, the header lines."""
    cfg, run_dir, files = run.cfg, run.run_dir, RunDir(run.run_dir)
    for note in plan.notes:
        print(f"salunet train: {note}", file=sys.stderr, flush=True)
    partial = remove_partial_files(run_dir)
    if partial:
        print(f"salunet train: removed {len(partial)} partial file(s) of an interrupted write "
              f"({', '.join(p.name for p in partial)})", file=sys.stderr, flush=True)
    if run.info.enabled and plan.new_run and os.environ.get("TORCHELASTIC_RUN_ID"):  # before config.json: a
        # restart then finds every directory its failed attempt could have written to
        files.write_run_id(os.environ["TORCHELASTIC_RUN_ID"], agents)
    files.write_config(asdict(cfg))
    files.trim_metrics(start_epoch)
    print(f"salunet train: {run_dir}" + ("" if plan.new_run else f"  (resumed at epoch {start_epoch})"))
    print("config: " + json.dumps(asdict(cfg), sort_keys=True))
    print(f"data: {run.source.note}")
    print(f"kernels: {kernels.kernel_path(run.info.device)}; device {run.info.device}; ranks {run.info.world}; "
          f"{sum(p.numel() for p in run.model.parameters()):,} parameters; {run.source.steps} steps/epoch", flush=True)
    held, overridden = declared_in_use(cfg)
    if held:
        print(f"model: {cfg.model} trains with the settings it declares: {_kv(held)} (a flag overrides any)")
    if overridden:
        print(f"model: {cfg.model} declares settings this run overrides, here: {_kv(overridden)} (by flags, a "
              "config file, or a TrainConfig built directly, which holds every default: "
              "salunet.train.resolve_config applies what a model declares)")
    if (note := amp_note(cfg.amp, run.info.device)) is not None:
        print(note, file=sys.stderr, flush=True)
    if cfg.salu_recalibrate_every:
        print(f"pin: every {cfg.salu_recalibrate_every} step(s), by the SALU sites in the model's own forward"
              + (" (one more compiled graph)" if cfg.compile else "")
              + (", each site's sums all-reduced over the ranks" if run.info.enabled else "")
              + "; measured " + _pin_measure(cfg, run.info.world), flush=True)
    guarded = guarded_convs(run.model) if cfg.channels_last else []
    if guarded:
        print(f"channels_last: except {', '.join(guarded)}, kept contiguous on CPU (torch's oneDNN backward of a 1x1 "
              "stride-2 conv with 2-7 input channels corrupts memory in channels_last; salunet.models.channels_last)",
              flush=True)
    if bad := unguardable_cpu_convs(run.model):
        print(f"salunet train: warning: {', '.join(bad)}: a 1x1 stride-2 conv with one input channel, whose CPU "
              "backward in torch 2.13 came out wrong (two threads) or corrupted memory (one) on an AVX2 machine, in "
              "every layout (salunet.models.channels_last); use --width 2 or more", file=sys.stderr, flush=True)
    if (cfg.salu_recalibrate_every and cfg.salu_recalibrate_rate == 1 and cfg.salu_recalibrate_measure != "reference"
            and cfg.batch_size // run.info.world < 2):
        print("salunet train: warning: --salu-recalibrate-every with one image per step and rank pins every SALU to "
              "that image's own statistics; at batch size 1 it trained at chance on digits (docs/RESULTS.md "
              "\"Pinning on small batches\"); pinning on fixed images with the projection's running sums did best "
              "there (--salu-recalibrate-measure reference --salu-project-grad --salu-project-grad-rate 0.1: \"The "
              "whole recipe at small batches\")", file=sys.stderr, flush=True)
    per_backward = cfg.batch_size // run.info.world // cfg.accum_steps
    projects_own = cfg.salu_project_grad and cfg.salu_project_grad_rate == 1  # each backward's own statistics
    if projects_own and per_backward < 2:
        print("salunet train: warning: --salu-project-grad with one image per backward projects every SALU input's "
              "gradient with that image's own statistics; at batch size 1 it trained near chance on digits "
              "(docs/RESULTS.md \"The whole recipe at small batches\"); --salu-project-grad-rate 0.1 (running sums) "
              "did best there", file=sys.stderr, flush=True)
    elif projects_own and per_backward <= 32:
        print(f"salunet train: warning: --salu-project-grad with {per_backward} images per backward (per rank and "
              "micro-batch) projects with their own statistics; for the C-18 on CIFAR-10 that tested below "
              "--salu-project-grad-rate 0.1 (running sums) by 2.1 points at 4 per backward, 1.5 at 16 and 1.3 at 32 "
              "(level at 128), and the running sums beat the BN twin at 4 (docs/RESULTS.md \"Small per-device "
              "batches on CIFAR-10\")", file=sys.stderr, flush=True)


def _prepare_training(run: _Run) -> None:
    """The model as it trains (DDP, torch.compile), the autocast context and AGC's parameters."""
    cfg, info = run.cfg, run.info
    if cfg.salu_recalibrate_every and cfg.salu_recalibrate_measure == "step":  # hooks before DDP and compile
        run.step_stats = StepStatistics(run.model)
    if cfg.salu_recalibrate_every and cfg.salu_recalibrate_measure == "reference":
        run.reference = _reference_images(run)
    if cfg.salu_project_grad:  # hooks for the run's life, before DDP and compile
        run.projection = GradientProjection(run.model, cfg.salu_project_grad_rate)
    run.train_model = run.model
    if info.enabled:
        run.train_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if cfg.compile:
        if info.device.type == "cpu" and (guarded := guard_cpu_compile(run.model)):
            print(f"compile: inductor's layout optimisation off on CPU because of {', '.join(guarded)} (it moves them "
                  "to channels_last, where torch's oneDNN backward corrupts memory; salunet.models.channels_last)",
                  flush=True)
        # static shapes: training's batches all have one shape (the last partial batch is dropped), and the per-step
        # pin may run another (the whole batch with --accum-steps > 1, or the reference images): with dynamo's
        # automatic dynamic shapes that second shape recompiled the training graph with a symbolic batch size;
        # static, each shape is compiled once for itself (tests/test_recalibrate.py)
        run.train_model = torch.compile(run.train_model, dynamic=False)
    # the per-step pin runs the model as it trains, without DDP's wrapper (an inference forward of the bare module:
    # its sites all-reduce their own sums, _pin_step): one process's training model, or under DDP the bare model,
    # compiled on its own with --compile (its pinning graph carries the all-reduces)
    if cfg.salu_recalibrate_every:
        run.pin_model = (run.train_model if not info.enabled else torch.compile(run.model, dynamic=False)
                         if cfg.compile else run.model)
    run.amp_ctx = autocast_for(cfg, info.device)
    run.agc_params = agc_parameters(run.model) if cfg.agc > 0 else []


def _train(plan: RunPlan, info: D.DistInfo, on_finish: FinishHook | None = None) -> dict:
    run, start_epoch, step = _build(plan, info)
    if (run.cfg.salu_recalibrate > 0 or run.cfg.salu_project_grad) and not salu_sites(run.model):  # before the
        # run directory is claimed
        flag = "--salu-recalibrate" if run.cfg.salu_recalibrate > 0 else "--salu-project-grad"
        raise ValueError(f"{flag}: model {run.cfg.model} has no SALU to act on; drop the option or train a SaluNet")
    new_run, lock, created, epochs_done, epoch = plan.new_run, None, [], 0, start_epoch
    if info.is_main:  # refuses if another process holds or has written the directory (then nothing there is ours)
        plan.run_dir, lock, created = claim_run_dir(plan)
    run.run_dir = run_dir = plan.run_dir = Path(D.broadcast_object(info, str(plan.run_dir)))  # rank 0's name
    agents = D.all_gather_object(info, D.agent_identity()) if info.enabled else []  # every node's launcher
    try:
        if info.is_main:
            _announce(run, plan, start_epoch, agents)
            run.loggers = RunLoggers(run.cfg, run_dir, start_step=step)
        _prepare_training(run)
        t_run = time.perf_counter()
        for epoch in range(start_epoch, run.cfg.epochs):
            row = _train_epoch(run, epoch, step, first=epoch == start_epoch)
            step += run.source.steps
            _check_finite_params(run, epoch)
            if info.is_main:
                row["elapsed_s"] = round(time.perf_counter() - t_run, 2)
                _end_epoch(run, epoch, step, row)
            epochs_done += 1
            D.barrier(info)
        return _finish(run_dir, run.cfg, on_finish) if info.is_main else {}
    except (Exception, Terminated) as exc:
        stopped = as_run_stopped(exc, run_dir, info, epoch + 1, kept=not (new_run and epochs_done == 0))
        if stopped is None:
            raise
        raise stopped from None
    finally:
        if run.step_stats is not None:
            run.step_stats.remove()  # the model outlives the run (a caller's); its hooks do not
        if run.projection is not None:
            run.projection.remove()
        if info.is_main:
            if run.loggers is not None:
                try:
                    run.loggers.close()
                except OSError as exc:  # e.g. a full disk: say so, and still release the lock below
                    print(f"salunet train: the last per-step log lines were not written ({exc})", file=sys.stderr,
                          flush=True)
            discard = new_run and epochs_done == 0
            if discard:  # the files while the lock still makes them ours; the (then empty) directories after
                RunDir(run_dir).discard_new_files()
            lock.release()
            if discard:
                remove_empty_dirs([RunDir(run_dir).checkpoint_dir, *created])


def _end_epoch(run: _Run, epoch: int, step: int, row: dict) -> None:
    """Rank 0 after each epoch: the metrics line, the progress line, and the checkpoint when one is due."""
    cfg = run.cfg
    RunDir(run.run_dir).append_metrics(row)
    if run.loggers is not None:
        run.loggers.epoch(row)
    ema_txt = f"  ema {100 * row['ema_test_acc']:.2f}%" if row.get("ema_test_acc") is not None else ""
    print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  test {100 * row['test_acc']:.2f}%"
          f"{ema_txt}  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['epoch_s']:.1f}s", flush=True)
    if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
        _save(run, epoch + 1, step, row)


def _forward(train_model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    try:
        return train_model(x)
    except Exception as exc:  # torch.compile may wrap the error; recognise it by its text
        if "Expected more than 1 value per channel when training" in str(exc):
            raise ValueError(
                f"model {cfg.model}: BatchNorm needs more than 1 value per channel in training, but with {len(x)} "
                "image(s) per micro-batch (and rank) a layer's feature map is 1x1; use a larger --batch-size or "
                "a norm-free model such as salunet_c18") from None
        raise


def _grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """Global gradient norm (clipping to ``clip`` if > 0): one fused pass, and the cheap finite check."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    # the norm of the per-tensor norms, as torch.nn.utils.get_total_norm computes it (that exists only from torch
    # 2.6; _foreach_norm, which clip_grad_norm_ has used since 2.0, is one fused call over all the small tensors)
    grads = [p.grad for p in params]
    if not grads:  # nothing received a gradient (e.g. a loss that does not depend on the parameters)
        return torch.zeros((), device=next(model.parameters()).device)
    norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack(list(norms)))


def _timed(batches, total: list):
    """Yield from ``batches``, adding the time each item took to produce to ``total[0]``; first, each time, the stop
    of a SIGTERM whose Terminated Python swallowed (stopping.raise_if_terminated)."""
    it = iter(batches)
    while True:
        raise_if_terminated()
        t = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        total[0] += time.perf_counter() - t
        yield item


def _step(run: _Run, batch, where: str) -> tuple[float, float, float]:
    """One optimizer step on ``batch`` (x, y_a, y_b, lam), accumulated over ``accum_steps`` micro-batches;
    returns the step's loss and hit count (over ranks) and the global gradient norm before clipping (with fp16,
    unscaled). Stops before the update if anything is not
    finite (``where`` names the step in the message)."""
    cfg, info, opt, scaler = run.cfg, run.info, run.opt, run.scaler
    x, ya, yb, lam = batch
    x = _training_layout(cfg, x)
    micro = cfg.accum_steps
    xs, yas, ybs = x.chunk(micro), ya.chunk(micro), yb.chunk(micro)
    step_loss = torch.zeros((), device=info.device)
    step_correct = torch.zeros((), device=info.device)
    for m in range(micro):
        sync = m == micro - 1 or not info.enabled
        with nullcontext() if sync else run.train_model.no_sync():
            with run.amp_ctx:
                logits = _forward(run.train_model, xs[m], cfg)
                loss = mixed_cross_entropy(logits.float(), yas[m], ybs[m], lam, cfg.label_smoothing)
            (scaler.scale(loss / micro) if scaler else loss / micro).backward()
        step_loss += loss.detach() / micro
        step_correct += (logits.argmax(1) == yas[m]).sum()
    if scaler:
        scaler.unscale_(opt)
    if cfg.agc > 0:
        adaptive_clip_(run.agc_params, cfg.agc)
    gnorm = _grad_norm(run.model, cfg.grad_clip)
    # one small all-reduce per step: the loss and hit count of every rank (the gradient norm is the same on all
    # ranks after DDP's average), so that all ranks log alike and stop alike
    sums = torch.stack([step_loss.double(), step_correct.double(), gnorm.double().to(info.device)])
    t_wait = time.perf_counter()
    loss_g, correct_g, gnorm_g = (D.all_reduce_sum(info, sums) / info.world).tolist()  # waits for the device
    run.wait_s += time.perf_counter() - t_wait
    if not math.isfinite(loss_g):
        raise TrainingDiverged(f"non-finite loss ({loss_g}) at {where}; stopped before the optimizer step. Last good "
                               f"checkpoint: {last_good(run.run_dir)}. Lower --lr or set --grad-clip")
    if scaler is None and not math.isfinite(gnorm_g):  # (the fp16 grad scaler skips such steps itself)
        raise TrainingDiverged(f"non-finite gradients (norm {gnorm_g}) with a finite loss at {where}; stopped before "
                               f"the optimizer step. Last good checkpoint: {last_good(run.run_dir)}. Lower --lr")
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.model)
    return loss_g, correct_g * info.world, gnorm_g


def _train_epoch(run: _Run, epoch: int, step: int, first: bool) -> dict:
    """One epoch of optimizer steps, then evaluation; returns the epoch's metrics row."""
    from tqdm import tqdm

    cfg, source = run.cfg, run.source
    run.train_model.train()
    loss_sum = correct_sum = 0.0
    lr, t_first = cfg.lr, None
    bar = tqdm(total=source.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (cfg.progress and run.info.is_main), dynamic_ncols=True)
    t0 = time.perf_counter()
    data_s = [0.0]  # time spent producing batches (loading, augmentation): the data pipeline's share
    run.wait_s = 0.0
    recal_factors: list[torch.Tensor] = []  # --salu-recalibrate-every: each recalibration's factors per site (on
    # the device, read once at the epoch's end: a read per step would make the host wait for the device)
    every = cfg.salu_recalibrate_every  # > 0 only with a target (config validation)
    if run.step_stats is not None:
        run.step_stats.reset()  # statistics never cross an epoch: a run resumed here has none gathered either
    if run.projection is not None:
        run.projection.reset()  # --salu-project-grad-rate: the running coefficients, likewise
    try:
        for s, batch in enumerate(_timed(source.train_batches(epoch), data_s)):
            lr = lr_at(step + s, run.total, run.warmup, cfg.lr, cfg.min_lr)
            set_lr(run.opt, lr)
            if every and (step + s) % every == 0:
                factors = None if run.step_stats is None else run.step_stats.pin(  # from the steps since the last
                    cfg.salu_recalibrate, cfg.salu_recalibrate_rate, reduce=_rank_sum(run),
                    sync=False)
                if factors is None:  # on the step's own batch, before its forward, as _step feeds it (with
                    # --salu-recalibrate-measure step: when nothing is gathered yet this epoch; with reference:
                    # on the fixed reference images instead)
                    x = _training_layout(cfg, batch[0]) if run.reference is None else run.reference
                    with run.amp_ctx:
                        factors = _pin_step(run, x)  # the reference's shape recurs at every step too: compiled once
                        # (the compiled kernel path, or the compiled model's pinning graph) and reused
                recal_factors.append(torch.stack(list(factors.values())))
            loss_g, correct_g, gnorm_g = _step(run, batch, f"epoch {epoch + 1}, step {s + 1}")
            if run.loggers is not None:
                run.loggers.step(step + s + 1, epoch + 1, loss=loss_g, acc=correct_g / cfg.batch_size, lr=lr,
                                 grad_norm=gnorm_g)
            faults.hit("step", step + s + 1)  # test hook (SALUNET_FAULT), a no-op otherwise
            loss_sum += loss_g
            correct_sum += correct_g
            if s == 0:
                t_first = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_g:.3f}", lr=f"{lr:.3g}")
    finally:
        bar.close()
    t1 = time.perf_counter()
    exclude_first = first and source.steps > 1  # the first step of a process carries its one-time costs
    startup = t_first - t0 if exclude_first else 0.0
    timed_steps = source.steps - exclude_first
    row = {"epoch": epoch + 1, "step": step + source.steps, "train_loss": loss_sum / source.steps,
           "train_acc": correct_sum / (source.steps * cfg.batch_size), "lr": lr, "epoch_s": round(t1 - t0, 3),
           "startup_s": round(startup, 3), "images_per_s": timed_steps * cfg.batch_size / (t1 - t0 - startup),
           "data_s": round(data_s[0], 3), "data_share": data_s[0] / (t1 - t0),
           "wait_s": round(run.wait_s, 3), "wait_share": run.wait_s / (t1 - t0)}
    if recal_factors:
        per_step = [_median_factor(dict(enumerate(f))) for f in torch.stack(recal_factors).tolist()]
        row["salu_recal_factor"] = round(statistics.median(per_step), 4)
        row["salu_recalibrations"] = len(recal_factors)
    elif cfg.salu_recalibrate > 0 and not cfg.salu_recalibrate_every and epoch + 1 < cfg.epochs:
        row["salu_recal_factor"] = _median_factor(_recalibrate_on(
            run, itertools.islice(run.source.train_batches(epoch + 1), 4)))  # the next epoch's first 4 (seeded)
    if cfg.salu_eval_pin or run.reference is not None:
        row.update(_pin_for_evaluation(run, epoch))
    row.update(_evaluate_epoch(run, epoch))
    row["eval_s"] = round(time.perf_counter() - t1, 3)
    return row


def _training_layout(cfg: TrainConfig, x: torch.Tensor) -> torch.Tensor:
    """A batch in the memory format the model trains in (``--channels-last``): the step, and the pins that must
    meet the shapes and layouts the step compiled for."""
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def _recalibrate_on(run: _Run, batches) -> dict:
    """--salu-recalibrate without --salu-recalibrate-every: pin every SALU's operating point on ``batches`` (after an
    epoch: the next epoch's first 4 seeded batches), so that a resumed run repeats it exactly; returns the factor
    applied to a and b per site (floats)."""
    return recalibrate_salu(run.model, batches, run.cfg.salu_recalibrate,
                            reduce=_rank_sum(run), rate=run.cfg.salu_recalibrate_rate)


def _rank_sum(run: _Run):
    """The ``reduce`` of every SALU pin: a sum over the ranks (the identity in one process). A new closure per call
    compiles nothing again (dynamo guards on its code: tests/test_distributed.py)."""
    return lambda t: D.all_reduce_sum(run.info, t)


def _pin_step(run: _Run, x: torch.Tensor) -> dict:
    """--salu-recalibrate-every: pin every SALU on ``x`` before a step; returns the factors per site as 0-d tensors on
    the device. The SALU sites pin themselves in the model's own forward (:func:`pin_in_forward`, ``run.pin_model``),
    so with --compile the pin is one compiled graph; under DDP each site's sums are all-reduced inside it (the
    forward pre-hooks' parameters bitwise in eager mode, with or without the all-reduce: tests/test_recalibrate.py,
    tests/test_distributed.py)."""
    return pin_in_forward(run.model, x, run.cfg.salu_recalibrate, run.cfg.salu_recalibrate_rate,
                          forward=run.pin_model, reduce=_rank_sum(run))


def _pin_for_evaluation(run: _Run, epoch: int) -> dict:
    """--salu-eval-pin N: pin the raw weights' (and the EMA's) SALUs on the average of the epoch's first N seeded
    training batches (at most the epoch's), each rank on its share, one forward per batch and model
    (:func:`pin_to_average`; each batch drawn once), so that what is evaluated and saved does not depend on which
    batch the last step pinned on. Pinned every step at rate 1, training goes on as without it up to float
    rounding (the next step's pin sets sqrt(ab) again from its own batch); at a rate < 1 the running mean square
    restarts from this average, and with --salu-recalibrate-every N > 1 the steps until the next pin use it. A
    resumed run loads the weights the run which did not stop went on from. Drawing the batches leaves the global
    random state as it was (an image-folder loader under DDP seeds its iterator from it). With
    --salu-recalibrate-measure reference the one batch is the reference images, as every training step was pinned:
    what is evaluated and saved is the function training saw. Returns the metrics' median factors."""
    cfg = run.cfg
    models = [run.model] + ([] if run.ema is None else [run.ema.module])
    with torch.random.fork_rng(devices=[]):
        batches = [run.reference] if run.reference is not None else (
            _training_layout(cfg, b[0]) for b in itertools.islice(run.source.train_batches(epoch), cfg.salu_eval_pin))
        with run.amp_ctx:
            factors = pin_to_average(models, batches, cfg.salu_recalibrate,
                                     reduce=_rank_sum(run), training_shape=True)
    out = {"salu_eval_pin_factor": _median_factor(factors[0])}
    if run.ema is not None:
        out["ema_salu_eval_pin_factor"] = _median_factor(factors[1])
    return out


_PIN_MEASURES = {"forward": "on each training batch, in one more forward before its step",
                 "step": "in each training step's own forward, pinned before the next step",
                 "reference": "on epoch 1's first {n} training images (all, if it has fewer), the same before every "
                              "step"}


def _pin_measure(cfg: TrainConfig, world: int) -> str:
    """What the pin is measured on, for the line a pinned run prints (:func:`_reference_images` says which images:
    under DDP with a batch size that does not divide N, not the first N)."""
    n, batch = cfg.salu_reference_images, cfg.batch_size
    if cfg.salu_recalibrate_measure == "reference" and world > 1 and n % batch:
        batches = -(-n // batch)
        return (f"on {n} training images of epoch 1's first {batches} batch(es), the first {n // world} of each "
                f"rank's share (all, if it has fewer), the same before every step")
    return _PIN_MEASURES[cfg.salu_recalibrate_measure].format(n=n)


def _kv(d: dict) -> str:
    return ", ".join(f"{k} {json.dumps(v)}" for k, v in d.items())


def _reference_images(run: _Run) -> torch.Tensor:
    """--salu-recalibrate-measure reference: the images every step pins on, fixed for the whole run: epoch 1's first
    N = --salu-reference-images (128) seeded training images (augmented as training draws them; at batch 128 and
    N 128 the first batch), in the training layout. Under DDP each rank keeps the first N / ranks of its share of
    the first ceil(N / batch size) batches (_build refuses an N the ranks do not divide): together the first N
    overall when the batch size divides N, else N other images of the same batches. (Before the tenth session
    whole batches were kept: a batch size that does not divide 128 pinned on more.) They are drawn from the epoch's
    seeded generator, so a resumed run draws the same ones, and with the global random state forked (as
    :func:`_pin_for_evaluation`). Each step is then pinned on the same images at the current weights: no lag and no
    batch statistics; the network trains as the fixed function it is evaluated as, at any batch size."""
    cfg, want = run.cfg, run.cfg.salu_reference_images
    n = min(-(-want // cfg.batch_size), run.source.steps)
    with torch.random.fork_rng(devices=[]):
        xs = [b[0] for b in itertools.islice(run.source.train_batches(0), n)]
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    return _training_layout(cfg, x[:want // run.info.world])


def _median_factor(factors: dict[str, float]) -> float:
    """The median over sites of a recalibration's factors, as the metrics record it."""
    return round(statistics.median(factors.values()), 4)


def _evaluate_epoch(run: _Run, epoch: int) -> dict:
    """Test metrics of the raw weights and, with EMA, of the averaged ones."""
    kw = dict(amp_ctx=run.amp_ctx, channels_last=run.cfg.channels_last, dist_info=run.info)
    ev = evaluate(run.model, _hooked(run.source.eval_batches(), epoch + 1), **kw)
    out = {"test_loss": ev["loss"], "test_acc": ev["acc"], "test_top5": ev["top5"]}
    if run.ema is not None:
        ee = evaluate(run.ema.module, run.source.eval_batches(), **kw)
        out.update(ema_test_loss=ee["loss"], ema_test_acc=ee["acc"], ema_test_top5=ee["top5"])
    return out


def _hooked(batches, epoch: int):
    """``batches`` with the ``eval`` fault-injection point after the first one (a no-op unless testing)."""
    for i, b in enumerate(batches):
        yield b
        if i == 0:
            faults.hit("eval", epoch)


@torch.no_grad()
def _check_finite_params(run: _Run, epoch: int) -> None:
    """Before anything is saved: every weight finite (one pass per epoch; the per-step gradient check catches
    almost everything, this catches an optimizer update that overflowed)."""
    bad = torch.stack([(~torch.isfinite(p)).any() for p in run.model.parameters()]).sum().double()
    if D.all_reduce_sum(run.info, bad).item() > 0:
        raise TrainingDiverged(f"parameters became non-finite during epoch {epoch + 1}; nothing saved. Last good "
                               f"checkpoint: {last_good(run.run_dir)}. Lower --lr or set --grad-clip")


def _rng_state(model: nn.Module) -> dict:
    """The generators training draws from: the CPU one (data order, crops, mixes) and, on a GPU, that GPU's
    (dropout inside the model), so that a resumed run draws exactly what the uninterrupted one would."""
    rng = {"torch": torch.get_rng_state()}
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev)
    return rng


def _save(run: _Run, epoch: int, step: int, row: dict) -> Path:
    cfg, source, model = run.cfg, run.source, run.model
    state = {"model": model.state_dict(), "optim": run.opt.state_dict(),
             "ema": run.ema.state_dict() if run.ema is not None else None,
             "scaler": run.scaler.state_dict() if run.scaler is not None else None,
             "rng": _rng_state(model)}
    meta = {"config": asdict(cfg), "epoch": epoch, "step": step, "metrics": row, "salunet": __version__,
            "num_classes": source.num_classes, "in_chans": source.in_chans, "image_size": source.image_size,
            "mean": source.mean.flatten().tolist(), "std": source.std.flatten().tolist(),
            "torch": torch.__version__, "data_fingerprint": data_fingerprint(source)}
    if source.classes is not None:  # image folders: label i is classes[i]; eval must map another val/ the same way
        meta["classes"] = source.classes
    files = RunDir(run.run_dir)
    path = files.checkpoint(epoch)
    save_checkpoint(path, state, meta)
    for old in files.checkpoints()[:-cfg.keep_checkpoints]:
        if old != path:  # never the file just written, whatever else lies in the folder
            old.unlink(missing_ok=True)
    return path


def _finish(run_dir: Path, cfg: TrainConfig, on_finish: FinishHook | None) -> dict:
    files = RunDir(run_dir)
    rows = files.read_metrics()
    final = rows[-1] if rows else {}
    ckpts = files.checkpoints()
    summary = {"run_dir": str(run_dir), "epochs": final.get("epoch", 0), "final": final,
               "best_test_acc": max((r["test_acc"] for r in rows), default=None),
               "checkpoint": str(ckpts[-1]) if ckpts else None}
    try:
        files.write_summary(summary)
        if rows and on_finish is not None:
            on_finish(run_dir, rows, cfg)
    except OSError as exc:  # after the last epoch: nothing of the training is lost, say so
        raise RunStopped(f"training finished ({summary['epochs']} epochs, checkpoint {summary['checkpoint']}), but "
                         f"writing the summary or curves.png failed ({exc.strerror or exc}); free some space, then "
                         f"draw the curves with: salunet experiment curves --runs {run_dir}") from None
    ema_txt = (f", EMA {100 * final['ema_test_acc']:.2f}%" if final.get("ema_test_acc") is not None else "")
    print(f"final test accuracy {100 * final.get('test_acc', float('nan')):.2f}%{ema_txt}  ->  {run_dir}")
    return summary
