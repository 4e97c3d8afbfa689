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


def train_val_samples(report: ScanReport, val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The folder's own train/val split when it has one, else a stratified split of everything."""
    if report.layout == "splits" and report.split("train"):
        if report.split("val"):
            return report.split("train"), report.split("val")
        return stratified_split(report.split("train"), val_split, seed)
    return stratified_split(report.samples, val_split, seed)
