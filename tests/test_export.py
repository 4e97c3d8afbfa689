"""export: self-describing ONNX verified against PyTorch; checked here with plain onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import cli
from exporters.export import export_onnx
from tests.conftest import digits_folder, held_out_by_content
from tests.test_finetune import random_weights_file
from transfer.apps.extract import extract
from transfer.core.preprocess import Preprocessing, eval_array
from transfer.training import FinetuneConfig, finetune, load_run

PLAIN_ORT = r'''
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image
for banned in ("torch", "timm", "transfer", "models", "exporters"):
    sys.modules[banned] = None
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
size, resize = int(meta["transfer.input_size"]), int(meta["transfer.resize"])
mean, std = np.array(json.loads(meta["transfer.mean"])), np.array(json.loads(meta["transfer.std"]))
classes = json.loads(meta["transfer.classes"])
filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
out = {}
for path in sys.argv[2:]:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize),
                         filters[meta["transfer.interpolation"]])
    left, top = round((image.width - size) / 2), round((image.height - size) / 2)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
    x = ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    index = int(session.run(["logits"], {"input": x})[0].argmax())
    out[path] = [index, classes[index]]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def imagenet_onnx(imagenet_lite0_onnx):
    return imagenet_lite0_onnx  # shared with the other test files (conftest: exported once per worker)


def test_imagenet_classifier_runs_with_plain_onnxruntime(imagenet_onnx, photo_dir, tmp_path):
    path, record = imagenet_onnx
    assert record.checker == "passed (full check)" and record.max_rel_diff["logits"] <= 1e-4
    assert record.batch_sizes_checked == [1, 3] and record.dynamic_axes["input"] == {0: "batch"}
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_ORT)
    chelsea, coffee = photo_dir / "chelsea.jpg", photo_dir / "coffee.jpg"
    result = subprocess.run([sys.executable, str(script), str(path), str(chelsea), str(coffee)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert 281 <= found[str(chelsea)][0] <= 285 and "cat" in found[str(chelsea)][1]
    assert found[str(coffee)][0] in (967, 968) and ("espresso" in found[str(coffee)][1]
                                                     or "cup" in found[str(coffee)][1])


def test_metadata_has_every_design_key(imagenet_onnx):
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(imagenet_onnx[0])).metadata_props}
    for key in ("classes", "input_size", "resize", "crop", "interpolation", "mean", "std", "layout", "backbone",
                "layers", "output_kind", "version"):
        assert f"transfer.{key}" in meta, key
    assert meta["transfer.output_kind"] == "logits" and meta["transfer.mean"] == "[0.5, 0.5, 0.5]"
    assert meta["transfer.resize"] == "256" and meta["transfer.crop"] == "224"
    assert len(json.loads(meta["transfer.classes"])) == 1000


def test_preprocessing_in_the_graph_matches_the_python_path(imagenet_onnx, photos, tmp_path):
    """--embed-preprocessing: decoded uint8 RGB of any size in; resize, crop and normalization in the graph. Same
    top-1 as the Python path on real photos of several sizes and aspect ratios, through plain onnxruntime, our
    runtime and the embed example; logits within the stated tolerance."""
    import onnx

    from exporters.runtime import OnnxModel
    from exporters.verify import IN_GRAPH_TOLERANCE

    path, _ = imagenet_onnx
    embedded = tmp_path / "embedded.onnx"
    record = export_onnx(embedded, backbone="efficientnet_lite0", embed_preprocessing=True)
    assert record.input_dtype == "uint8" and record.input_shape == ["batch", "height", "width", 3]
    check = record.preprocessing_in_graph
    assert check["max_rel_diff"] <= IN_GRAPH_TOLERANCE["fp32"] and check["same_top1"] == "8/8"
    assert "451x300" in check["images"]  # chelsea at its own size
    meta = {p.key: p.value for p in onnx.load(str(embedded)).metadata_props}
    assert meta["transfer.layout"] == "NHWC_uint8_any"
    prep = Preprocessing(224, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)
    plain, python_path = ort.InferenceSession(str(embedded)), ort.InferenceSession(str(path))
    files, worst = [], 0.0
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        for size in (None, (333, 517), (640, 360)):
            image = Image.fromarray(photos[name])
            image = image if size is None else image.resize(size, Image.BICUBIC)
            a = plain.run(["logits"], {"input": np.asarray(image)[None]})[0]
            b = python_path.run(["logits"], {"input": eval_array(image, prep)[None]})[0]
            assert a.argmax() == b.argmax(), (name, image.size)
            worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
            files.append(tmp_path / f"{name}_{image.width}x{image.height}.png")
            image.save(files[-1])
    assert worst <= IN_GRAPH_TOLERANCE["fp32"]
    ours = OnnxModel(embedded, device="cpu").predict(files, top_k=1, batch_size=4)
    reference = OnnxModel(path, device="cpu").predict(files, top_k=1, batch_size=4)
    assert [p.labels for p in ours] == [p.labels for p in reference] and not any(p.error for p in ours)
    assert [p.probabilities[0] for p in ours] == pytest.approx([p.probabilities[0] for p in reference], abs=0.02)
    same_size = [Image.fromarray(photos[n]).resize((300, 200)) for n in ("chelsea", "coffee")]
    batch = plain.run(["logits"], {"input": np.stack([np.asarray(i) for i in same_size])})[0]
    one_by_one = np.concatenate([plain.run(["logits"], {"input": np.asarray(i)[None]})[0] for i in same_size])
    assert np.abs(batch - one_by_one).max() <= 1e-4 * np.abs(one_by_one).max()
    embed_app = subprocess.run([sys.executable, "examples/embed_app.py", str(embedded), *map(str, files[:3])],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert embed_app.returncode == 0, embed_app.stderr
    assert [line.split("\t")[1] for line in embed_app.stdout.splitlines()] == [p.labels[0] for p in reference[:3]]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data = digits_folder(root / "digits", per_class=12, size=32, classes=4)
    weights = random_weights_file(root, "resnet18", size=48)
    config = FinetuneConfig(backbone="resnet18", epochs_head=2, epochs_finetune=1, batch_size=8, input_size=48,
                            weights=str(weights), augment=False, workers=0, lr_finetune=0.01)
    finetune(data, config, output=root / "run", device="cpu", log=lambda _: None)
    return root / "run", data


def test_run_classifier_agrees_with_pytorch_on_validation(small_run, tmp_path):
    run_dir, data = small_run
    path = tmp_path / "run.onnx"
    record = export_onnx(path, run=run_dir)
    assert "validation" in record.verify_images
    model, config = load_run(run_dir)
    from exporters.run_data import run_validation_images

    val = run_validation_images(config)
    prep = Preprocessing.from_dict(config["preprocessing"])
    x = np.stack([eval_array(Image.open(p).convert("RGB"), prep) for p in val])
    ours = ort.InferenceSession(str(path)).run(["logits"], {"input": x})[0]
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    assert len(val) == 8 and (ours.argmax(1) == reference.argmax(1)).all()
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    meta = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    assert json.loads(meta["transfer.classes"]) == ["0", "1", "2", "3"] and meta["transfer.input_size"] == "48"


# slow (25 s): tests/test_cli.py's int8 test covers the record in the default suite
@pytest.mark.slow
def test_int8_trained_run_keeps_top1_and_shrinks(tmp_path):
    """LeNet-5 trained on all 1,797 digits (~98% val), int8 calibrated on 100 training images."""
    from transfer.data.samples import write_digits_folder

    data = write_digits_folder(tmp_path / "digits", size=32)
    calibration = write_digits_folder(tmp_path / "calibration", per_class=10, size=32)
    config = FinetuneConfig(backbone="lenet5", epochs_head=10, epochs_finetune=0, augment=False, lr_head=3e-3,
                            workers=0, batch_size=64)
    result = finetune(data, config, output=tmp_path / "run", device="cpu", log=lambda _: None)
    record = export_onnx(tmp_path / "int8.onnx", run=tmp_path / "run", int8=True, calibration=calibration)
    ratio = record.fp32_size_bytes / record.size_bytes
    print(f"lenet5 val acc {result.best_val_acc:.4f}; int8 agreement {record.top1_agreement:.4f} on "
          f"{record.agreement_images}, {ratio:.2f}x smaller")
    held_out = held_out_by_content(data, calibration)  # the calibration digits are copies of some validation ones
    assert held_out < 359
    assert record.agreement_images == (f"{held_out} validation images of the run (none used for calibration, "
                                       "compared by content)")
    assert record.top1_agreement >= 0.98 and record.int8.logit_cosine >= 0.99 and ratio >= 3
    assert record.int8.speedup > 0 and record.int8.calibration_images == 100
    # calibrating on the run's own data leaves no unseen validation image: a quarter of it is held out instead
    again = export_onnx(tmp_path / "int8b.onnx", run=tmp_path / "run", int8=True, calibration=data)
    assert again.agreement_images.startswith("449 held-out calibration images")
    assert again.int8.calibration_images == 1348
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in __import__("onnx").load(
        str(tmp_path / "int8.onnx")).graph.node)
    assert session.get_modelmeta().custom_metadata_map["transfer.precision"] == "int8"


# slow (23 s): VGG16 export at full size; every alias is checked in the default suite
@pytest.mark.slow
def test_vgg16_block4_pool_extractor_any_batch(tmp_path, photos, photo_dir):
    weights = random_weights_file(tmp_path, "vgg16", size=64)
    path = tmp_path / "vgg.onnx"
    record = export_onnx(path, backbone="vgg16", weights=weights, layers=["block4_pool"])
    assert record.output_names == ["block4_pool"] and record.output_shapes["block4_pool"] == ["batch", 512, 14, 14]
    reference = extract(photo_dir, backbone="vgg16", layers=["block4_pool"], weights=weights, device="cpu",
                        workers=0)
    prep = Preprocessing(224, 0.875, "bilinear")
    rows = np.stack([eval_array(Image.open(p).convert("RGB"), prep) for p in reference.paths])
    session = ort.InferenceSession(str(path))
    for n in (1, 3, 8):
        batch = np.concatenate([rows] * 3)[:n]
        out = session.run(["block4_pool"], {"input": batch})[0]
        assert out.shape == (n, 512, 14, 14)
        expected = np.concatenate([reference.features["block4_pool"]] * 3)[:n]
        assert np.abs(out - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    via_onnx = extract(photo_dir, layers=["block4_pool"], onnx=path, device="cpu").features["block4_pool"]
    assert via_onnx.shape == (3, 512, 14, 14)
    assert np.abs(via_onnx - reference.features["block4_pool"]).max() <= 1e-4 * np.abs(via_onnx).max()


def test_forced_tolerance_failure_leaves_no_file(small_run, tmp_path, runner, monkeypatch):
    run_dir, _ = small_run
    real_export = torch.onnx.export

    def perturbed_export(model, args, f, **kwargs):  # the ONNX graph gets slightly different weights
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        try:
            return real_export(model, args, f, **kwargs)
        finally:
            model.load_state_dict(saved)

    monkeypatch.setattr(torch.onnx, "export", perturbed_export)
    output = tmp_path / "bad.onnx"
    result = runner.invoke(cli.app, ["export", "--run", str(run_dir), "--output", str(output)])
    assert result.exit_code == 1, result.output
    assert "verification failed" in result.output
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_export_cli_record_and_bad_input(small_run, tmp_path, runner):
    run_dir, _ = small_run
    result = runner.invoke(cli.app, ["export", "--run", str(run_dir), "-o", str(tmp_path / "m.onnx"), "--json",
                                     str(tmp_path / "record.json")])
    assert result.exit_code == 0, result.output
    assert "onnx.checker: passed" in result.output and "max difference vs PyTorch" in result.output
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["output_names"] == ["logits"] and record["output_shapes"]["logits"] == ["batch", 4]
    bad_layer = runner.invoke(cli.app, ["export", "--run", str(run_dir), "-o", str(tmp_path / "x.onnx"), "--layer",
                                        "conv5_block2_ou"])
    assert bad_layer.exit_code == 2 and "conv5_block2_out" in bad_layer.output
    bad_name = runner.invoke(cli.app, ["export", "--run", str(run_dir), "-o", str(tmp_path / "x.txt")])
    assert bad_name.exit_code == 2 and ".onnx" in bad_name.output


def test_fp16_export_halves_the_file_and_stays_close(small_run, tmp_path):
    run_dir, _ = small_run
    full = export_onnx(tmp_path / "fp32.onnx", run=run_dir)
    half = export_onnx(tmp_path / "fp16.onnx", run=run_dir, fp16=True)
    assert half.precision == "fp16" and half.input_dtype == "float32"
    assert half.max_rel_diff["logits"] <= 3e-2
    assert 1.8 <= full.size_bytes / half.size_bytes <= 2.2
    session = ort.InferenceSession(str(tmp_path / "fp16.onnx"))
    assert session.get_outputs()[0].type == "tensor(float)"


def test_int8_keeps_same_padding_arithmetic_in_float(imagenet_onnx, tmp_path):
    """In a TorchScript export (opset < 18) efficientnet's TF-'SAME' padding is computed from Shape at run time;
    quantizing that arithmetic changed the spatial sizes (7x7 became 6x6). The quantizer must leave it alone.
    The dynamo export (the default) folds the padding into constants."""
    import onnx

    from exporters.int8 import shape_arithmetic_nodes

    dynamo = onnx.load(str(imagenet_onnx[0]))
    assert imagenet_onnx[1].exporter == "dynamo" and not shape_arithmetic_nodes(dynamo)
    record = export_onnx(tmp_path / "ts.onnx", backbone="efficientnet_lite0", opset=17)
    assert record.exporter == "torchscript"
    model = onnx.load(str(tmp_path / "ts.onnx"))
    excluded = set(shape_arithmetic_nodes(model))
    by_output = {out: node for node in model.graph.node for out in node.output}
    pads = [node for node in model.graph.node if node.op_type == "Pad"]
    assert pads and all(by_output[pad.input[1]].name in excluded for pad in pads)
    kinds = {node.op_type for node in model.graph.node if node.name in excluded}
    assert "Shape" in kinds and not kinds & {"Conv", "Pad", "Gemm"}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vgg16", "inception_v3", "resnet18", "resnet34", "resnet50", "resnet101",
                                      "resnet152", "efficientnet_lite0", "alexnet", "lenet5", "cifar_convnet"])
def test_every_registry_backbone_exports_with_dynamo(backbone, tmp_path):
    """The maintained exporter passes the same verification (checker, 1e-4 relative at batch 1 and 3) for every
    registry backbone, as a classifier and as an extractor of its feature layer."""
    from models.registry import get_backbone

    spec = get_backbone(backbone)
    classifier = export_onnx(tmp_path / "c.onnx", backbone=backbone, pretrained=False)
    extractor = export_onnx(tmp_path / "f.onnx", backbone=backbone, pretrained=False, layers=[spec.feature_layer])
    for record in (classifier, extractor):
        assert record.exporter == "dynamo" and record.checker == "passed (full check)"
        assert record.batch_sizes_checked == [1, 3] and max(record.max_rel_diff.values()) <= 1e-4
