"""Train/validation splits (torch-free): the folder's own, or a seeded stratified split that depends only on the
paths, the fraction and the seed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transfer.data.scan import Sample, ScanReport


def stratified_split(samples: Sequence[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class: a seeded shuffle of the paths in sorted order, round(n * val_split) to validation.

    Every class with >= 2 images lands on both sides; the result depends only on the paths, the fraction and the
    seed, so it is the same across runs and machines.
    """
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    train: list[Sample] = []
    val: list[Sample] = []
    labels = sorted({s.label for s in samples if s.label is not None})
    for label in labels:
        members = sorted((s for s in samples if s.label == label), key=lambda s: s.path.as_posix())
        order = np.random.default_rng([seed, label]).permutation(len(members))
        n_val = 0
        if val_split > 0 and len(members) >= 2:
            n_val = min(max(1, round(len(members) * val_split)), len(members) - 1)
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return train, val


def random_split(samples: Sequence[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded shuffle of the paths in sorted order, round(n * val_split) to validation: for several labels per
    image, where classes overlap and a per-class split is not defined. Depends only on the paths, fraction and seed."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    members = sorted(samples, key=lambda s: s.path.as_posix())
    order = np.random.default_rng([seed]).permutation(len(members))
    n_val = min(max(1, round(len(members) * val_split)), len(members) - 1) if val_split > 0 and len(members) > 1 else 0
    return [members[i] for i in order[n_val:]], [members[i] for i in order[:n_val]]


def train_val_samples(report: ScanReport, val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The data's own train/val split when it has one (split folders, or a labels file's split column), else a
    seeded split of everything: stratified by class, or random with several labels per image."""
    split = random_split if report.task == "multilabel" else stratified_split
    pre_split = any(s.split for s in report.samples)
    if pre_split and report.split("train"):
        if report.split("val"):
            return report.split("train"), report.split("val")
        return split(report.split("train"), val_split, seed)
    return split(report.samples, val_split, seed)
