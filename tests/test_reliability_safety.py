"""Nothing executed from a file (issue 6): no code-executing loader anywhere in the package (checked on its
syntax tree), malicious pickles refused unread as checkpoints (resume and eval), as CIFAR batches and inside
an .npz; downloads verified before use; archive extraction refusing escapes, links and special files.

Every malicious payload here creates a marker file when unpickled; each test first proves that the payload is
live (plain ``pickle.loads`` does create the marker), then that salunet never creates it.
"""
import ast
import dataclasses
import hashlib
import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import salunet
from salunet.cli import main
from salunet.data import CIFAR, download_cifar, safe_extract
from salunet.train import train
from salunet.train.checkpoint import list_checkpoints

from helpers import cifar_batch_bytes, make_cifar10_archive

PACKAGE = Path(salunet.__file__).parent


# ---- the package holds no code-executing loader ------------------------------------------------------------

FORBIDDEN = {  # fully qualified callables that can run code from a file's contents
    "torch.load", "torch.jit.load", "torch.package.PackageImporter", "torch.hub.load", "torch.hub.load_state_dict_from_url",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
    "marshal.load", "marshal.loads", "shelve.open", "dill.load", "dill.loads", "joblib.load", "cloudpickle.load",
    "cloudpickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "numpy.lib.format.read_array",
    "eval", "exec", "compile", "builtins.eval", "builtins.exec", "__import__", "importlib.import_module",
    "runpy.run_path", "runpy.run_module",
}


def _calls(tree: ast.AST):
    """(qualified name, call node) of every call, with ``import x as y`` / ``from x import y as z`` resolved."""
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, f = [], node.func
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if isinstance(f, ast.Name):
            parts.append(alias.get(f.id, f.id))
        elif parts:  # a method of a computed object, e.g. tarfile.open(p).extractall(d): "<expr>.extractall"
            parts.append("<expr>")
        else:
            continue
        yield ".".join(reversed(parts)), node


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<dynamic>"
    return None


def _findings(tree: ast.AST, where: str) -> list[str]:
    """Every construct in ``tree`` that could run code from a file (``where``: the path inside the package)."""
    found = []
    for name, node in _calls(tree):
        if name in FORBIDDEN:
            found.append(f"{where}:{node.lineno} {name}")
        if name in ("numpy.load", "np.load") and _kw(node, "allow_pickle") is not False:
            found.append(f"{where}:{node.lineno} numpy.load without allow_pickle=False")
        if _kw(node, "weights_only") is False:
            found.append(f"{where}:{node.lineno} weights_only=False")
        if name.endswith(".extractall") and where != "data/cifar.py":
            found.append(f"{where}:{node.lineno} extractall outside safe_extract")
    for node in ast.walk(tree):  # an Unpickler subclass must restrict what it builds
        if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if "find_class" not in methods:
                found.append(f"{where}:{node.lineno} Unpickler subclass without find_class")
    return found


def test_package_has_no_code_executing_loader():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = []
    for path in files:
        found += _findings(ast.parse(path.read_text(), str(path)), str(path.relative_to(PACKAGE)))
    assert found == [], found


def test_the_scan_catches_what_it_should():
    """The checker itself: each construct it must catch, caught, by the rule meant for it."""
    bad = {"import torch\ntorch.load('x')\n": "torch.load",
           "from torch import load as l\nl('x')\n": "torch.load",
           "import pickle as p\np.loads(b'')\n": "pickle.loads",
           "import numpy as np\nnp.load('x')\n": "without allow_pickle=False",
           "import numpy as np\nnp.load('x', allow_pickle=True)\n": "without allow_pickle=False",
           "eval('1')\n": "eval",
           "import foo\nfoo.load('x', weights_only=False)\n": "weights_only=False",
           "import tarfile\ntarfile.open('a').extractall('d')\n": "extractall outside safe_extract",
           "import pickle\nclass U(pickle.Unpickler):\n    pass\n": "Unpickler subclass without find_class"}
    for src, rule in bad.items():
        found = _findings(ast.parse(src), "train/x.py")
        assert any(f.endswith(" " + rule) or rule in f for f in found), (src, found)
    ok = ("import numpy as np\nnp.load('x', allow_pickle=False)\nfrom safetensors.torch import load\nload(b'')\n"
          "import pickle\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise ValueError\n")
    assert _findings(ast.parse(ok), "train/x.py") == []
    # archives are extracted by the one guarded function, and only there
    assert _findings(ast.parse("import tarfile\ntarfile.open('a').extractall('d')\n"), "data/cifar.py") == []


