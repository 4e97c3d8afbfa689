"""`predict -o`: rows written as batches finish, a killed run continued where it stopped (byte for byte the file an
uninterrupted run writes), and a run of another job or a changed file never continued."""

from __future__ import annotations

import json

import pytest

import cli
from exporters.export import export_onnx
from exporters.runtime import OnnxModel
from tests.conftest import digits_folder

IMAGES = 37  # 10 batches of 4 with a short last one


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    data = digits_folder(root / "digits", per_class=4, size=32, classes=9)  # 36 digits
    (data / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")  # one unreadable: its row keeps its place
    export_onnx(root / "lenet.onnx", backbone="lenet5", pretrained=False)
    return root / "lenet.onnx", data


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a run: nothing after it runs (not even `except Exception`)."""


def interrupted(monkeypatch, after_chunks: int) -> list[int]:
    """Make OnnxModel.iter_predict die after `after_chunks` chunks; returns the lengths of the inputs it was given."""
    real = OnnxModel.iter_predict
    given: list[int] = []

    def dying(self, images, *args, **kwargs):
        images = list(images)
        given.append(len(images))
        for number, chunk in enumerate(real(self, images, *args, **kwargs)):
            if number == after_chunks:
                raise Killed
            yield chunk

    monkeypatch.setattr(OnnxModel, "iter_predict", dying)
    return given


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_killed_predict_continues_to_the_same_bytes(lenet_file, tmp_path, runner, monkeypatch, suffix):
    model, data = lenet_file
    base = ["predict", str(data), "--onnx", str(model), "--batch-size", "4", "--top-k", "3", "--workers", "1", "-q"]
    whole = runner.invoke(cli.app, [*base, "-o", str(tmp_path / f"whole{suffix}")])
    assert whole.exit_code == 0, whole.output
    assert f"wrote {tmp_path / f'whole{suffix}'} ({IMAGES} rows)" in whole.output
    assert "1 unreadable image(s)" in whole.output and "broken.png" in whole.output
    assert "probability" not in whole.output  # with -o the terminal gets a summary, not the table (--show for it)
    target = tmp_path / f"resumed{suffix}"
    record = tmp_path / f".resumed{suffix}.transfer-resume"
    given = interrupted(monkeypatch, after_chunks=5)
    with pytest.raises(Killed):
        runner.invoke(cli.app, [*base, "-o", str(target)], catch_exceptions=False)
    state = json.loads(record.read_text())
    assert state["rows"] == 20 and target.stat().st_size == state["bytes"]  # five batches of 4, written as they came
    with open(target, "ab") as handle:
        handle.write(b"half a row, as a kill leaves it")
    monkeypatch.undo()
    given = interrupted(monkeypatch, after_chunks=10 ** 6)  # counts what the second run predicts
    resumed = runner.invoke(cli.app, [*base, "-o", str(target)])
    assert resumed.exit_code == 0, resumed.output
    assert given == [IMAGES - 20]  # only the rest was predicted
    assert f"({IMAGES} rows; 20 kept from the interrupted run)" in resumed.output
    assert target.read_bytes() == (tmp_path / f"whole{suffix}").read_bytes()
    assert not record.exists()
    rows = (target.read_text().splitlines()[1:] if suffix == ".csv" else target.read_text().splitlines()
            if suffix == ".jsonl" else json.loads(target.read_text()))
    assert len(rows) == IMAGES


def test_a_record_of_another_job_or_a_changed_file_is_not_continued(lenet_file, tmp_path, runner, monkeypatch):
    model, data = lenet_file
    base = ["predict", str(data), "--onnx", str(model), "--batch-size", "4", "--workers", "1", "-q"]
    target = tmp_path / "p.csv"
    fresh = runner.invoke(cli.app, [*base, "--top-k", "2", "-o", str(tmp_path / "fresh.csv")])
    assert fresh.exit_code == 0, fresh.output
    interrupted(monkeypatch, after_chunks=3)
    with pytest.raises(Killed):
        runner.invoke(cli.app, [*base, "--top-k", "3", "-o", str(target)], catch_exceptions=False)
    monkeypatch.undo()
    given = interrupted(monkeypatch, after_chunks=10 ** 6)
    other = runner.invoke(cli.app, [*base, "--top-k", "2", "-o", str(target)])  # other settings: starts over
    assert other.exit_code == 0, other.output
    assert "started" in other.output and "afresh" in other.output and "another model, inputs or settings" in \
        other.output and given == [IMAGES]
    assert target.read_bytes() == (tmp_path / "fresh.csv").read_bytes()
    monkeypatch.undo()
    interrupted(monkeypatch, after_chunks=3)
    with pytest.raises(Killed):
        runner.invoke(cli.app, [*base, "--top-k", "2", "-o", str(target)], catch_exceptions=False)
    monkeypatch.undo()
    edited = target.read_bytes().replace(b"path", b"file", 1)  # someone edited the partial file since
    target.write_bytes(edited)
    given = interrupted(monkeypatch, after_chunks=10 ** 6)
    again = runner.invoke(cli.app, [*base, "--top-k", "2", "-o", str(target)])
    assert again.exit_code == 0 and "changed since the interrupted run wrote it" in again.output
    assert given == [IMAGES] and target.read_bytes() == (tmp_path / "fresh.csv").read_bytes()


def test_show_prints_the_table_and_bad_suffixes_are_refused(lenet_file, tmp_path, runner):
    model, data = lenet_file
    shown = runner.invoke(cli.app, ["predict", str(data / "1"), "--onnx", str(model), "--top-k", "2", "--show",
                                    "-o", str(tmp_path / "p.jsonl")])
    assert shown.exit_code == 0, shown.output
    assert "probability" in shown.output and "wrote" in shown.output
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(len(r["labels"]) == 2 and r["error"] is None for r in records)
    refused = runner.invoke(cli.app, ["predict", str(data / "1"), "--onnx", str(model), "-o", str(tmp_path / "p.txt")])
    assert refused.exit_code == 2 and "use a .csv, .jsonl or .json file" in refused.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # no lock, record or temp file left


def test_no_images_still_make_a_whole_file(lenet_file, tmp_path):
    """Nothing to predict: each format is still a complete file, the one write_predictions makes for no rows."""
    from transfer.serving.predict import predict_to_file, write_predictions

    model = OnnxModel(lenet_file[0], device="cpu")
    for suffix in (".csv", ".jsonl", ".json"):
        written = predict_to_file(model, lenet_file[0], [], tmp_path / f"none{suffix}", top_k=3)
        write_predictions(tmp_path / f"expected{suffix}", [], 3)
        assert written.rows == 0
        assert (tmp_path / f"none{suffix}").read_bytes() == (tmp_path / f"expected{suffix}").read_bytes()
    assert json.loads((tmp_path / "none.json").read_text()) == []
    assert (tmp_path / "none.csv").read_text().startswith("path,label_1,probability_1,")
