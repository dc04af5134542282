"""What batches a rank sees: the data set named by the config, as batches of (x, y_a, y_b, lam) for training
and (x, y) for evaluation.

- :class:`MemorySource`: a data set resident on the device (CIFAR, .npz, digits); augmentation as batched
  tensor ops. Every rank draws the *global* batch and its augmentation from the epoch's generator and keeps
  its own slice (train/loop.py's module docstring says why).
- :class:`FolderSource`: ImageNet-style folders through DataLoader workers; training sharded by
  DistributedSampler, evaluation by a strided subset per rank.
- :func:`open_folder`: an image folder read per its plan (data/folders.py: size, channels and crop from the data
  unless given): small pad-and-crop folders decoded once into a :class:`MemorySource`, others a FolderSource.
  Both carry ``classes`` (the label order a checkpoint records) and ``note`` (the plan, printed by train).
- :func:`epoch_generator`: the generator of epoch ``e`` (data order, crops, flips, mixes), seeded with (seed,
  e), so an epoch replays identically whether or not the process restarted.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import ImageArrays, ImageFolder, load_arrays, mix_batch, random_crop, random_flip, to_memory
from ..data.folders import FolderPlan, decode_folder, default_padding, plan_folder
from ..data.imagefolder import iter_quietly, quiet_worker
from . import distributed as D
from .config import TrainConfig
from .stopping import raise_if_terminated

__all__ = ["MemorySource", "FolderSource", "open_folder", "load_source", "epoch_generator", "class_spread_subset",
           "data_fingerprint"]

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
_GRAY_MEAN, _GRAY_STD = _IMAGENET_MEAN.mean().view(1, 1, 1, 1), _IMAGENET_STD.mean().view(1, 1, 1, 1)

def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + rank)


class MemorySource:
    """Batches from a data set resident on the device; augmentation as batched tensor ops."""

    def __init__(self, data, cfg: TrainConfig, info: D.DistInfo) -> None:
        self.data, self.cfg, self.info = data, cfg, info
        self.n_train = len(data.x_train)
        self.steps = self.n_train // cfg.batch_size
        self.num_classes, self.in_chans, self.image_size = data.num_classes, data.in_chans, data.image_size
        self.mean, self.std = data.mean, data.std
        self.padding = cfg.crop_padding if cfg.crop_padding is not None else default_padding(self.image_size)
        if self.padding > self.image_size:  # (padding allocates (size + 2 p)^2 pixels per image of every batch)
            raise ValueError(f"crop_padding {self.padding} is larger than the {self.image_size} px images; use at most "
                             f"{self.image_size} (CIFAR's recipes use 4 at 32 px)")
        self.classes: list[str] | None = None  # an image folder's label order (open_folder sets it)
        self.note = f"{data.source}: {self.n_train} training images, {self.image_size} px, {self.in_chans} channel(s)"

    def train_batches(self, epoch: int):
        cfg, B = self.cfg, self.cfg.batch_size
        g = epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(self.n_train, generator=g).to(self.data.x_train.device)
        b = B // self.info.world
        lo = self.info.rank * b
        for s in range(self.steps):
            idx = perm[s * B:(s + 1) * B]
            x = self.data.x_train[idx]  # (B, C, H, W) uint8, the global batch (see the module docstring)
            x = random_crop(x, self.padding, g)
            if cfg.flip:
                x = random_flip(x, g)
            x = self.data.normalize(x)
            x, ya, yb, lam = mix_batch(x, self.data.y_train[idx], cfg.mixup, cfg.cutmix, g)
            yield x[lo:lo + b], ya[lo:lo + b], yb[lo:lo + b], lam

    def eval_batches(self):
        """This rank's shard of the test set: images rank, rank + world, ... (all of them in one process)."""
        d, n, r, w = self.data, self.cfg.eval_batch_size, self.info.rank, self.info.world
        x, y = d.x_test[r::w], d.y_test[r::w]
        for i in range(0, len(x), n):
            yield d.normalize(x[i:i + n]), y[i:i + n]


def class_spread_subset(ds, n: int):
    """The first ``n`` samples of ``ds`` taken round-robin over its classes (all of ``ds`` when ``n`` is 0 or
    covers it), in their original order."""
    from torch.utils.data import Subset

    if n <= 0 or n >= len(ds):
        return ds
    seen: dict[int, int] = {}
    rank = []
    for i, (_, label) in enumerate(ds.samples):
        rank.append((seen.get(label, 0), label, i))
        seen[label] = seen.get(label, 0) + 1
    return Subset(ds, sorted(i for _, _, i in sorted(rank)[:n]))


