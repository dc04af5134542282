"""Benchmarks (never timed tests): every figure is a ratio against a baseline measured in the same process
run, median of several interleaved repeats, so that a noisy shared machine slows both sides alike.

``salunet bench ops``: SALU+SWALU vs BatchNorm2d+ReLU on NCHW, the fused residual tail vs BatchNorm2d+add+ReLU,
SALU+GALU vs LayerNorm+GELU on tokens, and
the fused / eager / reference / torch.compile variants of SALU alone; forward+backward time and the bytes
saved for backward (unique storages kept by autograd, parameters excluded since they live anyway).

``--device cuda`` / ``--dtype bf16|fp16`` (ops and models): the same cases on a GPU and in low precision.
Activations take the dtype, parameters stay float32 (what a layer meets inside a bf16-autocast network); the
models run under ``torch.autocast``. GPU timing: ``torch.cuda.synchronize`` around CUDA events that enclose
a loop of calls (ops) or one step (models). GPU rows also carry the peak memory allocated by one
forward+backward (``torch.cuda.max_memory_allocated`` above what was allocated before it) and, for the ops, the
achieved bandwidth: **byte model** = the op's minimal traffic, one read of each input and one write of each
output per direction: forward reads x (and the residual) and writes y; backward reads x (and the residual) and
the upstream gradient and writes dL/dx (and dL/dresidual). That is 5 element-sizes per element (8 for the
residual tail), the same count for every variant of a case (the baseline too), so GB/s compares variants and
sits against the device's copy bandwidth, measured in the same run (row ``copy``), as the ceiling.

``salunet bench folder``: training images/s on a generated 28 px grayscale image folder with no data flag but the
path, against the same images as an .npz, in one process (data/folders.py: a small folder is decoded once and
trains like the .npz).
"""
from __future__ import annotations

import copy
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .nn import GALU, SALU, SALUAct, SWALU, kernels
from .nn import functional as F

