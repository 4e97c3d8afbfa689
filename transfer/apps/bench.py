"""`transfer bench`: onnxruntime rows (`transfer.serving.predict.run_bench`) and, with --against-torch, PyTorch eager
on the same machine, same synthetic input, same timing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from exporters.runtime import OnnxModel, latency_summary
from models.registry import get_backbone
from models.weights import create_backbone
from transfer.core.progress import SILENT, Progress
from transfer.serving.predict import run_bench
from transfer.training.runs import load_run


def bench(model_path: str | os.PathLike, batch_sizes: list[int], device: str = "auto", seconds: float = 3.0,
          against_torch: bool = False, progress: Progress = SILENT) -> dict:
    """onnxruntime rows per batch size; with `against_torch`, PyTorch eager rows on the model the file came from
    (its run directory when it still exists, else its registry backbone: speed does not depend on the weights)."""
    onnx_model = OnnxModel(model_path, device=device)
    result = run_bench(onnx_model, batch_sizes, seconds=seconds, progress=progress)
    if not against_torch:
        return result
    source = onnx_model.metadata.get("transfer.run") or onnx_model.metadata.get("transfer.backbone", "")
    if not source or (source.startswith("/") and not Path(source).is_dir()):
        source = onnx_model.metadata.get("transfer.backbone", "")
    network, description = torch_model(source)
    torch_rows = []
    with progress.task("benchmarking pytorch eager", total=len(batch_sizes), unit="runs") as advance:
        for size in batch_sizes:
            torch_rows.append({"engine": "pytorch eager", **torch_benchmark(
                network, onnx_model.prep.input_size, size, onnx_model.device, seconds=seconds)})
            advance(1)
    onnx_rows = list(result["rows"])
    result["rows"] += torch_rows
    result["torch_model"] = description
    result["speedup_vs_torch"] = {str(a["batch_size"]): round(a["images_per_s"] / b["images_per_s"], 3)
                                  for a, b in zip(onnx_rows, torch_rows, strict=True)}
    return result


def torch_model(against: str, pretrained: bool | None = False) -> tuple[torch.nn.Module, str]:
    """A run directory's classifier, or a registry backbone (random weights: speed does not depend on them)."""
    if Path(against).is_dir():
        model, _ = load_run(against)
        return model, f"run {against}"
    model, source = create_backbone(get_backbone(against), pretrained=pretrained)
    return model.eval(), f"{against} ({source})"


def torch_benchmark(model: torch.nn.Module, input_size: int, batch_size: int, device: str = "cpu",
                    channels_last: bool = False, half: bool = False, seconds: float = 3.0, warmup: int = 3,
                    min_runs: int = 5) -> dict:
    """images/s and latency p50/p95 of PyTorch eager inference (no_grad/inference_mode) after warm-up."""
    target = torch.device(device)
    model = model.eval().to(target)
    batch = torch.randn(batch_size, 3, input_size, input_size, device=target)
    if half:
        model, batch = model.half(), batch.half()
    if channels_last:
        model, batch = model.to(memory_format=torch.channels_last), batch.to(memory_format=torch.channels_last)

    def step() -> None:
        model(batch)
        if target.type == "cuda":
            torch.cuda.synchronize()

    latencies = []
    with torch.inference_mode():
        for _ in range(warmup):
            step()
        started = time.perf_counter()
        while len(latencies) < min_runs or time.perf_counter() - started < seconds:
            tick = time.perf_counter()
            step()
            latencies.append(time.perf_counter() - tick)
    result = latency_summary(batch_size, np.asarray(latencies))
    result["channels_last"], result["half"] = channels_last, half
    return result