def open_folder(cfg: TrainConfig, info: D.DistInfo, classes: list[str] | None = None) -> MemorySource | FolderSource:
    """The image folder ``cfg.data_path`` read per its plan (data/folders.py). ``classes`` (evaluation of a
    checkpoint, which records them): label order of the trained model; then only ROOT/val/ is read. Otherwise the
    class folders of ROOT/train/ define the labels."""
    if cfg.data_path is None:
        raise ValueError("data 'imagefolder' needs --data-path ROOT with ROOT/train/<class>/ and ROOT/val/<class>/")
    root = Path(cfg.data_path).expanduser()
    train_set = None if classes else ImageFolder(root / "train", train=True, seed=cfg.seed, flip=cfg.flip)
    classes = classes or train_set.classes
    val_set = ImageFolder(root / "val", train=False, classes=classes)
    # --train-subset / --test-subset: the same number of images from every class (the folders list samples
    # class by class, so a plain prefix would be one or two classes)
    train_data = class_spread_subset(train_set, cfg.train_subset) if train_set else None
    val_data = class_spread_subset(val_set, cfg.test_subset)
    plan = plan_folder(train_set or val_set, (len(train_data) if train_data else 0) + len(val_data),
                       image_size=cfg.image_size, eval_size=cfg.eval_size, in_chans=cfg.in_chans, crop=cfg.crop,
                       crop_scale=cfg.crop_scale, crop_padding=cfg.crop_padding)
    for ds, size in ((train_set, plan.size), (val_set, plan.eval_size)):  # the transforms the plan chose
        if ds is not None:
            ds.size, ds.crop, ds.scale = size, "fixed" if plan.crop == "pad" else "resized", plan.scale
            ds.channels, ds.to_gray = plan.channels, plan.to_gray
    if plan.in_memory:
        source = _folder_in_memory(cfg, info, train_data, val_data, plan, len(classes), root)
    else:
        source = FolderSource(cfg, info, train_set, train_data, val_data, plan, len(classes))
    source.classes, source.note = list(classes), plan.describe(root)
    return source


def _folder_in_memory(cfg, info, train_data, val_data, plan: FolderPlan, num_classes: int, root) -> MemorySource:
    """A small pad-and-crop folder decoded once and served exactly like an .npz (per-channel mean/std of its
    training images). Evaluation only (no training set): one validation image stands in for the training set, and
    the caller sets mean/std from the checkpoint."""
    x_test, y_test = decode_folder(val_data, cfg.workers)
    x_train, y_train = decode_folder(train_data, cfg.workers) if train_data is not None else (x_test[:1], y_test[:1])
    return MemorySource(to_memory(ImageArrays(x_train, y_train, x_test, y_test, num_classes, str(root)), info.device),
                        cfg, info)


class FolderSource:
    """Image folders streamed through DataLoader workers (Pillow decoding); training sharded by
    DistributedSampler, evaluation by a strided subset per rank. With the pad-and-crop plan the workers deliver
    fixed-size images and the random shift and flip are applied to the batch on the device."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, train_set, train_data, val_data, plan: FolderPlan,
                 num_classes: int) -> None:
        self.train_set, self.train_data, self.val_data, self.plan = train_set, train_data, val_data, plan
        self.cfg, self.info = cfg, info
        self.local_batch = cfg.batch_size // info.world
        self.n_train = len(self.train_data) if self.train_data is not None else 0
        self.steps = self.n_train // cfg.batch_size
        self.num_classes, self.in_chans, self.image_size = num_classes, plan.channels, plan.size
        mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if plan.channels == 3 else (_GRAY_MEAN, _GRAY_STD)
        self.mean, self.std = mean.to(info.device), std.to(info.device)
        self.classes: list[str] | None = None
        self.note = ""

    def _loader(self, ds, batch: int, sampler=None, generator=None, shuffle: bool = False):
        from torch.utils.data import DataLoader

        return DataLoader(ds, batch_size=batch, shuffle=shuffle, sampler=sampler, generator=generator,
                          num_workers=self.cfg.workers, drop_last=shuffle or sampler is not None,
                          worker_init_fn=quiet_worker if self.cfg.workers else None,
                          pin_memory=self.info.device.type == "cuda")

    def train_batches(self, epoch: int):
        from torch.utils.data import DistributedSampler

        info = self.info
        self.train_set.set_epoch(epoch)
        if info.enabled:
            sampler = DistributedSampler(self.train_data, info.world, info.rank, shuffle=True, seed=self.cfg.seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            loader = self._loader(self.train_data, self.local_batch, sampler=sampler)
        else:
            loader = self._loader(self.train_data, self.local_batch, shuffle=True,
                                  generator=epoch_generator(self.cfg.seed, epoch))
        g = epoch_generator(self.cfg.seed, epoch, info.rank)
        for s, (x, y) in enumerate(_batches(loader)):
            if s >= self.steps:
                break
            x = x.to(info.device, non_blocking=True)
            if self.plan.crop == "pad":  # the CIFAR-style augmentation, on the uint8 batch as for in-memory data
                x = random_crop(x, self.plan.padding, g)
                if self.cfg.flip:
                    x = random_flip(x, g)
            x = (x.float() - self.mean) / self.std
            yield mix_batch(x, y.to(info.device, non_blocking=True), self.cfg.mixup, self.cfg.cutmix, g)

    def eval_batches(self):
        """This rank's shard of the validation set (every image exactly once over all ranks, no padding)."""
        from torch.utils.data import Subset

        shard = Subset(self.val_data, range(self.info.rank, len(self.val_data), self.info.world))
        for x, y in _batches(self._loader(shard, self.cfg.eval_batch_size)):
            yield (x.to(self.info.device).float() - self.mean) / self.std, y.to(self.info.device)


