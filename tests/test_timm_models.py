"""Any timm model is a backbone: one model per family people pick today, through finetune (staged unfreezing from
timm's own groups), extract at a feature_info layer, and export with verification, on tiny inputs.

No network here, so each model starts from random weights saved by the test (`--weights FILE`, the path a user with
a downloaded timm/HF file takes), with BatchNorm statistics set from a few batches so activations stay in range."""

from __future__ import annotations

import importlib
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import group_parameters

import cli
from exporters.export import export_onnx
from models.registry import get_backbone
from transfer.apps.extract import extract
from transfer.core.images import open_image
from transfer.core.preprocess import Preprocessing, eval_array
from transfer.training import FinetuneConfig, finetune
from transfer.training.checkpoints import load_checkpoint

FAMILIES = [  # (timm name, input side, ONNX opset: 18 is the dynamo exporter, 17 TorchScript's, the faster)
    ("convnext_atto", 32, 18),
    ("tf_efficientnetv2_b0", 64, 17),
    ("regnetx_002", 32, 17),
    ("mobilenetv3_small_050", 64, 17),
    pytest.param("deit_tiny_patch16_224", 32, 18, marks=pytest.mark.slow),  # slow (18 s): the ViT; layers in default
]


def saved_random_weights(name: str, size: int, folder, path) -> dict[str, torch.Tensor]:
    """A timm model's random weights with BatchNorm running statistics from the folder's images (as a pretrained
    net's are from its data, so activations stay in range), saved as safetensors; returns the state dict."""
    spec = get_backbone(name)
    model = timm.create_model(name, pretrained=False, **dict(spec.timm_kwargs))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the batches
    prep = replace(spec.preprocessing, input_size=size)
    images = np.stack([eval_array(open_image(path), prep) for path in sorted(folder.rglob("*.png"))])
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(images))
    state = {key: value.contiguous() for key, value in model.eval().state_dict().items()}
    save_file(state, str(path))
    return state


def timm_top_group(name: str) -> set[str]:
    """The parameters of timm's top coarse group (with the block below it when that group holds norms only)."""
    model = timm.create_model(name, pretrained=False, **dict(get_backbone(name).timm_kwargs))
    model.reset_classifier(0)
    groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    top = set(groups[-1])
    if all("norm" in parameter for parameter in top):
        top |= set(groups[-2])
    return top


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / label).mkdir()
        for index in range(6):
            pixels = rng.integers(0, 120, (40, 40, 3), dtype=np.uint8)
            pixels[..., channel] = 230
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


@pytest.mark.parametrize(("name", "size", "opset"), FAMILIES)
def test_a_timm_family_finetunes_extracts_and_exports(name, size, opset, colour_folder, tmp_path):
    spec = get_backbone(name)
    assert not spec.curated and spec.feature_layers and spec.unfreeze_groups
    weights = tmp_path / "weights.safetensors"
    initial = saved_random_weights(name, size, colour_folder, weights)

    config = FinetuneConfig(backbone=name, epochs_head=1, epochs_finetune=1, unfreeze="1", input_size=size,
                            weights=str(weights), workers=0, batch_size=4, augment=False, val_split=0.34)
    run = finetune(colour_folder, config, output=tmp_path / "run", device="cpu", log=lambda _: None)
    assert run.epochs_run == 2
    final = {key.removeprefix("backbone."): value
             for key, value in load_checkpoint(tmp_path / "run" / "last.ckpt")["model"].items()
             if key.startswith("backbone.")}
    changed = {key for key, value in final.items() if not torch.equal(value, initial[key])}
    trainable = timm_top_group(name)
    assert changed and changed <= trainable  # stage 2 trained timm's top group and nothing else
    assert len(changed) >= len(trainable) // 2

    layer = spec.feature_layers[len(spec.feature_layers) // 2]
    result = extract(colour_folder, backbone=name, weights=str(weights), layers=[layer], pool="none",
                     input_size=size, device="cpu", workers=0)
    reference = timm.create_model(name, pretrained=False, **dict(spec.timm_kwargs))
    reference.load_state_dict(initial)
    captured = []
    reference.get_submodule(layer).register_forward_hook(lambda _m, _i, output: captured.append(output.clone()))
    prep = Preprocessing.from_dict(result.metadata["preprocessing"])
    batch = np.stack([eval_array(open_image(path), prep) for path in result.paths])
    with torch.no_grad():
        reference.eval()(torch.from_numpy(batch))
    expected = captured[0].numpy()
    assert result.features[layer].shape == expected.shape
    assert np.allclose(result.features[layer], expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))

    record = export_onnx(tmp_path / "model.onnx", run=tmp_path / "run", opset=opset)
    assert record.checker.startswith("passed") and max(record.max_rel_diff.values()) <= record.tolerance
    assert record.output_shapes["logits"] == ["batch", 2]


