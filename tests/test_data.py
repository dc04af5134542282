"""Data: CIFAR official format / .npz / download (local server) / safe extraction, digits, image folders,
batched augmentation."""
import dataclasses
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from salunet.data import (CIFAR, ImageFolder, download_cifar, load_arrays, load_cifar, mix_batch, random_crop,
                          random_flip, read_npz, safe_extract, scan_folder)
from salunet.data.cifar import _read_batch

from helpers import make_cifar10_archive, make_image_folder, make_npz


def test_official_archive_and_folder(tmp_path):
    arch = make_cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    d = load_cifar("cifar10", arch)
    assert d.x_train.shape == (60, 32, 32, 3) and d.x_test.shape == (12, 32, 32, 3) and d.x_train.dtype == np.uint8
    safe_extract(arch, tmp_path / "ex")
    d2 = load_cifar("cifar10", tmp_path / "ex")
    np.testing.assert_array_equal(d.x_train, d2.x_train)
    np.testing.assert_array_equal(d.y_test, d2.y_test)


def test_shared_cifar10_npz(cifar_npz):
    d = load_arrays("cifar10", str(cifar_npz))
    assert d.x_train.shape == (50000, 32, 32, 3) and d.num_classes == 10
    assert np.bincount(d.y_test) .tolist() == [1000] * 10
    m = d.x_train[:2000].reshape(-1, 3).mean(0)
    assert np.allclose(m, [125.3, 122.95, 113.87], atol=3)


@pytest.mark.parametrize("replace,match", [
    (dict(x_train=np.zeros((4, 8, 8, 3), np.float32)), "dtype float32, expected uint8"),
    (dict(x_train=np.zeros((64, 8, 8), np.uint8)), "expected \\(N, H, W, C\\)"),
    (dict(y_train=np.full(64, 12)), "labels in \\[12, 12\\], expected 0..9"),
    (dict(y_test=np.zeros(5, np.int64)), "y_test has shape"),
    (dict(x_test=None), "missing array\\(s\\) x_test"),
])
def test_bad_npz(tmp_path, replace, match):
    p = make_npz(tmp_path / "bad.npz", **replace)
    with pytest.raises(ValueError, match=match):
        load_cifar("cifar10", p)


