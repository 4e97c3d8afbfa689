"""Experiment logs where people already look: TensorBoard event files and MLflow runs, written while a run trains.

`--log tensorboard` writes event files into RUN/tensorboard/ (`epochs/`: losses, accuracies, every parameter
group's learning rate and the stage index, one point per epoch at step = epoch; `batches/`: the training loss at
most BATCH_POINTS_PER_EPOCH times an epoch at step = global batch; at the end the curves, confusion and top-losses
figures, and the settings as hyper-parameters with the final metrics). `--log mlflow` logs the same metrics by step,
the settings as parameters and the run's files as artifacts to MLflow: `MLFLOW_TRACKING_URI` when set, else
MLflow's own default (a SQLite store, ./mlflow.db, which `mlflow ui` started in the same folder shows; MLflow 3
refuses new ./mlruns file stores). Both are optional extras, checked before any work.

Resume continues the same curves: TensorBoard's writers purge what a killed session wrote past the checkpoint
(`purge_step`), and the MLflow run (its id kept in RUN/tracking.json) gets each batch's points only once their epoch
is saved, so a resumed run adds no duplicate points. Only rank 0 of a torchrun job logs.

A log never decides a training run's fate: the MLflow store is probed (read and write, no retries, a short timeout)
before any work, so an unreachable, read-only or refused store is one line and exit 2; once training runs, a
tracker that fails warns once and is dropped while training and checkpoints go on, and a resume whose MLflow run
is gone (or whose tracking.json is damaged) continues in a new MLflow run with a note.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from transfer.core.errors import OptionError, first_line
from transfer.core.io import read_json_object, write_json

TRACKERS = ("tensorboard", "mlflow")
INSTALL = {"tensorboard": "pip install 'transfer[tensorboard]' (or: pip install tensorboard)",
           "mlflow": "pip install 'transfer[mlflow]' (or: pip install mlflow)"}
BATCH_POINTS_PER_EPOCH = 20
MLFLOW_PROBE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}  # an answer in seconds
MLFLOW_DURING_RUN = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
TRACKING_FILE = "tracking.json"  # the MLflow run a resumed run continues
FIGURES = ("curves.png", "confusion.png", "top_losses.png", "lr_find.png")
NOT_ARTIFACTS = {"last.ckpt", ".lock", "tensorboard"}  # the optimizer state and the event files stay local


def check_trackers(names: list[str]) -> None:
    """Refuse, before any work, an unknown tracker or one whose package is not installed (naming the install)."""
    for name in names:
        if name not in TRACKERS:
            raise OptionError(f"--log {name}: use one of {', '.join(TRACKERS)}")
        if not installed(name):
            raise OptionError(f"--log {name} needs the {name} package: {INSTALL[name]}")


def probe_trackers(names: list[str]) -> None:
    """Reach every tracker before any work: MLflow's store must answer and take a write (the experiment "transfer"
    made or found, a tag set on it) within seconds, else an `OptionError` saying what the store answered."""
    if "mlflow" not in names:
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    try:
        with mlflow_limits(MLFLOW_PROBE):
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(client)
            client.set_experiment_tag(experiment_id, "transfer.checked", str(_now_ms()))
    except Exception as exc:  # MLflow raises its own, requests' and SQLAlchemy's exception types
        raise OptionError(f"--log mlflow: the MLflow store {uri} cannot be used ({first_line(exc)[:300]}); set "
                          "MLFLOW_TRACKING_URI to a store that works, or drop --log mlflow") from None


@contextlib.contextmanager
def mlflow_limits(values: dict[str, str]) -> Iterator[None]:
    """MLflow's HTTP retries and timeout for the calls inside the block (the user's own settings win); restored
    after, so nothing outside the block changes."""
    chosen = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for name in chosen:
            os.environ.pop(name, None)


def _experiment_id(client) -> str:
    experiment = client.get_experiment_by_name("transfer")
    return experiment.experiment_id if experiment is not None else client.create_experiment("transfer")


def installed(package: str) -> bool:
    """Whether `package` (tensorboard, mlflow) can be imported here."""
    return importlib.util.find_spec(package) is not None


def batch_logged(step: int, total: int) -> bool:
    """Whether batch `step` (0-based) of an epoch of `total` gets a training-loss point: a bounded number per epoch,
    always including the last batch."""
    every = max(1, math.ceil(total / BATCH_POINTS_PER_EPOCH))
    return (step + 1) % every == 0 or step + 1 == total


def flat_settings(config: dict) -> dict[str, str | int | float | bool]:
    """The run's settings and identity as flat scalars (lists and dicts as JSON text), for hyper-parameters."""
    flat: dict[str, str | int | float | bool] = {"backbone": config["backbone"], "data_dir": config.get("data_dir", ""),
                                                  "classes": len(config["classes"]), "task": config.get("task", "")}
    for key, value in config["settings"].items():
        flat[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return flat


class Tracker:
    """What a run tells a tracker; each method is called by rank 0 only."""

    def batch(self, step: int, loss: float) -> None:
        """A training-loss point at global batch `step`."""

    def epoch(self, row: dict, lrs: list[float], stage_index: int) -> None:
        """An epoch's metrics row (metrics.csv), its parameter groups' learning rates, its stage."""

    def finish(self, run_dir: Path, config: dict, report: dict | None, status: str) -> None:
        """The end: figures, settings with the final metrics, status ("finished", "interrupted", "failed")."""


class TensorBoardTracker(Tracker):
    """Event files in RUN/tensorboard/{epochs,batches}, through torch.utils.tensorboard."""

    def __init__(self, run_dir: Path, resumed_epoch: int, batches_per_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        root = run_dir / "tensorboard"
        purge = resumed_epoch > 0  # drop what a killed session wrote after the checkpoint
        self.epochs = SummaryWriter(str(root / "epochs"), purge_step=resumed_epoch + 1 if purge else None)
        self.batches = SummaryWriter(str(root / "batches"),
                                     purge_step=resumed_epoch * batches_per_epoch + 1 if purge else None)

    def batch(self, step: int, loss: float) -> None:
        self.batches.add_scalar("batch/train_loss", loss, step)

    def epoch(self, row: dict, lrs: list[float], stage_index: int) -> None:
        step = row["epoch"]
        for key in ("train_loss", "val_loss", "train_acc", "val_acc", "seconds"):
            self.epochs.add_scalar(f"epoch/{key}", row[key], step)
        for index, lr in enumerate(lrs):
            self.epochs.add_scalar(f"lr/group{index}", lr, step)
        self.epochs.add_scalar("epoch/stage_index", stage_index, step)
        if row["stage_epoch"] == 1:
            self.epochs.add_text("stages", f"stage {row['stage']} starts at epoch {step}", step)
        self.epochs.flush()
        self.batches.flush()

    def finish(self, run_dir: Path, config: dict, report: dict | None, status: str) -> None:
        import numpy as np
        from PIL import Image

        step = max(1, int((report or {}).get("epochs", 1)))
        for name in FIGURES:
            if (run_dir / name).is_file():
                with Image.open(run_dir / name) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.epochs.add_image(f"figures/{Path(name).stem}", pixels, step, dataformats="HWC")
        if report is not None:
            final = {f"final/{key}": float(report[key]) for key in ("best_val_loss", "accuracy", "macro_f1")
                     if isinstance(report.get(key), (int, float))}
            self.epochs.add_hparams(flat_settings(config), final, run_name=".")
        self.epochs.add_text("status", status, step)
        self.epochs.close()
        self.batches.close()


class MlflowTracker(Tracker):
    """One MLflow run per run directory (kept in RUN/tracking.json), through MlflowClient, no global state."""

    def __init__(self, run_dir: Path, config: dict, resumed_epoch: int, warn: Callable[[str], None] = print):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        self.uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default store
        self.client = MlflowClient(tracking_uri=self.uri)
        self.pending: list = []  # batch points of the epoch in progress, logged once the epoch is saved
        saved = _read_tracking(run_dir, warn).get("mlflow")
        if resumed_epoch > 0 and saved and saved["tracking_uri"] == self.uri:
            try:
                self.client.get_run(saved["run_id"])
            except Exception as exc:  # deleted, or a store that forgot it: go on in a new MLflow run
                warn(f"note: MLflow run {saved['run_id']} of this run cannot be continued ({first_line(exc)[:200]}); "
                     "logging the resumed epochs to a new MLflow run")
            else:
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
        experiment_id = _experiment_id(self.client)
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"transfer.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        write_json(run_dir / TRACKING_FILE, {"mlflow": {"run_id": self.run_id, "tracking_uri": self.uri,
                                                        "experiment_id": experiment_id}})
        self.client.log_batch(self.run_id, params=[Param(key, str(value)[:6000])
                                                   for key, value in flat_settings(config).items()])

    def batch(self, step: int, loss: float) -> None:
        from mlflow.entities import Metric

        self.pending.append(Metric("batch_train_loss", float(loss), _now_ms(), step))

    def epoch(self, row: dict, lrs: list[float], stage_index: int) -> None:
        from mlflow.entities import Metric

        step, now = row["epoch"], _now_ms()
        metrics = [Metric(key, float(row[key]), now, step)
                   for key in ("train_loss", "val_loss", "train_acc", "val_acc", "seconds")]
        metrics += [Metric(f"lr_group{index}", float(lr), now, step) for index, lr in enumerate(lrs)]
        metrics.append(Metric("stage_index", float(stage_index), now, step))
        metrics, self.pending = metrics + self.pending, []
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def finish(self, run_dir: Path, config: dict, report: dict | None, status: str) -> None:
        from mlflow.entities import Metric

        self.pending = []  # an unfinished epoch's points: its epoch is trained again on resume
        if report is not None:
            final = [Metric(f"final_{key}", float(report[key]), _now_ms(), int(report.get("epochs", 0)))
                     for key in ("best_val_loss", "accuracy", "macro_f1") if isinstance(report.get(key), (int, float))]
            if final:
                self.client.log_batch(self.run_id, metrics=final)
        for path in sorted(run_dir.iterdir()):
            if path.name in NOT_ARTIFACTS or path.name.startswith(".") or not path.is_file():
                continue
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "interrupted": "KILLED"}.get(
            status, "FAILED"))


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _read_tracking(run_dir: Path, warn: Callable[[str], None] | None = None) -> dict:
    """RUN/tracking.json, or {} when it is absent; a damaged one (not JSON, or its MLflow entry without a run id
    and a store) is {} too, with a note through `warn`: the run is then logged to a new MLflow run."""
    path = run_dir / TRACKING_FILE
    data = read_json_object(path)
    saved = data.get("mlflow")
    if saved is None and not path.exists():
        return {}
    if isinstance(saved, dict) and all(isinstance(saved.get(key), str) and saved.get(key)
                                       for key in ("run_id", "tracking_uri")):
        return data
    if warn is not None:
        warn(f"note: {path} is damaged (no MLflow run id and store in it); it is written anew")
    return {}


