"""One run directory, one writer: the lock `finetune` holds, and the clean-up of a run that never got going.

A fresh run creates its folder (or adopts an empty one), holds `RUN/.lock` while it trains, and removes every
trace of itself if it fails or is interrupted before its first checkpoint exists. Once `last.ckpt` exists the
run is kept, and every message about resuming it is true. A lock left by a killed process does not block: the
OS drops `flock` locks with their process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transfer.core.errors import TransferError
from transfer.core.io import Lock, OutputError, display, file_sha256, os_error_message, probe_folder, remove_stale_temps

CHECKPOINT = "last.ckpt"
SPLIT_FILE = "split.json"  # which images trained and which validated
RUN_FILES = ("config.json", "best.safetensors", CHECKPOINT, "metrics.csv", "curves.png", "confusion.png",
             "report.json", "top_losses.png", "lr_find.png", SPLIT_FILE)
LOCK_NAME = ".lock"


class RunDirectory:
    """Context manager around a training run's folder: lock, stale-temp clean-up, and no-trace on early failure."""

    def __init__(self, path: str | os.PathLike, fresh: bool):
        self.path, self.fresh = Path(path), fresh
        self.created = False
        self.created_parents: list[Path] = []
        self.lock: Lock | None = None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def __enter__(self) -> RunDirectory:
        if self.fresh:
            self._create()
        elif not self.path.is_dir():
            raise TransferError(f"--resume {display(self.path)}: not a run directory (folder not found)")
        self.lock = Lock(self.path / LOCK_NAME, f"run directory {display(self.path)}")
        self.lock.acquire()  # on failure the folder belongs to the holder: leave it alone
        remove_stale_temps(self.path)
        if self.fresh and self.checkpoint.exists():
            self.lock.release()
            raise TransferError(f"{display(self.path)} already holds a run; pass --resume {display(self.path)} or "
                                "another --output")
        if self.fresh:
            foreign = sorted(e.name for e in self.path.iterdir() if e.name not in RUN_FILES and e.name != LOCK_NAME)
            if foreign:
                self.lock.release()
                raise OutputError(f"--output {display(self.path)}: the folder holds other files ({foreign[0]}, ...); "
                                  "name a new or empty folder")
            for name in RUN_FILES:  # a start that never finished an epoch (killed outright): nothing to keep
                (self.path / name).unlink(missing_ok=True)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is not None and self.fresh and not self.checkpoint.exists():
                self._remove_traces()
        finally:
            if self.lock is not None:
                self.lock.release(remove=self.path.is_dir())

    def _create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--output {display(self.path)}: a file is in the way of the run directory")
        missing = [p for p in reversed(self.path.parents) if not p.exists()]
        self.created_parents = missing  # removed again with the run if they stay empty
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
            self.created = True
        except FileExistsError:
            if not self.path.is_dir():
                raise OutputError(f"--output {display(self.path)}: a file is in the way of the run directory") from None
        except OSError as exc:
            raise OutputError(f"--output {os_error_message(exc, self.path)}") from None
        try:
            probe_folder(self.path)
        except OSError as exc:
            self._remove_traces()
            raise OutputError(f"--output {os_error_message(exc, self.path)}") from None

    def _remove_traces(self) -> None:
        """Undo a fresh run that never reached a checkpoint: the folder if this run made it, else its files."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in reversed(self.created_parents):  # e.g. runs/ made for this run
                try:
                    parent.rmdir()
                except OSError:
                    break
            return
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        remove_stale_temps(self.path)


MODEL_KEYS = ("backbone", "classes", "preprocessing", "head")  # what in config.json changes a run's outputs


def run_fingerprint(run_dir: str | os.PathLike) -> str:
    """SHA-256 naming what a run computes: its best weights' bytes and the model part of its config (backbone,
    classes, preprocessing, head). A resumed run that trained on has another fingerprint under the same path."""
    import hashlib
    import json

    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
        weights = file_sha256(run_dir / "best.safetensors")
    except (OSError, ValueError) as exc:
        raise TransferError(f"{display(run_dir)}: cannot read its config.json and best.safetensors ({exc})") from None
    model = {key: config.get(key) for key in MODEL_KEYS} if isinstance(config, dict) else config
    return hashlib.sha256(json.dumps([weights, model], sort_keys=True).encode()).hexdigest()
