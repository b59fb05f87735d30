"""The few collectives of training, over the process group Ray Train set up (gloo on CPU, NCCL on GPU).

With one worker there is no process group: every function is then the identity on its rank's value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def collective_device() -> str:
    """Where a tensor must live to take part in a collective: NCCL only moves CUDA tensors, gloo CPU ones."""
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean over ranks of a small CPU tensor (identity for one worker)."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = values.to(collective_device())
    dist.all_reduce(t)
    return (t / world).cpu()


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order (an in-memory collective; nothing is written)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def replica_max_abs_diff(params: Iterable[torch.Tensor], world: int) -> float:
    """Largest difference between any rank's `params` and rank 0's (0.0 when DDP keeps the replicas in step)."""
    if world == 1:
        return 0.0
    import torch.distributed as dist

    device = collective_device()
    flat = torch.cat([p.detach().float().reshape(-1) for p in params]).to(device)
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)
    return max(float((part - parts[0]).abs().max()) for part in parts)
