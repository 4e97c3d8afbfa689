"""The default recipe (issue #42): what it resolves to per kind of run, and the paced writes of a stage on cached
features, checked against a run that writes every epoch and against an interrupted and resumed run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import digits_folder
from transfer.core.metrics import read_metrics
from transfer.training import FinetuneConfig, epoch_saves, finetune
from transfer.training.config import DEFAULTS, resumed_config

QUIET = {"device": "cpu", "log": lambda _: None}


def test_defaults_resolve_per_kind_of_run(tmp_path):
    staged = FinetuneConfig(backbone="efficientnet_lite0").check()
    assert (staged.epochs_head, staged.epochs_finetune, staged.augment) == (25, 3, False)
    assert staged.cache_features is True
    scratch = FinetuneConfig(backbone="lenet5").check()
    assert (scratch.epochs_head, scratch.epochs_finetune, scratch.augment) == (3, 3, True)
    assert DEFAULTS["staged"]["epochs_head"] == 25 and DEFAULTS["scratch"]["augment"] is True
    augmented = FinetuneConfig(backbone="efficientnet_lite0", augment=True).check()
    assert augmented.cache_features is True  # augmentation then starts with stage 2
    given = FinetuneConfig(backbone="efficientnet_lite0", epochs_head=0, epochs_finetune=2).check()
    assert (given.epochs_head, given.epochs_finetune) == (0, 2)
    assert FinetuneConfig(backbone="efficientnet_lite0", mixup=0.2).check().cache_features is False  # mixes images
    assert FinetuneConfig(backbone="efficientnet_lite0", cache_features=False).check().cache_features is False
    # a run written before the rule changed kept `None`: it resumes under the rule it ran under
    old = {"backbone": "efficientnet_lite0", "epochs_head": 3, "epochs_finetune": 3, "augment": True,
           "cache_features": None}
    assert resumed_config({"settings": old}, {}, tmp_path).cache_features is False
    assert resumed_config({"settings": {**old, "augment": False}}, {}, tmp_path).cache_features is True


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp("digits") / "d", per_class=8, size=32, classes=3)


CONFIG = {"backbone": "efficientnet_lite0", "input_size": 32, "crop_pct": 1.0, "epochs_head": 8, "epochs_finetune": 2,
          "batch_size": 8, "workers": 0, "patience": 99, "lr_head": 3e-3}


def run_watching_writes(data, output, stop_at: int | None = None) -> list[tuple[str, tuple | None]]:
    """Each epoch's stage and the identity of last.ckpt when it ended (a write replaces the file: a new inode and
    modification time)."""
    seen = []

    def watch(row):
        checkpoint = output / "last.ckpt"
        found = checkpoint.stat() if checkpoint.exists() else None
        seen.append((row["stage"], (found.st_ino, found.st_mtime_ns) if found else None))
        if row["epoch"] == stop_at:
            raise KeyboardInterrupt

    finetune(data, FinetuneConfig(**CONFIG), output=output, on_epoch_end=watch, **QUIET)
    return seen


def rows_of(run) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in read_metrics(run / "metrics.csv")]


def test_cached_stage_writes_once_and_keeps_the_same_best_weights(digits, tmp_path, monkeypatch):
    paced = run_watching_writes(digits, tmp_path / "paced")
    head = [inode for stage, inode in paced if stage == "head"]
    assert head[:-1] == [None] * 7 and head[-1] is not None  # 8 quick epochs: one write, at the stage's end
    tuned = [inode for stage, inode in paced if stage == "finetune"]
    assert len({head[-1], *tuned}) == 3  # stage 2 on images writes every epoch
    monkeypatch.setattr(epoch_saves, "PACE_SECONDS", 0.0)  # every epoch written, as stages on images are
    every = run_watching_writes(digits, tmp_path / "every")
    assert len({inode for _, inode in every}) == 10
    rows = rows_of(tmp_path / "paced")
    best_epoch = min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert rows == rows_of(tmp_path / "every") and len(rows) == 10
    paced_best = load_file(tmp_path / "paced" / "best.safetensors")
    every_best = load_file(tmp_path / "every" / "best.safetensors")
    assert paced_best.keys() == every_best.keys()
    for name, tensor in every_best.items():
        assert torch.equal(paced_best[name], tensor), (name, best_epoch)


def test_interrupt_in_a_paced_stage_keeps_the_epoch_and_resumes_exactly(digits, tmp_path):
    run_watching_writes(digits, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_watching_writes(digits, tmp_path / "cut", stop_at=5)
    checkpoint = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 5 and checkpoint["stage_index"] == 0
    assert (tmp_path / "cut" / "best.safetensors").exists()
    finetune(digits, None, resume=tmp_path / "cut", **QUIET)
    assert rows_of(tmp_path / "cut") == rows_of(tmp_path / "whole")
    whole, cut = (load_file(tmp_path / name / "best.safetensors") for name in ("whole", "cut"))
    for name, tensor in whole.items():
        assert torch.equal(cut[name], tensor), name