__all__ = ["saved_bytes", "time_fwd_bwd", "bench_ops", "OpResult", "bench_models", "ModelResult", "bench_train",
           "TrainBenchResult", "fold_batchnorm", "fold_for_inference", "resolve_device", "DTYPES", "OP_CASES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, refused in one line if this machine cannot run it."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"bench: unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"bench: device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"bench: --device {device} but CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); run on a GPU machine or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"bench: --device {device} but this machine has {torch.cuda.device_count()} GPU(s); "
                             "use cuda:0 .. cuda:N-1")
    return dev


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"bench: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Peak:
    """Peak memory allocated on a CUDA device inside the ``with`` block, above what was allocated at its start
    (MiB in ``.mib``); None on CPU, where torch keeps no such count."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda" and exc[0] is None:
            _sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20


def saved_bytes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                params: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``fn(x)``, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    del y
    return sum(seen.values())


def time_fwd_bwd(fn: Callable, x: torch.Tensor, grad: torch.Tensor, inner: int = 1) -> float:
    """Seconds of one forward+backward of ``fn(x)``. On CUDA: the mean over ``inner`` calls between two CUDA events,
    after a synchronize (one call of a ~10 us kernel would measure the launch, not the kernel); ``x.grad`` is
    reset between calls so that no call pays for accumulating into it."""
    if x.device.type != "cuda":
        t0 = time.perf_counter()
        y = fn(x)
        y.backward(grad)
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(x.device)
    start.record()
    for _ in range(inner):
        x.grad = None
        fn(x).backward(grad)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


@dataclass
class OpResult:
    case: str
    variant: str
    baseline: str
    median_ms: float
    ratio_time: float  # median time / median time of the baseline
    saved_bytes: int
    ratio_saved: float  # saved bytes / input bytes
    path: str
    device: str = "cpu"
    dtype: str = "fp32"
    shape: str = ""
    gbps: float = 0.0  # achieved bandwidth under the byte model of the module docstring
    peak_mib: float | None = None  # CUDA: peak memory allocated by one forward+backward, above what existed before


def _path(variant: str, device: str = "cpu") -> str:
    if "reference" in variant or not any(op in variant for op in ("salu", "swalu", "galu")):
        return "torch"
    for key, mode in (("eager", "eager"), ("C++", "cpp"), ("inductor", "compiled"), ("Triton kernels", "triton")):
        if key in variant:
            return "salunet " + mode
    return "salunet " + kernels.kernel_path(device)


def _measure(case: str, shape: tuple[int, ...], variants: dict[str, tuple[nn.Module | Callable, list]],
             baseline: str, repeats: int, warmup: int, device: torch.device = torch.device("cpu"),
             dtype: str = "fp32", io_tensors: int = 1, inner: int = 1) -> list[OpResult]:
    """Time every variant on x of ``shape``; ``io_tensors``: inputs of the op that the byte model counts (1, or 2
    for the residual tail)."""
    torch.manual_seed(0)
    x0 = torch.randn(shape, device=device).to(DTYPES[dtype])
    grad = torch.randn(shape, device=device).to(DTYPES[dtype])
    in_bytes = x0.numel() * x0.element_size()
    moved = in_bytes * (3 * io_tensors + 2)  # fwd: read inputs, write y; bwd: read inputs and g, write their grads
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, (fn, _) in variants.items():  # warm-up (and compilation) outside the timed loop
        for _ in range(warmup):
            time_fwd_bwd(fn, x0.clone().requires_grad_(), grad, inner)
    for _ in range(repeats):  # interleaved so that machine noise hits every variant alike
        for name, (fn, _) in variants.items():
            times[name].append(time_fwd_bwd(fn, x0.clone().requires_grad_(), grad, inner))
    base = statistics.median(times[baseline])
    out = []
    for name, (fn, params) in variants.items():
        med = statistics.median(times[name])
        sb = saved_bytes(fn, x0.clone().requires_grad_(), params)
        with _Peak(device) as peak:
            fn(x0.clone().requires_grad_()).backward(grad)
        out.append(OpResult(case, name, baseline, med * 1e3, med / base, sb, sb / in_bytes, _path(name, device),
                            device.type, dtype, "x".join(map(str, shape)), moved / med / 1e9, peak.mib))
    return out


OP_CASES = ("nchw", "tail", "tokens", "salu")  # names for ``cases``: see the _*_case builders below


def bench_ops(repeats: int = 15, warmup: int = 3, threads: int = 2, progress: Callable[[str], None] = print,
              device: str = "cpu", dtype: str = "fp32", batch: int | None = None,
              cases: str | None = None) -> list[OpResult]:
    """Run the operator benchmark; return one :class:`OpResult` per (case, variant). ``device`` / ``dtype``: see
    the module docstring; ``batch``: leading size of every case (default 64 NCHW / 128 tokens on CPU, 4x that on
    CUDA, so that each tensor is well beyond the GPU's L2 cache); ``cases``: comma-separated names of
    :data:`OP_CASES` to run (default all)."""
    dev, _ = resolve_device(device), _dtype(dtype)
    wanted = list(OP_CASES) if cases is None else [c.strip() for c in cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in OP_CASES]
    if unknown or not wanted:
        raise ValueError(f"bench ops: unknown case(s) {', '.join(map(repr, unknown)) or 'none given'}; choose from "
                         f"{', '.join(OP_CASES)}")
    torch.set_num_threads(threads)
    scale = 4 if dev.type == "cuda" else 1
    n_img, n_tok = (batch, batch) if batch else (64 * scale, 128 * scale)
    inner = 20 if dev.type == "cuda" else 1
    builders = {"nchw": lambda: _nchw_case(n_img, dev, dtype), "tail": lambda: _tail_case(n_img, dev, dtype),
                "tokens": lambda: _token_case(n_tok, dev, dtype), "salu": lambda: _salu_alone_case(n_img, dev, dtype)}
    results: list[OpResult] = []
    mode = kernels.get_kernel_mode()
    try:
        if dev.type == "cuda":
            results.append(_copy_row(n_img, dev, dtype, repeats, inner))
        for name in wanted:
            label, case, shape, variants, baseline = builders[name]()
            progress(f"ops: {label} ({dev}, {dtype}) ...")
            results += _measure(case, shape, variants, baseline, repeats, warmup, dev, dtype,
                                io_tensors=2 if name == "tail" else 1, inner=inner)
    finally:
        kernels.set_kernel_mode(mode)
    return results


def _copy_row(n: int, device: torch.device, dtype: str, repeats: int, inner: int) -> OpResult:
    """The device's copy bandwidth on the NCHW case's tensor (read x + write y): the ceiling for the GB/s column."""
    x = torch.randn(n, _C, 32, 32, device=device).to(DTYPES[dtype])
    y = torch.empty_like(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(inner):
            y.copy_(x)
        end.record()
        end.synchronize()
        if i:  # the first round warms up
            times.append(start.elapsed_time(end) / 1e3 / inner)
    med = statistics.median(times)
    nbytes = x.numel() * x.element_size()
    return OpResult("copy", "y.copy_(x) (read + write, no backward)", "itself", med * 1e3, 1.0, 0, 0.0, "torch",
                    device.type, dtype, "x".join(map(str, x.shape)), 2 * nbytes / med / 1e9, None)


def _params(*mods):
    return [p for m in mods for p in m.parameters()]


_C, _D = 64, 384  # channels of the NCHW cases, hidden size of the token case


def _in_mode(mode: str, fn: Callable) -> Callable:
    """``fn`` run in kernel mode ``mode``; the path is fixed at forward time, so backward runs the same path."""
    def run(x):
        with kernels.using_kernel_mode(mode):
            return fn(x)
    return run


def _with_triton(device, variants: dict, name: str, fn: Callable, params: list) -> dict:
    """``variants`` plus ``name`` (``fn`` on salunet's hand-written Triton kernels) on CUDA, where they run."""
    if device.type == "cuda" and kernels._triton().available(device):
        variants[name] = (_in_mode("triton", fn), params)
    return variants


def _on(device, *mods):
    """Modules on ``device`` with float32 parameters (activations carry the benchmark's dtype)."""
    return [m.to(device) for m in mods]


def _nchw_case(n: int = 64, device=torch.device("cpu"), dtype: str = "fp32"):
    """SALU + SWALU (two modules, fused) vs BatchNorm2d + ReLU on NCHW."""
    bn, relu, s1, w1 = _on(device, nn.BatchNorm2d(_C), nn.ReLU(), SALU(_C), SWALU(_C))
    pair, = _on(device, SALUAct(SALU(_C), SWALU(_C)))
    return f"NCHW ({n}, 64, 32, 32)", f"nchw_{n}x64x32x32", (n, _C, 32, 32), _with_triton(device, {
        "batchnorm2d+relu": (lambda x: relu(bn(x)), _params(bn)),
        "salu+swalu (two modules)": (lambda x: w1(s1(x)), _params(s1, w1)),
        "salu+swalu (fused SALUAct)": (pair, _params(pair)),
        "swalu alone": (w1, _params(w1)),
    }, "salu+swalu (fused SALUAct, Triton kernels)", pair, _params(pair)), "batchnorm2d+relu"


def _tail_case(n: int = 64, device=torch.device("cpu"), dtype: str = "fp32"):
    """The residual tail act(norm(x) + shortcut): fused SALUAddAct vs BatchNorm2d + add + ReLU."""
    from .nn import SALUAddAct

    r0 = torch.randn(n, _C, 32, 32, device=device).to(DTYPES[dtype])
    bn2, relu, tail = _on(device, nn.BatchNorm2d(_C), nn.ReLU(), SALUAddAct(SALU(_C), SWALU(_C)))
    return f"residual tail NCHW ({n}, 64, 32, 32)", f"tail_{n}x64x32x32", (n, _C, 32, 32), _with_triton(device, {
        "batchnorm2d+add+relu": (lambda x: relu(bn2(x) + r0), _params(bn2)),
        "salu+add+swalu (fused SALUAddAct)": (lambda x: tail(x, r0), _params(tail)),
    }, "salu+add+swalu (fused SALUAddAct, Triton kernels)", lambda x: tail(x, r0), _params(tail)), \
        "batchnorm2d+add+relu"


def _token_case(n: int = 128, device=torch.device("cpu"), dtype: str = "fp32"):
    """Tokens: SALU + GALU (two modules, fused) vs LayerNorm + GELU."""
    ln, gelu, s2, g2 = _on(device, nn.LayerNorm(_D), nn.GELU(), SALU(_D, dim=-1), GALU(_D, dim=-1))
    # CUDA's layer_norm takes weights of the input's dtype only (CPU's takes float32 too): the baseline in bf16
    # is LayerNorm cast to bf16, as a model cast with .to(torch.bfloat16) runs it
    ln.to(DTYPES[dtype])
    pair2, = _on(device, SALUAct(SALU(_D, dim=-1), GALU(_D, dim=-1)))
    return f"tokens ({n}, 65, 384)", f"tokens_{n}x65x384", (n, 65, _D), _with_triton(device, {
        "layernorm+gelu": (lambda x: gelu(ln(x)), _params(ln)),
        "salu+galu (two modules)": (lambda x: g2(s2(x)), _params(s2, g2)),
        "salu+galu (fused SALUAct)": (pair2, _params(pair2)),
    }, "salu+galu (fused SALUAct, Triton kernels)", pair2, _params(pair2)), "layernorm+gelu"


def _salu_alone_case(n: int = 64, device=torch.device("cpu"), dtype: str = "fp32"):
    """SALU alone on every path (C++ on CPU only, inductor, Triton kernels on CUDA only, eager), the plain-formula
    reference and its torch.compile."""
    bn, s3 = _on(device, nn.BatchNorm2d(_C), SALU(_C))
    a = torch.ones(_C, 1, 1, device=device, requires_grad=True)
    b = torch.ones(_C, 1, 1, device=device, requires_grad=True)
    ref_compiled = torch.compile(F.salu_reference, dynamic=False)
    variants = {
        "batchnorm2d": (bn, _params(bn)),
        "salu fused, C++": (_in_mode("cpp", s3), _params(s3)),
        "salu fused, inductor": (_in_mode("compiled", s3), _params(s3)),
        "salu fused, eager": (_in_mode("eager", s3), _params(s3)),
        "salu reference": (lambda x: F.salu_reference(x, a, b), [a, b]),
        "salu reference, torch.compile": (lambda x: ref_compiled(x, a, b), [a, b]),
    }
    if device.type != "cpu":  # the C++ kernels take CPU tensors only
        del variants["salu fused, C++"]
    _with_triton(device, variants, "salu fused, Triton kernels", s3, _params(s3))
    return "SALU alone, variants", f"salu_{n}x64x32x32", (n, _C, 32, 32), variants, "batchnorm2d"


def environment(device: str | torch.device = "cpu") -> dict:
    dev = torch.device(device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        # the CPU path is not asked for here: asking builds the C++ kernels (~25 s), which a GPU benchmark never
        # runs; on an H200 that build ran past a step's time limit (issue 13)
        env.update(device=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                   kernel_path_cuda=kernels.kernel_path(dev))
        if kernels._triton().available(dev):  # how the Triton rows' kernels are launched
            env["triton_launch"] = kernels._triton().launch_path()
    else:
        env["kernel_path"] = kernels.kernel_path("cpu")
    return env


def format_table(results: list[OpResult]) -> str:
    """The markdown table; rows measured on a GPU add achieved GB/s and peak memory (CPU tables are unchanged)."""
    gpu = any(r.device != "cpu" for r in results)
    lines = ["| case | variant | fwd+bwd ms | time vs baseline | saved for backward | x input bytes |"
             + (" GB/s | peak MiB |" if gpu else ""), "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if gpu else "")]
    for r in results:
        peak = "" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"| {r.case} | {r.variant} | {r.median_ms:.{3 if gpu else 2}f} | {r.ratio_time:.2f}x | "
                     f"{r.saved_bytes / 2**20:.1f} MiB | {r.ratio_saved:.2f}x |" + (f" {r.gbps:.0f} | {peak} |"
                                                                                     if gpu else ""))
    return "\n".join(lines)


def write_jsonl(path, results, env: dict) -> None:
    """The benchmark's rows, one JSON line each with the environment, written atomically (train/checkpoint.py)."""
    from .train.checkpoint import write_jsonl_atomic

    write_jsonl_atomic(Path(path), [{**asdict(r), "env": env} for r in results])


# ----------------------------------------------------------------------------------------------------------
# models: training-step and inference throughput, SaluNet vs its normalized twin

@dataclass
class ModelResult:
    pair: str
    model: str
    baseline: str
    width: str
    batch: int
    image: int
    train_img_s: float
    train_ratio: float  # model / baseline images per second (>1 = faster)
    infer_img_s: float
    infer_ratio: float  # against the baseline with BatchNorm folded into its convolutions when it has BN
    infer_baseline: str
    device: str = "cpu"
    dtype: str = "fp32"  # fp32, or the autocast dtype
    train_peak_mib: float | None = None  # CUDA: peak memory allocated by one training step, above what existed
    train_peak_ratio: float | None = None  # model / baseline (<1 = leaner)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Eval-mode copy of ``model`` with every Conv->BatchNorm folded into the conv (what a deployment runs)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def fold_for_inference(model: nn.Module) -> nn.Module:
    """Eval-mode copy of a norm-free model with weight-standardised convs folded into plain ones (models/nf.py):
    what a deployment runs, like the twin's BN folding."""
    from .models import fold_nf_convs

    m = copy.deepcopy(model).eval()
    fold_nf_convs(m)
    return m


def _train_step(model, opt, x, y, amp=None):
    _sync(x.device)  # on CUDA: time this step's kernels, not the queue left by earlier work
    t0 = time.perf_counter()
    with amp or nullcontext():
        loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync(x.device)
    return time.perf_counter() - t0


def _infer(model, x, amp=None):
    _sync(x.device)
    t0 = time.perf_counter()
    with torch.inference_mode(), amp or nullcontext():
        model(x)
    _sync(x.device)
    return time.perf_counter() - t0


MODEL_PAIRS = [  # (pair, salunet, twin, width or None, batch, image side, full?)
    ("resnet18 cpu-width", "salunet_c18", "resnet18_bn", 16, 64, 32, False),
    ("resnet18 v2 cpu-width", "salunet_c18_v2", "resnet18_bn", 16, 64, 32, False),
    ("vit cpu-width", "salunet_t", "vit_ln", 96, 64, 32, False),
    ("resnet50 cpu-width", "salunet_c50", "resnet50_bn", 16, 8, 64, False),
    ("resnet50 v2 cpu-width", "salunet_c50_v2", "resnet50_bn", 16, 8, 64, False),
    ("resnet18 full", "salunet_c18", "resnet18_bn", None, 32, 32, True),
    ("resnet18 v2 full", "salunet_c18_v2", "resnet18_bn", None, 32, 32, True),
    ("vit full", "salunet_t", "vit_ln", None, 32, 32, True),
    ("resnet50 full", "salunet_c50", "resnet50_bn", None, 4, 224, True),
    ("resnet50 v2 full", "salunet_c50_v2", "resnet50_bn", None, 4, 224, True),
]


def bench_models(repeats: int = 7, warmup: int = 3, threads: int = 2, full: bool = False,
                 progress: Callable[[str], None] = print, pairs: str | None = None, device: str = "cpu",
                 dtype: str = "fp32", batch: int | None = None, channels_last: bool = False) -> list[ModelResult]:
    """Images/s of a training step (SGD) and of inference, SaluNet vs its twin, interleaved repeats. ``pairs``
    (comma-separated names of :data:`MODEL_PAIRS`) runs only those, whatever ``full`` says. ``device`` /
    ``dtype`` (bf16 / fp16: ``torch.autocast``) / ``channels_last``: where and how the models run; ``batch``
    replaces every pair's own batch size (on a GPU the paper's 128, say)."""
    from .models import create_model
    from .models.channels_last import to_channels_last

    dev, _ = resolve_device(device), _dtype(dtype)
    wanted = None if pairs is None else {p.strip() for p in pairs.split(",") if p.strip()}
    unknown = sorted((wanted or set()) - {p[0] for p in MODEL_PAIRS})
    if unknown:
        raise ValueError(f"unknown model pair(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(repr(p[0]) for p in MODEL_PAIRS)}")
    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def amp():
        return nullcontext() if dtype == "fp32" else torch.autocast(dev.type, dtype=DTYPES[dtype])

    out = []
    for pair, name, twin, width, pair_batch, side, is_full in MODEL_PAIRS:
        if (wanted is not None and pair not in wanted) or (wanted is None and is_full and not full):
            continue
        batch_n = batch or pair_batch
        progress(f"models: {pair} ({name} vs {twin}, batch {batch_n}, {side}x{side}, {dev}, {dtype}) ...")
        torch.manual_seed(0)
        x = torch.randn(batch_n, 3, side, side, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch_n,), device=dev)
        models = {n: create_model(n, num_classes=10, width=width).to(dev) for n in (name, twin)}
        if channels_last:
            models = {n: to_channels_last(m) for n, m in models.items()}
        opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in models.items()}
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in models[twin].modules())
        # separate eval-mode copies: the training models stay in train mode (SaluNets behave the same in both,
        # the twin's BatchNorm does not)
        infer_models = {name: fold_for_inference(models[name]),
                        twin: fold_batchnorm(models[twin]) if has_bn else copy.deepcopy(models[twin]).eval()}
        times = {k: [] for k in ("train_" + name, "train_" + twin, "infer_" + name, "infer_" + twin)}
        for m in models.values():
            m.train()
        # training and inference are timed in separate phases, each interleaving the two models: a training
        # step between inference calls changes the machine's state (caches, OpenMP threads kept awake) and
        # with it the inference ratio (measured 0.82x interleaved vs 1.04x for resnet18 cpu-width)
        for i in range(warmup + repeats):
            for n, m in models.items():
                t = _train_step(m, opts[n], x, y, amp())
                if i >= warmup:
                    times["train_" + n].append(t)
        for i in range(warmup + repeats):
            for n, m in infer_models.items():
                t = _infer(m, x, amp())
                if i >= warmup:
                    times["infer_" + n].append(t)
        peaks = {}
        for n, m in models.items():  # one more step each, alone, for its peak memory (None on CPU)
            with _Peak(dev) as peak:
                _train_step(m, opts[n], x, y, amp())
            peaks[n] = peak.mib
        med = {k: batch_n / statistics.median(v) for k, v in times.items()}
        out.append(ModelResult(pair, name, twin, str(width or "paper"), batch_n, side, med["train_" + name],
                               med["train_" + name] / med["train_" + twin], med["infer_" + name],
                               med["infer_" + name] / med["infer_" + twin],
                               twin + (" (BN folded)" if has_bn else ""), dev.type, dtype, peaks[name],
                               None if peaks[name] is None else peaks[name] / peaks[twin]))
    return out


