"""`transfer finetune`: a frozen pretrained backbone, a new head, staged unfreezing, resumable and atomic.

The one module that wires the loop (`transfer.training.loop`) to its hooks (the learning-rate range test), the run
directory's lock, --resume and interruptions. Usage:

    from transfer.training import FinetuneConfig, finetune
    result = finetune("mydata/", FinetuneConfig(backbone="efficientnet_lite0"), output="runs/first")
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from models.registry import get_backbone
from transfer.core.errors import DataError, OptionError, PeerLostError, TransferError
from transfer.core.io import display
from transfer.core.progress import SILENT, Progress
from transfer.core.rundir import CHECKPOINT, RunDirectory
from transfer.core.world import DEFAULT_TIMEOUT_S, World
from transfer.training import collectives
from transfer.training.checkpoints import load_checkpoint
from transfer.training.config import FinetuneConfig, check_extension, resumed_config
from transfer.training.device import resolve_device
from transfer.training.loop import Trainer
from transfer.training.lr_find import resolve_lr
from transfer.training.report import FinetuneResult, finished_result, write_interrupted_reports
from transfer.training.runs import default_run_dir, load_run_config
from transfer.training.tracking import tracked


def finetune(
    data_dir: str | os.PathLike | None,
    config: FinetuneConfig | None = None,
    output: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[dict], None] | None = None,
    on_batch: Callable[[str, int, int], None] | None = None,
    changes: dict | None = None,
    progress: Progress = SILENT,
    dist_timeout: float = DEFAULT_TIMEOUT_S,
) -> FinetuneResult:
    """Fine-tune on `data_dir` into a new run directory, or continue `resume` from its last.ckpt.

    On resume the run's saved settings apply; `changes` holds the settings given anew: raised `epochs_head` /
    `epochs_finetune` train the extra epochs, `workers`/`patience` may change, any other difference is an
    `OptionError` naming the flag. The run directory is locked while training; a fresh run that fails or is
    interrupted before its first checkpoint leaves nothing behind. Under torchrun a process that stops answering
    for `dist_timeout` seconds ends every other one with a `PeerLostError`; the last checkpoint stays resumable.
    """
    if data_dir is None:
        if resume is None:
            raise OptionError("finetune needs a data folder (one sub-folder per class)")
        data_dir = load_run_config(resume).get("data_dir") or ""
        if not Path(data_dir).is_dir():
            raise DataError(f"--resume {display(resume)}: its data folder {data_dir or '(not recorded)'} is gone; "
                            "give the data folder as the first argument")
    if not Path(data_dir).is_dir():
        raise DataError(f"folder not found: {data_dir}")
    world = World.from_env()
    target = resolve_device(device, world)
    if resume is None:
        if config is None:
            raise TransferError("finetune needs a config (at least the backbone)")
        config.check()
        run_dir = Path(output) if output is not None else default_run_dir(config.backbone)
    else:
        run_dir = Path(resume)
    if world.distributed and output is None and resume is None:
        raise TransferError("under torchrun give the run directory with --output RUN (every process must name it)")
    joined = collectives.join(world, target.type, dist_timeout)
    if not world.main:  # rank 0 alone writes and reports; the others train their share and stay quiet
        log, progress = (lambda _: None), SILENT
    if resume is None and (unexportable := get_backbone(config.backbone).not_exportable):
        log(f"note: {config.backbone} cannot be exported to ONNX ({unexportable}); the run trains, evaluates and "
            "extracts in PyTorch")
    try:
        with RunDirectory(run_dir, fresh=resume is None) if world.main else contextlib.nullcontext():
            resume_state, saved = None, None
            if resume is not None:
                saved = load_run_config(run_dir)
                config = resumed_config(saved, changes or {}, run_dir)
                resume_state = load_checkpoint(run_dir / CHECKPOINT)
                check_extension(saved, config, resume_state, run_dir)
                finished = finished_result(run_dir, saved, config)
                if finished is not None:
                    log(f"{display(run_dir)} already finished its {finished.epochs_run} epoch(s); nothing new to "
                        "train (raise --epochs-head/--epochs-finetune, or --epochs, to train more)")
                    return finished
            torch.manual_seed(config.seed)
            trainer = Trainer(config, data_dir, run_dir, target, log, on_epoch_end, on_batch, progress, world,
                              choose_lr=resolve_lr)
            if saved is not None and trainer.classes != saved["classes"]:
                raise DataError(f"{data_dir} has classes {trainer.classes}, the run was trained on {saved['classes']}")
            with tracked(trainer):  # the --log trackers end finished, interrupted or failed with the run
                try:
                    return trainer.fit(resume_state, saved)
                except RuntimeError as exc:
                    lost = collectives.lost_peer(world, exc, dist_timeout)
                    if lost is None:
                        raise
                    kept = (f"its last checkpoint is kept: resume with --resume {display(run_dir)}"
                            if (run_dir / CHECKPOINT).exists() or trainer.saves.saved_epoch is not None
                            else "no epoch had finished, so nothing was kept")
                    raise PeerLostError(f"{lost}; {kept}") from None
                except KeyboardInterrupt:
                    if trainer.saves.saved_epoch is None:
                        log("interrupted before the first epoch finished; nothing was kept")
                        raise
                    if not world.distributed:
                        write_interrupted_reports(trainer)
                    log(f"interrupted; epoch {trainer.saves.saved_epoch} is saved: resume with "
                        f"transfer finetune {display(data_dir)} --resume {display(run_dir)}")
                    raise
    finally:
        if joined:
            collectives.leave(world)

