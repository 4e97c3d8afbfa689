"""`transfer runs`: the runs under a folder, read from their run directories alone (no torch, nothing written).

A run directory is a folder holding config.json. Its status: "running" while a transfer process holds its lock,
"finished" when report.json says so, "interrupted" when it stopped before its schedule's end (Ctrl-C, a kill, a
crash), "damaged" when config.json cannot be read. It is resumable when last.ckpt is there (a finished run too: raise
its epochs to train more).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

from transfer.core.errors import DataError
from transfer.core.io import display, read_json_object
from transfer.core.metrics import read_metrics
from transfer.core.rundir import CHECKPOINT, LOCK_NAME

MAX_DEPTH = 4  # how deep under FOLDER run directories are looked for
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
        config = json.loads((run_dir / "config.json").read_text())
        row.update(backbone=config["backbone"], data=config.get("data_dir"), created=config.get("created"),
                   planned_epochs=sum(int(stage["epochs"]) for stage in config["stages"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        row["problem"] = f"config.json: {exc}"
        return row
    report = read_json_object(run_dir / "report.json")
    rows = _read_rows(run_dir / "metrics.csv")
    row["epochs"] = int(report.get("epochs", 0)) if report else (rows[-1]["epoch"] if rows else 0)
    if report and isinstance(report.get("best_val_loss"), (int, float)):
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


def list_runs(folder: str | os.PathLike) -> list[dict]:
    """A row per run directory under `folder` (see `run_summary`), oldest first."""
    rows = [run_summary(path) for path in find_runs(folder)]
    return sorted(rows, key=lambda row: (row["created"] or "", row["run"]))


def _read_rows(path: Path) -> list[dict]:
    try:
        return read_metrics(path)
    except (OSError, KeyError, ValueError, TypeError):
        return []


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _locked(lock_path: Path) -> bool:
    """Whether a live process holds the run's lock (a shared, non-blocking probe on a read-only handle)."""
    try:
        handle = os.open(lock_path, os.O_RDONLY)
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