class Trackers(Tracker):
    """Every tracker the run asked for, called in turn (none: every call does nothing). A tracker that raises is
    reported once through `warn` and dropped: logging never stops or blocks training."""

    def __init__(self, trackers: list[Tracker] | None = None, batches_per_epoch: int = 0,
                 warn: Callable[[str], None] = print):
        self.trackers = trackers or []
        self.batches_per_epoch = batches_per_epoch  # global batch step = (epoch - 1) * this + batch
        self.warn = warn

    @classmethod
    def open(cls, names: list[str], run_dir: Path, config: dict, resumed_epoch: int,
             batches_per_epoch: int, warn: Callable[[str], None] = print) -> Trackers:
        check_trackers(names)
        opened = cls([], batches_per_epoch, warn)
        for name in names:
            with mlflow_limits(MLFLOW_DURING_RUN), opened.guard(name):
                opened.trackers.append(
                    TensorBoardTracker(run_dir, resumed_epoch, batches_per_epoch) if name == "tensorboard"
                    else MlflowTracker(run_dir, config, resumed_epoch, warn))
        return opened

    @contextlib.contextmanager
    def guard(self, name: str, tracker: Tracker | None = None) -> Iterator[None]:
        """Run a tracker's call; on an error, warn once and drop the tracker (training goes on)."""
        try:
            yield
        except Exception as exc:
            self.warn(f"warning: --log {name} failed ({first_line(exc)[:300]}); training goes on without it")
            if tracker is not None and tracker in self.trackers:
                self.trackers.remove(tracker)

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            name = "tensorboard" if isinstance(tracker, TensorBoardTracker) else "mlflow"
            with mlflow_limits(MLFLOW_DURING_RUN), self.guard(name, tracker):
                call(tracker)

    def batch(self, step: int, loss: float) -> None:
        self._each(lambda tracker: tracker.batch(step, loss))

    def batch_done(self, epoch: int, step: int, total: int, loss: float) -> None:
        """Batch `step` (0-based) of `total` in `epoch` finished with this mean loss: a point when its turn comes."""
        if self.trackers and batch_logged(step, total):
            self.batch((epoch - 1) * self.batches_per_epoch + step + 1, loss)

    def epoch(self, row: dict, lrs: list[float], stage_index: int) -> None:
        self._each(lambda tracker: tracker.epoch(row, lrs, stage_index))

    def finish(self, run_dir: Path, config: dict, report: dict | None, status: str) -> None:
        self._each(lambda tracker: tracker.finish(run_dir, config, report, status))
        self.trackers = []


