"""What export reads from a fine-tuned run besides its weights: its thresholds and its own validation images; and the
class names of a registry backbone's own classifier."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from transfer.core.errors import ExportError
from transfer.core.io import display


def classifier_labels(spec, network: nn.Module) -> list[str]:
    """A registry backbone's own classifier's class names: ImageNet's with its pretrained weights, else indices."""
    from models.imagenet import imagenet_labels

    num_classes = getattr(network, "num_classes", 1000)
    if spec.has_pretrained and num_classes == 1000:
        return list(imagenet_labels())
    return [str(i) for i in range(num_classes)]


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
