"""Multi-process training with PyTorch's own engine: ``torchrun --nproc-per-node N -m salunet train ...``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; we initialise ``torch.distributed`` (gloo on
CPU, NCCL on CUDA) and wrap the model in DistributedDataParallel. Nothing here re-implements collective
communication. Every rank evaluates its shard of the test set (counts summed with an all-reduce); rank 0
alone logs and writes checkpoints, the others wait at a barrier.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "barrier", "broadcast_object", "all_reduce_sum", "resolve_device",
           "restart_count", "max_restarts", "agent_identity", "all_gather_object"]


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # setup() created the process group (so teardown() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch.device (``cuda`` = this process's local rank)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available; use --device cpu")
        dev = torch.device("cuda", local_rank) if spec == "cuda" else torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {dev} requested but this machine has {torch.cuda.device_count()} GPU(s); "
                             "pick one of cuda:0 .. cuda:N-1, or --device cuda")
        return dev
    if spec != "cpu":
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def setup(device: str = "auto", timeout: float = 600.0) -> DistInfo:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK), if any. A collective
    that waits more than ``timeout`` seconds for a peer (stopped, hung) fails, and the run stops saying so."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = resolve_device(device, 0)
        if dev.type == "cuda":  # --device cuda:1: make it current, or pin-memory threads and others open GPU 0
            torch.cuda.set_device(dev)
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:"):  # one fixed GPU for every rank: NCCL refuses duplicates, or ranks share it
        raise ValueError(f"--device {device} names one GPU, but torchrun runs {world} processes; use --device cuda "
                         "(each process takes the GPU of its LOCAL_RANK) or auto")
    dev = resolve_device(device, local_rank)
    owns = not dist.is_initialized()  # a caller's own process group is used as it is, and left alone
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        wait = datetime.timedelta(seconds=timeout)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one TCPStore for the whole job, and the keys that a failed attempt's process group left
            # there (its ranks' addresses) are read by the restarted attempt, which then connects to dead ports
            # ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712). A key prefix per
            # attempt keeps the attempts apart; the store and the rendezvous are torch's own.
            store, _, _ = next(dist.rendezvous("env://"))
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"salunet/attempt{restart}", store),
                                    rank=rank, world_size=world, timeout=wait)
        else:
            dist.init_process_group(backend=backend, timeout=wait)
    else:  # a caller's group was made before: wait for every rank here, as init would, so that no rank claims the
        # run directory before every rank has checked it (train's plan_run; else a slow rank found it taken)
        kw = {"device_ids": [dev.index]} if dist.get_backend() == "nccl" and dev.index is not None else {}
        dist.barrier(**kw)
    return DistInfo(rank, world, local_rank, dev, owns)


def agent_identity() -> str:
    """Who launched this process, unique to one torchrun invocation on one machine: host, boot, the launcher's
    (torchrun's elastic agent's) pid and its start time. It stays the same across the restarts of a job (the
    agent restarts its workers) and differs between jobs even when they share a ``--rdzv-id``."""
    import socket

    ppid = os.getppid()
    parts = [socket.gethostname(), str(ppid)]
    for path, pick in (("/proc/sys/kernel/random/boot_id", lambda t: t.strip()),
                       (f"/proc/{ppid}/stat", lambda t: t.rsplit(")", 1)[1].split()[19])):  # field 22: start time
        try:
            with open(path) as f:
                parts.append(pick(f.read()))
        except (OSError, IndexError):
            pass
    return ":".join(parts)


def all_gather_object(info: DistInfo, obj) -> list:
    """Every rank's ``obj`` (picklable, in-process only), in rank order; ``[obj]`` in a single process."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def restart_count() -> int:
    """How many times torchrun has restarted this job (``--max-restarts``); 0 in the first attempt or outside
    torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def teardown(info: DistInfo) -> None:
    if info.enabled and info.owns_group and dist.is_initialized():
        import gc

        # a DistributedDataParallel left in a reference cycle keeps the group alive past destroy_process_group;
        # destroyed only during interpreter shutdown, gloo's threads can then abort the process ("terminate
        # called without an active exception", seen once at the end of a finished 2-rank run)
        gc.collect()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, obj):
    """Send a picklable object from rank 0 to all ranks (in-process only; nothing read from disk)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place, returned); a no-op in a single process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
