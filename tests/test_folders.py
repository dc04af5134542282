"""Image folders at their own size (data/folders.py, train/sources.py open_folder): size, channels and classes
from the data, the upsampling warning, the crop policy, grayscale kept as 1 channel, ViT defaults."""
import json
import warnings

import numpy as np
import pytest
import torch

from salunet.cli import main
from salunet.data import ImageFolder
from salunet.data import folders
from salunet.data.folders import FolderShape, default_padding, plan_folder, probe_folder
from salunet.train import resolve_config
from salunet.train.checkpoint import load_checkpoint
from salunet.train.config import build_model
from salunet.train.distributed import DistInfo
from salunet.train.sources import FolderSource, MemorySource, load_source

from helpers import make_image_folder


def _cfg(root, **kw):
    return resolve_config(overrides=dict(data="imagefolder", data_path=str(root), workers=0, batch_size=4, **kw))


def _source(root, **kw):
    return load_source(_cfg(root, **kw), DistInfo(device=torch.device("cpu")))


@pytest.fixture
def gray28(tmp_path):
    """A Fashion-MNIST-like folder: 28 px grayscale PNGs, 3 classes."""
    return make_image_folder(tmp_path / "fm", classes=("bag", "coat", "shirt"), per_class=4, size=(28, 28), channels=1)


def test_small_grayscale_folder_keeps_its_size_and_one_channel_in_memory(gray28):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no upsampling warning at the images' own size
        src = _source(gray28)
    assert isinstance(src, MemorySource)  # decoded once, trained like an .npz
    assert (src.in_chans, src.image_size, src.num_classes) == (1, 28, 3)
    assert src.classes == ["bag", "coat", "shirt"] and src.padding == 4 == default_padding(28)
    assert src.data.x_train.shape == (12, 1, 28, 28) and src.data.x_train.dtype == torch.uint8
    assert "grayscale 28x28" in src.note and "pad-and-crop 4 px" in src.note and "into memory" in src.note
    from PIL import Image  # the pixels are the files' own (no resampling at the native size)
    path, label = ImageFolder(gray28 / "train", train=False).samples[5]
    assert torch.equal(src.data.x_train[5, 0], torch.from_numpy(np.array(Image.open(path))))
    assert src.data.y_train[5] == label
    x, ya, yb, lam = next(src.train_batches(0))
    assert x.shape == (4, 1, 28, 28)


def test_train_on_a_grayscale_folder_with_no_size_flags_builds_a_one_channel_model(gray28, tmp_path, capsys):
    assert main(["train", "--data", "imagefolder", "--data-path", str(gray28), "--width", "4", "--batch-size", "4",
                 "--epochs", "1", "--workers", "0", "--progress", "false", "--out", str(tmp_path), "--name", "g"]) == 0
    out = capsys.readouterr().out
    assert "data: image folder" in out and "1 channel(s)" in out
    ckpt = sorted((tmp_path / "g" / "checkpoints").glob("*.safetensors"))[-1]
    state, meta = load_checkpoint(ckpt)
    assert (meta["in_chans"], meta["image_size"], meta["num_classes"]) == (1, 28, 3)
    assert meta["classes"] == ["bag", "coat", "shirt"] and len(meta["mean"]) == 1
    first_conv = next(v for k, v in state["model"].items() if v.dim() == 4)
    assert first_conv.shape[1] == 1
    assert main(["eval", str(ckpt)]) == 0  # eval rebuilds the same 1-channel, 28 px model
    assert json.loads(capsys.readouterr().out)["raw"]["n"] == 12


def test_a_requested_size_that_upsamples_is_warned_about(gray28):
    with pytest.warns(UserWarning, match=r"image_size 56 upsamples the images .* shorter side 28 px\) 2.0x per side"):
        src = _source(gray28, image_size=56)
    assert src.image_size == 56 and src.data.x_train.shape[-1] == 56
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _source(gray28, image_size=20).image_size == 20  # downsampling is not warned about


