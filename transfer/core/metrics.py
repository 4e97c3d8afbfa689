"""Classification metrics and plots (numpy + matplotlib's object API: no pyplot global state)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

import numpy as np

from transfer.core.io import write_atomic


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Overall accuracy, per-class precision, recall, F1 and support (0 where undefined), and the confusion
    matrix (rows true, columns predicted): scikit-learn's metrics, packed as JSON-ready values."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    matrix = confusion_matrix(y_true, y_pred, labels=labels) if len(y_true) else np.zeros((len(labels),) * 2, int)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0) if len(y_true) else (np.zeros(len(labels)),) * 4
    total = int(matrix.sum())
    present = np.asarray(support) > 0
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "count": total,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "macro_f1": float(np.asarray(f1)[present].mean()) if present.any() else 0.0,
        "confusion_matrix": matrix.astype(int).tolist(),
    }


THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95


def choose_thresholds(y_true: np.ndarray, probabilities: np.ndarray) -> list[float]:
    """Per label, the decision threshold in THRESHOLD_GRID with the best F1 on these (validation) images; ties go
    to the threshold nearest 0.5, and a label without a positive image keeps 0.5."""
    y_true = np.asarray(y_true) > 0.5
    chosen = []
    for column in range(y_true.shape[1]):
        truth, scores = y_true[:, column], probabilities[:, column]
        if not truth.any():
            chosen.append(0.5)
            continue
        best = max(THRESHOLD_GRID, key=lambda t: (_f1(truth, scores >= t), -abs(t - 0.5)))
        chosen.append(float(best))
    return chosen


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    hits = float(np.sum(truth & predicted))
    return 2 * hits / max(1.0, float(truth.sum() + predicted.sum()))


def multilabel_report(y_true: np.ndarray, probabilities: np.ndarray, thresholds: Sequence[float],
                      classes: Sequence[str]) -> dict:
    """Several labels per image: per-label precision, recall, F1 and support at the chosen thresholds, micro and
    macro F1, mean average precision (threshold-free, over labels with a positive image) and the exact-match ratio
    (every label of an image right): scikit-learn's metrics, packed as JSON-ready values."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_recall_fscore_support

    truth = (np.asarray(y_true) > 0.5).astype(int)
    predicted = (probabilities >= np.asarray(thresholds)[None, :]).astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, zero_division=0)
    present = truth.sum(axis=0) > 0
    average_precision = (average_precision_score(truth[:, present], probabilities[:, present], average=None)
                         if present.any() else np.zeros(0))
    return {
        "task": "multilabel",
        "count": int(len(truth)),
        "exact_match": float(accuracy_score(truth, predicted)) if len(truth) else 0.0,
        "accuracy": float(accuracy_score(truth, predicted)) if len(truth) else 0.0,  # the exact-match ratio
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "macro_f1": float(np.asarray(f1)[present].mean()) if present.any() else 0.0,
        "mean_average_precision": float(np.mean(average_precision)) if len(average_precision) else 0.0,
        "thresholds": {name: float(t) for name, t in zip(classes, thresholds, strict=True)},
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(classes)
        },
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


def save_figure(figure, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110))


def plot_curves(rows: Sequence[dict], path: str | os.PathLike, title: str = "training curves",
                multilabel: bool = False) -> None:
    """Loss and accuracy per epoch, train and validation, with a dashed line at each stage boundary. With several
    labels per image the losses are binary cross-entropy and the accuracy is the exact-match ratio."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4.2), layout="constrained")
    figure.suptitle(title)
    epochs = [row["epoch"] for row in rows]
    boundaries = [rows[i]["epoch"] - 0.5 for i in range(1, len(rows)) if rows[i]["stage"] != rows[i - 1]["stage"]]
    names = (("loss", "loss (binary cross-entropy)"), ("acc", "exact match (every label right at 0.5)")) \
        if multilabel else (("loss", "loss (cross-entropy)"), ("acc", "accuracy"))
    for index, (metric, name) in enumerate(names):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.plot(epochs, [row[f"train_{metric}"] for row in rows], "o-", label="train")
        axes.plot(epochs, [row[f"val_{metric}"] for row in rows], "o-", label="validation")
        for number, boundary in enumerate(boundaries):
            axes.axvline(boundary, color="grey", linestyle="--", label="stage boundary" if number == 0 else None)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend()
    save_figure(figure, path)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike,
                   title: str = "validation confusion matrix") -> None:
    """Counts and the row-normalised view (recall per class) side by side, with readable cell labels."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix)
    side = max(4.0, 0.45 * len(classes) + 2.5)
    figure = Figure(figsize=(2 * side + 1, side + 0.6), layout="constrained")
    figure.suptitle(f"{title} ({int(matrix.sum())} images)")
    totals = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)
    show_values = len(classes) <= 30
    for index, (values, name, fmt) in enumerate(((matrix, "counts", "d"), (normalised, "share of each true class",
                                                                            ".2f"))):
        axes = figure.add_subplot(1, 2, index + 1)
        display = ConfusionMatrixDisplay(values, display_labels=list(classes))
        display.plot(ax=axes, cmap="Blues", values_format=fmt, include_values=show_values, colorbar=True,
                     xticks_rotation="vertical")
        if fmt == "d":  # counts are whole numbers: no 0.5 ticks on the colour bar
            from matplotlib.ticker import MaxNLocator

            display.im_.colorbar.locator = MaxNLocator(integer=True)
            display.im_.colorbar.update_ticks()
        axes.set_title(name)
    save_figure(figure, path)
