"""Training augmentation settings (torch-free): what `--augment` does, saved in config.json; applied by
`transfer.data.datasets.train_transform`."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Augment:
    """Training augmentation; the defaults are the seed texts' (rotation 40, shifts 0.2, zoom 0.2, flips)."""

    rotation: float = 40.0
    shift: float = 0.2
    zoom: float = 0.2
    hflip: bool = True
    color_jitter: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)
