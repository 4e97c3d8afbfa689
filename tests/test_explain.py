"""explain and CAM: kernels and feature maps against an independent hook, the ONNX CAM against an independent CAM,
heatmaps that point at the object, multi-label heatmaps that follow the thresholds, and the CLI's errors."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import cli
from tests.conftest import one_line_error
from tests.test_finetune import random_weights_file
from transfer.core.heatmaps import crop_box, peak_and_box
from transfer.core.preprocess import Preprocessing, eval_array


def _resnet18(weights) -> torch.nn.Module:
    model = timm.create_model("resnet18", pretrained=False)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def test_kernels_and_feature_maps_equal_an_independent_forward_hook(tmp_path, photo_dir):
    """The kernels drawn are the first convolution's weights; each feature-map row is what a plain forward hook
    on that module returns (act1 is an in-place ReLU: the hook clones at once); the channels drawn are the most
    active by mean, the same indices on rows of equal width; the pictures are on disk."""
    from transfer.apps.explain import explain

    weights = random_weights_file(tmp_path, "resnet18", size=64)
    result = explain([str(photo_dir / "chelsea.jpg")], tmp_path / "out", backbone="resnet18", weights=weights,
                     input_size=64, kernels=True, layers=["conv1", "act1", "maxpool"])
    model = _resnet18(weights)
    assert result.kernels[0] == "conv1"
    np.testing.assert_array_equal(result.kernels[1], model.conv1.weight.detach().numpy())
    captured = {}
    for name in ("conv1", "act1", "maxpool"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone()))
    prep = Preprocessing(**_prep_of("resnet18", 64))
    with torch.no_grad():
        model(torch.from_numpy(eval_array(Image.open(photo_dir / "chelsea.jpg").convert("RGB"), prep))[None])
    record = result.maps[0]
    for name, array in zip(("conv1", "act1", "maxpool"), record["arrays"], strict=True):
        np.testing.assert_allclose(array, captured[name][0].numpy(), rtol=1e-5, atol=1e-6)
    assert (record["arrays"][1] >= 0).all() and (record["arrays"][0] < 0).any()  # the ReLU's output, not the conv's
    expected = [int(i) for i in np.argsort(-record["arrays"][0].mean(axis=(1, 2)), kind="stable")[:16]]
    assert [layer["channels"] for layer in record["layers"]] == [expected] * 3
    assert (tmp_path / "out" / "kernels.png").stat().st_size > 10_000
    assert Image.open(record["file"]).size[0] > 1000


def _prep_of(name: str, size: int) -> dict:
    from dataclasses import asdict, replace

    from models.registry import get_backbone

    return asdict(replace(get_backbone(name).preprocessing, input_size=size))


def test_onnx_cam_equals_an_independent_cam_and_predict_draws_its_peak(tmp_path, photo_dir, runner):
    """export --cam: the `cam` output equals the CAM computed here from the PyTorch model's last feature map and
    its fc row (relative 1e-4), for every class; the logits are unchanged; predict --cam writes overlays and
    heatmaps.json whose peaks are the middle of the map's flat top carried back to the image's pixels."""
    weights = random_weights_file(tmp_path, "resnet18", size=64)
    onnx_path = tmp_path / "cam.onnx"
    result = runner.invoke(cli.app, ["export", "-b", "resnet18", "--weights", str(weights), "--input-size", "64",
                                     "--cam", "--cam-classes", "all", "-o", str(onnx_path), "-q"])
    assert result.exit_code == 0, result.output
    assert "cam: the all class activation map(s)" in result.output
    assert "max difference vs PyTorch (cam" in result.output
    model = _resnet18(weights)
    prep = Preprocessing(**_prep_of("resnet18", 64))
    batch = np.stack([eval_array(Image.open(p).convert("RGB"), prep) for p in sorted(photo_dir.iterdir())])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, cam = session.run(["logits", "cam"], {"input": batch})
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(batch))
        reference_logits = model(torch.from_numpy(batch)).numpy()
    weight, bias = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    maps = np.einsum("kc,bchw->bkhw", weight, features.numpy()) + bias[None, :, None, None]
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), reference_logits, rtol=1e-4, atol=1e-4)  # CAM is exact
    expected = F.interpolate(torch.from_numpy(maps), size=(64, 64), mode="bilinear", align_corners=False).numpy()
    assert cam.shape == (3, 1000, 64, 64)
    assert np.abs(cam - expected).max() / np.abs(expected).max() < 1e-4
    assert np.abs(logits - reference_logits).max() / np.abs(reference_logits).max() < 1e-4

    top = tmp_path / "top.onnx"
    assert runner.invoke(cli.app, ["export", "-b", "resnet18", "--weights", str(weights), "--input-size", "64",
                                   "--cam", "-o", str(top), "-q"]).exit_code == 0
    top_logits, top_cam = ort.InferenceSession(str(top), providers=["CPUExecutionProvider"]).run(
        ["logits", "cam"], {"input": batch})
    assert top_cam.shape == (3, 1, 64, 64)
    for row in range(3):
        np.testing.assert_allclose(top_cam[row, 0], expected[row, top_logits[row].argmax()], rtol=1e-3, atol=1e-4)

    drawn = tmp_path / "drawn"
    result = runner.invoke(cli.app, ["predict", str(photo_dir), "--onnx", str(top), "--cam", str(drawn), "-q",
                                     "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert f"wrote 3 heatmap(s) of 3 image(s) to {drawn}" in result.output
    records = json.loads((drawn / "heatmaps.json").read_text())["images"]
    assert json.loads((tmp_path / "p.json").read_text())["cam"] == records
    for record, row in zip(records, range(3), strict=True):
        width, height = Image.open(record["path"]).size
        x0, y0, x1, y1 = crop_box(width, height, prep)
        heat = top_cam[row, 0]
        top_rows, top_cols = np.nonzero(heat >= heat.max() - 1e-6 * (heat.max() - heat.min()))  # the flat top
        peak_row, peak_col = top_rows.mean(), top_cols.mean()  # a 2x2 map upsampled: a corner block, its middle
        assert record["classes"][0]["peak"] == pytest.approx(
            [x0 + (peak_col + 0.5) * (x1 - x0) / 64, y0 + (peak_row + 0.5) * (y1 - y0) / 64], abs=0.06)
        assert Image.open(record["files"][0]).size == (width, height)


def test_crop_box_matches_the_evaluation_crop_and_the_box_surrounds_the_peak():
    """crop_box is where eval_array's centre crop lies in the original image: a marker pixel drawn at the box's
    centre lands at the crop's centre; peak_and_box's box holds the peak and only the strong region."""
    prep = Preprocessing(32, 0.875, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    for width, height in ((120, 60), (50, 100), (64, 64)):
        x0, y0, x1, y1 = crop_box(width, height, prep)
        assert (x1 - x0) == pytest.approx(y1 - y0, rel=0.05) and x0 >= 0 and x1 <= width and y1 <= height
        pixels = np.zeros((height, width, 3), np.uint8)
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        pixels[cy - 2:cy + 3, cx - 2:cx + 3] = 255
        crop = eval_array(Image.fromarray(pixels), prep)[0]
        row, col = np.unravel_index(crop.argmax(), crop.shape)
        assert abs(row - 16) <= 2 and abs(col - 16) <= 2, (width, height, row, col)
    heat = np.zeros((10, 10))
    heat[2:4, 6:9] = 1.0
    heat[8, 0] = 0.9  # strong but apart: not in the peak's region
    heat[3, 7] = 2.0
    found = peak_and_box(heat, (0, 0, 100, 100))
    assert found["peak"] == [75.0, 35.0] and found["box"] == [60.0, 20.0, 90.0, 40.0]


def _composite(photo: np.ndarray, rng: np.random.Generator, canvas: int = 320, side: int = 150):
    """A crop of `photo` pasted at a random place on a plain grey canvas; returns the image and the pasted box."""
    height, width = photo.shape[:2]
    top, left = rng.integers(0, height - side), rng.integers(0, width - side)
    piece = Image.fromarray(photo[top:top + side, left:left + side])
    image = Image.new("RGB", (canvas, canvas), (128, 128, 128))
    x, y = int(rng.integers(0, canvas - side)), int(rng.integers(0, canvas - side))
    image.paste(piece, (x, y))
    return image, (x, y, x + side, y + side)


def test_explain_heatmap_points_at_the_pasted_photo_and_the_cli_reports_it(tmp_path, photos, runner):
    """The pointing game in small: a crop of the cat photo pasted at a random place on a grey canvas; the ImageNet
    classifier's heatmap peak (Grad-CAM, `explain`) falls inside the pasted box on every composite, and --json
    records it in the image's pixels (a chance peak would land in the box 22% of the time). A file that is not an
    image is skipped and named."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "composites"
    folder.mkdir()
    boxes = {}
    for index in range(3):
        image, box = _composite(photos["chelsea"][40:260, 80:330], rng)
        image.save(folder / f"c{index}.png")
        boxes[str(folder / f"c{index}.png")] = box
    (folder / "notes.png").write_text("not an image")
    out = tmp_path / "seen"
    result = runner.invoke(cli.app, ["explain", str(folder), "-b", "efficientnet_lite0", "-o", str(out), "-q",
                                     "--json", str(tmp_path / "h.json")])
    assert result.exit_code == 0, result.output
    assert "heatmaps: gradcam on forward_features (CNN) for 3 image(s)" in result.output
    assert f"skipped {folder / 'notes.png'}: not an image" in result.output
    record = json.loads((tmp_path / "h.json").read_text())
    assert record["method"] == "gradcam" and record["family"] == "CNN"
    for item in record["images"]:
        x0, y0, x1, y1 = boxes[item["path"]]
        px, py = item["classes"][0]["peak"]
        assert x0 <= px <= x1 and y0 <= py <= y1, (item, boxes[item["path"]])
    assert len(list((out / "heatmaps").glob("0*.png"))) == 3 and (out / "heatmaps" / "contact_sheet.png").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["-b", "resnet18", "--no-pretrained", "--layer", "blokc4_pool"], "unknown layer for resnet18 'blokc4_pool'"),
    (["-b", "resnet18", "--no-pretrained", "--class", "zebra-ish"], "unknown class 'zebra-ish'"),
    ([], "explain needs one model"),
    (["-b", "resnet18", "--no-pretrained", "--method", "magic"], "Invalid value for '--method'"),
])
def test_explain_cli_errors_are_one_line(tmp_path, photo_dir, runner, args, message):
    result = runner.invoke(cli.app, ["explain", str(photo_dir), "-o", str(tmp_path / "o"), *args])
    assert message in one_line_error(result), result.output


