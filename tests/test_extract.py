"""extract: values equal independent forward hooks, in-place guard, run directories, streaming, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

import cli
from tests.conftest import digits_folder
from tests.test_finetune import random_weights_file
from transfer.apps.extract import extract, load_features
from transfer.training import FinetuneConfig, finetune


def hooked(timm_name: str, weights, paths: list[str], photo_paths, size: int | None = None) -> dict[str, np.ndarray]:
    """Independent reference: plain timm model, plain forward hooks, timm's own eval transform."""
    model = timm.create_model(timm_name, pretrained=False)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    cfg = model.pretrained_cfg
    transform = create_transform(input_size=size or cfg["input_size"][-1], crop_pct=cfg["crop_pct"],
                                 interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photo_paths])
    captured = {}
    modules = dict(model.named_modules())
    def hook_for(path: str):
        def hook(_module, _inputs, out) -> None:  # returning None keeps the model's own output
            captured.setdefault(path, out.detach().clone())
        return hook

    handles = [modules[p].register_forward_hook(hook_for(p)) for p in paths]
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    return {p: captured[p].numpy() for p in paths}


def photo_files(photo_dir):
    return sorted(photo_dir.iterdir())


# slow (17 s): tests/test_trust.py checks every VGG16 alias against a hook
@pytest.mark.slow
def test_vgg16_block4_pool_equals_hook(tmp_path, photo_dir):
    weights = random_weights_file(tmp_path, "vgg16", size=64)
    expected = hooked("vgg16", weights, ["features.23"], photo_files(photo_dir))["features.23"]
    import transfer  # the notebook API: transfer.extract(...) returns arrays and paths

    result = transfer.extract(photo_dir, backbone="vgg16", layers=["block4_pool"], weights=weights, device="cpu",
                              workers=0)
    got = result.features["block4_pool"]
    assert got.shape == (3, 512, 14, 14)
    assert np.allclose(got, expected, atol=1e-5)
    assert [p.split("/")[-1] for p in result.paths] == ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    nhwc = extract(photo_dir, backbone="vgg16", layers=["block4_pool"], weights=weights, layout="nhwc",
                   device="cpu", workers=0).features["block4_pool"]
    assert nhwc.shape == (3, 14, 14, 512) and np.allclose(nhwc, expected.transpose(0, 2, 3, 1), atol=1e-5)


def test_inplace_relu_guard_returns_preactivation(tmp_path, photo_dir):
    weights = random_weights_file(tmp_path, "vgg16", size=64)
    got = extract(photo_dir, backbone="vgg16", layers=["features.21", "block4_conv2"], weights=weights,
                  device="cpu", workers=0).features
    model = timm.create_model("vgg16", pretrained=False)
    model.load_state_dict(torch.load(weights, weights_only=True))
    previous = torch.from_numpy(got["block4_conv2"])  # features.20 = ReLU output feeding features.21
    with torch.no_grad():
        conv = model.features[21](previous).numpy()
    assert (got["features.21"] < 0).any()
    assert np.allclose(got["features.21"], conv, atol=1e-4)


def test_inception_and_resnet_layers_equal_hooks(tmp_path, photo_dir):
    files = photo_files(photo_dir)
    weights = random_weights_file(tmp_path, "inception_v3", size=96)
    expected = hooked("inception_v3", weights, ["Mixed_6e"], files)["Mixed_6e"]
    got = extract(photo_dir, backbone="inception_v3", layers=["mixed7"], weights=weights, device="cpu",
                  workers=0).features["mixed7"]
    assert got.shape == (3, 768, 17, 17) and np.allclose(got, expected, atol=1e-4)
    weights = random_weights_file(tmp_path, "resnet50", size=64)
    expected = hooked("resnet50", weights, ["layer3.5", "layer2.3"], files)
    got = extract(photo_dir, backbone="resnet50", layers=["conv4_block6_out", "conv3_block4_out"], weights=weights,
                  device="cpu", workers=0).features
    assert got["conv4_block6_out"].shape == (3, 1024, 14, 14)
    assert np.allclose(got["conv4_block6_out"], expected["layer3.5"], atol=1e-4)
    assert np.allclose(got["conv3_block4_out"], expected["layer2.3"], atol=1e-4)


