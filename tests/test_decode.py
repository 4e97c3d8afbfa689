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