def test_cam_is_refused_where_it_is_not_exact_and_explain_onnx_needs_it(tmp_path, photo_dir, runner,
                                                                        imagenet_lite0_onnx):
    """VGG's classifier has two dense layers before its last: no exact CAM, one line naming explain. A file
    exported without --cam: explain --onnx and predict --cam say how to get one."""
    result = runner.invoke(cli.app, ["export", "-b", "vgg11", "--no-pretrained", "--input-size", "64", "--cam",
                                     "-o", str(tmp_path / "v.onnx")])
    assert "CAM would not be exact: use `transfer explain`" in one_line_error(result), result.output
    assert not (tmp_path / "v.onnx").exists()
    plain, _ = imagenet_lite0_onnx
    for command in (["explain", str(photo_dir), "--onnx", str(plain)],
                    ["predict", str(photo_dir), "--onnx", str(plain), "--cam", str(tmp_path / "d")]):
        result = runner.invoke(cli.app, command)
        assert "has no class activation map: export it with `transfer export ... --cam`" in one_line_error(result)


def test_multilabel_heatmaps_follow_the_thresholds_and_an_mlp_head_is_refused(tmp_path, runner):
    """A multi-label run with a linear head: its file carries every label's map (`all`), and predict --cam and
    explain draw one heatmap per label at or over its threshold (the most probable when none is), computed here
    from the file's own logits and thresholds. The same data with the default MLP head: --cam refused, naming
    explain."""
    from transfer.data.samples import write_digit_pairs

    pairs = write_digit_pairs(tmp_path / "pairs", count=48, classes=3, size=64)
    weights = random_weights_file(tmp_path, "resnet18", size=64)
    common = [str(pairs / "images"), "--labels", str(pairs / "labels.csv"), "--multi-label", "-b", "resnet18",
              "--weights", str(weights), "--input-size", "64", "--epochs-head", "1", "--epochs-finetune", "0",
              "--batch-size", "8", "--workers", "0", "--device", "cpu", "-q"]
    for head in ("linear", "mlp"):
        result = runner.invoke(cli.app, ["finetune", *common, "--head", head, "-o", str(tmp_path / head)])
        assert result.exit_code == 0, result.output
    refused = runner.invoke(cli.app, ["export", "--run", str(tmp_path / "mlp"), "--cam", "-o",
                                      str(tmp_path / "m.onnx")])
    assert "this run has a 2-layer head" in one_line_error(refused) and "transfer explain --run" in refused.output

    onnx_path = tmp_path / "ml.onnx"
    result = runner.invoke(cli.app, ["export", "--run", str(tmp_path / "linear"), "--cam", "-o", str(onnx_path), "-q"])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["transfer.cam"] == "all"
    thresholds = np.array(json.loads(meta["transfer.thresholds"]))
    images = sorted((pairs / "images").glob("*.png"))[:6]
    drawn = tmp_path / "drawn"
    assert runner.invoke(cli.app, ["predict", *map(str, images), "--onnx", str(onnx_path), "--cam", str(drawn),
                                   "-q"]).exit_code == 0
    records = {r["path"]: r for r in json.loads((drawn / "heatmaps.json").read_text())["images"]}
    explained = tmp_path / "e.json"
    assert runner.invoke(cli.app, ["explain", *map(str, images), "--run", str(tmp_path / "linear"), "-o",
                                   str(tmp_path / "seen"), "--json", str(explained), "-q"]).exit_code == 0
    by_explain = {r["path"]: r for r in json.loads(explained.read_text())["images"]}
    from exporters.runtime import OnnxModel

    model = OnnxModel(onnx_path, device="cpu")
    for path in images:
        logits, cam = session.run(["logits", "cam"], {"input": model.preprocess_one(path)[None]})
        assert cam.shape == (1, 3, 64, 64)
        probabilities = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
        order = np.argsort(-probabilities, kind="stable")
        expected = [int(i) for i in order if probabilities[i] >= thresholds[i]] or [int(order[0])]
        names = [model.classes[i] for i in expected]
        assert [item["class"] for item in records[str(path)]["classes"]] == names
        assert [item["class"] for item in by_explain[str(path)]["classes"]] == names
        assert len(records[str(path)]["files"]) == len(names)


