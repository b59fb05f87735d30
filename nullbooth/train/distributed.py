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


def ddp_options() -> dict[str, Any]:
    """DistributedDataParallel's options for the UNet: no buffer broadcast before every forward pass.

    The UNet's only buffers are the null-space bases of global mode (NullSpaceProjection.basis): constants, read
    from the same verified files on every rank. By default DDP broadcasts every buffer from rank 0 before each
    forward pass, for SD 1.5 tens of MB per step for nothing. DDP still syncs them once, when it wraps the model.
    torch ≥ 2.13 names the option `forward_sync_buffers` (and deprecates `broadcast_buffers`).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return {name: False}


def data_parallel(module: torch.nn.Module, world: int) -> torch.nn.Module:
    """`module` under DDP through Ray Train (its device placement for NCCL) with `ddp_options()`; itself for one
    worker."""
    if world == 1:
        return module
    import ray.train.torch

    return ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy="ddp",
                                         parallel_strategy_kwargs=ddp_options())
