"""`transfer bench --against-torch`: PyTorch eager on the same machine, same synthetic input, same timing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from exporters.runtime import latency_summary


def torch_model(against: str, pretrained: bool | None = False) -> tuple[torch.nn.Module, str]:
    """A run directory's classifier, or a registry backbone (random weights: speed does not depend on them)."""
    from models.registry import get_backbone
    from models.weights import create_backbone
    from transfer.train import load_run

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
