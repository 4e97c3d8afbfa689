"""Experiment logs: TensorBoard event files and an MLflow run from one finetune, through an interruption and a
resume, read back with TensorBoard's and MLflow's own readers; `transfer runs` on the same run directories."""

from __future__ import annotations

import json
import math

import pytest

import cli
from tests.conftest import digits_folder, one_line_error
from tests.test_finetune import random_weights_file
from transfer.core.metrics import read_metrics
from transfer.training import FinetuneConfig, finetune


def _scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_and_mlflow_continue_through_a_resume(tmp_path, monkeypatch, runner):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store: ./mlflow.db, where `mlflow ui` looks
    data = digits_folder(tmp_path / "digits", per_class=8, size=32, classes=3)
    config = FinetuneConfig(backbone="resnet18", epochs_head=2, epochs_finetune=2, batch_size=4, input_size=48,
                            weights=str(random_weights_file(tmp_path, "resnet18")), augment=False, workers=0,
                            cache_features=False, log=["tensorboard", "mlflow"])
    run_dir = tmp_path / "runs" / "tracked"
    quiet = {"device": "cpu", "log": lambda _: None}

    def stop_in_epoch_3(description, done, total):
        if description.endswith("epoch 3") and done == 2:  # mid-epoch: two batch points after the checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, config, output=run_dir, on_batch=stop_in_epoch_3, **quiet)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    saved = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(saved["tracking_uri"])
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2]
    listed = runner.invoke(cli.app, ["runs", str(tmp_path / "runs"), "--json", str(tmp_path / "runs.json")])
    assert listed.exit_code == 0, listed.output
    row, = json.loads((tmp_path / "runs.json").read_text())
    assert (row["status"], row["resumable"], row["epochs"], row["planned_epochs"]) == ("interrupted", True, 2, 4)

    finetune(data, resume=run_dir, **quiet)
    rows = read_metrics(run_dir / "metrics.csv")
    batches_per_epoch = math.ceil(len(json.loads((run_dir / "split.json").read_text())["train"]) / 4)
    # TensorBoard: one point per epoch at steps 1..4 (the killed session's partial epoch 3 purged), the values of
    # metrics.csv, both stages' learning rates, every batch once
    epochs = run_dir / "tensorboard" / "epochs"
    val_loss = _scalars(epochs, "epoch/val_loss")
    assert [step for step, _ in val_loss] == [1, 2, 3, 4]
    assert [value for _, value in val_loss] == pytest.approx([r["val_loss"] for r in rows], rel=1e-6)
    assert [value for _, value in _scalars(epochs, "epoch/stage_index")] == [0, 0, 1, 1]
    assert [value for _, value in _scalars(epochs, "lr/group0")] == pytest.approx([r["lr"] for r in rows])
    batch_steps = [step for step, _ in _scalars(run_dir / "tensorboard" / "batches", "batch/train_loss")]
    assert batch_steps == list(range(1, 4 * batches_per_epoch + 1))
    images = EventAccumulator(str(epochs), size_guidance={"images": 0})
    images.Reload()
    assert {"figures/curves", "figures/confusion"} <= set(images.Tags()["images"])
    # MLflow: the same run continued, parameters, the histories without duplicates, the run's files
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["backbone"] == "resnet18" and run.data.params["epochs_head"] == "2"
    history = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([r["val_loss"] for r in rows])
    assert sorted(m.step for m in client.get_metric_history(run_id, "batch_train_loss")) == list(
        range(1, 4 * batches_per_epoch + 1))
    assert run.data.metrics["final_best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows))
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"config.json", "metrics.csv", "report.json", "curves.png", "best.safetensors"} <= artifacts
    assert "last.ckpt" not in artifacts and "tensorboard" not in artifacts
    # export --run on the tracked run: the ONNX file and its record join the MLflow run
    exported = runner.invoke(cli.app, ["export", "--run", str(run_dir), "-o", str(tmp_path / "tracked.onnx")])
    assert exported.exit_code == 0, exported.output
    assert f"logged the file and this record to MLflow run {run_id}" in exported.output
    assert {item.path for item in client.list_artifacts(run_id, "onnx")} == {"onnx/tracked.onnx",
                                                                               "onnx/tracked.record.json"}
    listed = runner.invoke(cli.app, ["runs", str(tmp_path / "runs"), "--json", str(tmp_path / "runs.json")])
    row, = json.loads((tmp_path / "runs.json").read_text())
    assert (row["status"], row["resumable"], row["epochs"]) == ("finished", True, 4)
    assert row["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in rows))
    assert "finished" in listed.output and "resnet18" in listed.output


def test_missing_tracker_package_stops_before_any_work(tmp_path, monkeypatch, runner):
    from transfer.training import tracking

    monkeypatch.setattr(tracking, "installed", lambda package: package != "mlflow")
    data = digits_folder(tmp_path / "digits", per_class=4, size=32, classes=2)
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--log", "mlflow", "-o",
                                     str(tmp_path / "run"), "--device", "cpu"])
    message = one_line_error(result)
    assert message == ("error: --log mlflow needs the mlflow package: pip install 'transfer[mlflow]' (or: pip "
                       "install mlflow)")
    assert not (tmp_path / "run").exists()


