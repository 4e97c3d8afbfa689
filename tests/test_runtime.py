"""Torch-free runtime: predict, bench, the embed example; no torch, no silent CPU fallback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from exporters.export import export_onnx
from exporters.runtime import OnnxModel
from tests.conftest import digits_folder
from transfer.apps.evaluate import evaluate
from transfer.core.preprocess import Preprocessing
from transfer.data.datasets import eval_transform
from transfer.training import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lenet_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    data = digits_folder(root / "digits", per_class=15, size=32, classes=3)
    finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=4, epochs_finetune=0, workers=0, batch_size=8,
                                  augment=False, lr_head=3e-3), output=root / "run", device="cpu", log=lambda _: None)
    export_onnx(root / "lenet.onnx", run=root / "run")
    return root / "lenet.onnx", root / "run", data


def test_runtime_without_torch_matches_evaluate(lenet_onnx):
    path, run_dir, data = lenet_onnx
    report = evaluate(run_dir, data, device="cpu")
    images = sorted(str(p) for p in data.rglob("*.png"))
    code = (
        "import sys, json\n"
        "sys.modules['torch'] = None; sys.modules['timm'] = None; sys.modules['torchvision'] = None\n"
        "from exporters.runtime import OnnxModel\n"
        f"model = OnnxModel({str(path)!r}, device='cpu')\n"
        f"preds = model.predict({images!r}, top_k=1)\n"
        "print(json.dumps([p.indices[0] for p in preds]))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    runtime_top1 = json.loads(result.stdout)
    # evaluate's confusion matrix rows follow the sorted sample order per class: rebuild its predictions
    from transfer.apps.evaluate import _run_model

    run_logits, _, _ = _run_model(run_dir, 32, "cpu")
    torch_logits = run_logits([Path(p) for p in images], None, False)
    assert runtime_top1 == torch_logits.argmax(1).tolist()
    agree = np.mean([int(Path(p).parent.name) == t for p, t in zip(images, runtime_top1, strict=True)])
    assert agree == pytest.approx(report["accuracy"])


def test_runtime_preprocessing_equals_training_transform(photos, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(path, backbone="lenet5", pretrained=False)
    model = OnnxModel(path, device="cpu")
    model.prep = Preprocessing(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    odd = {"wide": Image.fromarray(photos["astronaut"]).resize((451, 300)),
           "tall": Image.fromarray(photos["rocket"]).resize((300, 451)),
           "gray": Image.fromarray(photos["coffee"]).convert("L"),
           "rgba": Image.fromarray(photos["chelsea"]).convert("RGBA")}
    for name, image in odd.items():
        file = tmp_path / f"{name}.png"
        image.save(file)
        from transfer.core.images import open_image

        training = eval_transform(model.prep)(open_image(file)).numpy()
        runtime = model.preprocess_one(str(file))
        scale = np.asarray(model.prep.std).reshape(3, 1, 1) * 255
        assert runtime.shape == training.shape == (3, 224, 224)
        assert (np.abs(runtime - training) * scale).max() <= 1.0, name


def test_predict_cuda_without_cuda_exits_2(lenet_onnx, runner):
    path, _, data = lenet_onnx
    result = runner.invoke(cli.app, ["predict", str(data), "--onnx", str(path), "--device", "cuda"])
    assert result.exit_code == 2 and "CUDAExecutionProvider" in result.output


def test_a_cuda_session_that_falls_back_to_cpu_is_an_error(lenet_onnx, monkeypatch):
    """onnxruntime asked for the CUDA provider it cannot start runs on CPU with a warning; we refuse it. Here the
    CPU build is told CUDA is available, so the session really falls back."""
    import onnxruntime as ort

    from transfer.core.errors import DeviceError

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(DeviceError, match="fell back to CPUExecutionProvider"), \
            pytest.warns(UserWarning, match="'CUDAExecutionProvider' is not in available provider names"):
        OnnxModel(lenet_onnx[0], device="cuda")


def test_predict_lists_unreadable_and_predicts_the_rest(lenet_onnx, runner, tmp_path):
    path, _, data = lenet_onnx
    folder = tmp_path / "mixed"
    folder.mkdir()
    for source in sorted(data.rglob("*.png"))[:4]:
        (folder / f"{source.parent.name}_{source.name}").write_bytes(source.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "preds.json"
    result = runner.invoke(cli.app, ["predict", str(folder), "--onnx", str(path), "--top-k", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "unreadable" in result.output and "1 unreadable image(s)" in result.output
    records = json.loads(out.read_text())
    assert len(records) == 5
    broken = next(r for r in records if r["path"].endswith("broken.jpg"))
    assert broken["error"] and not broken["labels"]
    good = [r for r in records if not r["error"]]
    assert len(good) == 4 and all(len(r["labels"]) == 2 and abs(sum(r["probabilities"]) - 1) < 1 for r in good)
    csv_out = tmp_path / "preds.csv"
    assert runner.invoke(cli.app, ["predict", str(folder / "*.png"), "--onnx", str(path), "--output",
                                   str(csv_out)]).exit_code == 0
    assert len(csv_out.read_text().strip().splitlines()) == 5


def test_bench_cli_against_torch(lenet_onnx, runner, tmp_path):
    path, run_dir, _ = lenet_onnx
    out = tmp_path / "bench.json"
    result = runner.invoke(cli.app, ["bench", "--onnx", str(path), "--batch-sizes", "1,4", "--seconds", "0.2",
                                     "--against-torch", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["rows"]] == [1, 4, 1, 4]
    assert all(r["images_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in data["rows"])
    assert set(data["speedup_vs_torch"]) == {"1", "4"}
    bad = runner.invoke(cli.app, ["bench", "--onnx", str(path), "--batch-sizes", "one"])
    assert bad.exit_code == 2 and "--batch-sizes" in bad.output


def test_embed_app_example_runs_without_torch(lenet_onnx, tmp_path):
    path, _, data = lenet_onnx
    images = sorted(str(p) for p in data.rglob("*.png"))[:3]
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nfor m in ('torch', 'timm', 'transfer', 'exporters', 'models'):\n"
                       "    sys.modules[m] = None\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "embed_app.py"), str(path), *images],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    expected = OnnxModel(path, device="cpu").predict(images, top_k=1)
    assert [line.split("\t")[1] for line in lines] == [p.labels[0] for p in expected]


def test_evaluate_onnx_equals_evaluate_run(lenet_onnx, runner):
    path, run_dir, data = lenet_onnx
    from_run = evaluate(run_dir, data, device="cpu")
    from_onnx = evaluate(path, data, device="cpu")
    assert from_onnx["confusion_matrix"] == from_run["confusion_matrix"]
    result = runner.invoke(cli.app, ["evaluate", str(data), "--onnx", str(path)])
    assert result.exit_code == 0 and f"accuracy {from_run['accuracy']:.4f}" in result.output
