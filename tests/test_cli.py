"""The newcomer pass: one vocabulary, feedback on long steps, defaults that work, messages that point the right way."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
from exporters.export import export_onnx
from models.registry import BACKBONES, get_backbone
from tests.conftest import digits_folder, held_out_by_content
from transfer.core.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("backbones", "layers", "scan", "finetune", "evaluate", "extract", "export", "predict", "bench", "serve",
            "index", "similar", "lr-find")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_a_copy_pasteable_example(runner, command):
    result = runner.invoke(cli.app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output and f"$ transfer {command}" in result.output


def test_choices_are_listed_and_enforced(runner):
    help_text = runner.invoke(cli.app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    assert "adamw|rmsprop|sgd" in help_text and "mlp|linear" in help_text and "auto|cpu|cuda" in help_text
    bad = runner.invoke(cli.app, ["extract", "x", "--pool", "median"])
    assert bad.exit_code == 2 and "--pool" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_non_tty_finetune_prints_a_progress_line_per_epoch(tmp_path, runner):
    data = digits_folder(tmp_path / "d", per_class=8, size=32, classes=2)
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--epochs-head", "3",
                                     "--epochs-finetune", "0", "--batch-size", "4", "--workers", "0", "--device",
                                     "cpu", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "batches" in line and "(done)" in line]
    assert [line.split(":")[0] for line in lines] == ["scratch 1/3 (epoch 1)", "scratch 2/3 (epoch 2)",
                                                      "scratch 3/3 (epoch 3)"]
    assert all("batches/s" in line for line in lines)
    quiet = runner.invoke(cli.app, ["scan", str(data), "--quiet"])
    assert quiet.exit_code == 0 and "scanning" not in quiet.stderr


def test_progress_lines_report_rate_and_eta():
    import io

    from transfer.core.progress import Progress

    stream = io.StringIO()
    progress = Progress("lines", stream, interval=0.0)
    with progress.task("extracting", total=4, unit="images", min_seconds=0) as advance:
        advance(1)
        advance(3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("extracting: 1/4 images,") and "ETA" in lines[0]
    assert lines[-1].startswith("extracting: 4/4 images,") and lines[-1].endswith("(done)")
    quick = io.StringIO()
    with Progress("lines", quick).task("scanning", total=2) as advance:
        advance(2)
    assert quick.getvalue() == ""  # steps shorter than a second say nothing


def test_resume_with_more_epochs_adds_exactly_those_epochs(tmp_path, runner):
    from tests.test_finetune import random_weights_file

    data = digits_folder(tmp_path / "d", per_class=8, size=32, classes=2)
    weights = random_weights_file(tmp_path, "resnet18", size=48)
    run_dir = tmp_path / "run"
    base = ["finetune", str(data), "-b", "resnet18", "--weights", str(weights), "--input-size", "48",
            "--epochs-head", "1", "--epochs-finetune", "2", "--batch-size", "8", "--no-augment", "--workers", "0",
            "--device", "cpu", "-o", str(run_dir)]
    assert runner.invoke(cli.app, base).exit_code == 0
    rows = read_metrics(run_dir / "metrics.csv")
    assert len(rows) == 3
    created = json.loads((run_dir / "config.json").read_text())["created"]
    time.sleep(1.1)  # config times have one-second resolution
    more = runner.invoke(cli.app, ["finetune", str(data), "--resume", str(run_dir), "--epochs-finetune", "3",
                                   "--workers", "0"])
    assert more.exit_code == 0, more.output
    after = read_metrics(run_dir / "metrics.csv")
    assert len(after) == 4 and after[:3] == rows
    assert after[3]["stage"] == "finetune" and after[3]["stage_epoch"] == 3 and after[3]["epoch"] == 4
    config = json.loads((run_dir / "config.json").read_text())
    assert after[3]["lr"] == pytest.approx(config["settings"]["lr_finetune"])  # a fresh cosine tail: the stage's rate
    assert config["settings"]["epochs_finetune"] == 3 and config["stages"][1]["epochs"] == 3
    assert config["extensions"][0]["stage_epochs_after"]["finetune"] == 3
    assert config["created"] == created and config["updated"] > created  # a resume does not move `created`
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["epoch"] == 4

    changed = runner.invoke(cli.app, ["finetune", str(data), "--resume", str(run_dir), "--lr-finetune", "0.01"])
    assert changed.exit_code == 2 and "--lr-finetune" in changed.output and "differs" in changed.output
    back = runner.invoke(cli.app, ["finetune", str(data), "--resume", str(run_dir), "--epochs-head", "2"])
    assert back.exit_code == 2 and "already in stage finetune" in back.output
    assert len(read_metrics(run_dir / "metrics.csv")) == 4


def test_interrupt_hint_names_the_data_folder(tmp_path):
    from transfer.training import FinetuneConfig, finetune

    data = digits_folder(tmp_path / "d", per_class=6, size=32, classes=2)
    lines = []

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=2, workers=0, batch_size=4),
                 output=tmp_path / "run", device="cpu", log=lines.append, on_epoch_end=stop)
    assert lines[-1].endswith(f"resume with transfer finetune {data} --resume {tmp_path / 'run'}")


def test_registry_param_counts_and_sizes_match_the_models():
    """`transfer backbones` reads these from the registry (no model built, no torch imported): keep them true."""
    import timm

    from models.weights import build_architecture

    for spec in BACKBONES.values():
        with torch.device("meta"):
            model = build_architecture(spec)
        assert sum(p.numel() for p in model.parameters()) == spec.params, spec.name
        assert spec.input_size_default == spec.input_size, spec.name
        if spec.timm_name:
            assert timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id == spec.hf_hub_id, spec.name


def test_backbones_command_imports_no_torch(tmp_path):
    code = ("import sys, json\nfrom typer.testing import CliRunner\nimport cli\n"
            "result = CliRunner().invoke(cli.app, ['backbones', '--json', sys.argv[1]])\n"
            "assert result.exit_code == 0, result.output\n"
            "print(json.dumps(sorted(m for m in ('torch', 'timm') if m in sys.modules)))")
    out = tmp_path / "b.json"
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert rows["vgg16"]["feature_layer"] == "block4_pool" and rows["resnet50"]["feature_layer"] == "conv4_block6_out"
    assert rows["efficientnet_lite0"]["available"] is True


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_default_feature_layer_resolves(name):
    from models.layers import resolve_layer

    spec = get_backbone(name)
    assert resolve_layer(spec, spec.feature_layer) in dict(spec.aliases).values()


def test_extract_without_layer_for_backbones_with_offline_weights(tmp_path, photo_dir, runner):
    from models.availability import weights_status

    offline = [spec for spec in BACKBONES.values() if weights_status(spec).available or not spec.has_pretrained]
    assert "efficientnet_lite0" in {spec.name for spec in offline}
    for spec in offline:
        out = tmp_path / f"{spec.name}.npy"
        result = runner.invoke(cli.app, ["extract", str(photo_dir), "-b", spec.name, "-o", str(out), "--workers", "0",
                                         "--pool", "avg", "-q"])
        assert result.exit_code == 0, (spec.name, result.output)
        meta = json.loads(out.with_suffix(".json").read_text())
        assert list(meta["layers"]) == [spec.feature_layer]
        assert meta["shapes"][spec.feature_layer][0] == 3
    lite0 = json.loads((tmp_path / "efficientnet_lite0.npy").with_suffix(".json").read_text())
    assert lite0["layers"] == {"block5c_add": "blocks.4.2"} and lite0["shapes"]["block5c_add"] == [3, 112]


def test_extract_takes_files_and_globs(tmp_path, photo_dir, runner):
    from transfer.apps.extract import load_features

    out = tmp_path / "f.npy"
    result = runner.invoke(cli.app, ["extract", str(photo_dir / "chelsea.jpg"), str(photo_dir / "r*.jpg"), "-b",
                                     "lenet5", "-o", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    arrays, meta = load_features(out)
    assert [Path(p).name for p in meta["paths"]] == ["chelsea.jpg", "rocket.jpg"]
    assert arrays["pool2"].shape == (2, 16, 5, 5)
    missing = runner.invoke(cli.app, ["extract", str(tmp_path / "photo.jpg"), "-b", "lenet5"])
    assert missing.exit_code == 2 and "not found" in missing.output and "folder" not in missing.output


@pytest.fixture(scope="module")
def extractor_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("x") / "extractor.onnx"
    export_onnx(path, backbone="lenet5", pretrained=False, layers=["pool2"])
    return path


def test_extractor_given_where_a_classifier_is_expected_names_the_command(extractor_onnx, photo_dir, runner,
                                                                          tmp_path):
    predict = runner.invoke(cli.app, ["predict", str(photo_dir), "--onnx", str(extractor_onnx)])
    assert predict.exit_code == 2 and f"transfer extract --onnx {extractor_onnx}" in predict.output
    data = digits_folder(tmp_path / "d", per_class=2, size=32, classes=2)
    evaluate = runner.invoke(cli.app, ["evaluate", str(data), "--onnx", str(extractor_onnx)])
    assert evaluate.exit_code == 2 and "transfer extract --onnx" in evaluate.output
    positional = runner.invoke(cli.app, ["predict", str(extractor_onnx), str(photo_dir)])
    assert positional.exit_code == 2 and f"--onnx {extractor_onnx}" in positional.output
    classifier = tmp_path / "classifier.onnx"
    export_onnx(classifier, backbone="lenet5", pretrained=False)
    wrong = runner.invoke(cli.app, ["extract", str(photo_dir), "--onnx", str(classifier), "-o",
                                    str(tmp_path / "f.npy")])
    assert wrong.exit_code == 2 and "`transfer export -b NAME --layer LAYER`" in wrong.output
    assert "transfer predict --onnx" in wrong.output


def test_predict_csv_keeps_labels_with_commas(tmp_path, photo_dir, runner, imagenet_lite0_onnx):
    path = imagenet_lite0_onnx[0]
    out = tmp_path / "p.csv"
    result = runner.invoke(cli.app, ["predict", str(photo_dir / "chelsea.jpg"), "--onnx", str(path), "--top-k", "3",
                                     "-o", str(out), "--show"])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(out.open()))
    labels = [row[f"label_{k}"] for k in (1, 2, 3)]
    assert any("," in label for label in labels) and all(label for label in labels)
    assert " | " in result.output
    from exporters.runtime import OnnxModel

    expected = OnnxModel(path, device="cpu").predict([photo_dir / "chelsea.jpg"], top_k=3)[0]
    assert labels == expected.labels
    assert [float(row[f"probability_{k}"]) for k in (1, 2, 3)] == pytest.approx(expected.probabilities, abs=1e-6)


def test_export_prints_no_warnings_and_uses_the_dynamo_exporter(tmp_path):
    code = ("import sys\nfrom typer.testing import CliRunner\nimport cli\n"
            "r = CliRunner().invoke(cli.app, ['export', '-b', 'lenet5', '--no-pretrained', '-o', sys.argv[1]])\n"
            "print(r.output)\nsys.exit(r.exit_code)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr and "Warning" not in result.stdout
    assert "dynamo" in result.stdout and "[torch.onnx]" not in result.stdout


def test_export_int8_states_agreement_speed_and_kernel(tmp_path, runner):
    import hashlib

    import numpy as np
    import onnxruntime as ort

    from transfer.core.images import open_image
    from transfer.core.preprocess import Preprocessing, eval_array
    from transfer.data.samples import write_digits_folder
    from transfer.data.scan import scan_folder
    from transfer.data.splits import train_val_samples
    from transfer.training import FinetuneConfig, finetune
    from transfer.training.runs import load_run

    data = write_digits_folder(tmp_path / "digits", per_class=40, size=32)
    finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=8, epochs_finetune=0, augment=False, lr_head=3e-3,
                                  workers=0, batch_size=32), output=tmp_path / "run", device="cpu", log=lambda _: None)
    calibration = write_digits_folder(tmp_path / "calibration", per_class=3, size=32)
    result = runner.invoke(cli.app, ["export", "--run", str(tmp_path / "run"), "--int8", "--calibration",
                                     str(calibration), "--max-accuracy-loss", "0.5", "-o", str(tmp_path / "m.onnx"),
                                     "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())["int8"]
    held_out = held_out_by_content(data, calibration)  # the calibration digits are copies of some validation ones
    assert held_out < 80
    assert record["agreement_images"] == (f"{held_out} validation images of the run (none used for calibration, "
                                          "compared by content)")
    output = result.output
    assert f"top-1 agreement {record['top1_agreement']:.4f} (" in output
    assert f"logit cosine {record['logit_cosine']:.4f}" in output
    assert record["method"].startswith("nncf ") and f"int8 made by {record['method']}" in output
    assert f"int8: {record['speedup']:.2f}x the fp32 file's speed" in output and record["kernel"] in output
    assert "━" not in output and "INFO:nncf" not in output  # NNCF's own progress bars and log lines stay out
    # the accuracies, computed here without the exporter: PyTorch and the int8 file on the same held-out images
    seen = {hashlib.sha256(p.read_bytes()).digest() for p in calibration.rglob("*.png")}
    _, validation = train_val_samples(scan_folder(data), 0.2, 0)
    judged = [s for s in validation if hashlib.sha256(s.path.read_bytes()).digest() not in seen]
    model, config = load_run(tmp_path / "run")
    prep = Preprocessing.from_dict(config["preprocessing"])
    inputs = np.stack([eval_array(open_image(s.path), prep) for s in judged]).astype(np.float32)
    truth = np.array([s.label for s in judged])
    with torch.no_grad():
        fp32_accuracy = float((model(torch.from_numpy(inputs)).argmax(1).numpy() == truth).mean())
    int8_logits = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": inputs})[0]
    int8_accuracy = float((int8_logits.argmax(1) == truth).mean())
    assert record["accuracy_images"] == len(judged) == held_out
    assert record["fp32_accuracy"] == pytest.approx(fp32_accuracy) and fp32_accuracy >= 0.7
    assert record["int8_accuracy"] == pytest.approx(int8_accuracy)
    assert 100 * (fp32_accuracy - int8_accuracy) <= 0.5
    assert (f"accuracy on {held_out} held-out validation images: fp32 {100 * fp32_accuracy:.2f}%, int8 "
            f"{100 * int8_accuracy:.2f}%") in output
    refused = runner.invoke(cli.app, ["export", "-b", "lenet5", "--no-pretrained", "--int8", "--calibration",
                                      str(calibration), "--max-accuracy-loss", "1", "-o", str(tmp_path / "b.onnx")])
    assert refused.exit_code == 2 and not (tmp_path / "b.onnx").exists()
    assert "--max-accuracy-loss needs a run" in refused.output
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((calibration / "0").iterdir()) + sorted((calibration / "1").iterdir())[:2]:
        (few / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    # without a run there is no validation set, so a quarter of --calibration must be held out to judge the file
    result = runner.invoke(cli.app, ["export", "-b", "lenet5", "--no-pretrained", "--int8", "--calibration", str(few),
                                     "-o", str(tmp_path / "few.onnx")])
    assert result.exit_code == 2
    assert "--calibration: 5 usable images of distinct content; int8 needs at least 8" in result.output
    assert not (tmp_path / "few.onnx").exists()
