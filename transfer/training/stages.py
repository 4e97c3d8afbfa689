"""The staged schedule on one screen: which stages a run trains, with what, and the seed of each epoch.

  stage "head"     backbone frozen (no gradients, BatchNorm in eval), head trained with AdamW/RMSprop at lr_head;
                   on cached pooled features ("bottleneck features") unless mixup/cutmix or --no-cache-features
                   ask for images; augmentation then starts with stage 2.
  stage "finetune" the top `unfreeze` groups + head trained with SGD momentum 0.9 at lr_finetune, cosine schedule.
  stage "scratch"  (classic nets, --no-pretrained) everything trained from the start, AdamW, cosine schedule.
With `--schedule one-cycle` every stage follows fastai's one-cycle curve instead, stepped per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.spec import BackboneSpec
from transfer.training.config import FinetuneConfig
from transfer.training.model import group_prefixes


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    prefixes: tuple[str, ...]  # backbone module prefixes that train ("" = all); the head always trains
    optimizer: str
    lr: float
    schedule: str  # "constant" or "cosine" (stepped per epoch), "one-cycle" (stepped per batch)
    cached: bool



def plan_stages(config: FinetuneConfig, spec: BackboneSpec, pretrained: bool) -> list[Stage]:
    """The staged schedule; from-scratch models get a single stage that trains everything."""
    if not pretrained:
        return [Stage("scratch", config.epochs_head + config.epochs_finetune, ("",), config.head_optimizer,
                      config.lr_head, config.schedule, False)]
    return [
        Stage("head", config.epochs_head, (), config.head_optimizer, config.lr_head,
              "one-cycle" if config.schedule == "one-cycle" else "constant", bool(config.cache_features)),
        Stage("finetune", config.epochs_finetune, tuple(group_prefixes(spec, config.unfreeze)), "sgd",
              config.lr_finetune, config.schedule, False),
    ]



def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, global epoch): shuffling, augmentation and dropout repeat exactly after --resume."""
    return seed * 100_003 + epoch

