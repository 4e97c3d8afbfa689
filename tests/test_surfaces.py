"""Trust, second round: the surfaces added since the first (index/similar, sharded predict, the int8 record, the embed
example, --no-pretrained extraction, torchrun) fail closed. Each test reproduces a failure seen when they were tried
as a hostile user would (data loss, a wrong answer with exit 0, a traceback) and checks what replaced it. The HTTP
side of the round (serve) is in tests/test_serve_limits.py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from exporters.export import export_onnx
from exporters.runtime import OnnxModel
from models.registry import get_backbone
from models.weights import create_backbone
from tests.conftest import digits_folder, make_messy_folder, one_line_error, tree_hashes
from transfer.apps.index import build_index
from transfer.core.errors import DataError
from transfer.serving.search import MARKER_FILE, SearchIndex, previous_path
from transfer.training import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = shutil.which("transfer") or str(Path(sys.executable).parent / "transfer")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("surfaces") / "digits", per_class=4, size=32, classes=3)


# --- the index folder: never deletes what it did not write ------------------------------------------------------
@pytest.mark.parametrize("layout", ["old index with the user's notes", "web site", "images inside the output"])
def test_index_never_replaces_a_folder_holding_other_files(tmp_path, digits, runner, layout):
    """An index.json beside other files used to be taken for an index and the whole folder replaced, exit 0."""
    target = tmp_path / "x.idx"
    if layout == "old index with the user's notes":
        build_index(digits, target, backbone="lenet5", workers=0)
        (target / "notes.txt").write_text("mine")
        (target / "album").mkdir()
        (target / "album" / "photo.png").write_bytes((digits / "0" / "0000.png").read_bytes())
        images = digits
    elif layout == "web site":
        (target / "src").mkdir(parents=True)
        (target / "index.json").write_text('{"name": "my site"}')
        (target / "index.html").write_text("<html></html>")
        (target / "src" / "app.js").write_text("console.log(1)")
        images = digits
    else:  # transfer index ./x.idx/imgs ... -o x.idx
        shutil.copytree(digits, target / "imgs")
        images = target / "imgs"
    before = tree_hashes(tmp_path)
    result = runner.invoke(cli.app, ["index", str(images), "-b", "lenet5", "-o", str(target), "-q"])
    message = one_line_error(result)
    assert f"--output {target}" in message and ("did not write" in message or "besides an index" in message)
    assert tree_hashes(tmp_path) == before  # byte-identical, nothing added or removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.idx"]  # no lock, temp or aside copy left


def test_an_index_rebuilt_in_place_keeps_only_index_files(tmp_path, digits):
    first = build_index(digits, tmp_path / "idx", backbone="lenet5", workers=0)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(["index.json", "vectors.npy", MARKER_FILE])
    assert json.loads((tmp_path / "idx" / MARKER_FILE).read_text())["written_by"] == "transfer index"
    second = build_index(digits, tmp_path / "idx", backbone="lenet5", workers=0)
    assert first["paths"] == second["paths"] and all(Path(p).is_absolute() for p in second["paths"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_a_rebuild_killed_between_the_renames_keeps_the_old_index(tmp_path, digits, monkeypatch):
    """Killed between moving the old index aside and the new one in: once there was no readable index, and the next
    build removed the old copy as a stale temp."""
    import transfer.serving.search as search

    old = build_index(digits, tmp_path / "idx", backbone="lenet5", workers=0)
    old_bytes = (tmp_path / "idx" / "vectors.npy").read_bytes()
    real_replace = os.replace

    def killed_before_the_new_index_moves_in(source, target):
        if Path(target) == tmp_path / "idx":  # the old index is aside already: the process dies here
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(search.os, "replace", killed_before_the_new_index_moves_in)
    (digits / "0" / "0000.png").rename(tmp_path / "moved.png")  # the new index would differ
    try:
        with pytest.raises(KeyboardInterrupt):
            build_index(digits, tmp_path / "idx", backbone="lenet5", workers=0)
    finally:
        (tmp_path / "moved.png").rename(digits / "0" / "0000.png")
    monkeypatch.setattr(search.os, "replace", real_replace)
    assert not (tmp_path / "idx").exists() and previous_path(tmp_path / "idx").is_dir()
    readable = SearchIndex.load(tmp_path / "idx")  # the old index is still there to read
    assert readable.record["paths"] == old["paths"] and np.asarray(readable.vectors).tobytes() in old_bytes
    build_index(digits, tmp_path / "idx", backbone="lenet5", workers=0)  # recovers, then replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


# --- model identity is content ------------------------------------------------------------------------------------
def test_sharded_predict_never_merges_parts_of_two_models(tmp_path, digits, runner):
    """The fingerprint hashed the model's path: replace the file between shard 0/2 and 1/2 and the merged CSV held
    rows of two models, "merged 2 shards", exit 0."""
    ten, three = tmp_path / "ten.onnx", tmp_path / "three.onnx"
    export_onnx(ten, backbone="lenet5", pretrained=False)
    run_dir = tmp_path / "run"
    finetune(digits, FinetuneConfig(backbone="lenet5", epochs_head=1, epochs_finetune=0, workers=0, batch_size=8,
                                    augment=False), output=run_dir, device="cpu", log=lambda _: None)
    export_onnx(three, run=run_dir)
    model = tmp_path / "model.onnx"
    shutil.copyfile(ten, model)
    base = ["predict", str(digits), "--onnx", str(model), "--batch-size", "4", "-q", "-o", str(tmp_path / "p.csv")]
    first = runner.invoke(cli.app, [*base, "--shard", "0/2"])
    assert first.exit_code == 0 and "waiting for 1 more shard(s)" in first.output
    shutil.copyfile(three, model)  # another model under the same name
    second = runner.invoke(cli.app, [*base, "--shard", "1/2"])
    assert second.exit_code == 0, second.output
    assert "merged 2 shards" not in second.output and "waiting for 1 more shard(s)" in second.output
    assert "1 part file(s) beside" in second.output and "another job" in second.output
    assert not (tmp_path / "p.csv").exists()
    redo = runner.invoke(cli.app, [*base, "--shard", "0/2"])  # shard 0 again, with the model now in place
    assert redo.exit_code == 0 and "merged 2 shards" in redo.output
    whole = runner.invoke(cli.app, [*base[:-1], str(tmp_path / "whole.csv")])
    assert whole.exit_code == 0
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()  # every row of one model


def test_similar_refuses_an_index_whose_run_trained_on(tmp_path, digits, runner):
    """`index --run R`, then `finetune --resume R` with more epochs, then `similar`: neighbours came from the old
    weights with exit 0, because only the run's path was recorded."""
    run_dir = tmp_path / "run"
    finetune(digits, FinetuneConfig(backbone="lenet5", epochs_head=1, epochs_finetune=0, workers=0, batch_size=8,
                                    augment=False), output=run_dir, device="cpu", log=lambda _: None)
    result = runner.invoke(cli.app, ["index", str(digits), "--run", str(run_dir), "-o", str(tmp_path / "idx"), "-q"])
    assert result.exit_code == 0, result.output
    query = str(digits / "1" / "0001.png")
    ok = runner.invoke(cli.app, ["similar", query, "--index", str(tmp_path / "idx"), "-o", str(tmp_path / "s.png")])
    assert ok.exit_code == 0, ok.output
    resumed = runner.invoke(cli.app, ["finetune", str(digits), "--resume", str(run_dir), "--epochs-head", "2", "-q"])
    assert resumed.exit_code == 0, resumed.output
    stale = runner.invoke(cli.app, ["similar", query, "--index", str(tmp_path / "idx"), "-o", str(tmp_path / "t.png")])
    assert "has changed since the index was built" in one_line_error(stale)
    assert not (tmp_path / "t.png").exists()


