"""`transfer evaluate`: accuracy, per-class metrics and a confusion matrix of a run or an ONNX file on a folder."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from transfer.core.errors import DataError
from transfer.core.interpret import most_confused, plot_top_losses, sigmoid, softmax, top_losses
from transfer.core.metrics import classification_report, multilabel_report
from transfer.core.options import check_int
from transfer.core.preprocess import tta_views
from transfer.core.progress import SILENT, Progress
from transfer.data.labels import LabelsFile, scan_data
from transfer.data.scan import ScanReport


def evaluation_samples(report: ScanReport):
    """The test split of pre-split data (a test/ folder, or rows whose split is test), else every labelled image."""
    if report.layout == "flat":
        raise DataError(f"{report.root}: evaluation needs labelled class sub-folders (or --labels FILE.csv)")
    if report.split("test"):
        return report.split("test")
    return report.samples


def run_split(model_path: Path, metadata: dict | None = None) -> dict[str, set[Path]] | None:
    """{'train': paths, 'val': paths} (resolved) of the run behind a run directory, or behind an ONNX file exported
    from a run that is still there; None when unknown (a backbone export, a run from before split.json)."""
    import json

    from transfer.core.rundir import SPLIT_FILE

    run_dir = model_path if metadata is None else metadata.get("transfer.run")
    if not run_dir:
        return None
    try:
        record = json.loads((Path(run_dir) / SPLIT_FILE).read_text())
        root = Path(record["data_dir"])
        return {name: {(root / rel).resolve() for rel in record[name]} for name in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate(model_path: str | os.PathLike, data_dir: str | os.PathLike, batch_size: int = 32,
             device: str = "auto", progress: Progress = SILENT, tta: bool = False,
             top_losses_plot: str | os.PathLike | None = None, tta_crops: bool = False, split: str = "all",
             workers: int | None = None, labels: LabelsFile | None = None,
             decode_floor: float | None = None) -> dict:
    """Evaluate a run directory (PyTorch, best weights) or a .onnx classifier (onnxruntime) on a labelled folder.

    The folder's classes are matched to the model's by name; a class the model does not know is an error. The
    report adds the most-confused class pairs and the most confidently wrong images (plotted to
    `top_losses_plot`); with `tta` (`tta_crops`), also the accuracy of the average of the probabilities over the
    views of `tta_views`, and each view's own accuracy, next to the plain accuracy, which stays `accuracy`.

    When the model's run recorded its split, `training_images` counts the images the run trained on (their accuracy
    says little about new images), and `split="val"` keeps only the run's validation images. `labels` reads the
    labels from a file instead of class folders. A model with several labels per image is judged at its stored
    thresholds with the multi-label metrics (`multilabel_report`). `decode_floor` replaces the model's own (the
    run's or the file's) for JPEG decoding.
    """
    model_path = Path(model_path)
    check_int(batch_size, "--batch-size", 1)
    if split not in ("all", "val"):
        raise DataError(f"--split {split!r}: use all or val")
    if model_path.suffix == ".onnx":
        from exporters.runtime import OnnxModel

        onnx_model = OnnxModel(model_path, device=device, decode_workers=workers or None, decode_floor=decode_floor)
        onnx_model.require_classifier()
        classes, thresholds = onnx_model.classes, onnx_model.thresholds
        known_split = run_split(model_path, onnx_model.metadata)

        def view_logits(paths, corner, mirror, advance):
            return onnx_model.logits(paths, batch_size=batch_size, progress=advance, mirror=mirror, corner=corner)
    else:
        from transfer.training.runs import load_run_config

        load_run_config(model_path)  # a damaged or missing run fails before the folder is scanned
        view_logits, classes, thresholds = _run_model(model_path, batch_size, device, workers, decode_floor)
        known_split = run_split(model_path)
    if thresholds is not None and top_losses_plot is not None:
        raise DataError("--output: the plot of the worst mistakes is for one label per image; this model predicts "
                        "several")
    report = scan_data(data_dir, labels, progress=progress)
    if report.task == "multilabel" and thresholds is None:
        raise DataError(f"{labels.path if labels else data_dir} has several labels per image; {model_path} predicts "
                        "one (train a run with them: `transfer finetune DATA --labels FILE.csv`)")
    unknown = [c for c in report.classes if c not in classes]
    if unknown:
        raise DataError(f"{data_dir}: class(es) {', '.join(unknown)} unknown to the model (it knows {classes})")
    samples = evaluation_samples(report)
    overlap = None
    if known_split is not None:
        overlap = sum(Path(s.path).resolve() in known_split["train"] for s in samples)
    if split == "val":
        if known_split is None:
            raise DataError(f"--split val: {model_path} has no record of its run's split (a run written by this "
                            "version, or an ONNX file exported from one that still exists, has split.json)")
        samples = [s for s in samples if Path(s.path).resolve() in known_split["val"]]
        if not samples:
            raise DataError(f"--split val: none of the images in {data_dir} is one of the run's validation images")
        overlap = 0
    paths = [s.path for s in samples]
    views = tta_views(tta, tta_crops)
    outputs = []
    for name, corner, mirror in views:
        with progress.task("evaluating" if corner is None and not mirror else f"evaluating ({name})",
                           total=len(paths), unit="images") as advance:
            outputs.append(np.asarray(view_logits(paths, corner, mirror, advance)))
    logits = outputs[0]
    mapping = np.array([classes.index(c) for c in report.classes])
    if thresholds is not None:
        return _multilabel_result(outputs, samples, mapping, np.asarray(thresholds), classes, report) | {
            "model": str(model_path), "data": str(data_dir), "split": split, "training_images": overlap,
            "views": [name for name, _, _ in views]}
    y_true = mapping[[s.label for s in samples]]
    result = classification_report(y_true.tolist(), logits.argmax(1).tolist(), classes)
    worst = top_losses(logits, y_true, classes, paths)
    result.update(model=str(model_path), data=str(data_dir), split=split,
                  training_images=overlap,
                  most_confused=most_confused(result["confusion_matrix"], classes), top_losses=worst,
                  skipped=[{"path": s.path, "reason": s.reason} for s in report.skipped])
    if len(views) > 1:
        averaged = np.mean([softmax(o.astype(np.float64)) for o in outputs], axis=0)
        result["tta"] = {"views": [name for name, _, _ in views],
                         "accuracy": float((averaged.argmax(1) == y_true).mean()),
                         "accuracy_without": result["accuracy"],
                         "per_view": {name: float((o.argmax(1) == y_true).mean())
                                      for (name, _, _), o in zip(views, outputs, strict=True)}}
    if top_losses_plot is not None:
        plot_top_losses(worst, top_losses_plot, title=f"{Path(model_path).name}: most confidently wrong")
    return result


def _multilabel_result(outputs: list[np.ndarray], samples, mapping: np.ndarray, thresholds: np.ndarray,
                       classes: list[str], report: ScanReport) -> dict:
    """Several labels per image: the multi-label metrics at the model's thresholds, on the probabilities averaged
    over the views."""
    truth = np.zeros((len(samples), len(classes)))
    for row, sample in enumerate(samples):
        truth[row, mapping[list(sample.label_set)]] = 1.0
    probabilities = np.mean([sigmoid(o.astype(np.float64)) for o in outputs], axis=0)
    result = multilabel_report(truth, probabilities, thresholds.tolist(), classes)
    result["skipped"] = [{"path": s.path, "reason": s.reason} for s in report.skipped]
    return result


def _run_model(run_dir: Path, batch_size: int, device: str, workers: int | None = None,
               decode_floor: float | None = None):
    """(logits of paths for a view, class names, thresholds or None) of a run's best weights on `device`, loaded
    once."""
    import torch

    from transfer.core.preprocess import Preprocessing
    from transfer.data.datasets import eval_dataset, make_loader
    from transfer.data.scan import Sample
    from transfer.training.device import resolve_device
    from transfer.training.runs import load_run

    model, config = load_run(run_dir)
    target = resolve_device(device)
    model.to(target)
    prep = Preprocessing.from_dict(config["preprocessing"])
    if decode_floor is not None:
        prep = replace(prep, draft_factor=decode_floor)

    def run_logits(paths: list[Path], corner: str | None, mirror: bool, advance=None) -> np.ndarray:
        loader = make_loader(eval_dataset([Sample(p, None) for p in paths], prep, corner), batch_size,
                             workers=workers, device=target.type)
        outputs = []
        with torch.no_grad():
            for images, _ in loader:
                images = images.flip(3) if mirror else images
                outputs.append(model(images.to(target)).float().cpu().numpy())
                if advance is not None:
                    advance(len(images))
        return np.concatenate(outputs) if outputs else np.zeros((0, len(config["classes"])), np.float32)

    thresholds = None
    if config.get("task") == "multilabel":
        thresholds = config.get("thresholds")
        if not thresholds:
            raise DataError(f"{run_dir} has several labels per image but no thresholds yet (chosen when the run "
                            "finishes); finish or resume it first")
    return run_logits, list(config["classes"]), thresholds
