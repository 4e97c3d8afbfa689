"""The end of a run: the best weights reloaded and validated once more, report.json, the confusion matrix, loss
curves and top losses (rank 0); and reading a finished run's report back for --resume."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transfer.core.interpret import most_confused, plot_top_losses, top_losses
from transfer.core.io import write_json
from transfer.core.metrics import (
    choose_thresholds,
    classification_report,
    multilabel_report,
    plot_confusion,
    plot_curves,
)
from transfer.core.multilabel_errors import label_errors, multilabel_top_losses, plot_label_errors
from transfer.training import collectives
from transfer.training.checkpoints import load_weights
from transfer.training.config import FinetuneConfig
from transfer.training.model import TransferModel


@dataclass
class FinetuneResult:
    run_dir: Path
    best_val_loss: float
    best_val_acc: float
    epochs_run: int
    report: dict
    stopped: str = "completed"


def write_report(trainer, model: TransferModel, state: dict, finished: bool = True) -> FinetuneResult:
    """Reload the best weights, then write report.json, confusion.png, curves.png and top_losses.png (rank 0). An
    interrupted run (`finished=False`) writes them too, for the epochs it completed, and says so in report.json.
    With several labels per image: per-label thresholds chosen on the validation images (stored in config.json),
    the multi-label metrics, label_errors.png (missed and wrongly given, per label) and top_losses.png (the images
    with the largest loss, their labels predicted and true)."""
    collectives.barrier(trainer.world)  # rank 0's best.safetensors is complete
    load_weights(model, trainer.run_dir / "best.safetensors")
    logits, labels = trainer.sharded_forward(model, trainer.val_samples, pooled=False,
                                             description="report: validating the best weights")
    classes = trainer.classes
    val_paths = [s.path for s in trainer.failures.usable(trainer.val_samples)]  # the rows `logits` holds
    failed = trainer.failures.gathered(trainer.world)
    worst = None
    if trainer.multilabel:  # thresholds chosen on the validation images, then stored with the run
        probabilities = torch.sigmoid(logits).numpy()
        thresholds = choose_thresholds(labels.numpy(), probabilities)
        report = multilabel_report(labels.numpy(), probabilities, thresholds, classes)
        errors = label_errors(labels.numpy(), probabilities, thresholds, classes)
        worst = multilabel_top_losses(labels.numpy(), probabilities, thresholds, classes,
                                      val_paths)
        for name, counts in errors.items():
            report["per_class"][name].update(false_negatives=counts["false_negatives"],
                                             false_positives=counts["false_positives"])
        report.update(top_losses=worst)
    else:
        report = classification_report(labels.tolist(), logits.argmax(1).tolist(), classes)
        worst = top_losses(logits.numpy(), labels.numpy(), classes, val_paths)
        report.update(most_confused=most_confused(report["confusion_matrix"], classes), top_losses=worst)
    report.update(split="validation", finished=finished, epochs=state["epoch"],
                  best_val_loss=state["best_val_loss"],
                  best_weights=state.get("best_source", "model"),
                  skipped=[{"path": s.path, "reason": s.reason} for s in [*trainer.scan.skipped, *failed]])
    result = FinetuneResult(trainer.run_dir, state["best_val_loss"], report["accuracy"], state["epoch"], report)
    if failed and trainer.world.main:
        trainer.log(f"{len(failed)} image(s) failed to decode during training and were left out (first: "
                    f"{failed[0].path}: {failed[0].reason}); all are listed in report.json under skipped")
    if not trainer.world.main:
        return result
    run_dir = trainer.run_dir
    write_json(run_dir / "report.json", report)
    name = f"{trainer.spec.name} on {trainer.data_dir.name} ({run_dir.name})"
    plot_curves(trainer.rows, run_dir / "curves.png", multilabel=trainer.multilabel,
                title=f"{name}: loss and {'exact match' if trainer.multilabel else 'accuracy'} per epoch")
    kept = " (kept the EMA weights: they validated better)" if report["best_weights"] == "ema" else ""
    if trainer.multilabel:
        config = json.loads((run_dir / "config.json").read_text())
        write_json(run_dir / "config.json", config | {"thresholds": thresholds})
        plot_label_errors(errors, run_dir / "label_errors.png", title=f"{name}: validation errors per label")
        plot_top_losses(worst, run_dir / "top_losses.png", title=f"{name}: largest losses (validation)")
        trainer.log(f"best val loss {state['best_val_loss']:.4f}{kept}, macro F1 {report['macro_f1']:.4f}, exact "
                    f"match {report['exact_match']:.4f} at per-label thresholds; run saved in {run_dir}")
        return result
    plot_confusion(np.asarray(report["confusion_matrix"]), classes, run_dir / "confusion.png",
                   title=f"{name}: validation confusion matrix")
    plot_top_losses(worst, run_dir / "top_losses.png", title=f"{name}: most confidently wrong (validation)")
    trainer.log(f"best val loss {state['best_val_loss']:.4f}{kept}, val accuracy {report['accuracy']:.4f}; "
                f"run saved in {run_dir}")
    return result


def write_interrupted_reports(trainer) -> None:
    """report.json, curves.png and confusion.png for the epochs an interrupted run completed (a second Ctrl-C
    skips them); report.json says `finished: false`."""
    if trainer.state is None or trainer.model is None:
        return
    try:
        trainer.log("writing the report of the epochs done (Ctrl-C again to skip)")
        write_report(trainer, trainer.model, trainer.state, finished=False)
    except KeyboardInterrupt:
        trainer.log("report skipped")


def finished_result(run_dir: Path, saved: dict, config: FinetuneConfig) -> FinetuneResult | None:
    """The result of a run that completed its schedule, when resuming it adds no epoch; else None."""
    added = (config.epochs_head > saved["settings"]["epochs_head"]
             or config.epochs_finetune > saved["settings"]["epochs_finetune"])
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if added or not isinstance(report, dict) or report.get("finished") is not True:
        return None
    return FinetuneResult(run_dir, float(report.get("best_val_loss", math.nan)), float(report.get("accuracy", 0.0)),
                          int(report.get("epochs", 0)), report, stopped="already finished")

