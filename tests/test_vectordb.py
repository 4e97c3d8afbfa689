"""An index in a vector database (Milvus, through milvus-lite): the same vectors, paths, labels and model identity
as the local index, the same top-10, and every identity check of a local index."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

import cli
from exporters.export import export_onnx
from tests.conftest import digits_folder, one_line_error
from tests.test_search import clustered_unit_vectors
from transfer.apps.index import publish_index
from transfer.core.errors import DataError
from transfer.serving.search import SearchIndex, index_folder, write_index

pytest.importorskip("milvus_lite")  # the test extra installs it; `pip install 'transfer[milvus]'` for users

COUNT, DIM = 3_000, 64


def hand_made_index(tmp_path, name: str = "photos.idx", sha: str = "a" * 64) -> tuple:
    """3,000 clustered unit vectors with real files behind their paths (their stamps are checked), three classes,
    every fifth row holding two of them."""
    files = tmp_path / "files"
    files.mkdir(exist_ok=True)
    paths = []
    for row in range(COUNT):
        path = files / f"{row:04d}.jpg"
        if not path.exists():
            path.write_bytes(row.to_bytes(4, "little"))
        paths.append(str(path))
    labels = [[row % 3, (row + 1) % 3] if row % 5 == 0 else row % 3 for row in range(COUNT)]
    record = {"format": 3, "count": COUNT, "dim": DIM, "paths": paths, "labels": labels, "classes": ["a", "b", "c"],
              "stamps": [[4, (tmp_path / "files" / f"{row:04d}.jpg").stat().st_mtime_ns] for row in range(COUNT)],
              "model": {"backbone": None, "run": None, "onnx": "/models/extractor.onnx", "onnx_sha256": sha,
                        "layer": "avg_pool", "input_size": None}}
    vectors = clustered_unit_vectors(COUNT, DIM, 30, seed=3)
    with index_folder(tmp_path / name) as folder:
        write_index(folder, record, vectors)
    return tmp_path / name, vectors


def test_an_index_round_trips_through_milvus_lite_with_the_same_top_10(tmp_path):
    from pymilvus import MilvusClient

    folder, vectors = hand_made_index(tmp_path)
    database = tmp_path / "vectors.db"
    record = publish_index(folder, str(database), "photos")
    assert record["database"]["kind"] == "milvus" and record["database"]["collection"] == "photos"
    assert record["database"]["uri"] == str(database) and json.loads((folder / "index.json").read_text()) == record
    client = MilvusClient(str(database))
    stored = client.get("photos", ids=[0, 7, 2_999], output_fields=["vector", "path", "label", "size", "mtime_ns"])
    assert np.allclose([row["vector"] for row in stored], vectors[[0, 7, 2_999]], atol=1e-7)
    assert [row["path"] for row in stored] == [record["paths"][row] for row in (0, 7, 2_999)]
    assert [row["label"] for row in stored] == ["a, b", "b", "c"]  # row 0 holds two labels, joined as shown
    assert [[row["size"], row["mtime_ns"]] for row in stored] == [record["stamps"][row] for row in (0, 7, 2_999)]
    identity = json.loads(client.describe_collection("photos")["properties"]["transfer.index"])
    assert identity == {"build": record["database"]["build"], "count": COUNT, "dim": DIM, "model": record["model"]}
    client.close()

    remote, local = SearchIndex.load(folder), SearchIndex.load(folder, exact=True)
    assert remote.database is not None and local.database is None
    queries = clustered_unit_vectors(COUNT + 40, DIM, 30, seed=3)[COUNT:]  # held out: not in the index
    truth = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    from_milvus, from_disk = remote.nearest_many(queries, 10), local.nearest_many(queries, 10)
    assert [[hit["row"] for hit in hits] for hits in from_milvus] == truth.tolist()
    for milvus_hits, local_hits in zip(from_milvus, from_disk, strict=True):
        assert [(h["row"], h["path"], h["label"], h["status"]) for h in milvus_hits] == \
            [(h["row"], h["path"], h["label"], h["status"]) for h in local_hits]
        assert np.allclose([h["score"] for h in milvus_hits], [h["score"] for h in local_hits], atol=1e-5)
    assert {hit["status"] for hits in from_milvus for hit in hits} == {"ok"}
    (tmp_path / "files" / f"{truth[0][0]:04d}.jpg").write_bytes(b"changed!")
    assert SearchIndex.load(folder).nearest_many(queries[:1], 10)[0][0]["status"] == "changed"


def test_a_collection_is_searched_only_for_its_own_index(tmp_path):
    """Another build in the collection (an index pushed later under the same name, another model's vectors), a
    missing collection, and a collection `transfer` did not write are each one line, never an answer."""
    from pymilvus import DataType, MilvusClient

    database = str(tmp_path / "vectors.db")
    first, _ = hand_made_index(tmp_path, "first.idx")
    publish_index(first, database, "photos")
    second, _ = hand_made_index(tmp_path, "second.idx", sha="b" * 64)
    publish_index(second, database, "photos")  # replaces the collection the first push made
    assert SearchIndex.load(second).database is not None
    with pytest.raises(DataError, match="the Milvus collection photos holds another build of this index"):
        SearchIndex.load(first)
    assert SearchIndex.load(first, exact=True).nearest_many(np.eye(DIM, dtype=np.float32)[:1], 3)[0][0]["row"] >= 0
    record = json.loads((second / "index.json").read_text())
    record["database"]["collection"] = "elsewhere"
    (second / "index.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="holds no collection elsewhere written by `transfer index`"):
        SearchIndex.load(second)
    client = MilvusClient(database)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=4)
    client.create_collection("theirs", schema=schema)
    client.close()
    with pytest.raises(DataError, match="already holds a collection of that name that `transfer index` did not "
                                        "write; it is not replaced"):
        publish_index(first, database, "theirs")
    client = MilvusClient(database)
    assert client.has_collection("theirs") and "transfer.index" not in (
        client.describe_collection("theirs").get("properties") or {})
    client.close()


def test_similar_and_serve_search_milvus_with_the_index_model(tmp_path, runner):
    """`transfer index --milvus` (an ONNX extractor on digits): `similar` and `/similar` answer from the collection,
    as the local index does; --add pushes again; bad options are one line each."""
    from fastapi.testclient import TestClient

    from transfer.serving.serve import create_app

    digits = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=4)
    extractor = tmp_path / "extractor.onnx"
    export_onnx(extractor, backbone="lenet5", pretrained=False, layers=["fc1"])
    database = tmp_path / "vectors.db"
    built = runner.invoke(cli.app, ["index", str(digits), "--onnx", str(extractor), "-o", str(tmp_path / "d.idx"),
                                    "--milvus", str(database), "-q", "--workers", "0"])
    assert built.exit_code == 0, built.output
    assert f"searched in Milvus: collection d_idx at {database}" in built.output
    query = sorted((digits / "2").iterdir())[0]
    hits = {}
    for mode in ("milvus", "exact"):
        result = runner.invoke(cli.app, ["similar", str(query), "--index", str(tmp_path / "d.idx"), "-k", "10", "-q",
                                         "-o", str(tmp_path / f"{mode}.png"), "--json", str(tmp_path / f"{mode}.json"),
                                         *(["--exact"] if mode == "exact" else [])])
        assert result.exit_code == 0, result.output
        hits[mode] = json.loads((tmp_path / f"{mode}.json").read_text())["results"][0]["neighbours"]
    assert [(h["path"], h["label"]) for h in hits["milvus"]] == [(h["path"], h["label"]) for h in hits["exact"]]
    assert hits["milvus"][0]["path"] == str(query) and hits["milvus"][0]["self"]
    with TestClient(create_app(extractor, device="cpu", index=tmp_path / "d.idx")) as client:
        served = client.post("/similar?k=10", files=[("files", (query.name, query.read_bytes()))])
        by_row = client.get(f"/similar/{hits['exact'][0]['row']}?k=10")  # "more like this": no image sent
        assert client.get("/similar/24").status_code == 404 and client.get("/similar/-1").status_code == 404
    assert served.status_code == 200, served.text
    assert [h["path"] for h in by_row.json()["similar"][0]["neighbours"]] == [h["path"] for h in hits["exact"]]
    assert [h["path"] for h in served.json()["similar"][0]["neighbours"]] == [h["path"] for h in hits["exact"]]

    new = digits_folder(tmp_path / "more", per_class=1, size=32, classes=4)
    for path in sorted(new.rglob("*.png")):
        path.rename(digits / path.parent.name / f"new_{path.name}")
    added = runner.invoke(cli.app, ["index", str(digits), "-o", str(tmp_path / "d.idx"), "--add", "-q",
                                    "--workers", "0"])
    assert added.exit_code == 0, added.output
    assert "embedded 4 new or changed image(s)" in added.output and "searched in Milvus" in added.output
    assert SearchIndex.load(tmp_path / "d.idx").database is not None  # pushed again: the identity matches
    from pymilvus import MilvusClient

    client = MilvusClient(str(database))
    assert client.get_collection_stats("d_idx")["row_count"] == 28
    client.close()

    bad_name = runner.invoke(cli.app, ["index", "-o", str(tmp_path / "d.idx"), "--milvus", str(database),
                                       "--collection", "9 lives"])
    assert one_line_error(bad_name).startswith("error: --collection '9 lives': Milvus names hold letters")
    not_db = runner.invoke(cli.app, ["index", "-o", str(tmp_path / "d.idx"), "--milvus", str(tmp_path / "v.txt")])
    assert "give a server address (http://host:19530) or a milvus-lite file ending in .db" in one_line_error(not_db)
    lonely = runner.invoke(cli.app, ["index", "-o", str(tmp_path / "d.idx"), "--collection", "x"])
    assert one_line_error(lonely) == "error: --collection names a Milvus collection: give --milvus URI too"
    nothing = runner.invoke(cli.app, ["index", "-o", str(tmp_path / "none.idx"), "--milvus", str(database)])
    assert "no index there to copy" in one_line_error(nothing) and not (tmp_path / "none.idx").exists()
    with socket.socket() as probe:  # a port nobody listens on: refused before any image is embedded
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = runner.invoke(cli.app, ["index", str(digits), "--onnx", str(extractor), "-o",
                                          str(tmp_path / "u.idx"), "--milvus", f"http://127.0.0.1:{port}"])
    assert f"Milvus at http://127.0.0.1:{port}: cannot connect" in one_line_error(unreachable)
    assert not (tmp_path / "u.idx").exists()
