"""The CUDA paths, run for real on a GPU: every `--device cuda` command agrees with its CPU result.

Marked `gpu` (skipped without CUDA; `benchmarks/gpu/run.sh` runs them on a lent card and saves their output in
benchmarks/). `TRANSFER_GPU_REHEARSAL=1` runs the same tests with `cpu` in place of `cuda`, to rehearse them on a
machine without a GPU: the CUDA-only checks (providers, memory probe) are then the only ones left out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from tests.conftest import digits_folder
from tests.test_finetune import random_weights_file

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
REHEARSAL = os.environ.get("TRANSFER_GPU_REHEARSAL") == "1"
DEVICE = "cpu" if REHEARSAL else "cuda"
cuda_only = pytest.mark.skipif(REHEARSAL, reason="CUDA-only check (rehearsal on cpu)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short staged run of efficientnet_lite0 (calibrated random weights: no download) on each device."""
    from transfer.training import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("gpu")
    data = digits_folder(root / "digits", per_class=12, size=64, classes=3)
    weights = random_weights_file(root, "efficientnet_lite0", size=64)
    runs = {}
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        config = FinetuneConfig(backbone="efficientnet_lite0", input_size=64, epochs_head=2, epochs_finetune=1,
                                batch_size=8, augment=False, workers=0, weights=str(weights), seed=0)
        lines: list[str] = []
        runs[name] = finetune(data, config, output=root / f"run-{name}", device=device, log=lines.append)
        runs[name].lines = lines
    return root, data, runs


def metrics(run_dir) -> list[dict]:
    rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def test_finetune_trains_on_the_device_and_tracks_the_cpu_run(trained):
    """Same seed, same data: the CUDA run (bf16 autocast, channels_last) follows the CPU run's losses within 5%
    (bf16 rounds the forward pass) and says where it trained; its paced checkpoints, written from the card, load
    on the CPU."""
    from safetensors.torch import load_file

    from transfer.training.checkpoints import load_checkpoint

    _, _, runs = trained
    assert any(f"device {DEVICE}" in line for line in runs["device"].lines), runs["device"].lines[:2]
    recorded = json.loads((runs["device"].run_dir / "config.json").read_text())["device"]
    assert (recorded == "cpu") if REHEARSAL else recorded.startswith("cuda:0 (NVIDIA")
    cpu_rows, device_rows = metrics(runs["reference"].run_dir), metrics(runs["device"].run_dir)
    assert len(cpu_rows) == len(device_rows) == 3
    for a, b in zip(cpu_rows, device_rows, strict=True):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=0.05)
        assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=0.05)
    assert load_checkpoint(runs["device"].run_dir / "last.ckpt")["epoch"] == 3  # paced saves flushed from the card
    best = load_file(runs["device"].run_dir / "best.safetensors")  # readable on a machine without the card
    assert best.keys() == load_file(runs["reference"].run_dir / "best.safetensors").keys()


def test_evaluate_extract_predict_bench_on_the_device_agree_with_cpu(trained, runner, tmp_path):
    root, data, runs = trained
    run = runs["reference"].run_dir
    reports = {}
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        result = runner.invoke(cli.app, ["evaluate", str(data), "--run", str(run), "--device", device,
                                         "--json", str(tmp_path / f"e-{name}.json"), "-q"])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / f"e-{name}.json").read_text())
        result = runner.invoke(cli.app, ["extract", str(data), "--run", str(run), "--pool", "avg", "--device",
                                         device, "-o", str(tmp_path / f"f-{name}.npy"), "-q"])
        assert result.exit_code == 0, result.output
    count = reports["reference"]["count"]
    assert reports["device"]["accuracy"] == pytest.approx(reports["reference"]["accuracy"], abs=1 / count)
    cpu_features, device_features = (np.load(tmp_path / f"f-{name}.npy") for name in ("reference", "device"))
    scale = np.abs(cpu_features).max()
    assert np.abs(device_features - cpu_features).max() <= 1e-2 * scale  # TF32 convolutions on the GPU

    model = tmp_path / "model.onnx"
    result = runner.invoke(cli.app, ["export", "--run", str(run), "-o", str(model), "-q"])
    assert result.exit_code == 0, result.output
    predictions = {}
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        result = runner.invoke(cli.app, ["predict", str(data), "--onnx", str(model), "--device", device,
                                         "--top-k", "1", "-o", str(tmp_path / f"p-{name}.json"), "-q"])
        assert result.exit_code == 0, result.output
        predictions[name] = json.loads((tmp_path / f"p-{name}.json").read_text())
    pairs = list(zip(predictions["reference"], predictions["device"], strict=True))
    assert sum(a["labels"] == b["labels"] for a, b in pairs) >= len(pairs) - 1  # a near tie may flip
    assert max(abs(a["probabilities"][0] - b["probabilities"][0]) for a, b in pairs) < 1e-2
    result = runner.invoke(cli.app, ["bench", "--onnx", str(model), "--device", DEVICE, "--batch-sizes", "1,8",
                                     "--seconds", "0.2", "--json", str(tmp_path / "bench.json"), "-q"])
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert [row["batch_size"] for row in bench["rows"]] == [1, 8]
    assert all(row["images_per_s"] > 0 for row in bench["rows"])


