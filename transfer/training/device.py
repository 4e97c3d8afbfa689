"""Where a run computes: `--device auto|cpu|cuda` resolved (never a silent fallback), batches moved, autocast."""

from __future__ import annotations

import torch

from transfer.core.errors import DeviceError
from transfer.core.world import World


def resolve_device(device: str, world: World | None = None) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA is an error, never a silent fallback.

    Under torchrun, plain 'cuda' is this process's GPU, cuda:LOCAL_RANK."""
    world = World.from_env() if world is None else world
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """Where a run trained, as its config.json records it: 'cpu', or 'cuda:0 (NVIDIA H100 80GB HBM3)'."""
    if device.type != "cuda":
        return device.type
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; image batches on CUDA in channels_last (what the convolutions are fastest with)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda" and images.ndim == 4:
        return images.to(memory_format=torch.channels_last)
    return images


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA; a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
