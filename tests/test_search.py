"""Similar-image search: `transfer index` and `transfer similar`, exact cosine search, one model per index."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from exporters.export import export_onnx
from exporters.runtime import OnnxModel
from tests.conftest import one_line_error
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
    assert "search: exact" in result.output  # under 20,000 images: no approximate-search file
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["ann"] is None and not (tmp_path / "idx" / "ann.faiss").exists()
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


def clustered_unit_vectors(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres (a collection of look-alike photos has that shape)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, dim)).astype(np.float32)
    return normalise(rows)


def test_approximate_search_is_measured_and_agrees_with_exact(tmp_path):
    """A collection past the threshold gets a FAISS IVF-SQ8 file whose nprobe was chosen for recall@10 >= 0.95
    against exact search; held-out queries (not in the index) checked here against numpy's brute force reach it
    too, with exact cosines as scores (the candidates are re-scored with the stored vectors), one query and a batch
    answer alike, and --exact ignores the file."""
    from transfer.serving.ann import TARGET_RECALL
    from transfer.serving.search import index_folder, write_index

    vectors = clustered_unit_vectors(4_000, 48, 40, seed=0)
    record = {"format": 3, "count": len(vectors), "dim": 48, "model": {"backbone": "efficientnet_lite0",
              "layer": "avg_pool"}, "paths": [f"/nowhere/{i}.jpg" for i in range(len(vectors))], "classes": []}
    with index_folder(tmp_path / "big.idx") as folder:
        write_index(folder, record, vectors, ann_min_rows=1_000)
    saved = json.loads((tmp_path / "big.idx" / "index.json").read_text())["ann"]
    assert saved["kind"].startswith("faiss IVF-SQ8") and saved["nlist"] == 63  # round(sqrt(4000))
    assert (tmp_path / "big.idx" / "ann.faiss").stat().st_size < vectors.nbytes / 3  # 8-bit codes, not float32
    assert saved["recall_at_10"] >= TARGET_RECALL and saved["tried"][str(saved["nprobe"])] == saved["recall_at_10"]
    assert all(recall < TARGET_RECALL for nprobe, recall in saved["tried"].items() if int(nprobe) < saved["nprobe"])
    approximate, exact = SearchIndex.load(tmp_path / "big.idx"), SearchIndex.load(tmp_path / "big.idx", exact=True)
    assert approximate.ann is not None and exact.ann is None
    queries = clustered_unit_vectors(4_200, 48, 40, seed=0)[4_000:]  # the same centres, new points: held out
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    found = approximate.nearest_many(queries, 10)
    recall = np.mean([len({hit["row"] for hit in hits} & set(expected.tolist())) / 10
                      for hits, expected in zip(found, truth, strict=True)])
    assert recall >= 0.95, recall
    scores = np.array([[hit["score"] for hit in hits] for hits in found])
    rows = np.array([[hit["row"] for hit in hits] for hits in found])
    assert np.allclose(scores, np.einsum("qkd,qd->qk", vectors[rows], queries), atol=1e-5)  # exact cosines
    assert (np.diff(scores, axis=1) <= 0).all()
    exact_found = exact.nearest_many(queries, 10)
    assert [[hit["row"] for hit in hits] for hits in exact_found] == truth.tolist()
    assert [hit["row"] for hit in approximate.nearest(queries[7], 10)] == [hit["row"] for hit in found[7]]
    del approximate  # its ann.faiss is memory-mapped: the damaged file comes in as a new file, as a copy would
    (tmp_path / "damaged.faiss").write_bytes(b"damaged")
    (tmp_path / "damaged.faiss").replace(tmp_path / "big.idx" / "ann.faiss")
    with pytest.raises(DataError, match="ann.faiss unreadable"):
        SearchIndex.load(tmp_path / "big.idx")
    assert SearchIndex.load(tmp_path / "big.idx", exact=True).nearest_many(queries[:3], 10) == exact_found[:3]


def test_an_ivf_flat_file_from_the_earlier_version_still_searches(tmp_path):
    """Indexes built before IVF-SQ8 hold an IVF-Flat ann.faiss: it loads and answers through the same re-ranking,
    with the same rows as exact search where nprobe covers every list."""
    import faiss

    from transfer.serving.search import index_folder, write_index

    vectors = clustered_unit_vectors(2_000, 32, 20, seed=1)
    record = {"format": 3, "count": len(vectors), "dim": 32, "model": {"backbone": "efficientnet_lite0",
              "layer": "avg_pool"}, "paths": [f"/nowhere/{i}.jpg" for i in range(len(vectors))], "classes": []}
    with index_folder(tmp_path / "old.idx") as folder:
        write_index(folder, record, vectors, ann_min_rows=10_000)  # exact: the ANN file is added below
    flat = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 16, faiss.METRIC_INNER_PRODUCT)
    flat.train(vectors)
    flat.add(vectors)
    faiss.write_index(flat, str(tmp_path / "old.idx" / "ann.faiss"))
    saved = json.loads((tmp_path / "old.idx" / "index.json").read_text())
    saved["ann"] = {"kind": "faiss IVF-Flat (inner product)", "nlist": 16, "nprobe": 16, "recall_at_10": 1.0,
                    "file": "ann.faiss"}
    (tmp_path / "old.idx" / "index.json").write_text(json.dumps(saved))
    old, exact = SearchIndex.load(tmp_path / "old.idx"), SearchIndex.load(tmp_path / "old.idx", exact=True)
    assert old.ann is not None
    queries = clustered_unit_vectors(2_050, 32, 20, seed=1)[2_000:]
    assert [[hit["row"] for hit in hits] for hits in old.nearest_many(queries, 10)] == \
        [[hit["row"] for hit in hits] for hits in exact.nearest_many(queries, 10)]


def test_vector_check_refuses_damage_in_float32(tmp_path):
    """The load-time check runs in float32 (no float64 copies): NaN, infinities, a non-unit row and float64 files
    are each one line naming the row or the dtype."""
    from transfer.serving.search import check_vectors

    vectors = clustered_unit_vectors(300, 16, 5, seed=1)
    record = {"count": 300, "dim": 16, "paths": [f"{i}.jpg" for i in range(300)]}
    check_vectors(vectors, record, "v")
    for row, value, problem in ((3, np.nan, "row 3 (3.jpg) is not finite"), (5, np.inf, "row 5 (5.jpg) is not finite"),
                                (7, 2.0, "row 7 (7.jpg) has length")):
        damaged = vectors.copy()
        damaged[row, 0] = value
        with pytest.raises(DataError, match=re.escape(problem)):
            check_vectors(damaged, record, "v")
    with pytest.raises(DataError, match="dtype float64, not float32"):
        check_vectors(vectors.astype(np.float64), record, "v")


def test_add_embeds_only_new_images_and_remove_drops_gone_ones(tmp_path, photos, runner, monkeypatch):
    """`index --add` keeps every stored vector as it is and embeds only the images the index does not hold (a
    changed file is embedded again and its old row replaced); `--remove` drops rows whose files are gone."""
    import transfer.apps.index as index_app

    write_crops(tmp_path / "crops", photos, per_class=3, seed=0)
    common = ["-q", "--workers", "0"]
    first = runner.invoke(cli.app, ["index", str(tmp_path / "crops"), "-o", str(tmp_path / "idx"),
                                    "--input-size", "96", *common])
    assert first.exit_code == 0, first.output
    before = json.loads((tmp_path / "idx" / "index.json").read_text())
    old_vectors = np.load(tmp_path / "idx" / "vectors.npy")
    embedded: list[int] = []
    real_extract = index_app.extract

    def counting_extract(images, **kwargs):
        embedded.append(len(images))
        assert kwargs["output"].name == "features.npy"  # streamed to a scratch file beside the index, not held
        return real_extract(images, **kwargs)

    monkeypatch.setattr(index_app, "extract", counting_extract)
    new = write_crops(tmp_path / "more", photos, per_class=1, seed=5)  # 4 new crops in class folders
    for path in new:
        target = tmp_path / "crops" / path.parent.name / f"new_{path.name}"
        path.rename(target)
    changed = Path(before["paths"][0])
    Image.open(changed).rotate(90).save(changed)  # this one changed since: embedded again, its old row replaced
    added = runner.invoke(cli.app, ["index", str(tmp_path / "crops"), "-o", str(tmp_path / "idx"), "--add", *common])
    assert added.exit_code == 0, added.output
    assert "embedded 5 new or changed image(s), replaced 1, removed 0" in added.output and embedded == [5]
    after = json.loads((tmp_path / "idx" / "index.json").read_text())
    vectors = np.load(tmp_path / "idx" / "vectors.npy")
    assert after["count"] == 16 and vectors.shape == (16, 1280) and after["paths"][:11] == before["paths"][1:]
    assert np.array_equal(vectors[:11], old_vectors[1:])  # kept rows copied, not re-embedded
    assert after["classes"] == before["classes"] and after["labels"][:11] == before["labels"][1:]
    assert [after["classes"][label] for label in after["labels"][11:]] == \
        [Path(path).parent.name for path in after["paths"][11:]]
    assert after["model"] == before["model"] and str(changed) in after["paths"][11:]
    gone = Path(after["paths"][3])
    gone.unlink()
    removed = runner.invoke(cli.app, ["index", "-o", str(tmp_path / "idx"), "--remove", *common])
    assert removed.exit_code == 0, removed.output
    assert "embedded 0 new or changed image(s), replaced 0, removed 1" in removed.output and embedded == [5]
    final = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert final["count"] == 15 and str(gone) not in final["paths"]
    assert np.array_equal(np.load(tmp_path / "idx" / "vectors.npy"), np.delete(vectors, 3, axis=0))
    wrong = runner.invoke(cli.app, ["index", str(tmp_path / "crops"), "-o", str(tmp_path / "idx"), "--add", "-b",
                                    "resnet18"])
    assert "--add/--remove embed with the index's own model" in one_line_error(wrong)
    missing = runner.invoke(cli.app, ["index", "-o", str(tmp_path / "none" / "idx"), "--remove"])
    assert one_line_error(missing) == (f"error: --output {tmp_path / 'none' / 'idx'}: no index there to update; "
                                       "build one with `transfer index IMAGES -o DIR`")
    assert not (tmp_path / "none").exists()  # nothing made on the way