def format_model_table(results: list[ModelResult]) -> str:
    """The markdown table; rows measured on a GPU add the training step's peak memory (CPU tables are unchanged)."""
    gpu = any(r.train_peak_mib is not None for r in results)
    lines = ["| pair | batch x image | train img/s | train vs twin | infer img/s | infer vs | twin at inference |"
             + (" train peak MiB | vs twin |" if gpu else ""), "|---|---|---:|---:|---:|---:|---|"
             + ("---:|---:|" if gpu else "")]
    for r in results:
        mem = (f" {r.train_peak_mib:.0f} | {r.train_peak_ratio:.2f}x |" if r.train_peak_mib is not None
               else " | |" if gpu else "")
        lines.append(f"| {r.pair} | {r.batch} x {r.image}² | {r.train_img_s:.1f} | {r.train_ratio:.2f}x | "
                     f"{r.infer_img_s:.1f} | {r.infer_ratio:.2f}x | {r.infer_baseline} |" + mem)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# training through the real trainer: images/s, peak memory, data-pipeline share

@dataclass
class TrainBenchResult:
    width: str
    model: str
    baseline: str
    images_per_s: float
    ratio_speed: float  # model / baseline images per second (>1 = faster)
    peak_rss_mib: float
    ratio_memory: float  # model / baseline peak resident memory (<1 = leaner)
    data_share: float  # share of training time spent producing batches (loading + augmentation)
    repeats: int


