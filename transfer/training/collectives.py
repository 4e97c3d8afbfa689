"""PyTorch's collectives for the processes torchrun started: join and leave the process group, sum, gather, barrier,
DistributedDataParallel, and the one-line error for a peer that stopped answering.

Each function takes the `World` (`transfer.core.world`, torch-free) and does nothing in a plain, one-process run.
Nothing here launches, rendezvouses or reduces by itself: that is torch.distributed's job.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from transfer.core.errors import PeerLostError, first_line
from transfer.core.world import DEFAULT_TIMEOUT_S, World


def join(world: World, device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join torch.distributed's default process group (env:// rendezvous, as torchrun prepares it); True when
    this call created it (and so should leave it), False when plain or already joined by the caller.

    `timeout_s` bounds every collective: when another process stops answering (killed, stopped, hung), this one
    fails after that long instead of blocking (PyTorch's gloo default is 30 minutes)."""
    if not world.distributed or dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def lost_peer(world: World, exc: BaseException, timeout_s: float) -> PeerLostError | None:
    """The one-line error for a collective that failed because another process stopped answering, or None when
    `exc` is something else (PyTorch reports it as a DistError, or a RuntimeError from gloo's transport)."""
    if not world.distributed:
        return None
    text = str(exc)
    if not isinstance(exc, getattr(dist, "DistError", ())) and not any(
            mark in text for mark in ("Timed out", "timed out", "Connection closed", "Connection reset", "gloo")):
        return None
    return PeerLostError(f"rank {world.rank} of {world.size}: another process stopped answering within "
                         f"--dist-timeout {timeout_s:g} s ({first_line(exc)[:160]})")


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: Sequence[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64 all_reduce)."""
    if not world.distributed:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(world: World, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (all_gather_object)."""
    if not world.distributed:
        return [value]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def data_parallel(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`module` wrapped in DistributedDataParallel under torchrun (gradients averaged over ranks), else itself."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