# ---- malicious pickles --------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if (and only if) the pickle is executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_bytes(marker, kind: str) -> bytes:
    if kind == "torch.save":
        buf = io.BytesIO()
        torch.save({"model": _Payload(marker)}, buf)
        return buf.getvalue()
    protocol = int(kind.split("-")[1])
    return pickle.dumps({"model": _Payload(marker)}, protocol=protocol)


def assert_live(payload: bytes, tmp_path, kind: str):
    """The payload really runs code when loaded the unsafe way (so its refusal below means something)."""
    probe = tmp_path / "probe"
    data = evil_bytes(probe, kind)
    if kind == "torch.save":
        torch.load(io.BytesIO(data), weights_only=False)  # the unsafe load that salunet must never do
    else:
        pickle.loads(data)
    assert probe.exists()
    probe.unlink()


KINDS = ["pickle-0", "pickle-2", "pickle-5", "torch.save"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train(model="cnn4", width=4, train_subset=64, test_subset=32, batch_size=32, epochs=2, progress=False,
          out=str(out), name="good")
    return out / "good"


def _snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def _one_line(capsys, code, expected=2):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == expected and len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_checkpoint_refused_by_eval(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    assert_live(evil_bytes(marker, kind), tmp_path, kind)
    ckpt = tmp_path / "epoch_0001.safetensors"
    ckpt.write_bytes(evil_bytes(marker, kind))
    before = _snapshot(tmp_path)
    line = _one_line(capsys, main(["eval", str(ckpt)]))
    assert line.startswith(f"salunet: error: {ckpt}: ")
    refusal = "checksum mismatch, the file is corrupt or truncated" if kind == "pickle-0" else "this is a pickle/torch.save file, refused unread"
    assert refusal in line
    assert not marker.exists() and _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_checkpoint_refused_by_resume(tmp_path, capsys, run, kind):
    """The only checkpoint of a run is a malicious pickle: resume refuses, naming it, and writes nothing."""
    marker = tmp_path / "pwned"
    d = shutil.copytree(run, tmp_path / "run")
    for p in list_checkpoints(d):
        p.unlink()
    evil = d / "checkpoints" / "epoch_0002.safetensors"
    evil.write_bytes(evil_bytes(marker, kind))
    before = _snapshot(tmp_path)
    line = _one_line(capsys, main(["train", "--resume", str(d)]))
    assert line.startswith(f"salunet: error: {d}: no checkpoint loads ({evil}: ")
    assert not marker.exists() and _snapshot(tmp_path) == before


def test_malicious_newest_checkpoint_skipped_on_resume(tmp_path, capsys, run):
    """A malicious pickle placed as the newest checkpoint: resume names it, continues from the good one (whose
    redone epoch then replaces the file), and never runs it."""
    marker = tmp_path / "pwned"
    d = shutil.copytree(run, tmp_path / "run")
    evil = d / "checkpoints" / "epoch_0003.safetensors"
    evil.write_bytes(evil_bytes(marker, "pickle-2"))
    assert main(["train", "--resume", str(d), "--epochs", "3"]) == 0
    err = capsys.readouterr().err
    assert f"salunet train: skipping {evil}: this is a pickle/torch.save file, refused unread" in err
    assert f"resuming from the previous good checkpoint {d}/checkpoints/epoch_0002.safetensors" in err
    assert not marker.exists() and evil.read_bytes()[:1] != b"\x80"  # replaced by the real epoch 3


def _cifar_folder(root, evil: bytes):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        (folder / name).write_bytes(evil if name == "data_batch_3" else cifar_batch_bytes(4, i))
    return folder


def _evil_batches(marker):
    import os

    return {  # each would run code if unpickled without restriction
        "open": pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2),
        "os.system": pickle.dumps(type("X", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})(),
                                  protocol=2),
        "eval": pickle.dumps(type("Y", (), {"__reduce__": lambda self: (eval, (f"open({str(marker)!r}, 'w')",))})(),
                             protocol=2),
    }


