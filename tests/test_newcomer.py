"""Newcomer pass, second round: what cost a new user time in the first hour, each now checked. (The serve page for
extractor files is in tests/test_serve.py, the tour's sidecars in tests/test_readme.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import typer

import cli
from tests.conftest import digits_folder, tree_hashes
from transfer.training import FinetuneConfig, finetune, split_epochs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("newcomer") / "digits", per_class=6, size=32, classes=3)


def commands() -> dict:
    return typer.main.get_command(cli.app).commands


def test_readme_vocabulary_table_matches_every_commands_options():
    """The README's table of shared flags lists, per flag, exactly the commands that take it."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- vocabulary:"):].split("\n\n")[0]  # the table right after the marker
    rows = [line for line in block.splitlines()[3:] if line.startswith("| `")]
    assert len(rows) >= 15
    options = {name: {opt for param in command.params for opt in param.opts + param.secondary_opts}
               for name, command in commands().items()}
    for row in rows:
        flags_cell, _, commands_cell = (cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:4])
        flags = re.findall(r"(--[a-z0-9-]+|-[a-z])\b", flags_cell.split("/")[0])
        if "--help" in flags or "--version" in flags:
            continue
        listed = {name.strip() for name in commands_cell.split(",")}
        for flag in flags:
            taking = {name for name, opts in options.items() if flag in opts}
            assert taking == listed, (flag, sorted(taking ^ listed))


def test_help_and_version_everywhere_and_switches_take_no_value(runner):
    version = runner.invoke(cli.app, ["--version"])
    from transfer import __version__

    assert version.exit_code == 0 and version.output.strip() == f"transfer {__version__}"
    for name in [None, *commands()]:
        result = runner.invoke(cli.app, [name, "-h"] if name else ["-h"], terminal_width=200)
        assert result.exit_code == 0 and "Usage" in result.output, name
        assert "<bool>" not in result.output, name


def test_split_epochs_follows_the_staged_rule():
    assert [split_epochs(n) for n in (1, 2, 3, 6, 10)] == [(1, 0), (1, 1), (1, 2), (3, 3), (5, 5)]


def test_epochs_resume_without_data_nothing_new_and_interrupted_reports(tmp_path, digits, runner):
    run_dir = tmp_path / "run"
    args = ["finetune", str(digits), "-b", "lenet5", "--workers", "0", "--no-augment", "-o", str(run_dir), "-q"]
    clash = runner.invoke(cli.app, [*args, "--epochs", "3", "--epochs-head", "2"])
    assert clash.exit_code == 2 and "--epochs 3 and --epochs-head exclude each other" in clash.output
    assert not run_dir.exists()
    done = runner.invoke(cli.app, [*args, "--epochs", "3", "--json", str(tmp_path / "run.json")])
    assert done.exit_code == 0, done.output
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["settings"]["epochs_head"], config["settings"]["epochs_finetune"]) == (1, 2)
    assert [s["epochs"] for s in config["stages"]] == [3] and config["data_dir"] == str(digits.resolve())
    assert json.loads((tmp_path / "run.json").read_text())["epochs"] == 3
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 18 and not set(split["train"]) & set(split["val"])
    # resume with nothing new: said, and nothing rewritten
    before = tree_hashes(run_dir)
    again = runner.invoke(cli.app, ["finetune", "--resume", str(run_dir)])
    assert again.exit_code == 0 and "nothing new to train" in again.output
    assert tree_hashes(run_dir) == before
    # resume without the data folder: the run's own is used
    more = runner.invoke(cli.app, ["finetune", "--resume", str(run_dir), "--epochs", "4", "-q"])
    assert more.exit_code == 0, more.output
    assert len((run_dir / "metrics.csv").read_text().strip().splitlines()) == 1 + 4
    # an interrupted run writes its report, curves and confusion matrix for the epochs it did
    stopped = tmp_path / "stopped"

    def stop(row: dict) -> None:
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(digits, FinetuneConfig(backbone="lenet5", epochs_head=4, epochs_finetune=0, workers=0,
                                        augment=False), output=stopped, device="cpu", log=lambda _: None,
                 on_epoch_end=stop)
    report = json.loads((stopped / "report.json").read_text())
    assert report["finished"] is False and report["epochs"] == 2
    assert (stopped / "curves.png").stat().st_size > 0 and (stopped / "confusion.png").stat().st_size > 0
    resumed = runner.invoke(cli.app, ["finetune", "--resume", str(stopped), "-q"])
    assert resumed.exit_code == 0 and "nothing new" not in resumed.output  # not finished: it trains on
    assert json.loads((stopped / "report.json").read_text())["finished"] is True


