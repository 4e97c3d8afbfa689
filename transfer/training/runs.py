"""A run directory read and written outside the loop: its default name, config.json, split.json, metrics.csv, and the
trained model (`load_run`). What evaluate, extract, export and bench import instead of the training loop.

The directory's file names, lock and fingerprint are torch-free and live in `transfer.core.rundir`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from models.registry import get_backbone
from models.weights import build_architecture
from transfer.core.errors import RunDamagedError, TransferError, first_line
from transfer.core.io import display, write_json
from transfer.core.metrics import read_metrics
from transfer.core.preprocess import Preprocessing
from transfer.core.rundir import SPLIT_FILE
from transfer.training.checkpoints import load_weights
from transfer.training.model import TransferModel, build_transfer_model


def default_run_dir(backbone: str) -> Path:
    """runs/BACKBONE-YYYYMMDD-HHMMSS: where a run goes without --output."""
    return Path("runs") / f"{backbone}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def write_config(trainer, stages: list, source: str, previous: dict | None = None) -> None:
    """config.json of `trainer`'s run (rank 0); `previous` (the config a resumed run was read from) adds an entry to
    its extensions."""
    if not trainer.world.main:
        return
    import timm
    import torch

    from transfer import __version__
    from transfer.training.device import device_name

    history, now = [], datetime.now().isoformat(timespec="seconds")
    if previous is not None:
        history = previous.get("extensions", []) + [{
            "at_epoch": trainer.saves.saved_epoch, "when": datetime.now().isoformat(timespec="seconds"),
            "stage_epochs_before": {s["name"]: s["epochs"] for s in previous["stages"]},
            "stage_epochs_after": {s.name: s.epochs for s in stages}}]
    write_json(trainer.run_dir / "config.json", {
        "backbone": trainer.spec.name,
        "timm_model": trainer.spec.timm_name,
        "classes": trainer.classes,
        "task": trainer.scan.task,
        "data_dir": str(trainer.data_dir),
        "preprocessing": trainer.prep.to_dict(),
        "head": {"kind": trainer.config.head, "dropout": trainer.config.dropout},
        "stages": [asdict(s) for s in stages],
        "weights_source": source,
        "settings": asdict(trainer.config),
        "created": (previous or {}).get("created", now),  # kept on resume; `updated` says when it last changed
        **({"updated": now} if previous is not None else {}),
        "device": device_name(trainer.device),  # the latest run's, on resume
        "versions": {"transfer": __version__, "torch": torch.__version__, "timm": timm.__version__},
        **({"extensions": history} if history else {}),
        **({"lr_find": trainer.lr_found} if trainer.lr_found else {}),
        **({"batch_size_auto": trainer.batch_choice} if trainer.batch_choice else {}),
        **({"class_weight_values": trainer.objective.weight.tolist()} if trainer.objective.weight is not None
           else {}),
        **({"thresholds": previous["thresholds"]} if previous and "thresholds" in previous else {}),
    })


def write_split(run_dir: Path, data_dir: Path, train_samples: list, val_samples: list) -> None:
    """split.json: which images trained and which validated (paths relative to the data folder), so evaluate
    can say when it is given training images, and evaluate --split val can take the validation ones."""
    write_json(run_dir / SPLIT_FILE, {
        "data_dir": str(data_dir),
        **{name: [os.path.relpath(Path(s.path).resolve(), data_dir) for s in samples]
           for name, samples in (("train", train_samples), ("val", val_samples))}})


def load_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run directory; missing, malformed or incomplete is a clear error, never a traceback."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir() or not path.is_file():
        raise TransferError(f"{display(run_dir)} is not a run directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDamagedError(display(run_dir), "config.json", first_line(exc)) from None
    required = {"backbone": str, "classes": list, "preprocessing": dict, "head": dict, "settings": dict,
                "stages": list}
    for key, kind in required.items():
        if not isinstance(config, dict) or not isinstance(config.get(key), kind):
            raise RunDamagedError(display(run_dir), "config.json", f"{key!r} is missing or not a {kind.__name__}")
    try:
        Preprocessing.from_dict(config["preprocessing"])
        get_backbone(config["backbone"])
    except TransferError as exc:
        raise RunDamagedError(display(run_dir), "config.json", str(exc)) from None
    return config


def read_run_metrics(run_dir: Path) -> list[dict]:
    """metrics.csv of a run, one dict per epoch; unreadable is a `RunDamagedError`."""
    try:
        return read_metrics(run_dir / "metrics.csv")
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RunDamagedError(display(run_dir), "metrics.csv", first_line(exc)) from None


def load_run(run_dir: str | os.PathLike, weights: str = "best.safetensors") -> tuple[TransferModel, dict]:
    """The fine-tuned model of a run directory (best weights) and its config; no download needed."""
    config = load_run_config(run_dir)
    spec = get_backbone(config["backbone"])
    prep = Preprocessing.from_dict(config["preprocessing"])
    head = config["head"]
    model = build_transfer_model(spec, build_architecture(spec), len(config["classes"]), prep.input_size,
                                 head.get("kind", "mlp"), head.get("dropout", 0.0))
    path = Path(run_dir) / weights
    if not path.is_file():
        raise TransferError(f"{display(run_dir)} has no {weights}: the run has not finished an epoch")
    load_weights(model, path)
    return model.eval(), config