TRAIN_PAIRS = [("salunet_c18", "resnet18_bn")]


def _train_child(cfg: dict, queue) -> None:
    """Child process of :func:`_train_once`: one training run, then its last epoch's metrics and peak RSS."""
    import resource

    from .train import train

    try:
        last = train(cfg)["final"]
        queue.put({"images_per_s": last["images_per_s"], "data_share": last["data_share"],
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})  # KiB on Linux
    except Exception as exc:  # noqa: BLE001 - reported by the parent with the config that failed
        queue.put({"error": f"{type(exc).__name__}: {exc}", "bad_input": isinstance(exc, (ValueError, OSError))})


def train_config(model: str, width: int | None, data_path: str, subset: int, epochs: int, out: str,
                 name: str) -> dict:
    """The training config of one benchmark run: CIFAR-10, batch 128, SGD lr 0.05, crop + flip, no EMA."""
    return {"model": model, "width": width, "data": "cifar10", "data_path": data_path, "train_subset": subset,
            "test_subset": 500, "epochs": epochs, "batch_size": 128, "lr": 0.05, "ema_decay": 0.0, "crop_padding": 4,
            "flip": True, "progress": False, "out": out, "name": name}


def _train_once(cfg: dict, threads: int) -> dict:
    """One training run of ``cfg`` (:func:`salunet.train.train`) in a fresh process, so that its peak RSS is its
    own; returns its last epoch's metrics and peak RSS."""
    import multiprocessing as mp
    import os

    ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's memory or threads
    queue = ctx.Queue()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the child's torch at import
    try:
        proc = ctx.Process(target=_train_child, args=(cfg, queue))
        proc.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    import queue as queue_mod

    while True:  # never wait forever on a child that died without reporting
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"training benchmark run exited with code {proc.exitcode} before reporting ({cfg})")
    proc.join()
    if result.get("bad_input"):  # the data or a path: the user's to fix, said in one line
        raise ValueError(f"bench train: {result['error'].split(': ', 1)[1]}")
    if "error" in result:
        raise RuntimeError(f"training benchmark run failed ({cfg}): {result['error']}")
    return result


