"""The runtime with onnxruntime's real CUDA build on a machine without a usable GPU (this one), the state of many
users' laptops and CI machines after `pip install onnxruntime-gpu`: `--device auto` (the default) runs on the CPU and
answers as the CPU build does; `--device cuda` exits 2 with one line naming the CUDA library onnxruntime could not
load, never a silent CPU run. `make test` installs the build into .venv/onnxruntime-gpu (the Makefile); each test
runs in a subprocess with it ahead of the CPU build on the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporters.runtime import OnnxModel

ROOT = Path(__file__).resolve().parents[1]
GPU_BUILD = ROOT / ".venv" / "onnxruntime-gpu"
CLI = ("import sys\nfrom typer.testing import CliRunner\nimport cli\nimport onnxruntime\n"
       "print('onnxruntime from', onnxruntime.__file__)\n"
       "result = CliRunner().invoke(cli.app, sys.argv[1:])\nprint(result.output)\nsys.exit(result.exit_code)\n")


def with_gpu_build(*args: str) -> subprocess.CompletedProcess:
    if not (GPU_BUILD / "onnxruntime").is_dir():
        pytest.fail(f"{GPU_BUILD} is missing: `make test` installs onnxruntime-gpu there")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GPU_BUILD), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=300)


def test_auto_runs_on_the_cpu_and_cuda_names_the_missing_library(imagenet_lite0_onnx, photo_dir, tmp_path):
    model, _ = imagenet_lite0_onnx
    out = tmp_path / "auto.json"
    auto = with_gpu_build("predict", str(photo_dir), "--onnx", str(model), "--top-k", "3", "-o", str(out))
    assert auto.returncode == 0, auto.stdout[-2000:] + auto.stderr[-2000:]
    assert f"onnxruntime from {GPU_BUILD}" in auto.stdout  # the CUDA build ran, not the CPU one
    assert "CPUExecutionProvider, 3 image(s)" in " ".join(auto.stdout.split())
    expected = OnnxModel(model, device="cpu").predict(sorted(photo_dir.iterdir()), top_k=3)
    rows = json.loads(out.read_text())
    assert [row["labels"] for row in rows] == [p.labels for p in expected]
    assert max(abs(a - b) for row, p in zip(rows, expected, strict=True)
               for a, b in zip(row["probabilities"], p.probabilities, strict=True)) < 1e-4

    cuda = with_gpu_build("predict", str(photo_dir), "--onnx", str(model), "--device", "cuda")
    assert cuda.returncode == 2, cuda.stdout[-2000:]
    errors = [line for line in cuda.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not start the CUDA provider" in errors[0], cuda.stdout[-2000:]
    assert "Failed to load lib" in errors[0] and ".so" in errors[0]  # the library, named
