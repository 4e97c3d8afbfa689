"""Regularisers for small folders: label smoothing, mixup, cutmix (timm's definitions), discriminative rates and the
weights' moving average (EMA).

`mix_batch` follows timm's `Mixup` in "batch" mode: one lambda ~ Beta(alpha, alpha) per batch, each image mixed with
the batch's mirror order (`x.flip(0)`), cutmix's lambda corrected to the pasted box's true area, smoothed one-hot
targets mixed with the same lambda; with both alphas set, cutmix is chosen half of the time. Unlike timm's it takes
odd batches too (the middle image pairs with itself), since a rank's share of a global batch can be odd. Random
numbers come from torch's generator, which training seeds per epoch, so resumed runs repeat them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def smoothed_one_hot(targets: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """One-hot rows with `smoothing` spread evenly over all classes (rows sum to 1)."""
    off = smoothing / classes
    return torch.full((len(targets), classes), off, device=targets.device).scatter_(
        1, targets.view(-1, 1), 1.0 - smoothing + off)


def _cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area about (1 - lam) of the image, centred uniformly at random and clipped to it."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(height, ()).item()), int(torch.randint(width, ()).item())
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def mix_batch(inputs: torch.Tensor, targets: torch.Tensor, classes: int, mixup: float = 0.0, cutmix: float = 0.0,
              smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed inputs, soft targets). Cutmix needs images (N, C, H, W); on feature rows only mixup applies. Targets
    are class indices, or multi-hot rows (several labels per image: smoothing moves each label toward 0.5)."""
    soft = (smoothed_one_hot(targets, classes, smoothing) if targets.ndim == 1
            else targets.float() * (1.0 - smoothing) + smoothing / 2)
    use_cutmix = cutmix > 0 and inputs.ndim == 4 and (mixup <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    if alpha <= 0 or len(inputs) == 0:
        return inputs, soft
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = inputs.flip(0)
    if use_cutmix:
        top, bottom, left, right = _cutmix_box(inputs.shape[2], inputs.shape[3], lam)
        inputs = inputs.clone()
        inputs[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (inputs.shape[2] * inputs.shape[3])
    else:
        inputs = inputs * lam + partner * (1.0 - lam)
    return inputs, soft * lam + soft.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy against probability rows (timm's SoftTargetCrossEntropy, summed not averaged)."""
    return torch.sum(-soft_targets * F.log_softmax(logits, dim=-1))


def discriminative_groups(model: nn.Module, group_prefixes: list[list[str]], lr: float, decay: float) -> list[dict]:
    """Optimizer parameter groups: the head at `lr`, the k-th unfrozen backbone group from the top at lr * decay**k
    (fastai's `slice` spread); parameters outside any group (frozen ones excluded) train at `lr`."""
    from transfer.training.model import _in_prefixes

    groups: list[dict] = [{"params": [], "lr": lr, "name": "head"}]
    groups += [{"params": [], "lr": lr * decay ** (k + 1), "name": ",".join(prefixes)}
               for k, prefixes in enumerate(group_prefixes)]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        path = name.removeprefix("backbone.")
        index = next((k + 1 for k, prefixes in enumerate(group_prefixes)
                      if name.startswith("backbone.") and _in_prefixes(path, prefixes)), 0)
        groups[index]["params"].append(param)
    return [group for group in groups if group["params"]]


def stage_lr_groups(model: nn.Module, spec, config, stage) -> list[dict] | None:
    """Stage 2 with --lr-decay below 1: one parameter group per unfrozen group of `spec` (a backbone's registry
    entry), lower rates further down; None (one group) otherwise."""
    if stage.name != "finetune" or config.lr_decay == 1.0:
        return None
    groups = spec.unfreeze_groups
    count = len(groups) if config.unfreeze == "all" else int(config.unfreeze)
    return discriminative_groups(model, [list(g.modules) for g in groups[:count]], stage.lr, config.lr_decay)


def make_ema(model: nn.Module, decay: float, resume_state: dict | None):
    """timm's ModelEmaV3 of the whole model with `--ema` (restored on resume from the checkpoint's "ema"), else
    None: an average of the weights over the steps, which often validates better than the last ones."""
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=decay)
    if resume_state is not None and "ema" in resume_state:
        ema.module.load_state_dict(resume_state["ema"])
    return ema
