"""What export reads from a fine-tuned run besides its weights: its thresholds and its own validation images."""

from __future__ import annotations

from pathlib import Path

from transfer.core.errors import ExportError
from transfer.core.io import display


def run_thresholds(config: dict, run) -> list[float] | None:
    """A multi-label run's per-label thresholds (chosen on its validation images when it finished), else None."""
    if config.get("task") != "multilabel":
        return None
    thresholds = config.get("thresholds")
    if not isinstance(thresholds, list) or len(thresholds) != len(config["classes"]):
        raise ExportError(f"{display(run)} has several labels per image but no decision thresholds yet (they are "
                          "chosen when the run finishes); finish or resume it first")
    return [float(t) for t in thresholds]


def run_validation_samples(config: dict) -> list:
    """The run's own validation images with their labels (`Sample`s), when its data is still there."""
    from transfer.data.labels import LabelsFile, scan_data
    from transfer.data.splits import train_val_samples

    data_dir = config.get("data_dir")
    settings = config["settings"]
    labels = LabelsFile.from_dict(settings.get("labels"))
    if not data_dir or not Path(data_dir).is_dir() or (labels is not None and not Path(labels.path).is_file()):
        return []
    # headers only, as finetune scans: the same samples, so the same seeded split
    _, val = train_val_samples(scan_data(data_dir, labels, decode=False), settings["val_split"], settings["seed"])
    return val


def run_validation_images(config: dict) -> list[Path]:
    """The run's own validation images, when its data folder is still there."""
    return [sample.path for sample in run_validation_samples(config)]
