"""Foundation: registry, Keras layer names from real forward passes, name suggestions, weight resolution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from models.imagenet import imagenet_labels
from models.layers import describe_layers, resolve_layer
from models.registry import BACKBONES, get_backbone
from models.weights import build_architecture, create_backbone, load_state_dict_file
from transfer.core.errors import UnknownNameError, WeightsError
from transfer.core.preprocess import eval_array

ROOT = Path(__file__).resolve().parents[1]


def rows_by_alias(name: str, size: int | None = None) -> dict:
    spec = get_backbone(name)
    rows = describe_layers(spec, build_architecture(spec), size or spec.input_size)
    return {row.alias: row for row in rows if row.alias}


def test_registry_has_the_design_backbones():
    expected = {"vgg16", "inception_v3", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "efficientnet_lite0", "alexnet", "lenet5"}
    assert expected <= set(BACKBONES)
    assert get_backbone("inception_v3").input_size == 299
    assert [g.name for g in get_backbone("inception_v3").unfreeze_groups[:2]] == ["Mixed_7c", "Mixed_7b"]
    assert get_backbone("efficientnet_lite0").preprocessing.mean == (0.5, 0.5, 0.5)


def test_vgg16_layers_cli_shows_block4_pool_and_fc1(runner):
    result = runner.invoke(cli.app, ["layers", "--backbone", "vgg16"])
    assert result.exit_code == 0, result.output
    line = next(li for li in result.output.splitlines() if "block4_pool" in li)
    assert "features.23" in line and "512x14x14" in line
    fc1 = next(li for li in result.output.splitlines() if " fc1 " in li)
    assert "pre_logits.act1" in fc1 and "│ 4096 " in fc1  # a vector, as Keras shows Dense layers


def test_inception_v3_mixed_blocks_shapes_from_forward():
    rows = rows_by_alias("inception_v3")
    assert rows["mixed7"].path == "Mixed_6e" and rows["mixed7"].shape == (768, 17, 17)
    assert rows["mixed10"].path == "Mixed_7c" and rows["mixed10"].shape == (2048, 8, 8)
    assert rows["mixed10"].group == "1:Mixed_7c"


def test_resnet_keras_names():
    rows = rows_by_alias("resnet50")
    assert rows["conv4_block6_out"].path == "layer3.5" and rows["conv4_block6_out"].shape == (1024, 14, 14)
    assert rows["conv1_relu"].shape == (64, 112, 112)
    assert resolve_layer(get_backbone("resnet101"), "conv4_block23_out") == "layer3.22"


def test_shapes_follow_input_size():
    rows = rows_by_alias("vgg16", size=128)
    assert rows["block4_pool"].shape == (512, 8, 8)


def test_unknown_backbone_cli_suggests(runner):
    result = runner.invoke(cli.app, ["layers", "--backbone", "vgg17"])
    assert result.exit_code == 2
    assert "unknown backbone 'vgg17'" in result.output and "'vgg16'" in result.output
    assert "Traceback" not in result.output


def test_unknown_layer_api_and_cli_suggest(runner):
    with pytest.raises(UnknownNameError) as info:
        resolve_layer(get_backbone("vgg16"), "block4_pol")
    assert info.value.suggestions[0] == "block4_pool"
    result = runner.invoke(cli.app, ["layers", "--backbone", "vgg16", "--layer", "block4_pol"])
    assert result.exit_code == 2
    assert "block4_pool" in result.output and len(result.output.strip().splitlines()) == 1


def test_raw_module_path_accepted():
    assert resolve_layer(get_backbone("vgg16"), "features.21") == "features.21"


def test_efficientnet_lite0_packaged_weights_call_chelsea_a_cat(photos):
    spec = get_backbone("efficientnet_lite0")
    model, source = create_backbone(spec)
    assert "package" in source
    model.eval()
    x = torch.from_numpy(eval_array(Image.fromarray(photos["chelsea"]), spec.preprocessing))[None]
    with torch.no_grad():
        top1 = int(model(x).argmax(1))
    label = imagenet_labels()[top1]
    print(f"chelsea -> {top1} {label}")
    assert 281 <= top1 <= 285 and "cat" in label


def test_weights_file_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    spec = get_backbone("lenet5")
    reference = build_architecture(spec).state_dict()
    path = tmp_path / "lenet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.items()}, str(path))
    model, source = create_backbone(spec, weights=path)
    assert str(path) in source
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


class Payload:  # a custom object pickled into a checkpoint: must never be unpickled
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_custom_object_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": Payload()}, path)
    with pytest.raises(WeightsError, match="refused to load"):
        load_state_dict_file(path)


def test_mismatched_weights_named(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="do not fit"):
        create_backbone(get_backbone("lenet5"), weights=path)


def test_no_weights_offline_names_the_flags(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "t")}
    code = ("from models.registry import get_backbone; from models.weights import create_backbone; "
            "create_backbone(get_backbone('resnet50'))")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--weights" in result.stderr and "--no-pretrained" in result.stderr


def test_classic_nets_have_no_pretrained_but_train_from_scratch_explicitly():
    spec = get_backbone("alexnet")
    with pytest.raises(WeightsError, match="--no-pretrained"):
        create_backbone(spec, pretrained=True)
    model, source = create_backbone(spec)
    assert "random init" in source
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


def test_backbones_command_lists_availability(runner):
    result = runner.invoke(cli.app, ["backbones"])
    assert result.exit_code == 0
    line = next(li for li in result.output.splitlines() if "efficientnet_lite0" in li)
    assert "tf_efficientnet_lite0" in line and "yes" in line
    assert np.isclose(float(next(li for li in result.output.splitlines() if " vgg16 " in li)
                            .split("│")[4].strip().rstrip("M")), 138.4, atol=0.1)