def bench_train(data_path: str, repeats: int = 3, threads: int = 2, full: bool = False,
                progress: Callable[[str], None] = print) -> list[TrainBenchResult]:
    """Training images/s and peak memory of each SaluNet vs its BN twin through ``salunet train`` (fresh
    processes, interleaved repeats, medians), at CPU width 16 and, with ``full``, at the paper's width."""
    import tempfile

    if not Path(data_path).expanduser().exists():
        raise FileNotFoundError(f"{data_path}: no such file; bench train needs CIFAR-10 (--data-path, an .npz "
                                "or the official archive)")
    settings = [(16, 2560, 2)] + ([(None, 512, 2)] if full else [])
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, subset, epochs in settings:
            for model, twin in TRAIN_PAIRS:
                runs: dict[str, list[dict]] = {model: [], twin: []}
                for r in range(repeats):
                    for m in (model, twin):  # interleaved: machine noise hits both alike
                        progress(f"train: {m} width {width or 'paper'} repeat {r + 1}/{repeats} ...")
                        cfg = train_config(m, width, data_path, subset, epochs, tmp, f"{m}-{width}-{r}")
                        runs[m].append(_train_once(cfg, threads))
                med = {m: {k: statistics.median(x[k] for x in v) for k in v[0]} for m, v in runs.items()}
                for m in (model, twin):
                    out.append(TrainBenchResult(str(width or "paper"), m, twin, med[m]["images_per_s"],
                                                med[m]["images_per_s"] / med[twin]["images_per_s"],
                                                med[m]["peak_rss_mib"], med[m]["peak_rss_mib"] / med[twin]["peak_rss_mib"],
                                                med[m]["data_share"], repeats))
    return out


