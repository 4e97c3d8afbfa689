"""The README's tour runs as written: every line exits 0 and leaves what it promises."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_tour_module():
    spec = importlib.util.spec_from_file_location("tour", ROOT / "benchmarks" / "tour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tour_runs_as_written(tmp_path):
    tour = load_tour_module()
    commands = tour.tour_commands()
    assert len(commands) >= 15 and all(c.startswith(("transfer ", "python -m transfer")) for c in commands)
    results = tour.run_tour_in_process(tmp_path)
    failed = [r for r in results if r["exit_code"] != 0]
    assert not failed, (failed[0]["command"], failed[0]["stderr"][-2000:])
    assert len(results) == len(commands)
    rows = list(csv.DictReader((tmp_path / "runs" / "digits" / "metrics.csv").open()))
    head = [float(r["val_loss"]) for r in rows if r["stage"] == "head"]
    assert [r["stage"] for r in rows] == ["head"] * len(head) + ["finetune"] * 4
    if len(head) < 25:  # the default head stage (25 epochs on cached features) ended by --patience 5
        assert len(head) > 5 and min(head[-5:]) >= min(head[:-5])
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["checker"] == "passed (full check)" and record["exporter"] == "dynamo"
    cat = next(r for r in results if "chelsea.jpg" in r["command"])
    assert "cat" in cat["stdout"]
    assert np.load(tmp_path / "feats.npy").shape == (4, 112)
    assert np.load(tmp_path / "logits.npy").shape == (120, 10)
    with np.load(tmp_path / "onnx_feats.npz") as archive:
        assert archive["top_activation"].shape == (4, 1280, 7, 7)
    for features, sidecar in (("feats.npy", "feats.json"), ("logits.npy", "logits.json"),
                              ("onnx_feats.npz", "onnx_feats.json")):  # every features file keeps its own sidecar
        assert json.loads((tmp_path / sidecar).read_text())["output"] == features
    assert len(list(csv.DictReader((tmp_path / "preds.csv").open()))) == 4
    heatmaps = json.loads((tmp_path / "heatmaps" / "heatmaps.json").read_text())["images"]
    assert len(heatmaps) == 4 and all(len(item["files"]) == 1 for item in heatmaps)
    cat_map = next(item for item in heatmaps if item["path"].endswith("chelsea.jpg"))["classes"][0]
    assert "cat" in cat_map["class"]
    for picture in ("kernels.png", "heatmaps/contact_sheet.png"):
        assert (tmp_path / "seen" / picture).stat().st_size > 10_000, picture
    assert len(list((tmp_path / "seen" / "feature_maps").glob("*chelsea.png"))) == 1
