"""transfer tune: a small study end to end, a killed study continued, the recipe reused by finetune --recipe."""

from __future__ import annotations

import csv
import json

import pytest

import cli
from tests.conftest import digits_folder, one_line_error
from transfer.training import FinetuneConfig

TUNE = ["-b", "lenet5", "--workers", "0", "--batch-size", "8", "-q"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_folder(tmp_path_factory.mktemp("tune") / "digits", per_class=6, size=32, classes=3)


def test_tune_runs_a_study_and_writes_the_best_recipe(tmp_path, digits, runner):
    """Two trials, each a run directory; recipe.json holds the knobs of the trial with the lowest validation loss
    (read back from that run's own config.json); trials.csv has a row per trial; finetune --recipe reuses the
    recipe, a flag given on the command line winning."""
    study = tmp_path / "study"
    result = runner.invoke(cli.app, ["tune", str(digits), *TUNE, "--trials", "2", "-o", str(study),
                                     "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((study / "trials.csv").open()))
    assert len(rows) == 2 and {row["state"] for row in rows} <= {"complete", "pruned"}
    complete = [row for row in rows if row["state"] == "complete"]
    best = min(complete, key=lambda row: float(row["val_loss"]))
    record = json.loads((tmp_path / "t.json").read_text())
    assert record["best"]["trial"] == int(best["trial"])
    assert record["best"]["val_loss"] == pytest.approx(float(best["val_loss"]))
    recipe = json.loads((study / "recipe.json").read_text())["recipe"]
    settings = json.loads((study / f"trial_{int(best['trial']):03d}" / "config.json").read_text())["settings"]
    assert recipe == {name: settings[name] for name in recipe} and len(recipe) == 10
    assert (study / "trials.png").stat().st_size > 5_000 and (study / "study.db").is_file()
    first = json.loads((study / "trial_000" / "config.json").read_text())["settings"]  # the defaults' own recipe
    defaults = vars(FinetuneConfig(backbone="lenet5", batch_size=8, workers=0).check())
    assert {name: first[name] for name in recipe} == {name: defaults[name] for name in recipe}
    assert f"best: trial {best['trial']}" in result.output

    reused = runner.invoke(cli.app, ["finetune", str(digits), "-b", "lenet5", "--recipe", str(study / "recipe.json"),
                                     "--epochs-finetune", "1", "--workers", "0", "-o", str(tmp_path / "run"), "-q"])
    assert reused.exit_code == 0, reused.output
    used = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert used["epochs_finetune"] == 1  # given on the command line
    assert {k: used[k] for k in recipe if k != "epochs_finetune"} == {k: v for k, v in recipe.items()
                                                                      if k != "epochs_finetune"}


def test_a_killed_tune_continues_its_study_and_other_settings_are_refused(tmp_path, digits, runner):
    """A trial left running by a killed process is marked failed and the study goes on to the asked number of
    finished trials; the same folder with another backbone setting is refused in one line."""
    import optuna

    from transfer.training.tune import STUDY_NAME

    study_dir = tmp_path / "study"
    assert runner.invoke(cli.app, ["tune", str(digits), *TUNE, "--trials", "1", "-o", str(study_dir)]).exit_code == 0
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{study_dir / 'study.db'}")
    study.ask()  # what a kill in the middle of a trial leaves: a trial still marked running
    result = runner.invoke(cli.app, ["tune", str(digits), *TUNE, "--trials", "2", "-o", str(study_dir)])
    assert result.exit_code == 0, result.output
    assert "continuing the study" in result.output and "1 trial(s) done" in result.output
    states = [t.state.name for t in optuna.load_study(study_name=STUDY_NAME,
                                                      storage=f"sqlite:///{study_dir / 'study.db'}").trials]
    assert states[1] == "FAIL" and sum(s in ("COMPLETE", "PRUNED") for s in states) == 2
    refused = runner.invoke(cli.app, ["tune", str(digits), *TUNE, "--seed", "3", "--trials", "2", "-o",
                                      str(study_dir)])
    assert "holds a study of other data or settings" in one_line_error(refused)


def test_recipe_files_are_checked(tmp_path, digits, runner):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"recipe": {"lr_head": 0.01, "backbone": "vgg16"}}))
    result = runner.invoke(cli.app, ["finetune", str(digits), "--recipe", str(bad), "-o", str(tmp_path / "r")])
    assert "unknown setting 'backbone'" in one_line_error(result)
    result = runner.invoke(cli.app, ["finetune", str(digits), "--recipe", str(tmp_path / "none.json")])
    assert "--recipe: file not found" in one_line_error(result)
    assert not (tmp_path / "r").exists()
