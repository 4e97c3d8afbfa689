"""A multi-label run's mistakes in pictures, as `interpret` shows a single-label run's: how often each label was
missed (a false negative) or given wrongly (a false positive) at its threshold, and the images with the largest
loss, titled with the labels predicted and the labels true. Torch-free (numpy and matplotlib), so logits from
PyTorch or onnxruntime alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def label_errors(truth: np.ndarray, probabilities: np.ndarray, thresholds: Sequence[float],
                 classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per label: images it was missed on (false negatives), given wrongly (false positives), and its support."""
    truth = np.asarray(truth) > 0.5
    predicted = np.asarray(probabilities) >= np.asarray(thresholds, dtype=float)[None, :]
    return {name: {"false_negatives": int((truth[:, i] & ~predicted[:, i]).sum()),
                   "false_positives": int((~truth[:, i] & predicted[:, i]).sum()),
                   "support": int(truth[:, i].sum())} for i, name in enumerate(classes)}


def multilabel_top_losses(truth: np.ndarray, probabilities: np.ndarray, thresholds: Sequence[float],
                          classes: Sequence[str], paths: Sequence, limit: int = 9) -> list[dict]:
    """The wrongly answered images (any label on the wrong side of its threshold) with the largest binary
    cross-entropy, summed over labels: what they got, what they are, the most confident wrong label's probability
    and the least confident true label's, and a caption naming the worst label given and the worst missed."""
    truth = np.asarray(truth) > 0.5
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    predicted = probabilities >= np.asarray(thresholds, dtype=float)[None, :]
    losses = -np.where(truth, np.log(probabilities), np.log(1 - probabilities)).sum(axis=1)
    wrong = np.flatnonzero((predicted != truth).any(axis=1))
    order = wrong[np.argsort(-losses[wrong], kind="stable")][:limit]

    def names(row: np.ndarray) -> str:
        return ", ".join(classes[i] for i in np.flatnonzero(row)) or "none"

    items = []
    for i in order:
        given = np.flatnonzero(predicted[i] & ~truth[i])  # false positives, most confident first
        given = given[np.argsort(-probabilities[i, given], kind="stable")]
        missed = np.flatnonzero(truth[i] & ~predicted[i])  # false negatives, least confident first
        missed = missed[np.argsort(probabilities[i, missed], kind="stable")]
        errors = [f"{classes[j]} given at {probabilities[i, j]:.2f}" for j in given[:1]] + \
                 [f"{classes[j]} missed at {probabilities[i, j]:.2f}" for j in missed[:1]]
        items.append({"path": str(paths[i]), "true": names(truth[i]), "predicted": names(predicted[i]),
                      "probability": float(probabilities[i, given[0]]) if len(given) else 0.0,
                      "true_probability": float(probabilities[i, truth[i]].min()) if truth[i].any() else 1.0,
                      "loss": float(losses[i]),
                      "caption": f"predicted {names(predicted[i])}; true {names(truth[i])}\n"
                                 f"{'; '.join(errors)}\nloss {losses[i]:.2f}"})
    return items


def plot_label_errors(errors: dict[str, dict[str, int]], path: str | os.PathLike,
                      title: str = "validation errors per label") -> None:
    """Missed and wrongly given counts per label, side by side, with each label's support in its name."""
    from matplotlib.figure import Figure

    from transfer.core.metrics import save_figure

    names = list(errors)
    positions = np.arange(len(names))
    figure = Figure(figsize=(max(5.0, 0.6 * len(names) + 2), 4), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(positions - 0.2, [errors[n]["false_negatives"] for n in names], 0.4, label="missed (false negative)")
    axes.bar(positions + 0.2, [errors[n]["false_positives"] for n in names], 0.4,
             label="given wrongly (false positive)")
    axes.set_xticks(positions, [f"{n}\n({errors[n]['support']})" for n in names], fontsize=8)
    axes.set_ylabel("validation images")
    axes.set_xlabel("label (images that have it)")
    axes.legend()
    figure.suptitle(f"{title} ({sum(e['false_negatives'] + e['false_positives'] for e in errors.values())} errors)")
    save_figure(figure, path)
