"""When an epoch's last.ckpt and best weights reach the disk.

An epoch on images costs far more than writing the model, so such a stage writes both after every epoch. A stage on
cached features trains an epoch in milliseconds while writing the whole model with an fsync costs 0.05-0.5 s (lite0
to ResNet-50), so there the writes are paced: they go to disk once `PACE_SECONDS` have passed since the last write,
at the stage's end (its last epoch, or the one after which --patience stops it), and when the run stops on an error
or Ctrl-C. Meanwhile the finished epoch waits in memory as a copy of what changes (the head, its optimizer, the
schedule's position); the frozen backbone is kept by reference, as nothing changes it before the stage ends. So an
interrupt keeps every finished epoch, and a hard kill loses at most `PACE_SECONDS` of the stage.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch

from transfer.core.io import display
from transfer.training.checkpoints import save_tensors, write_checkpoint

PACE_SECONDS = 10.0
FROZEN = "backbone."  # state-dict prefix of what a stage on cached features never changes


def _copy_changing(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor if name.startswith(FROZEN) else tensor.detach().clone() for name, tensor in tensors.items()}


def _snapshot(payload: dict) -> dict:
    """A checkpoint payload that later training steps cannot change: copies of what a paced stage trains (head,
    optimizer, schedule), the frozen backbone by reference."""
    snapshot = {**payload, "model": _copy_changing(payload["model"]),
                "optimizer": copy.deepcopy(payload["optimizer"]), "scheduler": copy.deepcopy(payload["scheduler"])}
    if "ema" in payload:
        snapshot["ema"] = _copy_changing(payload["ema"])
    return snapshot


class EpochSaves:
    """The writes of one run's epochs (rank 0 writes; every rank keeps the bookkeeping)."""

    def __init__(self, run_dir: Path, writes: bool):
        self.best_path, self.checkpoint_path = Path(run_dir) / "best.safetensors", Path(run_dir) / "last.ckpt"
        self.writes = writes
        self.saved_epoch: int | None = None  # the epoch of the checkpoint on disk
        self.last_write = time.monotonic()
        self.pending_best: dict[str, torch.Tensor] | None = None
        self.pending_checkpoint: tuple[int, dict] | None = None

    def kept_message(self) -> str:
        """What survives a failed or interrupted run, truthfully."""
        if self.saved_epoch is None:
            return "no epoch had finished, so nothing was kept"
        return f"the last good checkpoint, epoch {self.saved_epoch}, is kept in {display(self.checkpoint_path)}"

    def begin_stage(self) -> None:
        self.last_write = time.monotonic()

    def epoch_end(self, epoch: int, payload: Callable[[], dict], best: torch.nn.Module | None, paced: bool,
                  stage_ends: bool) -> None:
        """Record a finished epoch (`payload` builds its checkpoint; `best`: the model that just improved, if one
        did) and write now unless the stage is paced."""
        if not self.writes:  # another rank writes the files: keep only which epoch they hold
            self.pending_checkpoint = (epoch, {})
        elif not paced:
            if best is not None:
                self.pending_best = best.state_dict()
            self.pending_checkpoint = (epoch, payload())
        else:
            if best is not None:
                self.pending_best = _copy_changing(best.state_dict())
            self.pending_checkpoint = (epoch, _snapshot(payload()))
        if not paced or stage_ends or time.monotonic() - self.last_write >= PACE_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write what waits (nothing, after a stage on images)."""
        if self.pending_best is not None:  # only the writing rank keeps one
            save_tensors(self.pending_best, self.best_path)
            self.pending_best = None
        if self.pending_checkpoint is not None:
            epoch, payload = self.pending_checkpoint
            if self.writes:
                write_checkpoint(self.checkpoint_path, payload)
            self.saved_epoch, self.pending_checkpoint = epoch, None
            self.last_write = time.monotonic()
