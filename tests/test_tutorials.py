"""The README's "From the tutorials" map: every command runs (offline variants where weights are missing), and the
CIFAR-10 ConvNet matches Keras's cifar10_cnn layer for layer."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from models.registry import get_backbone
from models.weights import build_architecture
from tests.conftest import digits_folder
from tests.test_finetune import random_weights_file

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--epochs-head", "1", "--epochs-finetune", "1", "--workers", "0", "-q"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- tutorials:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def keras_cifar10_cnn(size: int = 32, classes: int = 10) -> list[tuple[str, tuple, int]]:
    """(Keras name, output shape HxWxC, params) of cifar10_cnn, from its definition: 3x3 convolutions ('same' keeps
    the side, 'valid' takes 2 off), 2x2 max pooling (floor), dense layers; params = weights + biases."""
    layers, side, channels = [], size, 3
    plan = [("conv2d", 32, "same"), ("conv2d_1", 32, "valid"), ("max_pooling2d", None, None), ("dropout", None, None),
            ("conv2d_2", 64, "same"), ("conv2d_3", 64, "valid"), ("max_pooling2d_1", None, None),
            ("dropout_1", None, None)]
    for name, filters, padding in plan:
        params = 0
        if filters is not None:
            side = side if padding == "same" else side - 2
            params, channels = 3 * 3 * channels * filters + filters, filters
        elif name.startswith("max_pooling"):
            side //= 2
        layers.append((name, (side, side, channels), params))
    flat = side * side * channels
    layers += [("flatten", (flat,), 0), ("dense", (512,), flat * 512 + 512), ("dropout_2", (512,), 0),
               ("dense_1", (classes,), 512 * classes + classes)]
    return layers


def test_cifar_convnet_has_keras_shapes_and_parameter_counts(runner, tmp_path):
    expected = keras_cifar10_cnn()
    result = runner.invoke(cli.app, ["layers", "-b", "cifar_convnet", "--json", str(tmp_path / "l.json"), "-q"])
    assert result.exit_code == 0, result.output
    rows = {row["alias"]: row for row in json.loads((tmp_path / "l.json").read_text()) if row["alias"]}
    for name, shape, params in expected:
        ours = rows[name]["shape"]
        keras_order = tuple(ours[1:] + ours[:1]) if len(ours) == 3 else tuple(ours)  # CxHxW -> HxWxC
        assert keras_order == shape and rows[name]["params"] == params, name
    total = sum(params for _, _, params in expected)
    model = build_architecture(get_backbone("cifar_convnet"))
    assert total == sum(p.numel() for p in model.parameters()) == get_backbone("cifar_convnet").params
    assert rows["flatten"]["shape"] == [2304] and total == 1_250_858  # as Keras's model.summary() prints them


def _substitute(command: str, tmp: Path, photos: Path, data: Path) -> list[str]:
    """The README command with this test's folders, and the offline variant where it needs absent weights."""
    args = shlex.split(command)[1:]
    args = [str(photos) if a == "./photos" else str(data) if a == "./mydata" else a for a in args]
    args = [str(tmp / a) if re.match(r"^(runs/|seen/|[\w.]+\.(onnx|npy)$)", a) else a for a in args]
    args = [str(photos / "chelsea.jpg") if a == "cat.jpg" else a for a in args]
    if args[0] == "export" and "vgg16" in args:  # VGG16's ImageNet weights: the offline backbone's path instead
        args[args.index("vgg16")] = "efficientnet_lite0"
    if args[0] == "explain" and "vgg16" in args:  # random weights: the same layers, shapes and pictures
        args += ["--no-pretrained", "--input-size", "64", "-q"]
    if args[0] == "extract" and "vgg16" in args:
        args += ["--no-pretrained", "--input-size", "64", "--workers", "0", "-q"]
    if args[0] == "finetune":
        if "inception_v3" in args:  # pretrained path (head, then unfreeze) with a weights file, at its minimum size
            args += ["--weights", str(tmp / "inception_v3.pth"), "--input-size", "75"]
        if "alexnet" in args:
            args += ["--input-size", "64"]
        args += [*FAST] if "--resume" not in args else ["--workers", "0", "-q"]
    return args


def test_every_tutorial_command_runs(runner, tmp_path, photo_dir):
    commands = readme_commands()
    assert len(commands) == 10 and all(c.startswith("transfer ") for c in commands)
    data = digits_folder(tmp_path / "mydata", per_class=4, size=32, classes=2)
    random_weights_file(tmp_path, "inception_v3", size=75)  # a stand-in for ImageNet weights: inception_v3.pth
    for command in commands:
        args = _substitute(command, tmp_path, photo_dir, data)
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, f"{command}\n{args}\n{result.output}"
        if args[0] == "predict":
            assert re.search(r"(tabby|tiger cat|Egyptian cat)", result.output)
    assert (tmp_path / "seen" / "block1" / "kernels.png").is_file()
    assert len(list((tmp_path / "seen" / "block1" / "feature_maps").glob("*chelsea.png"))) == 1
    features = np.load(tmp_path / "block4_pool.npy")
    assert features.shape == (3, 512, 4, 4)  # 64 px input: block4_pool is 1/16 of it, 512 channels
    config = json.loads((tmp_path / "runs" / "inception" / "config.json").read_text())
    head, finetune = config["stages"]
    assert (head["name"], head["optimizer"]) == ("head", "rmsprop")
    assert (finetune["optimizer"], finetune["lr"], finetune["prefixes"]) == ("sgd", 1e-4, ["Mixed_7c", "Mixed_7b"])
    for run in ("lenet", "alexnet", "cifar", "cifar_aug"):
        stages = json.loads((tmp_path / "runs" / run / "config.json").read_text())["stages"]
        assert [s["name"] for s in stages] == ["scratch"], run
    cifar = json.loads((tmp_path / "runs" / "cifar" / "config.json").read_text())
    assert cifar["stages"][0]["optimizer"] == "rmsprop" and cifar["stages"][0]["lr"] == 1e-4
    assert cifar["settings"]["augment"] is False
    assert json.loads((tmp_path / "runs" / "cifar_aug" / "config.json").read_text())["settings"]["augment"] is True
    metrics = (tmp_path / "runs" / "cifar" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 7  # 1 + 1 epochs, resumed with --epochs-head 6: 6 + 1, each epoch once


@pytest.mark.parametrize("size", [32, 48])
def test_cifar_convnet_trains_at_its_size_and_others(size):
    model = build_architecture(get_backbone("cifar_convnet"))
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 10)
