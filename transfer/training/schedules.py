"""Optimizers and learning-rate schedules of a stage: constant, cosine to 1%, fastai's one-cycle, and the fresh
tail a stage gets when --resume adds epochs to it."""

from __future__ import annotations

import math

import torch
from torch import nn

from transfer.core.errors import TransferError
from transfer.training.stages import Stage


def make_optimizer(stage: Stage, model: nn.Module, weight_decay: float,
                   groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The stage's optimizer over the trainable parameters, or over `groups` (each with its own lr)."""
    params = groups or [p for p in model.parameters() if p.requires_grad]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.lr, momentum=0.9)
    if stage.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=stage.lr)
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=stage.lr, weight_decay=weight_decay)
    raise TransferError(f"unknown optimizer {stage.optimizer!r}; use adamw, rmsprop or sgd")


def make_scheduler(stage: Stage, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine from the stage's rate down to 1% of it (per epoch), or one-cycle over the stage's batches; with
    discriminative rates (several parameter groups) each group follows the curve from its own rate, so the groups
    keep their ratios."""
    if stage.schedule == "one-cycle":
        return one_cycle(optimizer, max(1, stage.epochs) * steps_per_epoch)
    if stage.schedule == "cosine":
        if len(optimizer.param_groups) > 1:
            return cosine_to_one_percent(optimizer, max(1, stage.epochs))
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, stage.epochs), eta_min=stage.lr * 0.01)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def cosine_to_one_percent(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """CosineAnnealingLR's curve with eta_min = 1% of each group's own starting rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs)))


def one_cycle(optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.25, div: float = 25.0,
              div_final: float = 1e5) -> torch.optim.lr_scheduler.LambdaLR:
    """fastai's `fit_one_cycle` rate: cosine up from lr/div to lr over the first `warmup` of the steps, then cosine
    down to lr/div_final; a factor of each group's own rate. (fastai also cycles momentum; we keep SGD's 0.9.)"""
    warm = max(1, round(steps * warmup))

    def cosine(start: float, end: float, position: float) -> float:
        return start + (1 + math.cos(math.pi * (1 - position))) * (end - start) / 2

    def factor(step: int) -> float:
        if step < warm:
            return cosine(1 / div, 1.0, step / warm)
        return cosine(1.0, 1 / div_final, min(1.0, (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)



def fresh_tail(stage: Stage, optimizer: torch.optim.Optimizer, done: int, stage_finished: bool,
               steps_per_epoch: int = 1):
    """The schedule for a stage extended on resume: a new cosine over its remaining epochs, from the stage's base
    rate when the stage had finished (a warm restart), else from the rate it had reached. Constant-rate stages
    simply continue; a one-cycle stage runs a new cycle over its remaining epochs, up to each group's own rate."""
    if stage.schedule == "constant":
        return make_scheduler(stage, optimizer)
    if stage.schedule == "one-cycle":
        return one_cycle(optimizer, max(1, stage.epochs - done) * steps_per_epoch)
    if len(optimizer.param_groups) > 1:  # discriminative rates: every group restarts in proportion
        factor = 1.0 if stage_finished else optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * factor
        return cosine_to_one_percent(optimizer, max(1, stage.epochs - done))
    start_lr = stage.lr if stage_finished else optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = start_lr
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, stage.epochs - done),
                                                      eta_min=stage.lr * 0.01)

