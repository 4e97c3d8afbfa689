"""Reduced-scale JPEG decoding: never below the resize target, and the same pixels on every evaluation path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from transfer.core.images import open_image
from transfer.core.preprocess import DRAFT_FACTOR, Preprocessing, decode_size
from transfer.data.datasets import eval_dataset
from transfer.data.scan import Sample


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("big")
    sizes = {"wide": (2000, 1500), "tall": (1200, 1900), "just_above": (520, 600), "small": (300, 200)}
    for (name, size), photo in zip(sizes.items(), ("chelsea", "rocket", "coffee", "astronaut"), strict=True):
        Image.fromarray(photos[photo]).resize(size, Image.Resampling.BICUBIC).save(folder / f"{name}.jpg", quality=92)
    return folder, sizes


@pytest.mark.parametrize("prep", [Preprocessing(224, 0.875, "bicubic"), Preprocessing(299, 0.875, "bicubic"),
                                  Preprocessing(96, 1.0, "bilinear")])
def test_draft_never_decodes_below_the_default_floor(big_jpegs, prep):
    """The default floor (DRAFT_FACTOR x the resize length, chosen in benchmarks/decode.py) holds on both sides."""
    folder, sizes = big_jpegs
    floor = math.ceil(prep.resize * DRAFT_FACTOR)
    assert DRAFT_FACTOR >= 1 and decode_size(prep) == (floor, floor)
    for name, (width, height) in sizes.items():
        decoded = open_image(folder / f"{name}.jpg", draft_size=decode_size(prep))
        short = min(decoded.size)
        assert short >= min(floor, width, height), (name, decoded.size)
        scale = width / decoded.size[0]
        assert scale in (1, 2, 4, 8)
        # the largest reduction that still keeps both sides >= the floor was taken
        assert scale == 8 or min(width, height) / (2 * scale) < floor, (name, scale)


def test_training_evaluation_extract_and_runtime_see_the_same_pixels(big_jpegs, tmp_path):
    """One decoder, one transform: the dataset behind validation/evaluate/extract and the ONNX runtime agree
    bit for bit on large JPEGs (where the reduced-scale decode is active)."""
    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel

    folder, _ = big_jpegs
    path = tmp_path / "m.onnx"
    export_onnx(path, backbone="lenet5", pretrained=False, input_size=96)
    runtime = OnnxModel(path, device="cpu")
    prep = runtime.prep
    dataset = eval_dataset([Sample(p, None) for p in sorted(folder.iterdir())], prep)
    for index, sample in enumerate(dataset.samples):
        tensor, _ = dataset[index]
        assert np.array_equal(tensor.numpy(), runtime.preprocess_one(str(sample.path))), sample.path
    full = open_image(folder / "wide.jpg")
    reduced = open_image(folder / "wide.jpg", draft_size=decode_size(prep))
    floor = math.ceil(prep.resize * DRAFT_FACTOR)  # the largest DCT reduction whose short side stays >= the floor
    scale = max(s for s in (1, 2, 4, 8) if math.ceil(1500 / s) >= floor)
    assert full.size == (2000, 1500) and reduced.size == (2000 // scale, math.ceil(1500 / scale)) and scale > 1
    assert runtime.draft_factor == DRAFT_FACTOR and runtime.metadata["transfer.draft_factor"] == repr(DRAFT_FACTOR)
    assert torch.is_tensor(tensor)


def test_draft_factor_comes_from_the_file():
    """A file says how its images are decoded; one written before the key existed decoded to the resize length."""
    from transfer.core.model_metadata import MetadataError, read_draft_factor

    assert read_draft_factor({}) == 1.0 and read_draft_factor({"transfer.draft_factor": "3.0"}) == 3.0
    for bad in ("0.5", "nan", "many"):
        with pytest.raises(MetadataError, match="transfer.draft_factor"):
            read_draft_factor({"transfer.draft_factor": bad})


def test_the_decode_floor_is_a_choice_recorded_where_it_matters(big_jpegs, tmp_path, runner):
    """--decode-floor: a run records it (and its export writes it into the file), export and predict can replace
    it, extract records it in its sidecar; 1 takes the DCT's largest reduction, 8 decodes in full, as the file
    measured in benchmarks/decode.json says."""
    import json

    import cli
    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel
    from tests.conftest import digits_folder, one_line_error

    folder, _ = big_jpegs
    digits = digits_folder(tmp_path / "digits", per_class=3, size=32, classes=2)
    trained = runner.invoke(cli.app, ["finetune", str(digits), "-b", "lenet5", "--epochs-head", "1",
                                      "--epochs-finetune", "0", "--decode-floor", "1.5", "-o", str(tmp_path / "run"),
                                      "-q", "--workers", "0", "--batch-size", "4"])
    assert trained.exit_code == 0, trained.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["preprocessing"]["draft_factor"] == 1.5
    export_onnx(tmp_path / "run.onnx", run=tmp_path / "run")
    assert OnnxModel(tmp_path / "run.onnx", device="cpu").metadata["transfer.draft_factor"] == "1.5"
    export_onnx(tmp_path / "m.onnx", backbone="lenet5", pretrained=False, input_size=96, decode_floor=2.0)
    assert OnnxModel(tmp_path / "m.onnx", device="cpu").draft_factor == 2.0
    fastest = OnnxModel(tmp_path / "m.onnx", device="cpu", decode_floor=1.0)
    full = OnnxModel(tmp_path / "m.onnx", device="cpu", decode_floor=8.0)
    exact = OnnxModel(tmp_path / "m.onnx", device="cpu", exact_decode=True)
    resize = fastest.prep.resize
    assert fastest.draft_size == (resize, resize) and full.draft_size == (8 * resize, 8 * resize)
    wide = str(folder / "wide.jpg")  # 2000 x 1500: 8 x 109 covers it, so a floor of 8 decodes it whole
    assert np.array_equal(full.preprocess_one(wide), exact.preprocess_one(wide))
    assert not np.array_equal(fastest.preprocess_one(wide), exact.preprocess_one(wide))
    predicted = runner.invoke(cli.app, ["predict", wide, "--onnx", str(tmp_path / "m.onnx"), "--decode-floor", "8",
                                        "-o", str(tmp_path / "p.jsonl"), "-q"])
    assert predicted.exit_code == 0, predicted.output
    logits = exact.run(exact.preprocess_one(wide)[None])[0][0]
    assert json.loads((tmp_path / "p.jsonl").read_text())["probabilities"][0] == pytest.approx(
        float(exact.probabilities(logits[None])[0].max()), abs=1e-6)
    extracted = runner.invoke(cli.app, ["extract", str(folder), "-b", "lenet5", "--no-pretrained", "--input-size",
                                        "96", "--decode-floor", "4", "-o", str(tmp_path / "f.npy"), "-q"])
    assert extracted.exit_code == 0, extracted.output
    assert json.loads((tmp_path / "f.json").read_text())["preprocessing"]["draft_factor"] == 4.0
    refused = runner.invoke(cli.app, ["predict", wide, "--onnx", str(tmp_path / "m.onnx"), "--decode-floor", "0.5"])
    assert refused.exit_code == 2 and "--decode-floor" in refused.output
    from transfer.core.errors import DataError

    with pytest.raises(DataError, match="--decode-floor 9.0: must be between 1 and 8"):
        export_onnx(tmp_path / "bad.onnx", backbone="lenet5", pretrained=False, decode_floor=9.0)
    assert one_line_error(runner.invoke(cli.app, ["index", "-o", str(tmp_path / "idx"), "--remove",
                                                  "--decode-floor", "2"])).endswith("--input-size/--decode-floor")