def open_trackers(trainer, resumed_epoch: int) -> Trackers:
    """The run's --log trackers (rank 0 only; the others get none), continuing the curves after `resumed_epoch`."""
    batches_per_epoch = math.ceil(len(trainer.train_samples) / int(trainer.config.batch_size))
    if not (trainer.world.main and trainer.config.log):
        return Trackers(batches_per_epoch=batches_per_epoch)
    config = json.loads((trainer.run_dir / "config.json").read_text())
    return Trackers.open(trainer.config.log, trainer.run_dir, config, resumed_epoch, batches_per_epoch, trainer.log)


@contextlib.contextmanager
def tracked(trainer) -> Iterator[None]:
    """Close the run's trackers however the block ends: finished, interrupted (Ctrl-C, a kill) or failed; the
    run's report.json (a finished run's, or an interrupted one's when written) gives them its metrics."""
    try:
        yield
    except KeyboardInterrupt:
        _end_tracking(trainer, "interrupted")
        raise
    except BaseException:
        _end_tracking(trainer, "failed")
        raise
    _end_tracking(trainer, "finished")


def _end_tracking(trainer, status: str) -> None:
    if not trainer.tracker.trackers:
        return
    report = read_json_object(trainer.run_dir / "report.json") or None
    config = json.loads((trainer.run_dir / "config.json").read_text())
    trainer.tracker.finish(trainer.run_dir, config, report, status)


