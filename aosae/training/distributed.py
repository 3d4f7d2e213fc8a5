"""torchrun / DDP support: environment detection, process group, gradient all-reduce.

Under `torchrun --nproc_per_node N -m aosae train ...` each rank collects and reads its own
part of the token stream (⌊--tokens / N⌋ rows, its own store), computes gradients on its
own batches, and the gradients are averaged across ranks before every optimiser step, so
the weights stay identical. Rank 0 alone writes logs and checkpoints. Every step the ranks
agree on whether all their losses are finite before any of them steps, so a NaN/Inf on one
rank stops all of them at the same step (nobody is left waiting in a collective).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (single process if absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str) -> DistInfo:
    """Start the process group (NCCL for CUDA, gloo otherwise) when run under torchrun."""
    info = detect()
    if info.enabled and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return info


def device_for(device: str, info: DistInfo) -> str:
    """Each rank on its own GPU (cuda:LOCAL_RANK) when several run on one machine."""
    if device.startswith("cuda") and info.enabled:
        return f"cuda:{info.local_rank}"
    return device


def all_reduce_grads(params, info: DistInfo) -> None:
    """Average .grad over ranks (one flat buffer, one collective)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _collective_device() -> str:
    """NCCL reduces only CUDA tensors; gloo reduces CPU ones."""
    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        home = values.device
        values = values.to(_collective_device(), copy=True)
        dist.all_reduce(values)
        values /= info.world_size
        values = values.to(home)
    return values


def all_finite(finite: bool, info: DistInfo) -> bool:
    """True when `finite` holds on every rank (one tiny all-reduce)."""
    if not info.enabled:
        return finite
    t = torch.tensor([1 if finite else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def min_int(value: int, info: DistInfo) -> int:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
