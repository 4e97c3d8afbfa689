"""`transfer runs`: the runs under a folder, read from their run directories alone (no torch, nothing written).

A run directory is a folder holding config.json. Its status: "running" while a transfer process holds its lock,
"finished" when report.json says so, "interrupted" when it stopped before its schedule's end (Ctrl-C, a kill, a
crash), "damaged" when config.json or report.json cannot be read or holds values of the wrong kind (the row's
`problem` says which). It is resumable when last.ckpt is there (a finished run too: raise its epochs to train more).
Only regular files are read, without blocking: a FIFO or device named config.json cannot hang the listing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path

from transfer.core.errors import DataError
from transfer.core.io import display
from transfer.core.metrics import read_metrics
from transfer.core.rundir import CHECKPOINT, LOCK_NAME

MAX_DEPTH = 4  # how deep under FOLDER run directories are looked for
MAX_JSON_BYTES = 16 << 20  # a run's config.json and report.json are a few kB
SKIPPED_FOLDERS = {"tensorboard", "mlruns", "__pycache__"}


def find_runs(folder: str | os.PathLike) -> list[Path]:
    """Every run directory at or under `folder` (hidden folders, event-file and MLflow folders skipped), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"folder not found: {folder}")
    found = []
    for current, subfolders, files in os.walk(root):
        depth = len(Path(current).relative_to(root).parts)
        if "config.json" in files:
            found.append(Path(current))
            subfolders[:] = []  # a run's own sub-folders are not runs
            continue
        subfolders[:] = [] if depth >= MAX_DEPTH else sorted(
            name for name in subfolders if not name.startswith(".") and name not in SKIPPED_FOLDERS)
    return sorted(found)


def run_summary(run_dir: Path) -> dict:
    """One run's row: identity, progress, best validation metrics, created, status, resumable."""
    row: dict = {"run": display(run_dir), "backbone": None, "data": None, "epochs": 0, "planned_epochs": None,
                 "best_val_loss": None, "best_val_accuracy": None, "created": None, "status": "damaged",
                 "resumable": (run_dir / CHECKPOINT).is_file()}
    try:
        config = _json_object(run_dir / "config.json")
        stages = config.get("stages")
        if not isinstance(stages, list) or not all(isinstance(stage, dict) and _count(stage.get("epochs"))
                                                   is not None for stage in stages):
            raise ValueError("stages: a list of stages with whole epoch counts expected")
        row.update(backbone=_text(config, "backbone", required=True), data=_text(config, "data_dir"),
                   created=_text(config, "created"), planned_epochs=sum(stage["epochs"] for stage in stages))
    except (OSError, ValueError) as exc:
        row["problem"] = f"config.json: {exc}"
        return row
    rows = _read_rows(run_dir / "metrics.csv")
    report_path = run_dir / "report.json"
    try:
        report = _json_object(report_path) if os.path.lexists(report_path) else {}
        if report and (_count(report.get("epochs", 0)) is None or not isinstance(report.get("finished", False), bool)):
            raise ValueError("epochs must be a whole number and finished true or false")
    except (OSError, ValueError) as exc:
        row["problem"] = f"report.json: {exc}"
        return row
    row["epochs"] = report.get("epochs", 0) if report else (rows[-1]["epoch"] if rows else 0)
    if report and _number(report.get("best_val_loss")) is not None:
        row["best_val_loss"] = float(report["best_val_loss"])
        row["best_val_accuracy"] = _number(report.get("accuracy"))
    elif rows:
        best = min(rows, key=lambda r: r["val_loss"])
        row["best_val_loss"], row["best_val_accuracy"] = best["val_loss"], best["val_acc"]
    if _locked(run_dir / LOCK_NAME):
        row["status"] = "running"
    elif report.get("finished") is True:
        row["status"] = "finished"
    else:
        row["status"] = "interrupted"
    return row


def _json_object(path: Path) -> dict:
    """A JSON object from a regular file, opened without blocking (a FIFO answers at once and is refused)."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise ValueError("not a regular file")
        data = os.read(handle, MAX_JSON_BYTES + 1)
    finally:
        os.close(handle)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _text(data: dict, key: str, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key}: text expected, found {json.dumps(value)[:40]}")
    return value


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def list_runs(folder: str | os.PathLike) -> list[dict]:
    """A row per run directory under `folder` (see `run_summary`), oldest first."""
    rows = [run_summary(path) for path in find_runs(folder)]
    return sorted(rows, key=lambda row: (row["created"] or "", row["run"]))


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():  # absent, or a FIFO or device that would block the read
        return []
    try:
        return read_metrics(path)
    except (OSError, KeyError, ValueError, TypeError):
        return []


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _locked(lock_path: Path) -> bool:
    """Whether a live process holds the run's lock (a shared, non-blocking probe on a read-only handle)."""
    try:
        handle = os.open(lock_path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the listing
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
    finally:
        os.close(handle)