@pytest.mark.parametrize("payload", ["open", "os.system", "eval"])
@pytest.mark.parametrize("container", ["folder", "archive"])
def test_malicious_cifar_batch_refused(tmp_path, capsys, payload, container):
    marker = tmp_path / "pwned"
    evil = _evil_batches(marker)[payload]
    pickle.loads(evil)  # live: it does create the marker when loaded the unsafe way
    assert marker.exists()
    marker.unlink()
    folder = _cifar_folder(tmp_path / "data", evil)
    path = folder
    if container == "archive":
        path = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.add(folder, arcname=folder.name)
        shutil.rmtree(tmp_path / "data")
    before = _snapshot(tmp_path)
    line = _one_line(capsys, main(["train", "--data", "cifar10", "--data-path", str(path), "--width", "4",
                                   "--progress", "false", "--out", str(tmp_path / "runs")]))
    member = f"{path}:cifar-10-batches-py/data_batch_3" if container == "archive" else f"{folder}/data_batch_3"
    assert line.startswith(f"salunet: error: {member}: not a CIFAR python batch (refusing to load ")
    assert line.endswith("not part of the CIFAR format); replace it with the official file (or use --download)")
    assert not marker.exists() and _snapshot(tmp_path) == before and not (tmp_path / "runs").exists()


def test_malicious_object_array_in_npz_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    x = np.empty(1, dtype=object)
    x[0] = _Payload(marker)
    p = tmp_path / "evil.npz"
    np.savez(p, x_train=x, y_train=np.zeros(1, np.int64), x_test=x, y_test=np.zeros(1, np.int64))
    np.load(p, allow_pickle=True)["x_train"]  # live
    assert marker.exists()
    marker.unlink()
    line = _one_line(capsys, main(["train", "--data", "npz", "--data-path", str(p), "--out", str(tmp_path / "r")]))
    assert line == (f"salunet: error: {p}: holds object arrays (pickled Python objects), which salunet never loads: "
                    "unpickling can run code; save plain uint8 / integer arrays")
    assert not marker.exists() and not (tmp_path / "r").exists()


# ---- downloads are verified before use ------------------------------------------------------------------------

