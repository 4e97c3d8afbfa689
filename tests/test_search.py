"""Similar-image search: `transfer index` and `transfer similar`, exact cosine search, one model per index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from exporters.export import export_onnx
from exporters.runtime import OnnxModel
from transfer.apps.index import build_index
from transfer.core.errors import DataError
from transfer.serving.search import SearchIndex, normalise

CLASSES = ("chelsea", "coffee", "astronaut", "rocket")


def write_crops(folder: Path, photos: dict, per_class: int, seed: int, classes: bool = True) -> list[Path]:
    """Random square crops (40-90% of the short side) of each photo, in class folders or flat."""
    rng = np.random.default_rng(seed)
    paths = []
    for name in CLASSES:
        target = folder / name if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(photos[name])
        for index in range(per_class):
            side = int(rng.uniform(0.4, 0.9) * min(image.size))
            left = int(rng.uniform(0, image.width - side))
            top = int(rng.uniform(0, image.height - side))
            paths.append(target / f"{name}_{seed}_{index}.jpg")
            image.crop((left, top, left + side, top + side)).save(paths[-1], quality=92)
    return paths


def test_exact_search_matches_brute_force_across_chunks(tmp_path, monkeypatch):
    import transfer.serving.search as search

    rng = np.random.default_rng(0)
    vectors = normalise(rng.standard_normal((1000, 16)))
    np.save(tmp_path / "vectors.npy", vectors)
    (tmp_path / "index.json").write_text(json.dumps({"count": 1000, "dim": 16, "paths": [f"{i}.jpg" for i in
                                                     range(1000)], "labels": None, "classes": [],
                                                     "model": {"backbone": "efficientnet_lite0", "layer": "avg_pool"}}))
    monkeypatch.setattr(search, "CHUNK_ROWS", 64)  # 16 chunks: the running top-k must merge them exactly
    index = SearchIndex.load(tmp_path)
    query = normalise(rng.standard_normal((1, 16)))[0]
    hits = index.nearest(query, 7)
    expected = np.argsort(-(vectors @ query))[:7]
    assert [h["path"] for h in hits] == [f"{i}.jpg" for i in expected]
    assert [h["score"] for h in hits] == pytest.approx((vectors @ query)[expected].tolist(), abs=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_index_and_similar_find_the_same_scene(tmp_path, photos, runner):
    """Crops of four photos; held-out crops (another seed) find crops of their own photo (precision@5)."""
    write_crops(tmp_path / "crops", photos, per_class=6, seed=0)
    queries = write_crops(tmp_path / "queries", photos, per_class=2, seed=1, classes=False)
    result = runner.invoke(cli.app, ["index", str(tmp_path / "crops"), "-o", str(tmp_path / "idx"), "-q",
                                     "--input-size", "160", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "indexed 24 images (1280 dimensions, layer avg_pool) into" in result.output
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["classes"] == sorted(CLASSES) and meta["model"]["backbone"] == "efficientnet_lite0"
    assert np.load(tmp_path / "idx" / "vectors.npy").shape == (24, 1280)
    result = runner.invoke(cli.app, ["similar", *map(str, queries), "--index", str(tmp_path / "idx"), "-k", "5",
                                     "-o", str(tmp_path / "sheet.png"), "--json", str(tmp_path / "hits.json"), "-q"])
    assert result.exit_code == 0, result.output
    hits = json.loads((tmp_path / "hits.json").read_text())["results"]
    assert len(hits) == 8 and all(len(h["neighbours"]) == 5 for h in hits)
    precision = np.mean([n["label"] == Path(h["query"]).name.split("_")[0] for h in hits for n in h["neighbours"]])
    print(f"precision@5 {precision:.3f}")
    assert precision >= 0.8
    scores = [n["score"] for n in hits[0]["neighbours"]]
    assert scores == sorted(scores, reverse=True) and scores[0] <= 1.0 + 1e-6
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    header = 40  # the sheet's title
    assert sheet.shape == (header + 8 * (160 + 44 + 8) + 8, 6 * 168 + 8, 3)  # query + 5 neighbours per row, 8 rows
    assert sheet[8:30, 8:300].std() > 10  # the title is drawn
    query = Image.open(queries[0]).convert("RGB")
    query.thumbnail((160, 160))
    cell = sheet[header:header + query.height, 8:8 + query.width].astype(int)  # the first row's first cell: that query
    assert np.abs(cell - np.asarray(query, dtype=int)).mean() < 3
    for column in range(1, 6):  # each neighbour cell holds an image, not blank paper
        x = 8 + column * 168
        assert sheet[header:header + 160, x:x + 160].std() > 10


def test_index_writes_are_whole_and_never_touch_other_files(tmp_path, photos, runner):
    write_crops(tmp_path / "crops", photos, per_class=2, seed=0)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = runner.invoke(cli.app, ["index", str(tmp_path / "crops"), "-o", str(busy), "-q", "--input-size", "64"])
    assert result.exit_code == 2 and "the folder holds files that `transfer index` did not write" in result.output
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    first = build_index(tmp_path / "crops", tmp_path / "idx", input_size=64, workers=0)
    (tmp_path / "crops" / "rocket" / "rocket_0_0.jpg").unlink()
    second = build_index(tmp_path / "crops", tmp_path / "idx", input_size=64, workers=0)
    assert (first["count"], second["count"]) == (8, 7)
    assert SearchIndex.load(tmp_path / "idx").vectors.shape == (7, 1280)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "crops", "idx"]  # no temp, lock or old index
    result = runner.invoke(cli.app, ["similar", str(tmp_path / "crops"), "--index", str(busy)])
    assert result.exit_code == 2 and "not an index" in result.output


# slow (20 s): model identity by content is in tests/test_surfaces.py and tests/test_serve.py
@pytest.mark.slow
def test_an_index_only_meets_its_own_model(tmp_path, photos):
    write_crops(tmp_path / "crops", photos, per_class=2, seed=0)
    extractor = tmp_path / "extractor.onnx"
    other = tmp_path / "other.onnx"
    export_onnx(extractor, backbone="efficientnet_lite0", layers=["avg_pool"], input_size=64)
    export_onnx(other, backbone="efficientnet_lite0", layers=["block6a_expand_activation"], input_size=64)
    build_index(tmp_path / "crops", tmp_path / "by_onnx", onnx=extractor, workers=0)
    build_index(tmp_path / "crops", tmp_path / "by_backbone", input_size=64, workers=0)
    SearchIndex.load(tmp_path / "by_onnx").check_model(OnnxModel(extractor, device="cpu"))
    with pytest.raises(DataError, match="built with another model"):
        SearchIndex.load(tmp_path / "by_onnx").check_model(OnnxModel(other, device="cpu"))
    with pytest.raises(DataError, match="not an ONNX file"):
        SearchIndex.load(tmp_path / "by_backbone").check_model(OnnxModel(extractor, device="cpu"))
    from transfer.apps.index import similar

    hits = similar(tmp_path / "crops" / "coffee", tmp_path / "by_onnx", k=1)
    assert [h["neighbours"][0]["path"] for h in hits] == [h["query"] for h in hits]  # each crop finds itself
    extractor.write_bytes(other.read_bytes())  # the file the index was built with changed
    with pytest.raises(DataError, match="gone or changed"):
        similar(tmp_path / "crops" / "coffee", tmp_path / "by_onnx", k=1)


def test_an_unwritable_index_folder_fails_before_any_image_is_embedded(tmp_path, photos, monkeypatch, runner):
    import transfer.apps.index as index
    import transfer.serving.search as search

    write_crops(tmp_path / "crops", photos, per_class=1, seed=0)

    def refuse(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    def embed_never(*args, **kwargs):
        raise AssertionError("images were embedded before the output was checked")

    monkeypatch.setattr(search, "probe_folder", refuse)  # root ignores mode bits: simulate a read-only folder
    monkeypatch.setattr(index, "embed", embed_never)
    result = runner.invoke(cli.app, ["index", str(tmp_path / "crops"), "-o", str(tmp_path / "out" / "idx")])
    assert result.exit_code == 2 and result.output.startswith("error: --output")
    assert "Permission denied" in result.output
    assert not (tmp_path / "out" / "idx").exists()