def _batches(loader):
    """The batches of ``loader``, its workers forked with SIGTERM blocked (``iter_quietly``). Before each batch, the
    stop of a SIGTERM whose Terminated Python swallowed (in an at-fork hook while the workers were forked, or in the
    ``__del__`` of the previous loader's iterator: stopping.stop_on_sigterm); without it the run waited on workers
    the group SIGTERM had ended, or trained on with the workers forked after it."""
    it = iter_quietly(loader)
    while True:
        raise_if_terminated()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch


def data_fingerprint(source) -> str:
    """A SHA-256 of the data a run trains and evaluates on, as this source serves it: every image and label of an
    in-memory set (after subsetting), or each image file's path, size and label for streamed folders, and the
    class order. A checkpoint records it; resume refuses data that changed under the run (a replaced .npz, a
    renamed class folder, labels re-mapped). Computed once per source (~0.4 s for CIFAR-10 on a CPU)."""
    import hashlib

    if getattr(source, "_fingerprint", None) is None:
        h = hashlib.sha256(_json_bytes(source.classes))
        if isinstance(source, MemorySource):
            for t in (source.data.x_train, source.data.y_train, source.data.x_test, source.data.y_test):
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        else:
            for part in (source.train_data, source.val_data):
                h.update(_json_bytes(_samples(part)))
        source._fingerprint = h.hexdigest()
    return source._fingerprint


def _json_bytes(obj) -> bytes:
    import json

    return json.dumps(obj).encode()


def _samples(ds) -> list:
    """[path relative to the folder, label, file size] of each image of an ImageFolder or a Subset of one."""
    from torch.utils.data import Subset

    if ds is None:
        return []
    base, idx = (ds.dataset, ds.indices) if isinstance(ds, Subset) else (ds, range(len(ds.samples)))
    out = []
    for i in idx:
        path, label = base.samples[i]
        out.append([str(Path(path).relative_to(base.root)), label, Path(path).stat().st_size])
    return out


def load_source(cfg: TrainConfig, info: D.DistInfo, *, train: bool = True,
                classes: list[str] | None = None) -> MemorySource | FolderSource:
    """The batches of ``cfg.data`` for this rank. ``train=False`` (evaluation only) skips the checks that
    concern the training batches; with ``classes`` (an image-folder checkpoint's label order) only the
    validation folder is read, labelled in that order."""
    if train and cfg.batch_size % (info.world * cfg.accum_steps):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by ranks x accum_steps "
                         f"({info.world} x {cfg.accum_steps})")
    if cfg.data == "imagefolder":
        source = open_folder(cfg, info, classes=None if train else classes)
    else:
        source = MemorySource(to_memory(_load_arrays(cfg, info), info.device, cfg.train_subset, cfg.test_subset),
                              cfg, info)
    if train and source.steps == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({source.n_train} images); "
                         "lower --batch-size")
    return source


def _load_arrays(cfg: TrainConfig, info: D.DistInfo):
    if not (cfg.download and info.enabled):
        return load_arrays(cfg.data, cfg.data_path, download=cfg.download, progress=cfg.progress)
    # rank 0 downloads and extracts alone; broadcasting its outcome is also the barrier the others wait at
    arrays, error = None, None
    if info.is_main:
        try:
            arrays = load_arrays(cfg.data, cfg.data_path, download=True, progress=cfg.progress)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            error = exc
    msg = D.broadcast_object(info, None if error is None else str(error).splitlines()[0])
    if error is not None:
        raise error
    if msg is not None:
        raise ValueError(f"rank 0 could not get the data: {msg}")
    return arrays if arrays is not None else load_arrays(cfg.data, cfg.data_path, download=False)