def test_onnxruntime_runs_on_the_cuda_provider_and_fp16_stays_within_tolerance(trained, tmp_path):
    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel

    _, data, runs = trained
    record = export_onnx(tmp_path / "half.onnx", run=runs["reference"].run_dir, fp16=True)
    assert max(record.max_rel_diff.values()) <= record.tolerance  # export verifies (and would refuse) it
    model = OnnxModel(tmp_path / "half.onnx", device=DEVICE)
    expected = "CPUExecutionProvider" if REHEARSAL else "CUDAExecutionProvider"
    assert model.provider == expected and model.device == DEVICE
    paths = sorted(data.rglob("*.png"))[:16]
    on_device = model.logits(paths)
    on_cpu = OnnxModel(tmp_path / "half.onnx", device="cpu").logits(paths)
    assert np.abs(on_device - on_cpu).max() < 5e-2 * max(1.0, float(np.abs(on_cpu).max()))


def test_predict_without_torch_runs_on_the_device_and_answers_like_the_cpu(trained, tmp_path):
    """`transfer predict --device cuda` in a process where torch cannot even be imported (an embedding app's case):
    onnxruntime loads CUDA and cuDNN itself (exporters.cuda_libraries) and its answers are the CPU's."""
    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel

    _, data, runs = trained
    model, out = tmp_path / "model.onnx", tmp_path / "p.json"
    export_onnx(model, run=runs["reference"].run_dir)
    paths = sorted(data.rglob("*.png"))[::4]
    code = ("import sys\n"
            "for name in ('torch', 'timm', 'torchvision'):\n    sys.modules[name] = None\n"
            "from typer.testing import CliRunner\nimport cli\n"
            "result = CliRunner().invoke(cli.app, sys.argv[1:])\nprint(result.output)\nsys.exit(result.exit_code)\n")
    args = ["predict", *map(str, paths), "--onnx", str(model), "--device", DEVICE, "--top-k", "1", "-o", str(out), "-q"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    provider = "CPUExecutionProvider" if REHEARSAL else "CUDAExecutionProvider"
    assert f"{model}: {provider}, {len(paths)} image(s)" in " ".join(result.stdout.split()), result.stdout
    on_device = json.loads(out.read_text())
    on_cpu = OnnxModel(model, device="cpu").predict(paths, top_k=1)
    assert len(on_device) == len(paths) == len(on_cpu)
    assert sum(a["labels"] == b.labels for a, b in zip(on_device, on_cpu, strict=True)) >= len(paths) - 1
    assert max(abs(a["probabilities"][0] - b.probabilities[0]) for a, b in zip(on_device, on_cpu, strict=True)) < 1e-2


@cuda_only
def test_batch_size_auto_probes_the_card_and_leaves_the_model_untouched(trained):
    from models.registry import get_backbone
    from models.weights import create_backbone
    from transfer.training.batch_size import choose_batch_size, cuda_fits
    from transfer.training.model import build_transfer_model

    root, _, _ = trained
    spec = get_backbone("efficientnet_lite0")
    backbone, _ = create_backbone(spec, weights=str(root / "efficientnet_lite0.pth"))
    device = torch.device("cuda", 0)
    model = build_transfer_model(spec, backbone, 3, 224).to(device).to(memory_format=torch.channels_last).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    choice = choose_batch_size(device, 100_000, 1, cuda_fits(model, 224, device, autocast))
    batch = choice["batch_size"]
    assert batch >= 8 and batch & (batch - 1) == 0 and choice["tried"][0] == {"batch_size": 8, "fits": True}
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # BatchNorm statistics restored
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["convnext_atto", "deit_tiny_patch16_224"])
def test_any_timm_backbone_trains_and_runs_on_the_device(name, tmp_path):
    """A ConvNeXt and a ViT (timm names outside the curated registry) train on the device, export, and their ONNX
    file on the device's provider answers like the same file on the CPU."""
    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel
    from transfer.training import FinetuneConfig, finetune

    data = digits_folder(tmp_path / "digits", per_class=8, size=32, classes=3)
    lines: list[str] = []
    config = FinetuneConfig(backbone=name, pretrained=False, input_size=32, epochs_head=2, epochs_finetune=0,
                            batch_size=8, augment=False, workers=0)
    result = finetune(data, config, output=tmp_path / "run", device=DEVICE, log=lines.append)
    assert result.epochs_run == 2 and any(f"device {DEVICE}" in line for line in lines), lines[:2]
    record = export_onnx(tmp_path / "m.onnx", run=tmp_path / "run")
    assert max(record.max_rel_diff.values()) <= record.tolerance
    paths = sorted(data.rglob("*.png"))[:12]
    on_device = OnnxModel(tmp_path / "m.onnx", device=DEVICE)
    assert on_device.provider == ("CPUExecutionProvider" if REHEARSAL else "CUDAExecutionProvider")
    expected = OnnxModel(tmp_path / "m.onnx", device="cpu").logits(paths)
    assert np.abs(on_device.logits(paths) - expected).max() <= 1e-2 * max(1.0, float(np.abs(expected).max()))