def test_runs_lists_what_the_folders_say(tmp_path, runner):
    """Hand-made run directories: finished, interrupted without a report, damaged; a missing folder is exit 2."""
    root = tmp_path / "runs"
    stages = [{"name": "head", "epochs": 2}, {"name": "finetune", "epochs": 3}]
    header = "stage,epoch,stage_epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds\n"
    for name, created, report, epochs_done in (("b_done", "2026-11-02T10:00:00", True, 5),
                                               ("a_stopped", "2026-11-01T10:00:00", None, 3)):
        run = root / "exp" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"backbone": "resnet50", "data_dir": "/data/flowers",
                                                     "created": created, "stages": stages}))
        (run / "metrics.csv").write_text(header + "".join(
            f"head,{e},{e},0.001,1.0,0.5,{1 / e:.4f},{0.5 + e / 20:.4f},1.0\n" for e in range(1, epochs_done + 1)))
        (run / "last.ckpt").write_bytes(b"checkpoint")
        if report:
            (run / "report.json").write_text(json.dumps({"finished": True, "epochs": 5, "best_val_loss": 0.2,
                                                         "accuracy": 0.75}))
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / ".hidden" / "run").mkdir(parents=True)
    (root / ".hidden" / "run" / "config.json").write_text("{}")
    result = runner.invoke(cli.app, ["runs", str(root), "--json", str(tmp_path / "rows.json")])
    assert result.exit_code == 0, result.output
    rows = {row["run"].split("/")[-1]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert set(rows) == {"a_stopped", "b_done", "broken"}
    assert (rows["b_done"]["status"], rows["b_done"]["epochs"], rows["b_done"]["best_val_loss"]) == ("finished", 5, 0.2)
    assert (rows["a_stopped"]["status"], rows["a_stopped"]["epochs"]) == ("interrupted", 3)
    assert rows["a_stopped"]["best_val_loss"] == pytest.approx(1 / 3, abs=1e-4)  # from metrics.csv: no report
    assert rows["a_stopped"]["planned_epochs"] == 5 and rows["a_stopped"]["resumable"] is True
    assert rows["broken"]["status"] == "damaged" and not rows["broken"]["resumable"]
    assert "3 run(s) under" in result.output
    missing = runner.invoke(cli.app, ["runs", str(tmp_path / "nowhere")])
    assert one_line_error(missing) == f"error: folder not found: {tmp_path / 'nowhere'}"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("store", ["unreachable", "unwritable", "file store"])
def test_a_store_that_cannot_be_used_is_refused_in_seconds_before_any_work(tmp_path, monkeypatch, runner, store):
    """An unreachable server stalled 4-6 minutes and ended in a traceback; the store is probed before any work
    now (no retries, a short timeout): one line naming the store, exit 2, no run directory."""
    import time

    uri = {"unreachable": f"http://127.0.0.1:{_free_port()}",  # nothing listens there
           "unwritable": f"sqlite:///{tmp_path}/a_file/mlflow.db",  # its folder is a file: nothing can be written
           "file store": (tmp_path / "mlruns").as_uri()}[store]  # MLflow 3 refuses new file stores
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder, ./mlruns, lands here
    (tmp_path / "a_file").write_text("not a folder\n")
    data = digits_folder(tmp_path / "digits", per_class=4, size=32, classes=2)
    started = time.monotonic()
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--log", "mlflow", "-o",
                                     str(tmp_path / "run"), "--device", "cpu"])
    message = one_line_error(result)
    assert message.startswith(f"error: --log mlflow: the MLflow store {uri} cannot be used (")
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


