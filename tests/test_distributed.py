"""torchrun: the same commands on several processes (gloo on CPU here) give the same results as one process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import digits_folder
from tests.distributed_settings import CONFIG
from transfer.core.errors import OptionError
from transfer.core.metrics import read_metrics
from transfer.core.world import World, parse_shard
from transfer.data.datasets import GlobalBatchSampler
from transfer.training import finetune

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = shutil.which("transfer") or str(Path(sys.executable).parent / "transfer")


# Both sides compute with one thread per process: float sums split over another number of threads round differently.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(processes: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` (rendezvous on a free local port)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=ONE_THREAD)


def run(*args: str) -> subprocess.CompletedProcess:
    """One plain process, one thread."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=ROOT, env=ONE_THREAD)


def test_world_from_env_and_blocks():
    assert World.from_env({}) == World(0, 1, 0)
    world = World.from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.main, world.distributed) == (1, 3, False, True)
    # contiguous blocks that differ by at most one and give the input order back
    blocks = [World(rank, 3).block(10) for rank in range(3)]
    assert [list(b) for b in blocks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [World(rank, 4).take("ab") for rank in range(4)] == [["a"], ["b"], [], []]
    with pytest.raises(OptionError, match="RANK 3 is not in 0..WORLD_SIZE-1"):
        World.from_env({"RANK": "3", "WORLD_SIZE": "2"})
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(OptionError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_global_batches_are_split_not_changed(size):
    """Together the ranks see exactly the one-process batches, step by step, and every rank takes as many steps."""
    single = list(GlobalBatchSampler(23, 5, True, 7, World()))
    shares = [list(GlobalBatchSampler(23, 5, True, 7, World(rank, size))) for rank in range(size)]
    assert all(len(s) == len(single) == 5 for s in shares)
    for step, batch in enumerate(single):
        assert [i for share in shares for i in share[step]] == batch
    assert sorted(i for batch in single for i in batch) == list(range(23))
    assert list(GlobalBatchSampler(3, 5, True, 8, World())) != single[:1]  # the seed matters


def test_extract_blocks_are_whole_batches():
    """Each rank forwards whole one-process batches, so outputs are the same bytes at any number of processes."""
    spans = [World(rank, 3).batch_block(23, 4) for rank in range(3)]
    assert [(s.start, s.stop) for s in spans] == [(0, 8), (8, 16), (16, 23)]
    assert [len(World(rank, 2).batch_block(3, 4)) for rank in range(2)] == [3, 0]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("d") / "digits", per_class=8, size=32, classes=3)


def _same_weights(a: Path, b: Path) -> None:
    """allclose: the ranks sum gradients in another order, and AdamW divides by sqrt(v), so a weight whose gradient
    is near zero can move by a few 1e-5 (measured: 2.3e-5 on one of 1.3M head weights, all others within 1e-6)."""
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=1e-4, atol=1e-4, msg=name)


def _same_rows(a: Path, b: Path) -> None:
    rows_a, rows_b = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [r["stage"] for r in rows_a] == [r["stage"] for r in rows_b] == ["head"] * 2 + ["finetune"] * 2
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-6), key


# slow (49 s): the default suite keeps torchrun's extract, predict, stopped-rank and multi-process checks; the slow
# multi-label test also trains two processes against one
@pytest.mark.slow
def test_two_process_finetune_equals_one_and_resumes_at_another_size(tmp_path, digits):
    """Global batch 7 over 18 training images (7, 7, 4: shares 4/3, 4/3, 2/2), both stages: same weights and metrics
    rows as one process. Then a 2-process run stopped after epoch 1 resumes in one process to the same end."""
    single = finetune(digits, CONFIG, output=tmp_path / "one", device="cpu", log=lambda _: None)
    assert single.epochs_run == 4
    done = torchrun(2, "tests/distributed_job.py", str(digits), str(tmp_path / "two"))
    assert done.returncode == 0, done.stdout + done.stderr
    _same_weights(tmp_path / "one" / "best.safetensors", tmp_path / "two" / "best.safetensors")
    _same_rows(tmp_path / "one", tmp_path / "two")
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(single.best_val_acc)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())

    stopped = torchrun(2, "tests/distributed_job.py", str(digits), str(tmp_path / "resumed"), "1")
    assert stopped.returncode != 0 and (tmp_path / "resumed" / "last.ckpt").exists()
    assert len(read_metrics(tmp_path / "resumed" / "metrics.csv")) == 1
    finished = finetune(digits, resume=tmp_path / "resumed", device="cpu", log=lambda _: None)
    assert finished.epochs_run == 4
    _same_weights(tmp_path / "one" / "best.safetensors", tmp_path / "resumed" / "best.safetensors")
    _same_rows(tmp_path / "one", tmp_path / "resumed")


