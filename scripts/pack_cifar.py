"""Pack a class-balanced subset of CIFAR-10 losslessly small enough to travel to a GPU machine, and unpack it there.

    python scripts/pack_cifar.py pack [--src ../shared/data/cifar10.npz] [--train 25000] [--test 5000]
                                      [--out gpu_data/cifar10_pack.npz] [--fit]
    python scripts/pack_cifar.py unpack gpu_data/cifar10_pack.npz OUT.npz

Why: the device tool carries at most 64 MiB (the working tree included), and the shared CIFAR-10 copy is 170 MB.
Each image is stored on its own as lossless WebP (Pillow), or PNG where Pillow has no WebP or PNG comes out
smaller on a sample (measured on the shared copy: WebP lossless, method 4, 0.573 of the raw bytes at 1.9 ms per
image; method 6 0.585 at 60 ms; PNG 0.736; strips of 10 images 0.544 at 2.5x the encoding time). The pack is one
uncompressed .npz: the encoded bytes of each split in one uint8 array with offsets, the labels, the format, and
the SHA-256 of the raw pixel arrays, which ``unpack`` checks so that the rebuilt .npz is bitwise the subset.

The subset: the first ``n / 10`` images of each class in the file's order (the shared copy is in a fixed random
order), kept in that order. ``--fit`` lowers the training count (a multiple of 10) so that the pack and the rest
of what travels (git's tracked and unignored files) fit in the 64 MiB with 2 MiB to spare. The output folder
``gpu_data/`` is git-ignored: the pack is never committed.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np

TRAVEL_LIMIT = 64 * 2**20  # what the device tool carries per call (its README)
MARGIN = 2 * 2**20
CLASSES = 10


def balanced_indices(y: np.ndarray, n: int, classes: int = CLASSES) -> np.ndarray:
    """Indices of the first ``n / classes`` samples of each class, in file order."""
    if n % classes:
        raise ValueError(f"{n} is not a multiple of {classes}: a class-balanced subset needs one")
    per = n // classes
    picked = [np.flatnonzero(y == c)[:per] for c in range(classes)]
    short = [c for c, p in enumerate(picked) if len(p) < per]
    if short:
        raise ValueError(f"class(es) {short} have fewer than {per} samples; ask for fewer images")
    return np.sort(np.concatenate(picked))


def encode(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "webp":
        Image.fromarray(img).save(buf, "WEBP", lossless=True, quality=100, method=4)
    else:
        Image.fromarray(img).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def choose_format(sample: np.ndarray) -> str:
    """WebP lossless where Pillow has it and it is the smaller on ``sample``, else PNG."""
    from PIL import features

    if not features.check("webp"):
        print("pack: Pillow has no WebP support here; using PNG (larger)", file=sys.stderr)
        return "png"
    sizes = {fmt: sum(len(encode(im, fmt)) for im in sample) for fmt in ("webp", "png")}
    return min(sizes, key=sizes.get)


def travel_bytes(repo: Path) -> int:
    """Bytes of what the device tool sends: tracked and untracked-but-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                           capture_output=True).stdout.split(b"\0")
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pack(src: Path, out: Path, n_train: int, n_test: int, fit: bool = False) -> dict:
    d = np.load(src)
    fmt = choose_format(d["x_train"][:200])
    if fit:
        sample = d["x_train"][:500]
        per_image = sum(len(encode(im, fmt)) for im in sample) / len(sample) * 1.03  # + 3% for the estimate
        budget = TRAVEL_LIMIT - MARGIN - travel_bytes(Path(__file__).resolve().parents[1])
        fits = int((budget / per_image - n_test) // CLASSES * CLASSES)
        if fits < CLASSES:
            raise SystemExit(f"pack: only {budget / 2**20:.1f} MiB are left beside what travels; free space first")
        n_train = min(n_train, fits)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        idx = balanced_indices(d[f"y_{split}"], n)
        x, y = d[f"x_{split}"][idx], d[f"y_{split}"][idx]
        blobs = [encode(im, fmt) for im in x]
        arrays[f"{split}_data"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"y_{split}"] = y
        arrays[f"{split}_sha256"] = np.array(sha(x))
        arrays[f"{split}_shape"] = np.array(x.shape, np.int64)
    arrays["format"] = np.array(fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    info = {"out": str(out), "format": fmt, "train": n_train, "test": n_test, "bytes": out.stat().st_size,
            "raw_bytes": (n_train + n_test) * 32 * 32 * 3}
    print(f"pack: {n_train} train + {n_test} test images, {fmt}, {info['bytes'] / 2**20:.1f} MiB "
          f"({info['bytes'] / info['raw_bytes']:.3f} of raw) -> {out}")
    return info


def _decode_chunk(blob: bytes, off: np.ndarray) -> np.ndarray:
    """Decode the images of one chunk: ``off`` are offsets into ``blob`` (len(off) - 1 images)."""
    return np.stack([decode(blob[off[i]:off[i + 1]]) for i in range(len(off) - 1)])


def decode_all(data: bytes, off: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Decode every image, in order, on ``workers`` processes (all cores by default: 30,000 images are ~8 s of one
    core here, 1 s on the GPU machine's 16, whose lease is what counts)."""
    import os
    from concurrent.futures import ProcessPoolExecutor

    n = len(off) - 1
    workers = max(1, min(workers or os.cpu_count() or 1, n // 500 or 1))
    if workers == 1:
        return _decode_chunk(data, off)
    bounds = np.linspace(0, n, workers + 1).astype(int)
    chunks = [(data[off[a]:off[b]], off[a:b + 1] - off[a]) for a, b in zip(bounds[:-1], bounds[1:])]
    with ProcessPoolExecutor(workers) as ex:
        return np.concatenate(list(ex.map(_decode_chunk, *zip(*chunks))))


def unpack(pack_path: Path, out: Path, workers: int | None = None) -> Path:
    """Rebuild x_train / y_train / x_test / y_test (uint8 NHWC, int64) and check the pixels bitwise."""
    p = np.load(pack_path)
    arrays = {}
    for split in ("train", "test"):
        data, off = p[f"{split}_data"].tobytes(), p[f"{split}_offsets"]
        x = decode_all(data, off, workers) if len(off) > 1 else np.zeros(tuple(p[f"{split}_shape"]), np.uint8)
        if x.shape != tuple(p[f"{split}_shape"]) or sha(x) != str(p[f"{split}_sha256"]):
            raise SystemExit(f"unpack: {split} pixels differ from what was packed ({pack_path}); pack again")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, p[f"y_{split}"]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"unpack: {len(arrays['x_train'])} train + {len(arrays['x_test'])} test images, pixels verified -> {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10.npz")
    a.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "gpu_data/cifar10_pack.npz")
    a.add_argument("--train", type=int, default=25_000)
    a.add_argument("--test", type=int, default=5_000)
    a.add_argument("--fit", action="store_true", help="fewer training images if needed to fit in what travels")
    u = sub.add_parser("unpack")
    u.add_argument("pack", type=Path)
    u.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        if not args.src.exists():
            raise SystemExit(f"pack: {args.src}: no such file; pass --src CIFAR-10 .npz")
        pack(args.src, args.out, args.train, args.test, args.fit)
    else:
        if not args.pack.exists():
            raise SystemExit(f"unpack: {args.pack}: no such file; run `python scripts/pack_cifar.py pack` first")
        unpack(args.pack, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