def test_evaluate_warns_about_training_images_and_takes_the_validation_split(tmp_path, digits, runner):
    run_dir = tmp_path / "run"
    finetune(digits, FinetuneConfig(backbone="lenet5", epochs_head=1, epochs_finetune=0, workers=0, augment=False),
             output=run_dir, device="cpu", log=lambda _: None)
    split = json.loads((run_dir / "split.json").read_text())
    result = runner.invoke(cli.app, ["evaluate", str(digits), "--run", str(run_dir), "--json",
                                     str(tmp_path / "all.json")])
    assert result.exit_code == 0, result.output
    assert f"warning: {len(split['train'])} of these 18 images trained the run" in result.output
    assert f"wrote {tmp_path / 'all.json'}" in result.output
    assert json.loads((tmp_path / "all.json").read_text())["training_images"] == len(split["train"])
    val = runner.invoke(cli.app, ["evaluate", str(digits), "--run", str(run_dir), "--split", "val", "--json",
                                  str(tmp_path / "val.json")])
    assert val.exit_code == 0 and "warning" not in val.output
    record = json.loads((tmp_path / "val.json").read_text())
    assert record["count"] == len(split["val"]) and record["training_images"] == 0
    from exporters.export import export_onnx

    export_onnx(tmp_path / "m.onnx", run=run_dir)  # an ONNX file of the run knows the split through its run
    onnx = runner.invoke(cli.app, ["evaluate", str(digits), "--onnx", str(tmp_path / "m.onnx"), "--split", "val"])
    assert onnx.exit_code == 0 and f"({len(split['val'])} images of the run's validation split)" in onnx.output
    plain = digits_folder(tmp_path / "other", per_class=2, size=32, classes=3)
    none = runner.invoke(cli.app, ["evaluate", str(plain), "--run", str(run_dir), "--split", "val"])
    assert none.exit_code == 2 and "none of the images" in none.output


def test_vgg16_fc1_fc2_and_flatten_are_keras_vectors(tmp_path, photo_dir):
    from transfer.apps.extract import extract

    result = extract(photo_dir, backbone="vgg16", layers=["block5_pool", "flatten", "fc1", "fc2"], pretrained=False,
                     workers=0)
    pool = result.features["block5_pool"]
    assert pool.shape == (3, 512, 7, 7)
    assert result.features["flatten"].shape == (3, 25088)
    assert np.array_equal(result.features["flatten"], pool.transpose(0, 2, 3, 1).reshape(3, -1))  # Keras' order
    assert result.features["fc1"].shape == (3, 4096) and result.features["fc2"].shape == (3, 4096)
    assert (result.features["fc1"] >= 0).all()  # the ReLU after the dense layer, as Keras' Dense(relu)


def test_small_outputs_say_what_they_are(tmp_path, digits, runner):
    table = runner.invoke(cli.app, ["backbones"], terminal_width=250)
    lenet = next(line for line in table.output.splitlines() if "lenet5" in line)
    assert "yes (no weights needed)" in lenet
    model = tmp_path / "m.onnx"
    exported = runner.invoke(cli.app, ["export", "-b", "lenet5", "--no-pretrained", "-o", str(model), "-q"])
    assert exported.exit_code == 0 and "within the tolerance" in exported.output
    assert "for reference" in exported.output
    predicted = runner.invoke(cli.app, ["predict", str(digits), "--onnx", str(model), "-o", str(tmp_path / "p.csv"),
                                        "-q", "--workers", "1"])
    assert predicted.exit_code == 0 and f"wrote {tmp_path / 'p.csv'} (18 rows)" in predicted.output


def test_help_texts_say_what_the_readme_says(runner):
    """Help had drifted from the README: `-b` was a "registry name" (it takes any timm name), `runs -h` left out
    "damaged", `index --layer` did not say it takes one layer, the int8 example named a folder the tour never makes."""
    text = (ROOT / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `-b, --backbone NAME` |"))
    described = row.split("|")[2].strip()
    assert described == cli.BACKBONE_HELP
    for name, command in commands().items():
        for param in command.params:
            if "--backbone" in param.opts:
                assert param.help.startswith(cli.BACKBONE_HELP), (name, param.help)
    assert "`index`: one" in next(line for line in text.splitlines() if line.startswith("| `--layer NAME` |"))
    layer = next(p for p in commands()["index"].params if "--layer" in p.opts)
    assert not layer.multiple and "the one layer" in layer.help
    runs_help = runner.invoke(cli.app, ["runs", "-h"], terminal_width=200).output
    assert "damaged" in runs_help and "created (a resume keeps" in runs_help
    export_help = runner.invoke(cli.app, ["export", "-h"], terminal_width=200).output
    assert "--calibration ./mydata -o" in export_help and "mydata/train" not in export_help
    assert "python -m transfer.data.samples digits ./mydata" in text  # the tour's folder the example names
