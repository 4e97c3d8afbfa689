"""What a run's labels make of the loss: one label per image (softmax cross-entropy, optionally weighted by class) or
several (a sigmoid per label, binary cross-entropy), and the weights of `--class-weights balanced` and
`--sampler balanced`. The loop asks an `Objective` for the loss and the count of right answers, whatever the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from transfer.data.scan import Sample


@dataclass
class Objective:
    """The loss and the right-answer count of a run. `weight`: per-class loss weights (one label) or per-label
    positive weights (several labels); None is unweighted. Validation losses are always unweighted, so they stay
    comparable between runs."""

    multilabel: bool
    weight: torch.Tensor | None = None

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's summed training loss. Targets: class indices, probability rows (mixup, smoothing), or
        multi-hot rows; with several labels an image's loss is the mean over its labels."""
        weight = None if self.weight is None else self.weight.to(logits.device)
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=weight,
                                                      reduction="sum") / logits.shape[1]
        if targets.ndim == 2:  # soft targets: timm's SoftTargetCrossEntropy, summed, each class weighted
            per_class = -targets * F.log_softmax(logits, dim=-1)
            return torch.sum(per_class if weight is None else per_class * weight)
        return F.cross_entropy(logits, targets, weight=weight, reduction="sum")

    def mean_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The unweighted mean loss per image (validation)."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, targets.float()).item()
        return F.cross_entropy(logits, targets).item()

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> int:
        """Images answered right: the top class, or with several labels every label at probability 0.5."""
        if self.multilabel:
            return int(((logits > 0) == (targets > 0.5)).all(dim=1).sum())
        return int((logits.argmax(1) == targets).sum())

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


def label_counts(samples: Sequence[Sample], classes: int) -> np.ndarray:
    """Images per class (an image with several labels counts under each)."""
    counts = np.zeros(classes, dtype=np.int64)
    for sample in samples:
        for label in sample.label_set:
            counts[label] += 1
    return counts


def balanced_weights(samples: Sequence[Sample], classes: int, multilabel: bool) -> torch.Tensor:
    """`--class-weights balanced`. One label: scikit-learn's `compute_class_weight("balanced")`, n_images /
    (n_classes * images of the class). Several labels: each label's negatives over its positives, the
    `pos_weight` of binary cross-entropy that gives both sides equal total weight. A class without a training
    image gets weight 1, and so does a label on every training image (it has no negatives to balance against;
    its weight 0 would take away the label's whole gradient)."""
    counts = label_counts(samples, classes).astype(np.float64)
    if multilabel:
        weights = np.divide(len(samples) - counts, counts, out=np.ones(classes),
                            where=(counts > 0) & (counts < len(samples)))
    else:
        weights = np.divide(counts.sum(), classes * counts, out=np.ones(classes), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def sampling_weights(samples: Sequence[Sample], classes: int) -> torch.Tensor:
    """`--sampler balanced`: each image in inverse proportion to its class's size (with several labels, the mean
    over its labels), so every class is drawn about equally often."""
    counts = np.maximum(label_counts(samples, classes), 1).astype(np.float64)
    return torch.tensor([float(np.mean([1.0 / counts[label] for label in s.label_set])) for s in samples],
                        dtype=torch.double)