def test_not_an_npz_and_missing(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        read_npz(p)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_cifar("cifar10", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown data set"):
        load_arrays("mnist")


def test_corrupt_archive(tmp_path):
    arch = make_cifar10_archive(tmp_path / "c.tar.gz")
    data = arch.read_bytes()
    arch.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="c.tar.gz"):
        load_cifar("cifar10", arch)


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(ValueError, match="not a CIFAR python batch"):
        _read_batch(pickle.dumps({b"data": Evil()}), "data_batch_1", b"labels", 10)
    assert not marker.exists()


def _tar_with(tmp_path, name, link=False):
    p = tmp_path / "evil.tar.gz"
    with tarfile.open(p, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    return p


@pytest.mark.parametrize("name,link", [("../escape.txt", False), ("/abs.txt", False), ("a/link", True)])
def test_safe_extract_refuses(tmp_path, name, link):
    arch = _tar_with(tmp_path, name, link)
    with pytest.raises(ValueError, match="refusing member"):
        safe_extract(arch, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_download_from_local_server(tmp_path, local_server):
    srv_root, base = local_server
    arch = make_cifar10_archive(srv_root / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(arch.read_bytes()).hexdigest()
    dest = tmp_path / "data"
    folder = download_cifar("cifar10", dest, url=f"{base}/cifar-10-python.tar.gz", md5=md5, progress=False)
    assert folder.name == "cifar-10-batches-py" and (dest / "cifar-10-python.tar.gz").is_file()
    d = load_cifar("cifar10", dest)
    assert d.x_train.shape[0] == 60
    assert not list(dest.glob(".download-*")) and not list(dest.glob(".extract-*"))


def test_download_checksum_mismatch_keeps_nothing(tmp_path, local_server):
    srv_root, base = local_server
    make_cifar10_archive(srv_root / "cifar-10-python.tar.gz")
    dest = tmp_path / "data"
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_cifar("cifar10", dest, url=f"{base}/cifar-10-python.tar.gz", md5="0" * 32, progress=False)
    assert list(dest.iterdir()) == []
    with pytest.raises(ValueError, match="download failed"):
        download_cifar("cifar10", dest, url=f"{base}/missing.tar.gz", md5="0" * 32, progress=False)


def test_published_checksums_are_wired():
    from salunet.data import CIFAR

    assert CIFAR["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert CIFAR["cifar100"].url.startswith("https://www.cs.toronto.edu/~kriz/")


def test_digits_embedded():
    d = load_arrays("digits")
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.max() > 200 and set(np.unique(d.y_train)) == set(range(10))


def test_digits_read_without_sklearn_are_sklearns(monkeypatch):
    """The packaged file read directly (no sklearn import) gives what sklearn.datasets.load_digits gives, and
    where that file is not found, sklearn's loader reads the same set."""
    from sklearn.datasets import load_digits as sklearn_digits

    from salunet.data import digits

    assert digits._packaged_file() is not None  # the direct read is what this test checks
    ref = sklearn_digits()
    images, target = digits._read_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
    direct = digits.load_digits()
    monkeypatch.setattr(digits, "_packaged_file", lambda: None)
    via_sklearn = digits.load_digits()
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(direct, k), getattr(via_sklearn, k))


def test_image_folder(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    ds = ImageFolder(root / "train", train=True, size=12)
    x, y = ds[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8 and y == 0
    ev = ImageFolder(root / "val", train=False, size=12, classes=ds.classes)
    assert ev[len(ev) - 1][1] == 1 and ev[0][0].shape == (3, 12, 12)
    ds.set_epoch(0)
    a = ds[1][0]
    assert torch.equal(a, ds[1][0])  # reproducible per (seed, epoch, index)


def test_image_folder_bad(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        scan_folder(tmp_path / "none")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        scan_folder(tmp_path / "empty")
    root = make_image_folder(tmp_path / "imgs")
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not an image file"):
        scan_folder(root / "train")
    (root / "train" / "cat" / "notes.txt").unlink()
    (root / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolder(root / "train", train=False, size=8)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png"][0]
    with pytest.raises(ValueError, match="broken.png: cannot decode"):
        ds[idx]


def test_random_crop_and_flip():
    x = torch.arange(64 * 1 * 4 * 4, dtype=torch.float32).view(64, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    y = random_crop(x, 2, g)
    assert y.shape == x.shape
    # every crop is a window of the zero-padded image at some offset, and the offsets vary over the batch
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = []
    for n in range(len(x)):
        hits = [(oy, ox) for oy in range(5) for ox in range(5)
                if torch.equal(y[n], padded[n, :, oy:oy + 4, ox:ox + 4])]
        assert hits, f"sample {n} is not a window of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 5 and (2, 2) in offsets  # random, and the uncropped window is among them
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(random_flip(x, g1), random_flip(x, g2))
    f = random_flip(x, torch.Generator().manual_seed(1))
    flipped = [torch.equal(f[n], x[n].flip(-1)) for n in range(len(x))]
    for n in range(len(x)):
        assert flipped[n] or torch.equal(f[n], x[n])
    assert 10 < sum(flipped) < 54  # about half of 64 (binomial: outside this range with p < 1e-6)


def test_mixup_and_cutmix():
    x = torch.randn(8, 3, 8, 8)
    y = torch.arange(8)
    xm, ya, yb, lam = mix_batch(x, y, 0.4, 0.0, torch.Generator().manual_seed(0))
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[yb])  # y = arange, so yb is the permutation
    xc, ya, yb, lam = mix_batch(x, y, 0.0, 1.0, torch.Generator().manual_seed(1))
    changed = (xc != x).any(1).float().mean((1, 2))  # fraction of pixels pasted, per image
    assert torch.allclose(changed[yb != ya], torch.full_like(changed[yb != ya], 1 - lam), atol=1e-6)
    assert mix_batch(x, y, 0, 0, torch.Generator())[3] == 1.0


# ---- CIFAR-100 in the official python format -----------------------------------------------------------------

def make_cifar100_archive(path, n_train=30, n_test=10):
    """A .tar.gz in the official CIFAR-100 python layout: cifar-100-python/{train,test,meta}, protocol-2
    pickles with b"data" (N, 3072) uint8, b"fine_labels" and b"coarse_labels" (fine labels 0 and 99 present)."""
    def batch(n, seed):
        rng = np.random.RandomState(seed)
        fine = rng.randint(0, 100, n)
        fine[:2] = (0, 99)
        return pickle.dumps({b"batch_label": b"training batch 1 of 1", b"filenames": [b"x.png"] * n,
                             b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                             b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8)}, protocol=2)
    meta = pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)],
                         b"coarse_label_names": [b"s%d" % i for i in range(20)]}, protocol=2)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("train", batch(n_train, 1)), ("test", batch(n_test, 2)), ("meta", meta)):
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cifar100_official_archive_and_folder(tmp_path):
    arch = make_cifar100_archive(tmp_path / "cifar-100-python.tar.gz")
    d = load_cifar("cifar100", arch)
    assert d.x_train.shape == (30, 32, 32, 3) and d.x_test.shape == (10, 32, 32, 3) and d.num_classes == 100
    assert d.y_train.min() == 0 and d.y_train.max() == 99
    safe_extract(arch, tmp_path / "ex")
    d2 = load_arrays("cifar100", str(tmp_path / "ex"))  # the folder holding cifar-100-python/
    np.testing.assert_array_equal(d.x_train, d2.x_train)
    np.testing.assert_array_equal(d.y_test, d2.y_test)
    d3 = load_cifar("cifar100", tmp_path / "ex" / "cifar-100-python")  # the extracted folder itself
    np.testing.assert_array_equal(d.y_train, d3.y_train)
    # the pixels are unpacked channel-first (R plane, G plane, B plane), as the official format stores them
    raw = pickle.loads((tmp_path / "ex" / "cifar-100-python" / "train").read_bytes(), encoding="bytes")[b"data"]
    np.testing.assert_array_equal(d.x_train[3, :, :, 1].ravel(), raw[3, 1024:2048])


def test_cifar10_files_are_refused_as_cifar100(tmp_path):
    y = np.arange(64) % 10  # CIFAR-10 labels: all valid CIFAR-100 labels, so only the class count tells
    p = make_npz(tmp_path / "cifar10.npz", shape=(32, 32, 3), y_train=y, y_test=y[:32])
    with pytest.raises(ValueError, match=r"cifar10.npz: labels span 0..9 \(10 classes\), but cifar100 has 100; "
                                         r"is this cifar10\? use --data cifar10"):
        load_cifar("cifar100", p)
    assert load_cifar("cifar10", p).num_classes == 10
    with pytest.raises(ValueError, match="archive has no cifar-100-python/train"):
        load_cifar("cifar100", make_cifar10_archive(tmp_path / "c10.tar.gz"))


def test_shared_cifar10_npz_refused_as_cifar100(cifar_npz):
    with pytest.raises(ValueError, match="but cifar100 has 100; is this cifar10"):
        load_arrays("cifar100", str(cifar_npz))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_through_load_arrays(tmp_path, local_server, monkeypatch, name):
    """``--download``'s path: load_arrays fetches the official archive (here from 127.0.0.1), verifies its
    checksum, extracts it, and loads it; a second call reads the extracted folder without the network."""
    srv_root, base = local_server
    spec = CIFAR[name]
    maker = make_cifar10_archive if name == "cifar10" else make_cifar100_archive
    arch = maker(srv_root / spec.archive)
    monkeypatch.setitem(CIFAR, name, dataclasses.replace(spec, url=f"{base}/{spec.archive}",
                                                         md5=hashlib.md5(arch.read_bytes()).hexdigest()))
    dest = tmp_path / "data"
    d = load_arrays(name, str(dest), download=True)
    assert (dest / spec.folder).is_dir() and d.num_classes == spec.num_classes
    umask = os.umask(0)
    os.umask(umask)
    assert (dest / spec.archive).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    (srv_root / spec.archive).unlink()  # the server no longer has it: the local copy must be used
    d2 = load_arrays(name, str(dest), download=True)
    np.testing.assert_array_equal(d.x_train, d2.x_train)


def test_image_folder_flip_can_be_turned_off(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=6)
    on = ImageFolder(root / "train", train=True, size=12, flip=True)
    off = ImageFolder(root / "train", train=True, size=12, flip=False)
    flipped = 0
    for i in range(len(on)):
        a, b = on[i][0], off[i][0]
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))  # same crop, mirrored or not
        flipped += not torch.equal(a, b)
    assert flipped > 0
