"""Library side of `predict` and `bench`: writing predictions, timing onnxruntime (and PyTorch when asked)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
from pathlib import Path

from exporters.runtime import OnnxModel, Prediction
from transfer.core.errors import TransferError
from transfer.core.io import write_text
from transfer.core.progress import SILENT, Progress

PREDICTION_FORMATS = (".csv", ".json")
PART_SUFFIX = ".transfer-part"  # one shard's predictions, waiting for the others


def check_predictions_path(path: str | os.PathLike) -> Path:
    """The predictions file must be .csv or .json and writable: checked before any image is decoded."""
    from transfer.core.io import check_writable

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
    elif path.suffix == ".csv":  # one column pair per rank, so labels with commas stay intact
        k = max([1, *(len(r.labels) for r in results)])
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", *(f"{kind}_{rank}" for rank in range(1, k + 1) for kind in ("label", "probability")),
                         "error"])
        for r in results:
            pairs = zip(r.labels, r.probabilities, strict=True)
            ranked = [value for label, p in pairs for value in (label, f"{p:.6f}")]
            writer.writerow([r.path, *ranked, *([""] * (2 * k - len(ranked))), r.error or ""])
        write_text(path, buffer.getvalue())
    else:
        raise TransferError(f"--output {path}: use a .csv or .json file")


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
                fingerprint: str) -> int:
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
        write_predictions(output, merged)
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