def test_a_tracker_that_dies_mid_run_never_ends_the_training(tmp_path, monkeypatch, runner):
    """A tracker error used to end the run; now it warns once, training and checkpoints go on, and a resume whose
    MLflow run is gone (or whose tracking.json is damaged) continues in a new MLflow run."""
    from mlflow.tracking import MlflowClient

    from transfer.training import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder, ./mlruns, lands here
    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=2)
    run_dir = tmp_path / "run"
    calls = {"epochs": 0}
    real_epoch = tracking.MlflowTracker.epoch

    def dies_at_epoch_2(self, row, lrs, stage_index):
        calls["epochs"] += 1
        if row["epoch"] == 2:
            raise ConnectionError("the tracking server went away")
        real_epoch(self, row, lrs, stage_index)

    monkeypatch.setattr(tracking.MlflowTracker, "epoch", dies_at_epoch_2)
    common = ["-b", "lenet5", "--log", "mlflow", "--log", "tensorboard", "--device", "cpu", "--no-augment",
              "--workers", "0", "-q"]
    result = runner.invoke(cli.app, ["finetune", str(data), "--epochs", "3", "-o", str(run_dir), *common])
    assert result.exit_code == 0, result.output
    assert result.output.count("warning: --log mlflow failed (the tracking server went away); training goes on "
                               "without it") == 1
    assert calls["epochs"] == 2 and len(read_metrics(run_dir / "metrics.csv")) == 3  # dropped after its failure
    assert [step for step, _ in _scalars(run_dir / "tensorboard" / "epochs", "epoch/val_loss")] == [1, 2, 3]
    first_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert [m.step for m in client.get_metric_history(first_id, "val_loss")] == [1]

    monkeypatch.setattr(tracking.MlflowTracker, "epoch", real_epoch)
    saved = json.loads((run_dir / "tracking.json").read_text())
    saved["mlflow"]["run_id"] = "0" * 32  # a run the store does not know (deleted, or another store's)
    (run_dir / "tracking.json").write_text(json.dumps(saved))
    resumed = runner.invoke(cli.app, ["finetune", "--resume", str(run_dir), "--epochs", "4", *common[2:]])
    assert resumed.exit_code == 0, resumed.output
    assert f"note: MLflow run {'0' * 32} of this run cannot be continued" in resumed.output
    second_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    assert second_id not in (first_id, "0" * 32)
    assert [m.step for m in client.get_metric_history(second_id, "val_loss")] == [4]
    assert client.get_run(second_id).info.status == "FINISHED"

    (run_dir / "tracking.json").write_text("{damaged")
    again = runner.invoke(cli.app, ["finetune", "--resume", str(run_dir), "--epochs", "5", *common[2:]])
    assert again.exit_code == 0, again.output
    assert f"note: {run_dir / 'tracking.json'} is damaged" in again.output
    third_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    assert third_id != second_id and [m.step for m in client.get_metric_history(third_id, "val_loss")] == [5]
    (run_dir / "tracking.json").write_text('{"mlflow": 5}')
    exported = runner.invoke(cli.app, ["export", "--run", str(run_dir), "-o", str(tmp_path / "m.onnx")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "m.onnx").is_file() and "MLflow run" not in exported.output


@pytest.mark.slow  # starts MLflow's own server (about 10 s)
def test_mlflow_ui_in_the_test_venv_serves_the_run_a_finetune_just_wrote(tmp_path, monkeypatch, runner):
    """`mlflow ui` crashed in the venv `make` builds (the test extra brought mlflow-skinny, without Flask) though
    finetune told the user to run it. The extras now resolve to one MLflow with its UI: the exact command finetune
    prints serves the run it wrote (its page and the run's metrics through MLflow's REST API), on loopback."""
    import shlex
    import subprocess
    import time

    import httpx

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    data = digits_folder(tmp_path / "digits", per_class=4, size=32, classes=2)
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--epochs", "2", "--log", "mlflow",
                                     "--device", "cpu", "--no-augment", "--workers", "0", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    hint = next(line for line in result.output.splitlines() if line.startswith("MLflow: "))
    command = shlex.split(hint.removeprefix("MLflow: "))
    assert command[1:3] == ["ui", "--backend-store-uri"] and command[3] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]["run_id"]
    port = _free_port()
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get", params={"run_id": run_id},
                                   timeout=5)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert answer is not None, server.stderr.read().decode()[-2000:] if server.poll() is not None else "no answer"
        assert answer.status_code == 200, answer.text
        metrics = {m["key"]: m["value"] for m in answer.json()["run"]["data"]["metrics"]}
        assert math.isclose(metrics["val_loss"], read_metrics(tmp_path / "run" / "metrics.csv")[-1]["val_loss"],
                            rel_tol=1e-6)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
