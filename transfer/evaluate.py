"""`transfer evaluate`: accuracy, per-class metrics and a confusion matrix of a run or an ONNX file on a folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from transfer.errors import DataError
from transfer.interpret import most_confused, plot_top_losses, softmax, top_losses
from transfer.metrics import classification_report
from transfer.options import check_int
from transfer.progress import SILENT, Progress
from transfer.scan import ScanReport, scan_folder


def evaluation_samples(report: ScanReport):
    """The test split of a pre-split folder, else every labelled image."""
    if report.layout == "flat":
        raise DataError(f"{report.root}: evaluation needs labelled class sub-folders")
    if report.layout == "splits" and report.split("test"):
        return report.split("test")
    return report.samples


def evaluate(model_path: str | os.PathLike, data_dir: str | os.PathLike, batch_size: int = 32,
             device: str = "auto", progress: Progress = SILENT, tta: bool = False,
             top_losses_plot: str | os.PathLike | None = None) -> dict:
    """Evaluate a run directory (PyTorch, best weights) or a .onnx classifier (onnxruntime) on a labelled folder.

    The folder's classes are matched to the model's by name; a class the model does not know is an error. The
    report adds the most-confused class pairs and the most confidently wrong images (plotted to
    `top_losses_plot`); with `tta`, also the accuracy of the average of the image's and its mirror's
    probabilities (test-time augmentation), next to the plain accuracy, which stays `accuracy`.
    """
    model_path = Path(model_path)
    check_int(batch_size, "--batch-size", 1)
    if model_path.suffix == ".onnx":
        from exporters.runtime import OnnxModel

        onnx_model = OnnxModel(model_path, device=device)
        onnx_model.require_classifier()
    else:
        from transfer.train import load_run_config

        load_run_config(model_path)  # a damaged or missing run fails before the folder is scanned
    report = scan_folder(data_dir, progress=progress)
    samples = evaluation_samples(report)
    paths = [s.path for s in samples]
    views = (False, True) if tta else (False,)
    outputs = []
    for flip in views:
        with progress.task("evaluating (mirrored)" if flip else "evaluating", total=len(paths),
                           unit="images") as advance:
            if model_path.suffix == ".onnx":
                classes = onnx_model.classes
                outputs.append(onnx_model.logits(paths, batch_size=batch_size, progress=advance, mirror=flip))
            else:
                logits, classes = _run_logits(model_path, paths, batch_size, device, advance, flip)
                outputs.append(logits)
    logits = outputs[0]
    unknown = [c for c in report.classes if c not in classes]
    if unknown:
        raise DataError(f"{data_dir}: class(es) {', '.join(unknown)} unknown to the model (it knows {classes})")
    mapping = np.array([classes.index(c) for c in report.classes])
    y_true = mapping[[s.label for s in samples]]
    result = classification_report(y_true.tolist(), np.asarray(logits).argmax(1).tolist(), classes)
    worst = top_losses(logits, y_true, classes, paths)
    result.update(model=str(model_path), data=str(data_dir),
                  most_confused=most_confused(result["confusion_matrix"], classes), top_losses=worst,
                  skipped=[{"path": s.path, "reason": s.reason} for s in report.skipped])
    if tta:
        averaged = np.mean([softmax(np.asarray(o, dtype=np.float64)) for o in outputs], axis=0)
        result["tta"] = {"views": ["identity", "horizontal flip"],
                         "accuracy": float((averaged.argmax(1) == y_true).mean()),
                         "accuracy_without": result["accuracy"]}
    if top_losses_plot is not None:
        plot_top_losses(worst, top_losses_plot, title=f"{Path(model_path).name}: most confidently wrong")
    return result


def _run_logits(run_dir: Path, paths: list[Path], batch_size: int, device: str,
                advance=None, flip: bool = False) -> tuple[np.ndarray, list[str]]:
    import torch

    from transfer.data import eval_dataset, make_loader
    from transfer.preprocess import Preprocessing
    from transfer.scan import Sample
    from transfer.train import load_run, resolve_device

    model, config = load_run(run_dir)
    target = resolve_device(device)
    model.to(target)
    prep = Preprocessing.from_dict(config["preprocessing"])
    loader = make_loader(eval_dataset([Sample(p, None) for p in paths], prep), batch_size,
                         device=target.type)
    outputs = []
    with torch.no_grad():
        for images, _ in loader:
            images = images.flip(3) if flip else images
            outputs.append(model(images.to(target)).float().cpu().numpy())
            if advance is not None:
                advance(len(images))
    return np.concatenate(outputs), list(config["classes"])