def mlflow_run_of(run_dir: str | os.PathLike) -> dict | None:
    """The MLflow run a run directory is tracked in (RUN/tracking.json), or None; an `OptionError` when it is
    tracked but MLflow is not installed here (checked before `export --run` does any work)."""
    saved = _read_tracking(Path(run_dir)).get("mlflow")
    if not saved:
        return None  # not tracked, or a damaged tracking.json: the export itself goes on
    if not installed("mlflow"):
        raise OptionError(f"{run_dir} is tracked in MLflow, which is not installed here: {INSTALL['mlflow']}")
    return saved


def log_export(tracked: dict, onnx_path: Path, record: dict) -> str:
    """After `export --run` on a run tracked in MLflow: the ONNX file and its validation record as artifacts of
    that MLflow run (under onnx/). Returns the MLflow run id."""
    import tempfile

    from mlflow.tracking import MlflowClient

    with mlflow_limits(MLFLOW_PROBE), tempfile.TemporaryDirectory() as work:
        client = MlflowClient(tracking_uri=tracked["tracking_uri"])
        client.log_artifact(tracked["run_id"], str(onnx_path), artifact_path="onnx")
        record_path = Path(work) / f"{onnx_path.stem}.record.json"
        record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        client.log_artifact(tracked["run_id"], str(record_path), artifact_path="onnx")
    return tracked["run_id"]