def test_mixed_sizes_take_the_median_shorter_side_capped_at_224(gray28):
    ds = ImageFolder(gray28 / "train", train=True)
    mixed = FolderShape(((40, 30), (50, 36), (300, 400)), gray=False, probed=3)
    assert plan_folder(ds, 6, image_size=None, eval_size=None, in_chans=None, crop="auto", crop_scale=0.08,
                       crop_padding=None, shape=mixed).size == 36
    big = FolderShape(((500, 375), (640, 480)), gray=False, probed=2)
    p = plan_folder(ds, 6, image_size=None, eval_size=None, in_chans=None, crop="auto", crop_scale=0.08,
                    crop_padding=None, shape=big)
    assert (p.size, p.eval_size, p.channels, p.crop, p.in_memory) == (224, 224, 3, "resized", False)
    assert probe_folder(ds) == FolderShape(((28, 28),) * 12, gray=True, probed=12)


def test_crop_policy_flag(gray28, monkeypatch):
    src = _source(gray28, crop="resized", crop_scale=0.5)  # ImageNet-style, streamed
    assert isinstance(src, FolderSource) and src.plan.crop == "resized" and src.train_set.scale == (0.5, 1.0)
    assert src.train_set.crop == "resized" and "random-resized crop, area 0.5-1" in src.note
    x, *_ = next(src.train_batches(0))
    assert x.shape == (4, 1, 28, 28)
    monkeypatch.setattr(folders, "MEMORY_BUDGET", 0)  # pad-and-crop too big for memory: streamed, crop on device
    src = _source(gray28, crop="pad", crop_padding=3, flip=True)
    assert isinstance(src, FolderSource) and src.plan.crop == "pad" and src.train_set.crop == "fixed"
    assert "streamed" in src.note and "pad-and-crop 3 px" in src.note
    x, *_ = next(src.train_batches(0))
    raw = torch.stack([ImageFolder(gray28 / "train", train=False, crop="fixed", size=28, channels=1)[i][0]
                       for i in range(12)]).float()
    x = x * src.std + src.mean  # back to pixels: each is a shifted / mirrored copy of a stored image, zero-padded
    assert x.shape == (4, 1, 28, 28) and not any(torch.equal(x[0], r) for r in raw)
    with pytest.raises(ValueError, match="crop: 'random' is not one of auto, pad, resized"):
        _cfg(gray28, crop="random")
    with pytest.raises(ValueError, match=r"crop_scale .* in \(0, 1\]"):
        _cfg(gray28, crop_scale=0)


def test_grayscale_is_kept_colour_is_refused_or_converted_on_request(gray28, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(folders, "PROBE_FILES", 6)  # a large folder's probe misses a file: here 6 of 13
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(gray28 / "train" / "coat" / "zz_colour.png")
    with pytest.raises(ValueError, match=r"zz_colour.png: a colour image \(mode RGB\) in a folder read as "
                                         r"grayscale; pass --in-chans 3"):
        _source(gray28)  # decoding meets the colour file the probe did not open
    assert _source(gray28, in_chans=1).in_chans == 1  # explicit: every image converted to gray
    three = _source(gray28, in_chans=3)
    assert three.in_chans == 3 and three.data.x_train.shape[1] == 3
    rgb = make_image_folder(tmp_path / "rgb", size=(28, 28))
    assert _source(rgb).in_chans == 3
    with pytest.raises(ValueError, match="in_chans must be 1 .* or 3"):
        _cfg(gray28, in_chans=2)
    with pytest.raises(ValueError, match="--in-chans applies to image folders only"):
        resolve_config(overrides=dict(data="digits", in_chans=1))


def test_vit_defaults_are_valid_and_a_patch_that_does_not_fit_is_refused():
    for name in ("salunet_t", "vit_ln"):
        cfg = resolve_config(overrides={"model": name})
        assert cfg.width == 96 and cfg.width % 12 == 0  # the trainer's 16 is not a multiple of 12 heads
        m = build_model(cfg, num_classes=10, in_chans=1, image_size=28)  # 7x7 patches of 4 px
        assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert resolve_config(overrides={"model": "salunet_t", "width": 24}).width == 24  # a flag still wins
    with pytest.raises(ValueError, match=r"30 px images do not split into 4x4 patches; pass --model-overrides "
                                         r"'\{\"patch\": P\}' with P in \[1, 2, 3, 5, 6, 10, 15\]"):
        build_model(resolve_config(overrides={"model": "salunet_t"}), num_classes=10, in_chans=1, image_size=30)
    m = build_model(resolve_config(overrides={"model": "salunet_t", "model_overrides": {"patch": 5}}),
                    num_classes=10, in_chans=1, image_size=30)
    assert m.embed.patch == 5