def test_run_directory_features_use_finetuned_weights(tmp_path):
    data = digits_folder(tmp_path / "d", per_class=6, size=32, classes=2)
    weights = random_weights_file(tmp_path, "resnet18", size=48)
    config = FinetuneConfig(backbone="resnet18", epochs_head=1, epochs_finetune=2, unfreeze="1", batch_size=4,
                            input_size=48, weights=str(weights), augment=False, workers=0, lr_finetune=0.05)
    finetune(data, config, output=tmp_path / "run", device="cpu", log=lambda _: None)
    layers = ["conv4_block2_out", "conv5_block2_out"]
    tuned = extract(data, layers=layers, run=tmp_path / "run", device="cpu", workers=0)
    base = extract(data, backbone="resnet18", layers=layers, weights=weights, input_size=48, device="cpu", workers=0)
    assert tuned.metadata["input_size"] == 48 and tuned.features["conv5_block2_out"].shape == (12, 512, 2, 2)
    assert tuned.labels == base.labels and tuned.classes == ["0", "1"]
    assert np.allclose(tuned.features["conv4_block2_out"], base.features["conv4_block2_out"], atol=1e-5)
    assert not np.allclose(tuned.features["conv5_block2_out"], base.features["conv5_block2_out"], atol=1e-3)


def test_cli_streams_npz_with_sidecar(tmp_path, photo_dir, runner):
    weights = random_weights_file(tmp_path, "resnet18", size=64)
    out = tmp_path / "feats.npz"
    result = runner.invoke(cli.app, ["extract", str(photo_dir), "--backbone", "resnet18", "--layer", "conv1_relu",
                                     "--layer", "avg_pool", "--weights", str(weights), "--pool", "max", "--output",
                                     str(out), "--batch-size", "2", "--workers", "0"])
    assert result.exit_code == 0, result.output
    arrays, meta = load_features(out)
    direct = extract(photo_dir, backbone="resnet18", layers=["conv1_relu"], weights=weights, pool="max",
                     device="cpu", workers=0).features["conv1_relu"]
    assert arrays["conv1_relu"].shape == (3, 64) and np.allclose(arrays["conv1_relu"], direct, atol=1e-6)
    assert arrays["avg_pool"].shape == (3, 512)
    assert meta["layers"] == {"conv1_relu": "act1", "avg_pool": "global_pool"} and meta["pool"] == "max"
    assert [p.rsplit("/", 1)[-1] for p in meta["paths"]] == ["chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert not list(tmp_path.glob(".*"))
    single = tmp_path / "one.npy"
    assert runner.invoke(cli.app, ["extract", str(photo_dir), "--backbone", "resnet18", "--layer", "pool1_pool",
                                   "--weights", str(weights), "--output", str(single), "--workers", "0"]).exit_code == 0
    assert np.load(single).shape == (3, 64, 56, 56)
    assert json.loads(single.with_suffix(".json").read_text())["shapes"]["pool1_pool"] == [3, 64, 56, 56]


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "block4_pol"], "block4_pool"),
    (["--layer", "block4_pool", "--pool", "median"], "--pool"),
])
def test_cli_bad_layer_or_flag(tmp_path, photo_dir, runner, args, message):
    result = runner.invoke(cli.app, ["extract", str(photo_dir), "-b", "vgg16", "--no-pretrained", "--output",
                                     str(tmp_path / "f.npy"), *args])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_missing_and_empty_folder(tmp_path, runner):
    missing = runner.invoke(cli.app, ["extract", str(tmp_path / "nope"), "--no-pretrained"])
    assert missing.exit_code == 2 and "not found" in missing.output
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    empty = runner.invoke(cli.app, ["extract", str(tmp_path / "empty"), "--no-pretrained",
                                    "--output", str(tmp_path / "f.npy")])
    assert empty.exit_code == 2 and "no usable images" in empty.output
