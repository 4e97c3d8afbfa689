"""Library side of `predict` and `bench`: writing predictions, timing onnxruntime (and PyTorch when asked)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from exporters.runtime import OnnxModel, Prediction
from transfer.core.errors import TransferError
from transfer.core.io import write_text
from transfer.core.progress import SILENT, Progress
from transfer.serving.predictions_file import PredictionsFile, closing, label_columns, render

PREDICTION_FORMATS = (".csv", ".jsonl", ".json")
PART_SUFFIX = ".transfer-part"  # one shard's predictions, waiting for the others


def check_predictions_path(path: str | os.PathLike) -> Path:
    """The predictions file must be .csv or .json and writable: checked before any image is decoded."""
    from transfer.core.io import check_writable

    path = Path(path)
    if path.suffix not in PREDICTION_FORMATS:
        raise TransferError(f"--output {path}: use a .csv, .jsonl or .json file")
    return check_writable(path, "--output")


def write_predictions(path: str | os.PathLike, results: list[Prediction], columns: int) -> None:
    """.json (a list of records), .jsonl (one record per line) or .csv (one row per image: path, `columns`
    (label, probability) pairs, error), atomically: the bytes `predict_to_file` streams for the same rows.

    Paths that are not valid UTF-8 keep their bytes: raw in the CSV, \\udcXX escapes in the JSON (os.fsencode
    restores them)."""
    path = Path(path)
    if path.suffix not in PREDICTION_FORMATS:
        raise TransferError(f"--output {path}: use a .csv, .jsonl or .json file")
    write_text(path, render(path.suffix, results, columns, first=True) + closing(path.suffix, len(results)))


@dataclass
class PredictedFile:
    """What `predict_to_file` did: rows in the file, rows kept from an interrupted run, this run's unreadable
    images, and (with `keep`) this run's predictions."""

    rows: int
    continued: int
    not_continued: str | None
    unreadable: list[Prediction]
    results: list[Prediction]


def predict_to_file(model: OnnxModel, onnx: str | os.PathLike, paths: list, output: str | os.PathLike,
                    top_k: int = 5, batch_size: int = 32, views=None, progress: Progress = SILENT,
                    keep: bool = False) -> PredictedFile:
    """Predict `paths` into `output`, each chunk written as it finishes (`PredictionsFile`), continuing the run a
    kill interrupted when its resume record matches this job. Memory stays flat in the number of images unless
    `keep` (the caller shows every row)."""
    from transfer.core.io import output_lock
    from transfer.core.preprocess import tta_views

    views = views or tta_views()
    fingerprint = shard_fingerprint(onnx, paths, top_k, batch_size, 1, len(views))
    target = PredictionsFile(output, fingerprint, label_columns(len(model.classes), top_k, model.multilabel))
    unreadable, results = [], []
    with output_lock(output):
        try:
            done = target.start()
            with progress.task("predicting", total=len(paths) * len(views), unit="images") as advance:
                advance(done * len(views))
                for chunk in model.iter_predict(paths[done:], top_k, batch_size, advance, views):
                    target.write(chunk)
                    unreadable += [item for item in chunk if item.error]
                    if keep:
                        results += chunk
            target.finish()
        finally:
            target.close()
    return PredictedFile(target.rows, done, target.not_continued, unreadable, results)


def shard_fingerprint(onnx: str | os.PathLike, paths: list[Path], top_k: int, batch_size: int, shards: int,
                      views: int = 1) -> str:
    """Names one sharded job (the model's content, inputs, settings): parts of another job, or of another model
    under the same file name, are never merged into this one."""
    from transfer.core.io import file_sha256

    digest = hashlib.sha256()
    for item in (file_sha256(onnx), top_k, batch_size, shards, views, *(os.fsencode(p) for p in paths)):
        digest.update(item if isinstance(item, bytes) else str(item).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def part_path(output: Path, fingerprint: str, shard: int, shards: int) -> Path:
    return output.parent / f".{output.name}.{fingerprint}.shard-{shard}-of-{shards}{PART_SUFFIX}"


def foreign_parts(output: str | os.PathLike, fingerprint: str) -> list[Path]:
    """Part files beside `output` written by another job (another model, inputs or settings): never merged."""
    import glob

    output = Path(output)
    pattern = f".{glob.escape(output.name)}.*{PART_SUFFIX}"
    return sorted(p for p in output.parent.glob(pattern) if not p.name.startswith(f".{output.name}.{fingerprint}."))


def write_shard(output: str | os.PathLike, results: list[Prediction], shard: int, shards: int,
                fingerprint: str, columns: int) -> int:
    """Write this shard's predictions beside `output`; whichever shard finds all parts present (under the output's
    lock) merges them, in shard order, into `output` and removes the parts. Returns how many shards are missing
    (0: merged). Shards are contiguous blocks of the inputs, so the merged file is the one-process file."""
    from transfer.core.io import output_lock

    output = Path(output)
    write_text(part_path(output, fingerprint, shard, shards), json.dumps([r.__dict__ for r in results]))
    with output_lock(output):
        parts = [part_path(output, fingerprint, index, shards) for index in range(shards)]
        missing = sum(not part.exists() for part in parts)
        if missing:
            return missing
        merged = [Prediction(**record) for part in parts for record in json.loads(part.read_text(
            encoding="utf-8", errors="surrogateescape"))]
        write_predictions(output, merged, columns)
        for part in parts:
            part.unlink()
    return 0


def machine_name() -> str:
    """CPU model and its physical cores (psutil), for benchmark records."""
    import psutil

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model}, {psutil.cpu_count(logical=False) or os.cpu_count()} cores"


def run_bench(model_path: str | os.PathLike | OnnxModel, batch_sizes: list[int], device: str = "auto",
              seconds: float = 3.0, progress: Progress = SILENT) -> dict:
    """onnxruntime rows per batch size on synthetic input: images/s and latency p50/p95 (`transfer bench`; the
    PyTorch eager rows of --against-torch are added by `transfer.apps.bench`)."""
    onnx_model = model_path if isinstance(model_path, OnnxModel) else OnnxModel(model_path, device=device)
    result = {"model": str(onnx_model.path),
              "machine": machine_name(), "device": onnx_model.device,
              "precision": onnx_model.metadata.get("transfer.precision", "fp32"), "rows": []}
    with progress.task("benchmarking onnxruntime", total=len(batch_sizes), unit="runs") as advance:
        for size in batch_sizes:
            row = onnx_model.benchmark(size, seconds)
            result["rows"].append({"engine": f"onnxruntime {onnx_model.provider}", **row})
            advance(1)
    return result