def format_train_table(results: list[TrainBenchResult]) -> str:
    lines = ["| width | model | train img/s | vs twin | peak RSS MiB | vs twin | data-pipeline share |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.width} | {r.model} | {r.images_per_s:.0f} | {r.ratio_speed:.2f}x | {r.peak_rss_mib:.0f} | "
                     f"{r.ratio_memory:.2f}x | {100 * r.data_share:.1f}% |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# folder: your own images as an image folder vs the same images as an .npz (issue 15's speed target)

@dataclass
class FolderBenchResult:
    data: str  # "imagefolder" | "npz"
    images_per_s: float  # median over repeats of the last epoch's training images/s (startup excluded)
    ratio_speed: float  # this / the .npz run's images/s (>= 0.9 is the target)
    wall_s: float  # median wall time of the whole train() call (folder: includes its one-time decode)
    in_chans: int
    image_size: int
    repeats: int


def make_gray_folder(root: Path, n_per_class: int, classes: int = 10, size: int = 28, seed: int = 0):
    """A Fashion-MNIST-like image folder (``size`` px grayscale PNGs, ``classes`` classes; val = a fifth as many)
    and the same images as an .npz beside it; returns (folder root, npz path)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_per_class), ("val", max(1, n_per_class // 5))):
        xs, ys = [], []
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, (size, size))  # a class template plus noise: learnable, like real data
            for i in range(n):
                x = np.clip(base + rng.normal(0, 40, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(x).save(d / f"{i:05d}.png")
                xs.append(x[..., None])
                ys.append(c)
        key = "train" if split == "train" else "test"
        arrays[f"x_{key}"], arrays[f"y_{key}"] = np.stack(xs), np.asarray(ys, np.int64)
    npz = root.parent / f"{root.name}.npz"
    np.savez(npz, **arrays)
    return root, npz


def bench_folder(repeats: int = 3, threads: int = 2, n_per_class: int = 400,
                 progress: Callable[[str], None] = print) -> list[FolderBenchResult]:
    """Training images/s of ``salunet train --data imagefolder --data-path DIR`` (no other data flag) on a
    generated 28 px grayscale folder vs the same images as an .npz, in this process, interleaved repeats, medians.
    Both runs use the trainer's defaults (salunet_c18 width 16, batch 64), one epoch, no progress bar."""
    import tempfile

    from .train import train
    from .train.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    runs: dict[str, list[dict]] = {"imagefolder": [], "npz": []}
    with tempfile.TemporaryDirectory() as tmp:
        root, npz = make_gray_folder(Path(tmp) / "fmnist", n_per_class)
        for r in range(repeats):
            for data, path in (("imagefolder", root), ("npz", npz)):  # interleaved: machine noise hits both
                progress(f"folder: {data} repeat {r + 1}/{repeats} ...")
                t = time.perf_counter()
                s = train({"data": data, "data_path": str(path), "epochs": 1, "progress": False,
                           "out": str(Path(tmp) / "runs"), "name": f"{data}-{r}"})
                wall = time.perf_counter() - t
                _, meta = load_checkpoint(s["checkpoint"])
                runs[data].append({"images_per_s": s["final"]["images_per_s"], "wall_s": wall,
                                   "in_chans": meta["in_chans"], "image_size": meta["image_size"]})
    med = {d: {k: statistics.median(x[k] for x in v) for k in v[0]} for d, v in runs.items()}
    return [FolderBenchResult(d, med[d]["images_per_s"], med[d]["images_per_s"] / med["npz"]["images_per_s"],
                              med[d]["wall_s"], int(med[d]["in_chans"]), int(med[d]["image_size"]), repeats)
            for d in ("imagefolder", "npz")]


def format_folder_table(results: list[FolderBenchResult]) -> str:
    lines = ["| data | channels | size | train img/s | vs .npz | wall s (whole run) |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.data} | {r.in_chans} | {r.image_size} | {r.images_per_s:.0f} | {r.ratio_speed:.2f}x | "
                     f"{r.wall_s:.1f} |")
    return "\n".join(lines)
