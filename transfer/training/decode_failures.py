"""Images that passed the header-only scan but whose body fails to decode when training reaches them.

`finetune` scans headers only (a full decode of every file before the first batch costs minutes at 100,000 images),
so a truncated or corrupt body is found during the work. The datasets then hand back zeros with the reason instead
of raising (`ImageDataset`'s `bad_shape`); this module drops those items from what the model sees, remembers each
path with its reason, and gives them to the report next to the scan's own skipped files. A failed decode fails the
same way every time, so the training batches, the cached features and the validation outputs all leave out the
same images, and validation outputs stay aligned with `usable(val_samples)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from transfer.core.world import World
from transfer.data.scan import Sample, Skipped
from transfer.training import collectives


class DecodeFailures:
    """path -> reason for the images whose body failed to decode in this run (this rank's, until `gathered`)."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def record(self, path: str, reason: str) -> None:
        self.reasons.setdefault(path, reason)

    def training_batches(self, loader: Iterable, samples: Sequence[Sample]) -> Iterator[tuple[torch.Tensor, ...]]:
        """(inputs, targets) of each batch from a reporting loader (items: tensor, target, reason, sample index),
        without the items that failed to decode. A batch may come out smaller, or empty: the loop's steps stay
        the same on every rank."""
        for inputs, targets, reasons, indices in loader:
            failed = [i for i, reason in enumerate(reasons) if reason]
            if failed:
                for i in failed:
                    self.record(str(samples[int(indices[i])].path), reasons[i])
                keep = torch.tensor([not reason for reason in reasons])
                inputs, targets = inputs[keep], targets[keep]
            yield inputs, targets

    def keep_mask(self, samples: Sequence[Sample]) -> torch.Tensor:
        """True for each of `samples` that has not failed to decode."""
        return torch.tensor([str(sample.path) not in self.reasons for sample in samples], dtype=torch.bool)

    def usable(self, samples: Sequence[Sample]) -> list[Sample]:
        """`samples` without the ones that failed to decode (the rows that forward outputs keep)."""
        return [sample for sample in samples if str(sample.path) not in self.reasons]

    def gathered(self, world: World) -> list[Skipped]:
        """Every rank's failures (a training batch's failure is seen by the rank that decoded it), sorted by path."""
        merged: dict[str, str] = {}
        for part in collectives.all_gather(world, self.reasons):
            for path, reason in part.items():
                merged.setdefault(path, reason)
        return [Skipped(path, f"failed to decode during training: {reason}") for path, reason in sorted(merged.items())]
