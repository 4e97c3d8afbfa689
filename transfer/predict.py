"""Library side of `predict` and `bench`: writing predictions, timing onnxruntime (and PyTorch when asked)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from pathlib import Path

from exporters.runtime import OnnxModel, Prediction
from transfer.errors import TransferError
from transfer.io import write_text

PREDICTION_FORMATS = (".csv", ".json")


def check_predictions_path(path: str | os.PathLike) -> Path:
    """The predictions file must be .csv or .json and writable: checked before any image is decoded."""
    from transfer.io import check_writable

    path = Path(path)
    if path.suffix not in PREDICTION_FORMATS:
        raise TransferError(f"--output {path}: use a .csv or .json file")
    return check_writable(path, "--output")


def write_predictions(path: str | os.PathLike, results: list[Prediction]) -> None:
    """.json (a list of records) or .csv (one row per image: path, label, probability, top-k, error).

    Paths that are not valid UTF-8 keep their bytes: raw in the CSV, \\udcXX escapes in the JSON (os.fsencode
    restores them)."""
    path = Path(path)
    if path.suffix == ".json":
        write_text(path, json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    elif path.suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label", "probability", "top_k", "error"])
        for r in results:
            top = ";".join(f"{label}:{p:.6f}" for label, p in zip(r.labels, r.probabilities, strict=True))
            writer.writerow([r.path, r.labels[0] if r.labels else "", f"{r.probabilities[0]:.6f}" if r.labels else "",
                             top, r.error or ""])
        write_text(path, buffer.getvalue())
    else:
        raise TransferError(f"--output {path}: use a .csv or .json file")


def machine_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def run_bench(model_path: str | os.PathLike, batch_sizes: list[int], device: str = "auto", seconds: float = 3.0,
              against_torch: str | None = None) -> dict:
    """onnxruntime rows per batch size, plus PyTorch eager rows and the ratio when `against_torch` is given."""
    onnx_model = OnnxModel(model_path, device=device)
    rows = [{"engine": f"onnxruntime {onnx_model.provider}", **onnx_model.benchmark(b, seconds)} for b in batch_sizes]
    result = {"model": str(model_path), "machine": machine_name(), "device": onnx_model.device,
              "precision": onnx_model.metadata.get("transfer.precision", "fp32"), "rows": list(rows)}
    if against_torch:
        from transfer.bench import torch_benchmark, torch_model

        network, description = torch_model(against_torch)
        torch_rows = [{"engine": "pytorch eager", **torch_benchmark(network, onnx_model.prep.input_size, b,
                                                                     onnx_model.device, seconds=seconds)}
                      for b in batch_sizes]
        result["rows"] += torch_rows
        result["torch_model"] = description
        result["speedup_vs_torch"] = {str(a["batch_size"]): round(a["images_per_s"] / b["images_per_s"], 3)
                                      for a, b in zip(rows, torch_rows, strict=True)}
    return result