# --- the embed example decodes as the runtime does ------------------------------------------------------------------
def test_embed_app_decodes_exactly_as_the_runtime(tmp_path, photos):
    """A 16-bit PNG of the coffee photo came out white ("nematode") in examples/embed_app.py and transparent PNGs
    differed from `transfer predict`, though the README said they decode alike."""
    spec = importlib.util.spec_from_file_location("embed_app", ROOT / "examples" / "embed_app.py")
    embed_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(embed_app)
    folder = tmp_path / "odd"
    make_messy_folder(folder, photos, good_per_class=1)
    coffee16 = (np.asarray(Image.fromarray(photos["coffee"]).convert("L"), np.uint16) * 257)
    Image.fromarray(coffee16).save(folder / "coffee16.png")
    rgba = np.dstack([photos["chelsea"], np.tile(np.linspace(0, 255, photos["chelsea"].shape[1], dtype=np.uint8),
                                                 (photos["chelsea"].shape[0], 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    usable = ["cat/cmyk.jpg", "cat/palette.png", "cat/ramp16.png", "cat/gray_alpha.png", "cat/exif6.jpg",
              "cat/animated.gif", "cat/good0.jpg", "coffee16.png", "transparent.png"]
    model_path = tmp_path / "lenet.onnx"
    export_onnx(model_path, backbone="lenet5", pretrained=False)
    runtime = OnnxModel(model_path, device="cpu")
    meta = embed_app.model_metadata.read_model_metadata(runtime.metadata)
    for name in usable:
        ours, theirs = embed_app.preprocess(str(folder / name), meta), runtime.preprocess_one(folder / name)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), name
    white = np.full_like(runtime.preprocess_one(folder / "coffee16.png"), (1.0 - 0.5) / 0.5)
    assert not np.allclose(embed_app.preprocess(str(folder / "coffee16.png"), meta), white)


# --- random initialisation is seeded ---------------------------------------------------------------------------
def test_no_pretrained_extraction_is_the_same_every_run_and_leaves_the_random_state(tmp_path, photo_dir, runner):
    """`extract --no-pretrained` gave different features on every run (and each torchrun rank its own network)."""
    args = ["extract", str(photo_dir), "-b", "resnet18", "--no-pretrained", "--input-size", "64", "--pool", "avg",
            "--layer", "avg_pool", "--workers", "0", "-q"]
    for name in ("a", "b"):
        result = runner.invoke(cli.app, [*args, "-o", str(tmp_path / f"{name}.npy")])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert json.loads((tmp_path / "a.json").read_text())["seed"] == 0
    other = runner.invoke(cli.app, [*args, "--seed", "1", "-o", str(tmp_path / "c.npy")])
    assert other.exit_code == 0 and json.loads((tmp_path / "c.json").read_text())["seed"] == 1
    assert not np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))
    state = torch.random.get_rng_state()
    network, source = create_backbone(get_backbone("resnet18"), pretrained=False, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state) and source.endswith("seed 5)")
    again, _ = create_backbone(get_backbone("resnet18"), pretrained=False, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


def test_two_process_no_pretrained_extract_equals_one(tmp_path, digits):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [str(digits), "-b", "lenet5", "--no-pretrained", "--layer", "fc1", "--batch-size", "4", "--workers", "0",
            "-q"]
    one = subprocess.run([TRANSFER, "extract", *args, "-o", str(tmp_path / "one.npy")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          TRANSFER, "extract", *args, "-o", str(tmp_path / "two.npy")], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stdout + two.stderr
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "two.npy").read_bytes()


# --- index files are validated on load ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built_index(tmp_path_factory, digits) -> Path:
    folder = tmp_path_factory.mktemp("index") / "idx"
    build_index(digits, folder, backbone="lenet5", workers=0)
    return folder


def damaged_copy(source: Path, target: Path, record=None, vectors=None) -> Path:
    shutil.copytree(source, target)
    if record is not None:
        (target / "index.json").write_text(json.dumps(record))
    if vectors is not None:
        np.save(target / "vectors.npy", vectors)
    return target


def test_hand_damaged_vectors_are_refused_naming_the_row(tmp_path, built_index, digits, runner):
    """A row scaled x1000 ranked first and a NaN row was dropped silently."""
    vectors = np.load(built_index / "vectors.npy")
    record = json.loads((built_index / "index.json").read_text())
    scaled, nan = vectors.copy(), vectors.copy()
    scaled[3] *= 1000
    nan[5, 0] = np.nan
    query = str(digits / "2" / "0002.png")
    for name, bad, row, problem in (("scaled", scaled, 3, "has length"), ("nan", nan, 5, "is not finite")):
        folder = damaged_copy(built_index, tmp_path / name, vectors=bad)
        result = runner.invoke(cli.app, ["similar", query, "--index", str(folder), "-o", str(tmp_path / "s.png")])
        message = one_line_error(result)
        assert f"vectors.npy: row {row} ({record['paths'][row]}) {problem}" in message


@pytest.mark.parametrize(("change", "key"), [
    ("a JSON list", "must be a JSON object"),
    ("no model", "model is missing"),
    ("fewer paths than rows", "paths must list"),
    ("a label past the classes", "labels[0]"),
    ("count as text", "count is missing or not a whole number"),
    ("a future format", "format 99"),
])
def test_damaged_index_json_is_one_line_for_similar_and_serve(tmp_path, built_index, digits, runner, change, key):
    record = json.loads((built_index / "index.json").read_text())
    if change == "a JSON list":
        record = [record]
    elif change == "no model":
        del record["model"]
    elif change == "fewer paths than rows":
        record["paths"] = record["paths"][:-2]
    elif change == "a label past the classes":
        record["labels"][0] = len(record["classes"]) + 4
    elif change == "count as text":
        record["count"] = str(record["count"])
    else:
        record["format"] = 99
    folder = damaged_copy(built_index, tmp_path / "bad", record=record)
    result = runner.invoke(cli.app, ["similar", str(digits / "0" / "0000.png"), "--index", str(folder),
                                     "-o", str(tmp_path / "s.png")])
    message = one_line_error(result)
    assert f"--index {folder}: index.json" in message and key in message
    if change == "no model":  # serve reads the index at start-up, before binding: one line, exit 2
        onnx = tmp_path / "x.onnx"
        export_onnx(onnx, backbone="lenet5", pretrained=False, layers=["fc1"])
        served = runner.invoke(cli.app, ["serve", "--onnx", str(onnx), "--index", str(folder), "--port", "1"])
        assert key in one_line_error(served) and "serving" not in served.output


# --- smaller items --------------------------------------------------------------------------------------------------
def test_similar_reports_unreadable_queries_and_stale_images(tmp_path, digits, runner):
    images = tmp_path / "images"
    shutil.copytree(digits, images)
    build_index(images, tmp_path / "idx", backbone="lenet5", workers=0)
    (images / "0" / "0000.png").unlink()  # gone since indexed
    with Image.open(images / "1" / "0001.png") as image:
        image.rotate(90).save(images / "1" / "0001.png")  # changed since indexed
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good = digits / "0" / "0000.png"
    result = runner.invoke(cli.app, ["similar", str(good), str(digits / "1" / "0001.png"), str(bad), "--index",
                                     str(tmp_path / "idx"), "-k", "12", "-o", str(tmp_path / "s.png"),
                                     "--json", str(tmp_path / "hits.json")])
    assert result.exit_code == 0, result.output
    assert f"skipped query {bad}: not an image" in result.output
    assert "2 indexed image(s) are missing or changed since the index was built" in result.output
    hits = json.loads((tmp_path / "hits.json").read_text())["results"]
    statuses = {hit["path"]: hit["status"] for r in hits for hit in r["neighbours"]}
    assert statuses[str((images / "0" / "0000.png").resolve())] == "missing"
    assert statuses[str((images / "1" / "0001.png").resolve())] == "changed"
    assert [r.get("error") for r in hits][-1].startswith("not an image")


def test_layers_put_parameters_on_the_keras_named_rows(runner, tmp_path):
    """VGG16's blockN_convM and fc1/fc2 rows and Lite0's _bn rows showed 0 parameters (timm keeps the weights on the
    neighbouring module), unlike Keras' summary."""
    result = runner.invoke(cli.app, ["layers", "-b", "vgg16", "--json", str(tmp_path / "vgg.json"), "-q"])
    assert result.exit_code == 0, result.output
    rows = {row["alias"]: row["params"] for row in json.loads((tmp_path / "vgg.json").read_text()) if row["alias"]}
    assert rows["block1_conv1"] == 3 * 3 * 3 * 64 + 64 and rows["block5_conv3"] == 3 * 3 * 512 * 512 + 512
    assert rows["fc1"] == 7 * 7 * 512 * 4096 + 4096 and rows["fc2"] == 4096 * 4096 + 4096
    assert rows["block1_pool"] == 0 and rows["predictions"] == 4096 * 1000 + 1000
    assert sum(rows.values()) == 138_357_544  # every weight on exactly one named row: Keras' VGG16 total
    result = runner.invoke(cli.app, ["layers", "-b", "efficientnet_lite0", "--json", str(tmp_path / "lite.json"),
                                     "-q"])
    rows = {row["alias"]: row["params"] for row in json.loads((tmp_path / "lite.json").read_text()) if row["alias"]}
    assert rows["stem_bn"] == 2 * 32 and rows["stem_activation"] == 0 and rows["top_bn"] == 2 * 1280
    assert rows["block1a_bn"] == 2 * 32 and rows["block2a_expand_bn"] == 2 * 96


@pytest.mark.slow  # slow (20 s): --batch-size auto and its resume are tested in the default suite (test_recipe)
def test_batch_size_auto_again_on_resume_and_a_stage_named_twice(tmp_path, digits, runner):
    run_dir = tmp_path / "run"
    result = runner.invoke(cli.app, ["finetune", str(digits), "-b", "lenet5", "--epochs-head", "1", "--batch-size",
                                     "auto", "--workers", "0", "--no-augment", "-o", str(run_dir), "-q"])
    assert result.exit_code == 0, result.output
    resumed = runner.invoke(cli.app, ["finetune", str(digits), "--resume", str(run_dir), "--epochs-head", "2",
                                      "--batch-size", "auto", "-q"])
    assert resumed.exit_code == 0, resumed.output
    config = json.loads((run_dir / "config.json").read_text())
    assert config["settings"]["batch_size"] == config["batch_size_auto"]["batch_size"]
    twice = runner.invoke(cli.app, ["lr-find", str(digits), "-b", "lenet5", "--stage", "scratch", "--stage",
                                    "scratch", "--batch-size", "4", "-o", str(tmp_path / "lr.png"), "--json",
                                    str(tmp_path / "lr.json"), "-q"])
    assert twice.exit_code == 0, twice.output
    assert [r["stage"] for r in json.loads((tmp_path / "lr.json").read_text())] == ["scratch"]


# --- torchrun: a stopped rank ends the job, resumable ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_stopped_rank_ends_the_job_within_the_timeout_and_the_run_resumes(tmp_path):
    """One stopped rank blocked the others for 30 minutes (no timeout on the process group)."""
    data = digits_folder(tmp_path / "digits", per_class=3, size=32, classes=3)
    port = free_port()
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "PYTHONPATH": str(ROOT),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, "tests/distributed_job.py", str(data),
                                           str(tmp_path / "run"), "1", "stall", "4"], cwd=ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        started = time.monotonic()
        _, stderr = processes[0].communicate(timeout=240)
        assert processes[0].returncode == 1, stderr
        assert time.monotonic() - started < 200
        assert "rank 0 of 2: another process stopped answering within --dist-timeout 4 s" in stderr
        assert f"resume with --resume {tmp_path / 'run'}" in stderr and "Traceback" not in stderr
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
    assert (tmp_path / "run" / "last.ckpt").exists()
    finished = finetune(data, resume=tmp_path / "run", device="cpu", log=lambda _: None)
    assert finished.epochs_run == 4


def test_damaged_index_json_error_names_the_file(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.json").write_text("{not json")
    np.save(tmp_path / "idx" / "vectors.npy", np.zeros((1, 2), np.float32))
    with pytest.raises(DataError, match="unreadable"):
        SearchIndex.load(tmp_path / "idx")
