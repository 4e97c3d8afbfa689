"""Classification metrics and plots (numpy + matplotlib's object API: no pyplot global state)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np

from transfer.io import write_atomic


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Overall accuracy and per-class precision, recall, F1 and support (0 where undefined)."""
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    true_pos = np.diag(matrix).astype(float)
    predicted, support = matrix.sum(0).astype(float), matrix.sum(1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
    total = int(matrix.sum())
    return {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "count": total,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        "confusion_matrix": matrix.tolist(),
    }


METRIC_FIELDS = ("stage", "epoch", "stage_epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


def write_metrics(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """metrics.csv, rewritten whole and atomically after every epoch."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in METRIC_FIELDS})
    write_atomic(path, lambda temp: temp.write_text(buffer.getvalue()))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["epoch"], row["stage_epoch"] = int(row["epoch"]), int(row["stage_epoch"])
        for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"):
            row[key] = float(row[key])
    return rows


def _save_figure(figure, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110))


def plot_curves(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss and accuracy per epoch, train and validation, with a dashed line at each stage boundary."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="tight")
    epochs = [row["epoch"] for row in rows]
    boundaries = [rows[i]["epoch"] - 0.5 for i in range(1, len(rows)) if rows[i]["stage"] != rows[i - 1]["stage"]]
    for index, (metric, title) in enumerate((("loss", "loss"), ("acc", "accuracy"))):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.plot(epochs, [row[f"train_{metric}"] for row in rows], "o-", label="train")
        axes.plot(epochs, [row[f"val_{metric}"] for row in rows], "o-", label="validation")
        for boundary in boundaries:
            axes.axvline(boundary, color="grey", linestyle="--", label="stage boundary")
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.legend()
    _save_figure(figure, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure

    size = max(4.0, 0.5 * len(classes) + 2)
    figure = Figure(figsize=(size, size), layout="tight")
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=90)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(classes) <= 30:
        for (row, col), value in np.ndenumerate(matrix):
            axes.text(col, row, str(value), ha="center", va="center", fontsize=8)
    _save_figure(figure, path)