def test_the_cli_takes_any_timm_name_and_lists_them(runner):
    listed = runner.invoke(cli.app, ["backbones", "--all", "convnext_at*"])
    assert listed.exit_code == 0 and "convnext_atto" in listed.output and "d2_in1k" in listed.output
    layers = runner.invoke(cli.app, ["layers", "-b", "deit_tiny_patch16_224", "--input-size", "32", "-q"],
                           terminal_width=200)
    assert layers.exit_code == 0 and "blocks.11" in layers.output and "feature layers" in layers.output
    odd = runner.invoke(cli.app, ["layers", "-b", "deit_tiny_patch16_224", "--input-size", "40"])
    assert odd.exit_code == 2 and "cannot run at 40 pixels" in odd.output and "patch size" in odd.output
    unknown = runner.invoke(cli.app, ["layers", "-b", "convnext_tiny.no_such_tag"])
    assert unknown.exit_code == 2 and "unknown backbone" in unknown.output and "convnext_tiny" in unknown.output
    tagged = get_backbone("convnext_tiny.fb_in22k")
    assert tagged.hf_hub_id == "timm/convnext_tiny.fb_in22k" and tagged.preprocessing.input_size == 224


def test_a_timm_model_offline_without_weights_names_the_flags(tmp_path, colour_folder, runner, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("models.weights._timm_cached_file", lambda _name: None)  # as on a machine without a cache
    result = runner.invoke(cli.app, ["extract", str(colour_folder), "-b", "regnetx_002", "--input-size", "32",
                                     "-o", str(tmp_path / "f.npz")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "regnetx_002" in result.output and "--weights" in result.output and "--no-pretrained" in result.output
    assert not (tmp_path / "f.npz").exists()


def test_what_the_zoo_found_is_handled(tmp_path):
    """Shapes of timm models the sweep met: several heads, misspelled or container feature layers, stages that return
    tuples, tied weights."""
    from torch import nn

    from models.layers import FeatureTap
    from models.timm_backbones import _classifier_path, _module_named
    from transfer.training.checkpoints import load_weights, save_weights

    assert _classifier_path(("head.0", "head.1")) == "head" and _classifier_path("head.fc") == "head.fc"
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)), nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])])
    modules = dict(model.named_modules())
    assert _module_named("block.0", modules) == "blocks.0"  # Twins' feature_info spelling
    assert _module_named("blocks.1", modules) == "blocks.1.1"  # a ModuleList never runs whole: its last member
    assert _module_named("nowhere", modules) is None

    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x * 3

    tapped = FeatureTap(nn.Sequential(Pair()), ["0"], stop_early=False)
    assert torch.equal(tapped(torch.ones(1, 2))[0], torch.full((1, 2), 2.0))

    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    save_weights(tied, tmp_path / "tied.safetensors")
    fresh = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    load_weights(fresh, tmp_path / "tied.safetensors")
    assert torch.equal(fresh[0].weight, tied[0].weight) and torch.equal(fresh[1].weight, tied[0].weight)
    assert set(load_file(str(tmp_path / "tied.safetensors"))) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_a_model_no_exporter_can_trace_is_refused_before_any_work(tmp_path, runner, monkeypatch):
    """CondConv builds a kernel per image (the sweep: both exporters fail deep inside): one line, exit 2, no model
    built, no file; a fine-tune of it says so up front."""
    def never(*_args, **_kwargs):
        raise AssertionError("the refusal must come before the model is built")

    monkeypatch.setattr("exporters.export.create_backbone", never)
    output = tmp_path / "cc.onnx"
    result = runner.invoke(cli.app, ["export", "-b", "efficientnet_cc_b0_8e", "--no-pretrained", "-o", str(output)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "efficientnet_cc_b0_8e cannot be exported to ONNX" in result.output and "CondConv" in result.output
    assert not output.exists() and list(tmp_path.iterdir()) == []
    assert get_backbone("efficientnet_cc_b0_8e").not_exportable and not get_backbone("convnext_atto").not_exportable

    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(importlib.import_module("transfer.training.finetune"), "Trainer", stop)
    said: list[str] = []
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(Stop):
        finetune(folder, FinetuneConfig(backbone="efficientnet_cc_b0_8e", input_size=64, pretrained=False),
                 output=tmp_path / "run", device="cpu", log=said.append)
    assert len(said) == 1 and said[0].startswith("note: efficientnet_cc_b0_8e cannot be exported to ONNX")