def test_serve_and_the_embed_app_give_the_files_heatmap(tmp_path, photos, runner, capsys):
    """serve's /predict?cam=1 answers each upload's heatmaps (peak and box in its pixels, an overlay for the page),
    the embed example prints the same peak with onnxruntime alone; a file without the map answers 400."""
    import base64
    import importlib.util
    import io

    import httpx

    from exporters.runtime import OnnxModel
    from tests.test_serve import ROOT, Server, in_browser
    from transfer.serving.cam import iter_cam

    weights = random_weights_file(tmp_path, "resnet18", size=64)
    cam_file, plain = tmp_path / "cam.onnx", tmp_path / "plain.onnx"
    for path, extra in ((cam_file, ["--cam"]), (plain, [])):
        assert runner.invoke(cli.app, ["export", "-b", "resnet18", "--weights", str(weights), "--input-size", "64",
                                       "-o", str(path), "-q", *extra]).exit_code == 0
    picture = tmp_path / "rocket.png"
    Image.fromarray(photos["rocket"]).save(picture)
    expected = next(iter_cam(OnnxModel(cam_file, device="cpu"), [picture]))["classes"][0]
    server = Server("--onnx", str(cam_file), "--device", "cpu")
    try:
        with open(picture, "rb") as handle:
            response = httpx.post(server.url + "/predict?cam=1&top_k=2", files={"files": ("r.png", handle)},
                                  timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()["predictions"][0]
        heat = answer["heatmaps"][0]
        assert heat["class"] == answer["labels"][0] == expected["class"]
        assert heat["peak"] == expected["peak"] and heat["box"] == expected["box"]
        overlay = Image.open(io.BytesIO(base64.b64decode(heat["overlay"].split(",", 1)[1])))
        assert overlay.format == "JPEG" and max(overlay.size) == 512
        metadata = httpx.get(server.url + "/metadata", timeout=10).json()
        assert metadata["transfer"]["transfer.cam"] == "top"
        seen = in_browser(server.url, picture, "document.querySelector('#preview').src.startsWith('data:image/jpeg')",
                          "({hint: document.querySelector('#hint').textContent, "
                          "alt: document.querySelector('#preview').alt})")
        assert seen["alt"] == f"where the model looked for {expected['class']}"
        assert f"peak at ({expected['peak'][0]:g}, {expected['peak'][1]:g})" in seen["hint"]
    finally:
        server.stop()
    server = Server("--onnx", str(plain), "--device", "cpu")
    try:
        with open(picture, "rb") as handle:
            refused = httpx.post(server.url + "/predict?cam=1", files={"files": ("r.png", handle)}, timeout=60)
        assert refused.status_code == 400 and "export it with --cam" in refused.json()["detail"]
    finally:
        server.stop()

    spec = importlib.util.spec_from_file_location("embed_app_cam", ROOT / "examples" / "embed_app.py")
    embed_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(embed_app)
    capsys.readouterr()
    embed_app.main(str(cam_file), [str(picture)], str(tmp_path / "heat"))
    line = capsys.readouterr().out.strip().split("\t")
    assert line[1] == expected["class"]
    assert line[3] == f"peak {expected['peak'][0]:.0f},{expected['peak'][1]:.0f}"
    assert Image.open(tmp_path / "heat" / "rocket.cam.png").size == Image.open(picture).size


@pytest.mark.parametrize(("name", "family", "layer"), [
    ("vit_tiny_patch16_224", "ViT", "blocks.11.norm1"),
    ("swin_tiny_patch4_window7_224", "Swin", "forward_features (NHWC)"),
])
def test_transformer_families_get_their_layer_and_a_heatmap_over_the_crop(tmp_path, photo_dir, name, family, layer):
    """ViT: Grad-CAM on the last block's norm1 with the class token dropped and the patch tokens on their grid;
    Swin: its NHWC feature map permuted. Each heatmap's peak and box lie inside the model's crop of the image."""
    from transfer.apps.explain import explain, load_source

    result = explain([str(photo_dir / "coffee.jpg")], tmp_path / "o", backbone=name, pretrained=False)
    heat = result.heat
    assert (heat.family, heat.layer, heat.method) == (family, layer, "gradcam")
    prep = load_source(backbone=name, pretrained=False).prep
    x0, y0, x1, y1 = crop_box(*Image.open(photo_dir / "coffee.jpg").size, prep)
    found = heat.records[0]["classes"][0]
    assert x0 <= found["peak"][0] <= x1 and y0 <= found["peak"][1] <= y1
    bx0, by0, bx1, by1 = found["box"]
    assert x0 - 0.1 <= bx0 <= found["peak"][0] <= bx1 <= x1 + 0.1 and y0 - 0.1 <= by0 <= by1 <= y1 + 0.1
