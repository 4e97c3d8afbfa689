"""Data layer: messy folders, robust decoding, splits, the shared evaluation transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from tests.conftest import digits_folder, make_messy_folder, png_header_only, tree_hashes
from transfer.core.errors import DataError
from transfer.core.images import BadImageError, open_image
from transfer.core.preprocess import Preprocessing, eval_array
from transfer.data.augment import Augment
from transfer.data.datasets import ImageDataset, eval_transform, train_transform
from transfer.data.scan import scan_folder
from transfer.data.splits import stratified_split


def test_messy_folder_scan_reports_exactly_the_bad_files(tmp_path, photos):
    root = tmp_path / "data"
    expected = make_messy_folder(root, photos)
    before = tree_hashes(root)
    report = scan_folder(root)
    assert {s.path: s.reason for s in report.skipped}.keys() == expected.keys()
    for item in report.skipped:
        assert expected[item.path] in item.reason, item
    assert report.classes == ["cat", "cup", "empty"]
    assert report.empty_classes == ["empty"]
    with pytest.raises(DataError, match="empty"):
        report.check_trainable()
    names = {s.path.name for s in report.samples}
    assert {"cmyk.jpg", "palette.png", "ramp16.png", "gray_alpha.png", "exif6.jpg", "animated.gif"} <= names
    assert not any(part.startswith(".") for s in report.samples for part in s.path.parts[len(root.parts):])
    assert tree_hashes(root) == before


def test_scan_cli_prints_skips_and_names_empty_class(tmp_path, photos, runner):
    root = tmp_path / "data"
    expected = make_messy_folder(root, photos)
    before = tree_hashes(root)
    result = runner.invoke(cli.app, ["scan", str(root), "--json", str(tmp_path / "scan.json")])
    assert result.exit_code == 2
    for path in expected:
        assert path in result.output
    assert "empty class(es) with no usable image: empty" in result.output
    assert json.loads((tmp_path / "scan.json").read_text())["counts"]["all"]["cup"] == 4
    strict = runner.invoke(cli.app, ["scan", str(root), "--strict"])
    assert strict.exit_code == 2 and "--strict" in strict.output
    assert tree_hashes(root) == before
    missing = runner.invoke(cli.app, ["scan", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "folder not found" in missing.output


def test_sixteen_bit_ramp_keeps_levels_and_exif_rotation_applied(tmp_path, photos):
    root = tmp_path / "data"
    make_messy_folder(root, photos)
    ramp = np.asarray(open_image(root / "cat" / "ramp16.png"))
    assert ramp.dtype == np.uint8 and len(np.unique(ramp[..., 0])) > 200
    assert ramp[0, 0, 0] == 0 and ramp[0, -1, 0] == 255  # scaled, not clipped
    with Image.open(root / "cat" / "exif6.jpg") as raw:
        assert raw.size == (120, 80)
    assert open_image(root / "cat" / "exif6.jpg").size == (80, 120)
    for name in ("cmyk.jpg", "palette.png", "gray_alpha.png", "animated.gif"):
        assert open_image(root / "cat" / name).mode == "RGB"


def test_decompression_bomb_refused_without_touching_pil_limit(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    png_header_only(tmp_path / "bomb.png", 12_000, 12_000)  # 144 MP: above our limit, below PIL's own 2x error
    with pytest.raises(BadImageError, match="decompression bomb"):
        open_image(tmp_path / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == limit


def test_eval_transform_matches_timm_eval_on_real_photos(photos):
    from timm.data import create_transform

    images = [Image.fromarray(photos["astronaut"]).resize((451, 300)),
              Image.fromarray(photos["rocket"]).resize((300, 451)),
              Image.fromarray(photos["coffee"]).convert("L").convert("RGB")]
    for prep in (Preprocessing(224, 0.875, "bilinear"), Preprocessing(299, 0.875, "bicubic", (0.5,) * 3, (0.5,) * 3)):
        timm_eval = create_transform(input_size=prep.input_size, crop_pct=prep.crop_pct,
                                     interpolation=prep.interpolation, mean=prep.mean, std=prep.std)
        for image in images:
            ours = eval_transform(prep)(image)
            assert ours.shape == (3, prep.input_size, prep.input_size)
            assert torch.allclose(ours, timm_eval(image), atol=1e-6)
            assert np.array_equal(ours.numpy(), eval_array(image, prep))


def test_stratified_split_is_stable_and_covers_every_class(tmp_path):
    report = scan_folder(digits_folder(tmp_path / "digits", per_class=7, size=16))
    train, val = stratified_split(report.samples, 0.2, seed=3)
    again_train, again_val = stratified_split(report.samples, 0.2, seed=3)
    assert [s.path for s in val] == [s.path for s in again_val] and len(train) == len(again_train)
    assert {s.label for s in train} == {s.label for s in val} == set(range(10))
    assert len(val) == 10 and len(train) == 60
    assert {s.path for s in train}.isdisjoint({s.path for s in val})
    _, other_val = stratified_split(report.samples, 0.2, seed=4)
    assert {s.path for s in other_val} != {s.path for s in val}


def test_split_folders_and_single_class(tmp_path, photos):
    for split in ("train", "validation"):
        for name in ("chelsea", "coffee"):
            (tmp_path / "s" / split / name).mkdir(parents=True)
            Image.fromarray(photos[name]).save(tmp_path / "s" / split / name / "a.png")
    report = scan_folder(tmp_path / "s")
    assert report.layout == "splits" and report.classes == ["chelsea", "coffee"]
    assert len(report.split("train")) == 2 and len(report.split("val")) == 2
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.fromarray(photos["coffee"]).save(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(DataError, match="at least 2 classes"):
        scan_folder(tmp_path / "one").check_trainable()


def test_training_transform_augments_but_keeps_shape(photos):
    prep = Preprocessing(64, 0.875, "bilinear")
    image = Image.fromarray(photos["chelsea"])
    transform = train_transform(prep, Augment())
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert first.shape == second.shape == (3, 64, 64)
    assert not torch.equal(first, second)


def test_dataset_yields_labels(tmp_path):
    report = scan_folder(digits_folder(tmp_path / "digits", per_class=2, size=16, classes=3))
    dataset = ImageDataset(report.samples, eval_transform(Preprocessing(16, 1.0)))
    x, y = dataset[len(dataset) - 1]
    assert x.shape == (3, 16, 16) and y == 2


def test_symlinked_folders_followed_once(tmp_path, photos):
    root = tmp_path / "data"
    for name in ("chelsea", "coffee"):
        (root / name).mkdir(parents=True)
        Image.fromarray(photos[name]).resize((40, 30)).save(root / name / "a.png")
    outside = tmp_path / "more_cats"
    outside.mkdir()
    Image.fromarray(photos["chelsea"]).resize((30, 40)).save(outside / "b.png")
    (root / "chelsea" / "linked").symlink_to(outside, target_is_directory=True)
    (outside / "loop").symlink_to(root / "chelsea", target_is_directory=True)  # a cycle back
    report = scan_folder(root)
    assert sorted(s.path.name for s in report.samples if s.label == 0) == ["a.png", "b.png"]
    assert report.counts()["all"] == {"chelsea": 2, "coffee": 1}
