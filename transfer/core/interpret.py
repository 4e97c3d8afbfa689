"""Interpretation of a classifier's mistakes (fastai's ClassificationInterpretation, in numpy + matplotlib).

`most_confused`: the off-diagonal cells of the confusion matrix, largest first. `top_losses`: the most confidently
wrong images (predicted class, its probability, the true class's probability, the loss), plotted as a grid by
`plot_top_losses`. Torch-free: it works on logits from PyTorch or onnxruntime alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Each logit's probability on its own (several labels per image), without overflow for large magnitudes."""
    return np.exp(-np.logaddexp(0.0, -logits))


def most_confused(matrix: Sequence[Sequence[int]], classes: Sequence[str], limit: int = 10) -> list[dict]:
    """(true, predicted, count) for every confusion with count >= 1, most frequent first (ties by name)."""
    matrix = np.asarray(matrix)
    pairs = [(int(matrix[t, p]), classes[t], classes[p]) for t in range(len(classes)) for p in range(len(classes))
             if t != p and matrix[t, p] > 0]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [{"true": t, "predicted": p, "count": n} for n, t, p in pairs[:limit]]


def top_losses(logits: np.ndarray, y_true: Sequence[int], classes: Sequence[str], paths: Sequence,
               limit: int = 9) -> list[dict]:
    """The most confidently wrong images: misclassified, sorted by the probability of the wrong class."""
    probabilities = softmax(np.asarray(logits, dtype=np.float64))
    y_true = np.asarray(y_true)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:limit]
    return [{"path": str(paths[i]), "true": classes[y_true[i]], "predicted": classes[predicted[i]],
             "probability": float(probabilities[i, predicted[i]]),
             "true_probability": float(probabilities[i, y_true[i]]),
             "loss": float(-np.log(max(probabilities[i, y_true[i]], 1e-12)))} for i in order]


def plot_top_losses(items: Sequence[dict], path: str | os.PathLike, title: str = "most confidently wrong") -> None:
    """A grid of the images in `items`, each titled with the predicted class and its probability, the true class
    and its probability, and the loss, or with the item's own `caption` (an empty grid says there were none)."""
    from matplotlib.figure import Figure

    from transfer.core.images import BadImageError, open_image
    from transfer.core.metrics import save_figure

    columns = min(3, max(1, len(items)))
    rows = max(1, -(-len(items) // columns))
    figure = Figure(figsize=(3.2 * columns, 3.4 * rows), layout="constrained")
    figure.suptitle(f"{title} ({len(items)} shown)" if items else f"{title}: no mistakes")
    for index, item in enumerate(items):
        axes = figure.add_subplot(rows, columns, index + 1)
        try:
            image = open_image(item["path"], draft_size=(256, 256))
            image.thumbnail((256, 256))
            axes.imshow(np.asarray(image))
        except BadImageError:
            axes.text(0.5, 0.5, "unreadable", ha="center")
        axes.set_title(item.get("caption") or f"predicted {item['predicted']} ({item['probability']:.2f})\ntrue "
                       f"{item['true']} ({item['true_probability']:.2f}), loss {item['loss']:.2f}", fontsize=9)
        axes.axis("off")
    save_figure(figure, path)
