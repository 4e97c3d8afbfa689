"""Labels as people have them: a CSV of labels (the same run as class folders), several labels per image (real digits
composed two at a time), unbalanced classes (`--class-weights balanced`, `--sampler balanced`), and every malformed
labels file answered with one line or a reported skip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import cli
from exporters.runtime import OnnxModel
from tests.conftest import digits_folder, one_line_error, tree_hashes
from transfer.core.errors import DataError, OptionError
from transfer.core.metrics import choose_thresholds, multilabel_report
from transfer.data.datasets import epoch_order
from transfer.data.labels import LabelsFile, read_labels
from transfer.data.samples import write_digit_pairs
from transfer.data.scan import Sample
from transfer.training import FinetuneConfig, finetune, load_run
from transfer.training.targets import balanced_weights, sampling_weights

QUIET = {"device": "cpu", "log": lambda _: None}


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_labels_file_trains_exactly_as_class_folders(tmp_path, runner):
    data = digits_folder(tmp_path / "digits", per_class=12)
    labels = write_csv(tmp_path / "labels.csv", ["file,class"] + [f"{p.relative_to(data)},{p.parent.name}"
                                                                   for p in sorted(data.rglob("*.png"))])
    settings = {"backbone": "lenet5", "epochs_head": 2, "epochs_finetune": 0, "augment": False, "workers": 0,
                "batch_size": 16}
    folders = finetune(data, FinetuneConfig(**settings), output=tmp_path / "folders", **QUIET)
    from_csv = finetune(data, FinetuneConfig(**settings, labels=LabelsFile(str(labels)).to_dict()),
                        output=tmp_path / "csv", **QUIET)
    assert from_csv.best_val_loss == folders.best_val_loss and from_csv.best_val_acc == folders.best_val_acc
    for name in ("split.json", "report.json"):
        assert (tmp_path / "csv" / name).read_text() == (tmp_path / "folders" / name).read_text()
    rows = [[{k: v for k, v in row.items() if k != "seconds"} for row in
             __import__("csv").DictReader((tmp_path / run / "metrics.csv").open())] for run in ("folders", "csv")]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    config = json.loads((tmp_path / "csv" / "config.json").read_text())
    assert config["task"] == "single" and config["settings"]["labels"]["path"] == str(labels)

    result = runner.invoke(cli.app, ["scan", str(data), "--labels", str(labels)])
    assert result.exit_code == 0 and "csv layout" in result.output and "120 usable images" in result.output
    result = runner.invoke(cli.app, ["evaluate", str(data), "--labels", str(labels), "--run", str(tmp_path / "csv"),
                                     "--split", "val"])
    assert result.exit_code == 0 and f"accuracy {from_csv.best_val_acc:.4f} (20 images" in result.output


def test_every_malformed_labels_file_gets_one_line_or_a_reported_skip(tmp_path, runner, photos):
    data = digits_folder(tmp_path / "digits", per_class=3, classes=3)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "0" / "scan.jpg").write_bytes(b"")
    before = tree_hashes(data)

    def fails(name: str, text: bytes | str, *flags: str) -> str:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return one_line_error(runner.invoke(cli.app, ["scan", str(data), "--labels", str(path), *flags]))

    assert "file not found" in one_line_error(runner.invoke(cli.app, ["scan", str(data), "--labels",
                                                                      str(tmp_path / "none.csv")]))
    assert "not UTF-8 text" in fails("latin.csv", "image,label\n0/x.png,caf\xe9\n".encode("latin-1"))
    assert "empty; it needs a header row" in fails("empty.csv", "\n\n")
    assert "a header and no rows" in fails("header.csv", "image,label\n")
    assert "the header has 1 column" in fails("one.csv", "image\n0/0000.png\n")
    assert "'label' appear twice" in fails("twice.csv", "image,label,label\n0/a.png,0,0\n")
    assert "--label-column 'kind': " in fails("ok.csv", "image,label\n0/a.png,0\n", "--label-column", "kind")
    assert "the path and label columns are the same" in fails("same.csv", "image,label\n0/a.png,0\n",
                                                                 "--path-column", "label")
    assert "contradicts --single-label" in fails("sep.csv", "image,label\n0/a.png,0\n", "--label-sep", ";",
                                                  "--single-label")
    assert "add --labels FILE.csv" in one_line_error(runner.invoke(cli.app, ["scan", str(data), "--label-column",
                                                                             "x"]))
    first = sorted((data / "1").iterdir())[0].relative_to(data)
    good = sorted(data.glob("?/*.png"))
    rows = ["image,label,split", *(f"{p.relative_to(data)},{p.parent.name},train" for p in good),
            "missing.png,0,train", f"{first},1,train", f"{first},2,val", "2/0002.png,,val", ",1,val",
            "2/0001.png,2,later", "broken.png,1,train", "0/scan.jpg,0,val", "too,many,fields,here", "0/0000,0,val"]
    labels = write_csv(tmp_path / "messy.csv", rows)
    result = runner.invoke(cli.app, ["scan", str(data), "--labels", str(labels), "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    skipped = {item["path"]: item["reason"] for item in json.loads((tmp_path / "s.json").read_text())["skipped"]}
    where = str(labels)
    expected = {
        f"{where}:11 (missing.png)": "file not found",
        f"{where}:12 ({first})": "duplicate of line",
        f"{where}:13 ({first})": "labelled again: line",
        f"{where}:14 (2/0002.png)": "empty label",
        f"{where}:15": "empty path",
        f"{where}:16 (2/0001.png)": "unknown split 'later'",
        f"{where}:19": "4 fields, the header has 3",
        f"{where}:20 (0/0000)": "duplicate of line 2",  # an id without extension finds 0/0000.png
        str(data / "broken.png"): "",
        str(data / "0" / "scan.jpg"): "",
    }
    assert set(skipped) == set(expected), skipped
    for path, reason in expected.items():
        assert reason in skipped[path], (path, skipped[path])
    assert "skipped" in result.output and "10 row(s) skipped" in result.output
    strict = runner.invoke(cli.app, ["scan", str(data), "--labels", str(labels), "--strict"])
    assert "10 unusable row(s) (--strict)" in one_line_error(strict)
    assert tree_hashes(data) == before  # nothing the user owns was changed


def single_label_ceiling(label_sets: list[set[int]], classes: int) -> float:
    """The highest macro F1 any predictor of ONE label per image can reach on these images: class c's F1 is at most
    2 TP_c / (P_c + TP_c), and the true positives over all classes are at most one per image; F1_c is concave in
    TP_c, so handing out the images one at a time to the class that gains most finds the maximum."""
    positives = np.array([sum(c in labels for labels in label_sets) for c in range(classes)], dtype=float)
    hits = np.zeros(classes)

    def f1(c: int, tp: float) -> float:
        return 2 * tp / (positives[c] + tp) if positives[c] else 0.0

    for _ in label_sets:
        gains = [f1(c, hits[c] + 1) - f1(c, hits[c]) if hits[c] < positives[c] else -1.0 for c in range(classes)]
        best = int(np.argmax(gains))
        if gains[best] <= 0:
            break
        hits[best] += 1
    present = positives > 0
    return float(np.mean([f1(c, hits[c]) for c in range(classes) if present[c]]))


def test_several_labels_per_image_train_past_any_single_label_head(tmp_path, runner):
    pairs = write_digit_pairs(tmp_path / "pairs", count=320, classes=5)
    labels = pairs / "labels.csv"
    config = FinetuneConfig(backbone="lenet5", epochs_head=8, epochs_finetune=0, augment=False, workers=0,
                            batch_size=32, lr_head=3e-3, labels=LabelsFile(str(labels)).to_dict())
    result = finetune(pairs / "images", config, output=tmp_path / "run", **QUIET)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["task"] == "multilabel" and run_config["classes"] == ["0", "1", "2", "3", "4"]
    thresholds = run_config["thresholds"]
    assert list(report["thresholds"].values()) == thresholds and all(0 < t < 1 for t in thresholds)

    split = json.loads((tmp_path / "run" / "split.json").read_text())
    scan = read_labels(pairs / "images", LabelsFile(str(labels)))
    by_path = {s.path.name: s for s in scan.samples}
    val = [by_path[Path(p).name] for p in split["val"]]
    ceiling = single_label_ceiling([set(s.label_set) for s in val], 5)
    assert report["count"] == len(val) == 64
    assert report["macro_f1"] >= 0.8 and report["macro_f1"] > ceiling + 0.1, (report["macro_f1"], ceiling)
    assert result.best_val_acc == report["exact_match"]

    model, _ = load_run(tmp_path / "run")
    from transfer.core.images import open_image
    from transfer.core.preprocess import Preprocessing, eval_array

    prep = Preprocessing.from_dict(run_config["preprocessing"])
    batch = torch.from_numpy(np.stack([eval_array(open_image(s.path), prep) for s in val]))
    with torch.no_grad():
        torch_sets = [{str(c) for c in np.flatnonzero(row >= np.array(thresholds))}
                      for row in torch.sigmoid(model(batch)).numpy()]
    assert runner.invoke(cli.app, ["export", "--run", str(tmp_path / "run"), "-o", str(tmp_path / "m.onnx")]
                         ).exit_code == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["transfer.task"] == "multilabel" and json.loads(meta["transfer.thresholds"]) == thresholds
    predictions = OnnxModel(tmp_path / "m.onnx", device="cpu").predict([s.path for s in val])
    assert [set(p.labels) for p in predictions] == torch_sets
    assert any(len(labels) == 2 for labels in torch_sets) and any(len(labels) == 1 for labels in torch_sets)
    truth_sets = [{str(c) for c in s.label_set} for s in val]
    for name in run_config["classes"]:  # the errors per label, counted here from the reloaded model's answers
        missed = sum(name in t and name not in p for t, p in zip(truth_sets, torch_sets, strict=True))
        given = sum(name not in t and name in p for t, p in zip(truth_sets, torch_sets, strict=True))
        assert (report["per_class"][name]["false_negatives"], report["per_class"][name]["false_positives"]) == \
            (missed, given), name
    wrong = {s.path.name: (t, p) for s, t, p in zip(val, truth_sets, torch_sets, strict=True) if t != p}
    assert report["top_losses"] and {Path(item["path"]).name for item in report["top_losses"]} <= set(wrong)
    for item in report["top_losses"]:  # its caption names its own labels, as the model gave them
        truth, given = wrong[Path(item["path"]).name]
        assert item["caption"].startswith(f"predicted {', '.join(sorted(given)) or 'none'}; true "
                                          f"{', '.join(sorted(truth))}\n"), item["caption"]
    assert [item["loss"] for item in report["top_losses"]] == sorted((i["loss"] for i in report["top_losses"]),
                                                                     reverse=True)
    for picture in ("label_errors.png", "top_losses.png"):
        assert (tmp_path / "run" / picture).stat().st_size > 5_000, picture
    from fastapi.testclient import TestClient

    from transfer.serving.serve import create_app

    with TestClient(create_app(tmp_path / "m.onnx", device="cpu")) as client:
        files = [("files", (s.path.name, s.path.read_bytes(), "image/png")) for s in val[:6]]
        answer = client.post("/predict", files=files).json()
    assert answer["task"] == "multilabel"
    assert [set(p["labels"]) for p in answer["predictions"]] == torch_sets[:6]
    import subprocess
    import sys

    app = subprocess.run([sys.executable, "examples/embed_app.py", str(tmp_path / "m.onnx"),
                          *(str(s.path) for s in val[:6])], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert app.returncode == 0, app.stderr
    assert [set(filter(None, line.split("\t")[1].split(","))) for line in app.stdout.splitlines()] == torch_sets[:6]
    out = runner.invoke(cli.app, ["evaluate", str(pairs / "images"), "--labels", str(labels), "--onnx",
                                  str(tmp_path / "m.onnx"), "--split", "val"])
    assert out.exit_code == 0 and f"macro F1 {report['macro_f1']:.4f}" in out.output
    int8 = runner.invoke(cli.app, ["export", "--run", str(tmp_path / "run"), "--int8", "--calibration",
                                   str(pairs / "images"), "-o", str(tmp_path / "q.onnx")])
    assert "--int8 is judged by top-1 agreement" in one_line_error(int8) and not (tmp_path / "q.onnx").exists()

    damaged = onnx.load(str(tmp_path / "m.onnx"))
    for prop in damaged.metadata_props:
        if prop.key == "transfer.thresholds":
            prop.value = json.dumps(thresholds[:-1])
    onnx.save(damaged, str(tmp_path / "damaged.onnx"))
    with pytest.raises(DataError, match="transfer.thresholds: a multi-label file needs one threshold in"):
        OnnxModel(tmp_path / "damaged.onnx", device="cpu")


def test_balanced_weights_and_sampling_raise_the_minority_recall(tmp_path, runner):
    data = digits_folder(tmp_path / "digits", per_class=100, classes=2)
    for path in sorted((data / "1").iterdir())[10:]:
        path.unlink()  # 100 zeros, 10 ones
    recalls = {}
    for weights, flags in (("none", []), ("balanced", ["--class-weights", "balanced"]),
                           ("sampler", ["--sampler", "balanced"])):
        result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--epochs", "3", "--no-augment",
                                         "--batch-size", "16", "--val-split", "0.3", "--workers", "0", "--device",
                                         "cpu", *flags, "-o", str(tmp_path / weights), "-q"])
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / weights / "report.json").read_text())
        recalls[weights] = report["per_class"]["1"]["recall"]
        assert report["per_class"]["1"]["support"] == 3
        worst = min(report["per_class"], key=lambda name: report["per_class"][name]["recall"])
        assert f"lowest recall: {worst} {report['per_class'][worst]['recall']:.3f} of" in result.output
    assert recalls["balanced"] > recalls["none"] and recalls["sampler"] > recalls["none"], recalls
    assert json.loads((tmp_path / "sampler" / "config.json").read_text())["settings"]["sampler"] == "balanced"
    values = json.loads((tmp_path / "balanced" / "config.json").read_text())["class_weight_values"]
    from sklearn.utils.class_weight import compute_class_weight

    train = np.array([0] * 70 + [1] * 7)
    assert np.allclose(values, compute_class_weight("balanced", classes=np.array([0, 1]), y=train))


def test_balanced_sampling_and_weights_follow_their_rules():
    samples = [Sample(Path(f"{i}.png"), 0 if i < 90 else 1) for i in range(100)]
    draws = epoch_order(100_000, 3, sampling_weights(samples, 2).repeat(1000))
    counts = np.bincount(np.asarray([samples[i % 100].label for i in draws.tolist()]), minlength=2)
    assert abs(counts[1] / counts.sum() - 0.5) < 0.01  # each class drawn about half of the time
    order = epoch_order(50, 7)
    assert torch.equal(order, epoch_order(50, 7)) and sorted(order.tolist()) == list(range(50))
    multi = [Sample(Path(name), None, None, labels) for name, labels in (("a", (0, 1)), ("b", (1,)), ("c", (1,)))]
    assert balanced_weights(multi, 3, multilabel=True).tolist() == [2.0, 1.0, 1.0]  # negatives / positives
    # label 1 is on every image: 0 negatives / 3 positives would be pos_weight 0, no gradient at all; it stays 1
    assert balanced_weights(multi[1:], 3, multilabel=True).tolist() == [1.0, 1.0, 1.0]
    both = FinetuneConfig(backbone="lenet5", pretrained=False, class_weights="balanced", sampler="balanced")
    with pytest.raises(OptionError, match="--sampler balanced and --class-weights balanced"):
        both.check()


def test_thresholds_and_multilabel_metrics_against_independent_computations():
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(0)
    truth = (rng.random((200, 4)) < 0.4).astype(float)
    scores = np.clip(truth * 0.35 + rng.random((200, 4)) * 0.65, 0, 1)
    chosen = choose_thresholds(truth, scores)
    for column, threshold in enumerate(chosen):
        best = max(f1_score(truth[:, column], scores[:, column] >= t) for t in np.arange(0.05, 0.951, 0.05))
        assert f1_score(truth[:, column], scores[:, column] >= threshold) == pytest.approx(best)
    report = multilabel_report(truth, scores, chosen, ["a", "b", "c", "d"])
    predicted = scores >= np.array(chosen)
    assert report["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert report["micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro"))
    assert report["mean_average_precision"] == pytest.approx(average_precision_score(truth, scores, average="macro"))
    assert report["exact_match"] == pytest.approx(float(np.mean((predicted == (truth > 0.5)).all(axis=1))))



def test_multilabel_mixup_smoothing_ema_and_resume_work_as_for_one_label(tmp_path):
    from transfer.training.regularize import mix_batch

    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.manual_seed(0)
    _, soft = mix_batch(torch.zeros(2, 3, 4, 4), targets, 3, mixup=0.4, smoothing=0.1)
    smoothed = targets * 0.9 + 0.05
    lam = float((soft[0, 0] - smoothed[1, 0]) / (smoothed[0, 0] - smoothed[1, 0]))
    assert 0 < lam < 1 and torch.allclose(soft, smoothed * lam + smoothed.flip(0) * (1 - lam))

    pairs = write_digit_pairs(tmp_path / "pairs", count=60, classes=4)
    config = FinetuneConfig(backbone="lenet5", epochs_head=3, epochs_finetune=0, workers=0, batch_size=8, mixup=0.3,
                            label_smoothing=0.1, ema=0.9, labels=LabelsFile(str(pairs / "labels.csv")).to_dict())
    finetune(pairs / "images", config, output=tmp_path / "straight", **QUIET)

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(pairs / "images", config, output=tmp_path / "resumed", on_epoch_end=stop, **QUIET)
    finetune(None, resume=tmp_path / "resumed", **QUIET)
    from safetensors.torch import load_file

    straight, resumed = (load_file(tmp_path / run / "best.safetensors") for run in ("straight", "resumed"))
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
    a, b = (json.loads((tmp_path / run / "config.json").read_text()) for run in ("straight", "resumed"))
    assert a["thresholds"] == b["thresholds"] and a["task"] == "multilabel"


def test_extract_index_and_lr_find_read_a_labels_file(tmp_path, runner):
    pairs = write_digit_pairs(tmp_path / "pairs", count=16, classes=3)
    images, labels = pairs / "images", pairs / "labels.csv"
    expected = {row.split(",")[0]: sorted(int(n) for n in row.split(",")[1].split(";"))
                for row in labels.read_text().splitlines()[1:]}
    flags = ["--labels", str(labels), "-b", "lenet5", "--input-size", "32"]
    result = runner.invoke(cli.app, ["extract", str(images), *flags, "--pool", "avg", "-o", str(tmp_path / "f.npy")])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "f.json").read_text())
    assert sidecar["classes"] == ["0", "1", "2"] and len(sidecar["paths"]) == 16
    assert {Path(p).name: labels for p, labels in zip(sidecar["paths"], sidecar["labels"], strict=True)} == expected

    result = runner.invoke(cli.app, ["index", str(images), *flags, "-o", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    query = images / "0000.png"
    result = runner.invoke(cli.app, ["similar", str(query), "--index", str(tmp_path / "idx"), "-k", "1",
                                     "-o", str(tmp_path / "s.png"), "--json", str(tmp_path / "hits.json")])
    assert result.exit_code == 0, result.output
    hit = json.loads((tmp_path / "hits.json").read_text())["results"][0]["neighbours"][0]
    assert hit["label"] == ", ".join(str(n) for n in expected["0000.png"])
    mixed = runner.invoke(cli.app, ["extract", str(images), str(query), *flags])
    assert "--labels reads the images of one folder" in one_line_error(mixed)

    result = runner.invoke(cli.app, ["lr-find", str(images), "--labels", str(labels), "--label-column", "kind",
                                     "-b", "lenet5", "-o", str(tmp_path / "lr.png")])
    assert "--label-column 'kind': " in one_line_error(result) and not (tmp_path / "lr.png").exists()


@pytest.mark.slow  # a process per command; the same paths run in-process above
@pytest.mark.parametrize("marker", ["<!-- labels example -->", "<!-- multilabel example -->"])
def test_the_readme_label_examples_run_as_written(marker, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    outputs = []
    from tests.test_readme import load_tour_module

    for command in load_tour_module().tour_commands(marker=marker):
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs.append(done.stdout + done.stderr)
    if "multilabel" in marker:
        report = json.loads((tmp_path / "runs" / "pairs" / "report.json").read_text())
        assert report["task"] == "multilabel" and report["macro_f1"] >= 0.8
        assert f"macro F1 {report['macro_f1']:.4f}" in outputs[-1]
        assert "labels (at the model's thresholds)" in outputs[-2]
    else:
        assert "csv layout" in outputs[2] and "200 usable images" in outputs[2]
        config = json.loads((tmp_path / "runs" / "csv" / "config.json").read_text())
        assert config["settings"]["class_weights"] == "balanced" and len(config["class_weight_values"]) == 10
        report = json.loads((tmp_path / "runs" / "csv" / "report.json").read_text())
        assert report["count"] == 40 and report["accuracy"] >= 0.8  # the README says 0.93; chance is 0.1


def test_tsv_is_valid_separators_and_multi_label_flags(tmp_path):
    data = digits_folder(tmp_path / "digits", per_class=2, classes=3)
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*.png"))
    tsv = write_csv(tmp_path / "labels.tsv", ["Filename\tTags\tis_valid",
                                              *(f"{f}\tcat dog\t{'True' if i % 2 else 'False'}"
                                                for i, f in enumerate(files))])
    single = read_labels(data, LabelsFile(str(tsv)))  # a space is no separator unless asked: one label, "cat dog"
    assert single.task == "single" and single.classes == ["cat dog"]
    assert [s.split for s in single.samples] == ["train", "val"] * 3  # fastai's is_valid
    spaced = read_labels(data, LabelsFile(str(tsv), multi_label=True))  # --multi-label: space-separated tags
    assert spaced.task == "multilabel" and spaced.classes == ["cat", "dog"]
    assert all(s.labels == (0, 1) and s.label is None for s in spaced.samples)
    piped = write_csv(tmp_path / "piped.csv", ["path,kind,where", *(f"{f},a|b,test" for f in files[:2]),
                                               *(f"{f},a,train" for f in files[2:])])
    chosen = read_labels(data, LabelsFile(str(piped), label_column="kind", split_column="where"))
    assert chosen.task == "multilabel" and [s.labels for s in chosen.samples][:2] == [(0, 1), (0, 1)]
    assert [s.split for s in chosen.samples] == ["test", "test", "train", "train", "train", "train"]
    commas = write_csv(tmp_path / "commas.csv", ["image,label", *(f"{f},\"x, y\"" for f in files)])
    assert read_labels(data, LabelsFile(str(commas), label_sep=",")).classes == ["x", "y"]


def test_one_image_is_one_row_however_the_file_spells_it(tmp_path, runner):
    """`3/../3/0003.png`, the absolute path of a listed file, `./3/0003.png` and a symlink to it are one image: the
    first row is kept and the others are duplicates or 'labelled again', so it can never sit in training and
    validation under different labels. Rows that leave the data folder are refused (issue #35)."""
    data = digits_folder(tmp_path / "digits", per_class=4, classes=4)
    target = data / "3" / "0003.png"
    (data / "3" / "link.png").symlink_to(target)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.png").write_bytes(target.read_bytes())
    (data / "out.png").symlink_to(outside / "x.png")  # a symlink out is followed, as the folder scan follows it
    listed = sorted(p for p in data.glob("?/*.png") if p.name != "link.png")
    rows = ["image,label", *(f"{p.relative_to(data)},{p.parent.name}" for p in listed),
            "3/../3/0003.png,1", f"{target},2", "./3/0003.png,3", "3/link.png,0", "3//0003.png,3",
            "../elsewhere/x.png,1", f"{outside / 'x.png'},1", "out.png,2"]
    labels = write_csv(tmp_path / "spellings.csv", rows)
    report = read_labels(data, LabelsFile(str(labels)))
    first = len(listed) + 2  # line of the first extra row
    reasons = {item.path.split(":", 1)[1].split(" ")[0]: item.reason for item in report.skipped}
    assert reasons == {str(first): "labelled again: line 14 says 3; the first row is kept",
                       str(first + 1): "labelled again: line 14 says 3; the first row is kept",
                       str(first + 2): "duplicate of line 14", str(first + 3): reasons[str(first + 3)],
                       str(first + 4): "duplicate of line 14",
                       str(first + 5): f"outside the data folder {data}: ../elsewhere/x.png",
                       str(first + 6): f"outside the data folder {data}: {outside / 'x.png'}"}, reasons
    assert reasons[str(first + 3)].startswith("labelled again: line 14 says 3")
    paths = [str(s.path) for s in report.samples]
    assert len(paths) == len(set(paths)) == len(listed) + 1 and str(data / "out.png") in paths
    assert paths.count(str(target)) == 1
    result = runner.invoke(cli.app, ["finetune", str(data), "--labels", str(labels), "-b", "lenet5", "--epochs", "1",
                                     "--input-size", "32", "-o", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    listed_paths = [p for part in ("train", "val") for p in split[part]]
    assert len(listed_paths) == len(set(listed_paths)) == len(listed) + 1


def test_line_breaks_inside_a_row_never_cut_a_label_or_shift_line_numbers(tmp_path):
    """str.splitlines cut rows at U+2028, U+0085 and form feed and dropped quoted newlines; rows are the CSV's own
    rows now, a label holding a break or control character is skipped with its reason, and every later row keeps
    its true line number."""
    data = digits_folder(tmp_path / "digits", per_class=2, classes=3)
    a0, a1, b0, b1, c0, c1 = (str(p.relative_to(data)) for p in sorted(data.glob("?/*.png")))
    text = (f"image,label\n{a0},0\n{a1},ze\u2028ro\n{b0},one\u0085x\n{b1},o\fne\n"
            f'{c0},"four\nlines"\n{c1},2\nmissing.png,2\n')
    labels = tmp_path / "breaks.csv"
    labels.write_text(text, encoding="utf-8")
    report = read_labels(data, LabelsFile(str(labels)))
    reasons = {item.path: item.reason for item in report.skipped}
    where = str(labels)
    assert reasons == {
        f"{where}:3 ({a1})": "label holds a line break or control character (U+2028)",
        f"{where}:4 ({b0})": "label holds a line break or control character (U+0085)",
        f"{where}:5 ({b1})": "label holds a line break or control character (U+000C)",
        f"{where}:6 ({c0})": "label holds a line break or control character (U+000A)",
        f"{where}:9 (missing.png)": f"file not found: {data}/missing.png"}, reasons
    assert report.classes == ["0", "2"] and sorted(str(s.path.relative_to(data)) for s in report.samples) == [a0, c1]


def test_many_skipped_rows_print_a_bounded_summary_and_the_json_has_them_all(tmp_path, runner):
    data = digits_folder(tmp_path / "digits", per_class=3, classes=2)
    rows = ["image,label", *(f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.glob("?/*.png"))),
            *(f"gone/{i}.png,0" for i in range(300)), *("0/0000.png,0" for _ in range(40))]
    labels = write_csv(tmp_path / "many.csv", rows)
    out = tmp_path / "scan.json"
    result = runner.invoke(cli.app, ["scan", str(data), "--labels", str(labels), "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "300 skipped: file not found" in lines and "40 skipped: duplicate of line N" in lines
    assert sum(line.startswith("  ") and "gone/" in line for line in lines) == 3 and len(lines) < 40
    assert "340 row(s) skipped (--json FILE lists every one with its reason)" in result.output
    assert len(json.loads(out.read_text())["skipped"]) == 340


def test_labels_that_look_like_space_separated_tags_get_a_note(tmp_path, runner):
    """Kaggle-style tags ('0 1', '0 2', ...) without --multi-label became combination classes with no word said;
    now `scan` (and finetune's log) says so in one line and how to read them as tags, and real names with a space
    ('golden retriever') get no note."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    tags = ["0 1", "0 2", "1 2", "0 1", "2", "0 2"]
    for index in range(len(tags)):
        Image.new("RGB", (16, 16), (index * 40, 0, 0)).save(folder / f"{index}.png")
    write_csv(tmp_path / "tags.csv", ["image,tags", *(f"{i}.png,{tag}" for i, tag in enumerate(tags))])
    report = read_labels(folder, LabelsFile(str(tmp_path / "tags.csv")))
    assert report.task == "single" and len(report.classes) == 4 and len(report.notes) == 1
    assert "--multi-label" in report.notes[0] and "'0 1'" in report.notes[0]
    scanned = runner.invoke(cli.app, ["scan", str(folder), "--labels", str(tmp_path / "tags.csv")],
                            terminal_width=200)
    assert scanned.exit_code == 0 and "note: --labels" in scanned.output and "add --multi-label" in scanned.output
    as_tags = read_labels(folder, LabelsFile(str(tmp_path / "tags.csv"), multi_label=True))
    assert as_tags.task == "multilabel" and as_tags.classes == ["0", "1", "2"] and as_tags.notes == []
    names = ["golden retriever", "tabby cat", "labrador retriever", "tabby cat", "tabby cat", "golden retriever"]
    write_csv(tmp_path / "names.csv", ["image,label", *(f"{i}.png,{name}" for i, name in enumerate(names))])
    assert read_labels(folder, LabelsFile(str(tmp_path / "names.csv"))).notes == []
