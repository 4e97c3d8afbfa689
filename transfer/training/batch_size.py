"""`--batch-size auto`: the largest training batch that fits a GPU (probed, with back-off), a reasoned one on CPU.

On CUDA the run's own model takes training steps (forward and backward, autocast, channels_last, the widest stage's
parameters trainable) on random images at doubling batch sizes until one runs out of memory or passes
`MEMORY_FRACTION` of the card; the largest that passed is used. On CPU memory is rarely the limit and
throughput per image stops rising around 32, so the choice is 32. Both are capped at `MAX_AUTO_BATCH` and at an
eighth of the training images (a small folder still gets 8 steps an epoch), but never below `MIN_BATCH`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from transfer.core.errors import DeviceError
from transfer.training import collectives
from transfer.training.model import set_trainable, train_mode

MAX_AUTO_BATCH = 256
CPU_BATCH = 32
MEMORY_FRACTION = 0.8  # of the card: room for the optimizer's state, validation and the allocator's slack
MIN_STEPS = 8
MIN_BATCH = 8  # smaller batches make noisy steps, and a BatchNorm that trains needs more than one image


def power_of_two_at_most(value: int) -> int:
    return 1 << (max(1, value).bit_length() - 1)


def data_cap(train_count: int) -> int:
    """The largest batch that still gives an epoch MIN_STEPS steps (a power of two), at least MIN_BATCH."""
    return max(MIN_BATCH, power_of_two_at_most(train_count // MIN_STEPS))


def probe_batch_size(fits: Callable[[int], bool], limit: int, start: int = 8) -> tuple[int, list[dict]]:
    """The largest power of two <= `limit` for which `fits(batch)` holds: doubling from `start` while it fits,
    halving from `start` when even that does not. Returns (batch, every try in order)."""
    tried: list[dict] = []

    def attempt(batch: int) -> bool:
        ok = fits(batch)
        tried.append({"batch_size": batch, "fits": ok})
        return ok

    batch = min(power_of_two_at_most(start), power_of_two_at_most(limit))
    if attempt(batch):
        while batch * 2 <= limit and attempt(batch * 2):
            batch *= 2
        return batch, tried
    while batch > 1:
        batch //= 2
        if attempt(batch):
            return batch, tried
    raise DeviceError("--batch-size auto: not even a batch of 1 fits this device's memory")


def cuda_fits(model: torch.nn.Module, input_size: int, device: torch.device,
              autocast: Callable) -> Callable[[int], bool]:
    """A trial training step of `model` at a batch size on CUDA: True when it ran within MEMORY_FRACTION of the
    card. BatchNorm running statistics and gradients are restored afterwards, so the run is untouched."""
    total = torch.cuda.get_device_properties(device).total_memory
    generator = torch.Generator(device=device).manual_seed(0)

    def fits(batch: int) -> bool:
        buffers = {name: value.clone() for name, value in model.named_buffers()}
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            images = torch.randn(batch, 3, input_size, input_size, device=device, generator=generator)
            with autocast():
                loss = model(images.to(memory_format=torch.channels_last)).float().logsumexp(1).mean()
            loss.backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) <= MEMORY_FRACTION * total
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, value in model.named_buffers():
                    value.copy_(buffers[name])
            del buffers
            torch.cuda.empty_cache()

    return fits


def choose_batch_size(device: torch.device, train_count: int, world_size: int,
                      fits: Callable[[int], bool] | None = None) -> dict:
    """The global batch for `--batch-size auto` and how it was chosen (recorded in config.json).

    `fits` (CUDA) tests one process's share; the global batch is that share times the number of processes."""
    cap = min(MAX_AUTO_BATCH, data_cap(train_count))
    if device.type != "cuda" or fits is None:
        batch = min(CPU_BATCH, cap)
        return {"batch_size": batch, "device": device.type, "rule": (
            f"CPU: {CPU_BATCH} (memory is not the limit and throughput per image is flat beyond it), at most "
            f"{cap} (a power of two <= {train_count} training images / {MIN_STEPS}, at least {MIN_BATCH})")}
    share_cap = max(1, cap // world_size)
    share, tried = probe_batch_size(fits, share_cap)
    return {"batch_size": share * world_size, "device": device.type, "tried": tried, "rule": (
        f"CUDA probe: the largest power of two per process whose training step stayed within "
        f"{MEMORY_FRACTION:.0%} of the card's memory, times {world_size} process(es), at most {cap}")}


def resolve_auto_batch_size(trainer, model, widest) -> None:
    """Resolve `--batch-size auto` for `trainer` before the first stage; every rank takes the smallest of the ranks'
    choices. The choice becomes the run's batch size (kept on resume) and is recorded for config.json."""
    fits = None
    if trainer.device.type == "cuda":
        set_trainable(model, list(widest.prefixes))
        train_mode(model, list(widest.prefixes),
                   batchnorm_stats=widest.name == "scratch" or trainer.config.bn_stats)
        fits = cuda_fits(model, trainer.prep.input_size, trainer.device, trainer.autocast)
    choice = choose_batch_size(trainer.device, len(trainer.train_samples), trainer.world.size, fits)
    choice["batch_size"] = min(collectives.all_gather(trainer.world, choice["batch_size"]))
    trainer.batch_choice, trainer.config.batch_size = choice, choice["batch_size"]
    trainer.log(f"--batch-size auto: {choice['batch_size']} ({choice['rule']})")
