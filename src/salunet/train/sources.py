"""What batches a rank sees: the data set named by the config, as batches of (x, y_a, y_b, lam) for training
and (x, y) for evaluation.

- :class:`MemorySource`: a data set resident on the device (CIFAR, .npz, digits); augmentation as batched
  tensor ops. Every rank draws the *global* batch and its augmentation from the epoch's generator and keeps
  its own slice (train/loop.py's module docstring says why).
- :class:`FolderSource`: ImageNet-style folders through DataLoader workers; training sharded by
  DistributedSampler, evaluation by a strided subset per rank.
- :func:`epoch_generator`: the generator of epoch ``e`` (data order, crops, flips, mixes), seeded with (seed,
  e), so an epoch replays identically whether or not the process restarted.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data import ImageFolder, load_arrays, mix_batch, random_crop, random_flip, to_memory
from . import distributed as D
from .config import TrainConfig

__all__ = ["MemorySource", "FolderSource", "load_source", "epoch_generator", "class_spread_subset"]

_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

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

    def train_batches(self, epoch: int):
        cfg, B = self.cfg, self.cfg.batch_size
        g = epoch_generator(cfg.seed, epoch)
        perm = torch.randperm(self.n_train, generator=g).to(self.data.x_train.device)
        b = B // self.info.world
        lo = self.info.rank * b
        for s in range(self.steps):
            idx = perm[s * B:(s + 1) * B]
            x = self.data.x_train[idx]  # (B, C, H, W) uint8, the global batch (see the module docstring)
            x = random_crop(x, cfg.crop_padding, g)
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


class FolderSource:
    """ImageNet-style folders through DataLoader workers (Pillow decoding); training sharded by
    DistributedSampler, evaluation by a strided subset per rank."""

    def __init__(self, cfg: TrainConfig, info: D.DistInfo, classes: list[str] | None = None) -> None:
        """``classes`` (evaluation of a checkpoint, which records them): label order of the trained model; then
        only ROOT/val/ is read. Otherwise the class folders of ROOT/train/ define the labels."""
        if cfg.data_path is None:
            raise ValueError("data 'imagefolder' needs --data-path ROOT with ROOT/train/<class>/ and ROOT/val/<class>/")
        root = Path(cfg.data_path).expanduser()
        self.train_set = None if classes else \
            ImageFolder(root / "train", train=True, size=cfg.image_size, seed=cfg.seed, flip=cfg.flip)
        classes = classes or self.train_set.classes
        self.val_set = ImageFolder(root / "val", train=False, size=cfg.eval_size, classes=classes)
        # --train-subset / --test-subset: the same number of images from every class (the folders list samples
        # class by class, so a plain prefix would be one or two classes)
        self.train_data = class_spread_subset(self.train_set, cfg.train_subset) if self.train_set else None
        self.val_data = class_spread_subset(self.val_set, cfg.test_subset)
        self.cfg, self.info = cfg, info
        self.local_batch = cfg.batch_size // info.world
        self.n_train = len(self.train_data) if self.train_data is not None else 0
        self.steps = self.n_train // cfg.batch_size
        self.num_classes, self.in_chans, self.image_size = len(classes), 3, cfg.image_size
        self.mean, self.std = _IMAGENET_MEAN.to(info.device), _IMAGENET_STD.to(info.device)

    def _loader(self, ds, batch: int, sampler=None, generator=None, shuffle: bool = False):
        from torch.utils.data import DataLoader

        return DataLoader(ds, batch_size=batch, shuffle=shuffle, sampler=sampler, generator=generator,
                          num_workers=self.cfg.workers, drop_last=shuffle or sampler is not None,
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
        for s, (x, y) in enumerate(loader):
            if s >= self.steps:
                break
            x = (x.to(info.device, non_blocking=True).float() - self.mean) / self.std
            yield mix_batch(x, y.to(info.device, non_blocking=True), self.cfg.mixup, self.cfg.cutmix, g)

    def eval_batches(self):
        """This rank's shard of the validation set (every image exactly once over all ranks, no padding)."""
        from torch.utils.data import Subset

        shard = Subset(self.val_data, range(self.info.rank, len(self.val_data), self.info.world))
        for x, y in self._loader(shard, self.cfg.eval_batch_size):
            yield (x.to(self.info.device).float() - self.mean) / self.std, y.to(self.info.device)


def load_source(cfg: TrainConfig, info: D.DistInfo, *, train: bool = True,
                classes: list[str] | None = None) -> MemorySource | FolderSource:
    """The batches of ``cfg.data`` for this rank. ``train=False`` (evaluation only) skips the checks that
    concern the training batches; with ``classes`` (an image-folder checkpoint's label order) only the
    validation folder is read, labelled in that order."""
    if train and cfg.batch_size % (info.world * cfg.accum_steps):
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by ranks x accum_steps "
                         f"({info.world} x {cfg.accum_steps})")
    if cfg.data == "imagefolder":
        source = FolderSource(cfg, info, classes=None if train else classes)
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