@pytest.mark.slow
def test_two_process_multilabel_finetune_equals_one(tmp_path):
    """Several labels per image under torchrun: multi-hot targets gathered and an empty share of a tiny batch."""
    from transfer.data.samples import write_digit_pairs

    pairs = write_digit_pairs(tmp_path / "pairs", count=24, classes=4)
    config = replace(CONFIG, labels={"path": str(pairs / "labels.csv")})
    single = finetune(pairs / "images", config, output=tmp_path / "one", device="cpu", log=lambda _: None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "tests/distributed_job.py", str(pairs / "images"), str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**ONE_THREAD, "TRANSFER_TEST_LABELS": str(pairs / "labels.csv"),
                               "TRANSFER_TEST_LOG": "tensorboard"})
    assert done.returncode == 0, done.stdout + done.stderr
    _same_weights(tmp_path / "one" / "best.safetensors", tmp_path / "two" / "best.safetensors")
    _same_rows(tmp_path / "one", tmp_path / "two")
    # --log tensorboard under torchrun: rank 0 alone writes, one point per epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    epochs = tmp_path / "two" / "tensorboard" / "epochs"
    writers = {p.name.split(".")[-2] for p in (tmp_path / "two" / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # event files are named ...HOST.PID.N: every one from one process
    events = EventAccumulator(str(epochs))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/val_loss")] == [r["epoch"] for r in read_metrics(tmp_path / "two" /
                                                                                                   "metrics.csv")]
    one, two = (json.loads((tmp_path / run / "config.json").read_text()) for run in ("one", "two"))
    assert one["task"] == two["task"] == "multilabel" and one["thresholds"] == two["thresholds"]
    assert json.loads((tmp_path / "two" / "report.json").read_text())["macro_f1"] == pytest.approx(
        single.report["macro_f1"])


def test_two_process_extract_is_byte_identical(tmp_path, digits):
    args = [str(digits), "-b", "efficientnet_lite0", "--input-size", "32", "--layer", "block3a_expand_activation",
            "--layer", "avg_pool", "--batch-size", "4", "--workers", "0", "-q"]
    assert run(TRANSFER, "extract", *args, "-o", str(tmp_path / "one.npz")).returncode == 0
    done = torchrun(2, TRANSFER, "extract", *args, "-o", str(tmp_path / "two.npz"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one.pop("output") == "one.npz" and two.pop("output") == "two.npz"  # each sidecar names its own file
    assert one["paths"] == two["paths"] and len(one["paths"]) == 24 and one == two
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.npz", "two.json", "two.npz"]


def test_two_process_index_is_byte_identical(tmp_path, digits):
    """`transfer index` under torchrun: each process streams its block into a part, rank 0 writes the index."""
    args = [str(digits), "-b", "efficientnet_lite0", "--input-size", "32", "--batch-size", "4", "--workers", "0"]
    assert run(TRANSFER, "index", *args, "-o", str(tmp_path / "one.idx")).returncode == 0
    done = torchrun(2, TRANSFER, "index", *args, "-o", str(tmp_path / "two.idx"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("indexed 24 images (1280 dimensions, layer avg_pool)") == 1  # rank 0 reports
    assert (tmp_path / "one.idx" / "vectors.npy").read_bytes() == (tmp_path / "two.idx" / "vectors.npy").read_bytes()
    one, two = (json.loads((tmp_path / f"{n}.idx" / "index.json").read_text()) for n in ("one", "two"))
    assert one["paths"] == two["paths"] and one["labels"] == two["labels"] and len(one["paths"]) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.idx", "two.idx"]  # no scratch or part left


def test_sharded_predict_merges_into_the_one_process_file(tmp_path, digits):
    model = tmp_path / "m.onnx"
    assert run(TRANSFER, "export", "-b", "lenet5", "--no-pretrained", "-o", str(model)).returncode == 0
    base = [TRANSFER, "predict", str(digits), "--onnx", str(model), "--batch-size", "5", "-q"]
    assert run(*base, "-o", str(tmp_path / "one.csv")).returncode == 0
    first = run(*base, "--shard", "1/2", "-o", str(tmp_path / "shards.csv"))
    assert first.returncode == 0 and not (tmp_path / "shards.csv").exists()
    assert "shard 1/2: 9 image(s); waiting for 1 more shard(s)" in first.stdout
    second = run(*base, "--shard", "0/2", "-o", str(tmp_path / "shards.csv"))
    assert second.returncode == 0 and "merged 2 shards into" in second.stdout
    assert (tmp_path / "shards.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    rows = list(csv.DictReader((tmp_path / "one.csv").open()))
    assert len(rows) == 24 and rows[0]["path"].endswith("0000.png")
    done = torchrun(2, *base[:1], *base[1:], "-o", str(tmp_path / "two.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert run(*base, "-o", str(tmp_path / "one.json")).returncode == 0
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "one.csv", "one.json", "shards.csv", "two.json"]


def test_finetune_under_torchrun_needs_a_named_run(monkeypatch, digits):
    from transfer.core.errors import TransferError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TransferError, match="--output RUN"):
        finetune(digits, replace(CONFIG), device="cpu", log=lambda _: None)