def test_multilabel_run_and_serve_on_the_device_answer_like_the_cpu(tmp_path):
    """Several labels per image: trained on the device, its ONNX file gives the same label sets on the device as on
    the CPU, and `serve --device` answers /predict with them."""
    from fastapi.testclient import TestClient

    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel
    from transfer.data.samples import write_digit_pairs
    from transfer.serving.serve import create_app
    from transfer.training import FinetuneConfig, finetune

    pairs = write_digit_pairs(tmp_path / "pairs", count=48, classes=4)
    config = FinetuneConfig(backbone="lenet5", epochs_head=3, epochs_finetune=0, batch_size=16, augment=False,
                            workers=0, labels={"path": str(pairs / "labels.csv")})
    finetune(pairs / "images", config, output=tmp_path / "run", device=DEVICE, log=lambda _: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task"] == "multilabel"
    export_onnx(tmp_path / "m.onnx", run=tmp_path / "run")
    paths = sorted((pairs / "images").iterdir())[:12]
    on_device = [p.labels for p in OnnxModel(tmp_path / "m.onnx", device=DEVICE).predict(paths)]
    on_cpu = [p.labels for p in OnnxModel(tmp_path / "m.onnx", device="cpu").predict(paths)]
    assert sum(a == b for a, b in zip(on_device, on_cpu, strict=True)) >= len(paths) - 1  # a label at its threshold
    with TestClient(create_app(tmp_path / "m.onnx", device=DEVICE)) as client:
        answer = client.post("/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in paths[:4]])
    assert answer.status_code == 200 and answer.json()["task"] == "multilabel", answer.text
    assert [item["labels"] for item in answer.json()["predictions"]] == on_device[:4]


def test_heatmaps_on_the_device_match_the_cpu(trained, runner, tmp_path):
    """CAM inside the ONNX file (export --cam) on the device's provider gives the CPU's maps and predict --cam draws
    them there; explain's Grad-CAM on the device gives the CPU's maps (the backward pass through the backbone on
    the card) and the CLI names the same classes."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from exporters.runtime import OnnxModel
    from transfer.apps.explain import cam_plan, load_source
    from transfer.core.images import open_image
    from transfer.core.preprocess import eval_array

    _, data, runs = trained
    paths = sorted(data.rglob("*.png"))[::9][:4]
    weights = random_weights_file(tmp_path, "resnet18", size=64)
    model = tmp_path / "cam.onnx"
    result = runner.invoke(cli.app, ["export", "-b", "resnet18", "--weights", str(weights), "--input-size", "64",
                                     "--cam", "--cam-classes", "all", "-o", str(model), "-q"])
    assert result.exit_code == 0, result.output
    outputs = {}
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        onnx_model = OnnxModel(model, device=device)
        batch = next(onnx_model.iter_batches(paths, 8))[1]
        outputs[name] = onnx_model.run(batch, ["logits", "cam"])
    for on_cpu, on_device in zip(outputs["reference"], outputs["device"], strict=True):
        assert on_cpu.shape == on_device.shape
        assert np.abs(on_device - on_cpu).max() <= 1e-2 * np.abs(on_cpu).max()  # TF32 convolutions on the card
    drawn = tmp_path / "drawn"
    result = runner.invoke(cli.app, ["predict", *map(str, paths), "--onnx", str(model), "--device", DEVICE,
                                     "--top-k", "1", "--cam", str(drawn), "-q"])
    assert result.exit_code == 0, result.output
    assert "wrote 4 heatmap(s) of 4 image(s) to" in " ".join(result.output.split()), result.output
    assert len(json.loads((drawn / "heatmaps.json").read_text())["images"]) == 4

    run = runs["reference"].run_dir
    heat = {}
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        source = load_source(run=run)
        plan = cam_plan(source.model.to(device), source.prep.input_size)
        batch = torch.from_numpy(np.stack([eval_array(open_image(p), source.prep) for p in paths])).to(device)
        heat[name] = GradCAM(model=plan.model, target_layers=[plan.layer], reshape_transform=plan.reshape)(
            input_tensor=batch, targets=[ClassifierOutputTarget(0)] * len(paths))
    assert heat["reference"].shape == (4, 64, 64)
    assert np.abs(heat["device"] - heat["reference"]).max() < 0.1  # Grad-CAM scales each map to [0, 1]
    records = {}
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        result = runner.invoke(cli.app, ["explain", *map(str, paths), "--run", str(run), "--device", device,
                                         "-o", str(tmp_path / f"seen-{name}"), "--json",
                                         str(tmp_path / f"h-{name}.json"), "-q"])
        assert result.exit_code == 0, result.output
        records[name] = json.loads((tmp_path / f"h-{name}.json").read_text())["images"]
    assert len(records["device"]) == 4 and (tmp_path / "seen-device" / "heatmaps" / "contact_sheet.png").is_file()
    same = [a["classes"][0]["class"] == b["classes"][0]["class"] for a, b in zip(*records.values(), strict=True)]
    assert sum(same) >= 3  # a near tie may flip


def test_index_and_similar_on_the_device_agree_with_cpu(trained, runner, tmp_path):
    """`index --device` embeds on the card (vectors within TF32 rounding of the CPU's) and `similar --device`
    finds the neighbours the CPU finds, with the same cosines."""
    _, data, runs = trained
    run = runs["reference"].run_dir
    queries = sorted(data.rglob("*.png"))[::7][:5]
    hits = {}
    for name, device in (("reference", "cpu"), ("device", DEVICE)):
        index = tmp_path / f"idx-{name}"
        result = runner.invoke(cli.app, ["index", str(data), "--run", str(run), "--device", device, "-o", str(index),
                                         "--workers", "0", "-q"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(cli.app, ["similar", *map(str, queries), "--index", str(index), "--device", device,
                                         "-k", "3", "--exclude-self", "-o", str(tmp_path / f"s-{name}.png"),
                                         "--json", str(tmp_path / f"s-{name}.json"), "-q"])
        assert result.exit_code == 0, result.output
        hits[name] = json.loads((tmp_path / f"s-{name}.json").read_text())["results"]
    on_cpu, on_device = (np.load(tmp_path / f"idx-{name}" / "vectors.npy") for name in ("reference", "device"))
    assert on_cpu.shape == on_device.shape == (36, on_cpu.shape[1])
    assert np.abs(on_device - on_cpu).max() < 1e-2  # unit vectors
    for a, b in zip(hits["reference"], hits["device"], strict=True):
        assert [n["score"] for n in b["neighbours"]] == pytest.approx([n["score"] for n in a["neighbours"]], abs=1e-2)


def test_tune_runs_its_trials_on_the_device(tmp_path, runner):
    """`tune --device`: two trials train on the card (lenet5 from scratch), each a run that says where it trained,
    and the study writes its recipe."""
    import csv

    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=3)
    study = tmp_path / "study"
    result = runner.invoke(cli.app, ["tune", str(data), "-b", "lenet5", "--trials", "2", "--device", DEVICE,
                                     "--workers", "0", "--batch-size", "8", "-o", str(study), "-q"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((study / "trials.csv").open()))
    assert len(rows) == 2 and (study / "recipe.json").is_file()
    for trial in (0, 1):
        assert json.loads((study / f"trial_{trial:03d}" / "config.json").read_text())["device"].startswith(DEVICE)