def test_tampered_download_is_never_opened(tmp_path, local_server, monkeypatch, capsys):  # noqa: F811
    """The server's archive differs from the published checksum (here: it carries a malicious batch): the
    download is refused before anything is extracted or unpickled, and nothing is kept."""
    srv_root, base = local_server
    spec = CIFAR["cifar10"]
    good = make_cifar10_archive(tmp_path / "good.tar.gz")
    marker = tmp_path / "pwned"
    folder = _cifar_folder(tmp_path / "evil", _evil_batches(marker)["open"])
    with tarfile.open(srv_root / spec.archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    monkeypatch.setitem(CIFAR, "cifar10", dataclasses.replace(spec, url=f"{base}/{spec.archive}",
                                                              md5=hashlib.md5(good.read_bytes()).hexdigest()))
    dest = tmp_path / "data"
    code = main(["train", "--data", "cifar10", "--data-path", str(dest), "--download", "--progress", "false",
                 "--out", str(tmp_path / "runs")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("salunet")]  # (+ server log)
    assert code == 2 and len(err) == 1
    line = err[0]
    assert "checksum mismatch" in line and "nothing was kept" in line and not marker.exists()
    assert list(dest.iterdir()) == [] and not (tmp_path / "runs").exists()


def test_tampered_local_archive_is_replaced_not_used(tmp_path, local_server):  # noqa: F811
    """An archive already in the download folder whose checksum is wrong is fetched again, not used."""
    srv_root, base = local_server
    spec = CIFAR["cifar10"]
    good = make_cifar10_archive(srv_root / spec.archive)
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / spec.archive).write_bytes(b"tampered")
    folder = download_cifar("cifar10", dest, url=f"{base}/{spec.archive}", md5=hashlib.md5(good.read_bytes()).hexdigest(),
                            progress=False)
    assert (dest / spec.archive).read_bytes() == good.read_bytes() and (folder / "data_batch_1").is_file()


# ---- extraction refuses escapes, links and special files -----------------------------------------------------

def _tar(path, name, kind="file", target=""):
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(name)
        if kind == "file":
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
            return path
        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                     "chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE}[kind]
        info.linkname = target
        tf.addfile(info)
    return path


@pytest.mark.parametrize("name,kind,target", [
    ("../escape.txt", "file", ""),
    ("cifar-10-batches-py/../../escape.txt", "file", ""),
    ("/tmp/abs-escape.txt", "file", ""),
    ("cifar-10-batches-py/passwd", "symlink", "/etc/passwd"),
    ("cifar-10-batches-py/up", "symlink", "../../.."),
    ("cifar-10-batches-py/inside", "symlink", "readme"),  # even a link that stays inside: links are refused
    ("cifar-10-batches-py/passwd", "hardlink", "/etc/passwd"),
    ("cifar-10-batches-py/copy", "hardlink", "cifar-10-batches-py/readme"),
    ("cifar-10-batches-py/fifo", "fifo", ""),
    ("cifar-10-batches-py/tty", "chardev", ""),
    ("cifar-10-batches-py/disk", "blockdev", ""),
])
def test_safe_extract_refuses(tmp_path, name, kind, target):
    arch = _tar(tmp_path / "evil.tar.gz", name, kind, target)
    dest = tmp_path / "out" / "dest"
    with pytest.raises(ValueError, match=f"refusing member {name!r}"):
        safe_extract(arch, dest)
    written = [p for p in tmp_path.rglob("*") if p.name != "evil.tar.gz"]
    assert all(p.is_dir() for p in written), written  # nothing extracted, not even the harmless member
    assert not Path("/tmp/abs-escape.txt").exists()


def test_download_with_a_link_member_extracts_nothing(tmp_path, local_server):  # noqa: F811
    """The checksum matches (the archive is what the server claims) but it holds a symlink: refused, the
    staging folder removed, no data folder created."""
    srv_root, base = local_server
    spec = CIFAR["cifar10"]
    arch = _tar(srv_root / spec.archive, "cifar-10-batches-py/data_batch_1", "symlink", "/etc/passwd")
    dest = tmp_path / "data"
    with pytest.raises(ValueError, match="links and special files are not allowed"):
        download_cifar("cifar10", dest, url=f"{base}/{spec.archive}", md5=hashlib.md5(arch.read_bytes()).hexdigest(),
                       progress=False)
    assert sorted(p.name for p in dest.iterdir()) == [spec.archive]  # the verified download only


def test_checkpoint_whose_header_length_looks_like_a_pickle_loads(tmp_path):
    """A safetensors file begins with its header length (8 bytes, little-endian); 640 = 0x0280 begins like a
    protocol-2 pickle. Such a checkpoint must load: the pickle signature is consulted only after the file
    failed to parse as safetensors (consulted first, it refused good checkpoints whose header length was
    640, 1152 or 1408 modulo 65536 bytes)."""
    from salunet.train.checkpoint import load_checkpoint, save_checkpoint

    p = tmp_path / "c.safetensors"
    for pad in range(1024):
        save_checkpoint(p, {"w": torch.arange(3.0)}, {"note": "x" * pad})
        if p.read_bytes()[:2] == b"\x80\x02":
            break
    assert p.read_bytes()[:2] == b"\x80\x02"
    state, meta = load_checkpoint(p)
    assert torch.equal(state["w"], torch.arange(3.0)) and meta["note"] == "x" * pad


def test_zip_checkpoint_is_never_opened_as_zip(tmp_path, capsys):
    """A zip (torch.save's container) with any content is refused by its first bytes, before any parsing."""
    p = tmp_path / "c.safetensors"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    line = _one_line(capsys, main(["eval", str(p)]))
    assert "this is a pickle/torch.save file, refused unread" in line
