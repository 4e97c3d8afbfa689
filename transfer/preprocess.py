"""The evaluation transform, implemented once with PIL and numpy only.

Training-time evaluation, `transfer extract` and the torch-free ONNX runtime all call `eval_array`, so the
preprocessing of a model can never drift between PyTorch and onnxruntime. It reproduces timm's eval transform
(resize the short side to floor(size / crop_pct), centre crop, scale to [0, 1], normalize) pixel for pixel.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a decoded RGB image into a model input."""

    input_size: int
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def resize(self) -> int:
        """Length the short side is resized to before the centre crop (timm: floor(size / crop_pct))."""
        return math.floor(self.input_size / self.crop_pct)

    def to_dict(self) -> dict:
        return {**asdict(self), "resize": self.resize, "crop": self.input_size}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            input_size=int(data["input_size"]),
            crop_pct=float(data["crop_pct"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def to_metadata(self) -> dict[str, str]:
        """The `transfer.*` ONNX metadata keys describing this preprocessing (values are strings)."""
        return {
            "transfer.input_size": str(self.input_size),
            "transfer.resize": str(self.resize),
            "transfer.crop": str(self.input_size),
            "transfer.crop_pct": repr(self.crop_pct),
            "transfer.interpolation": self.interpolation,
            "transfer.mean": json.dumps(list(self.mean)),
            "transfer.std": json.dumps(list(self.std)),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Preprocessing:
        size = int(meta["transfer.input_size"])
        crop_pct = float(meta["transfer.crop_pct"]) if "transfer.crop_pct" in meta else None
        if crop_pct is None:  # files written by other tools: derive it from the resize length
            crop_pct = size / float(meta["transfer.resize"])
        return cls(
            input_size=size,
            crop_pct=crop_pct,
            interpolation=meta["transfer.interpolation"],
            mean=tuple(json.loads(meta["transfer.mean"])),
            std=tuple(json.loads(meta["transfer.std"])),
        )


def resize_and_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side to `prep.resize` and centre-crop `prep.input_size` (torchvision's rounding)."""
    if prep.interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {prep.interpolation!r}; use one of {sorted(INTERPOLATIONS)}")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = prep.resize, int(prep.resize * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, INTERPOLATIONS[prep.interpolation])
    return center_crop(image, prep.input_size)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to size x size with torchvision's rounding; pads with zeros if the image is smaller."""
    width, height = image.size
    if width < size or height < size:
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((max(width, size) - width) // 2, (max(height, size) - height) // 2))
        image, (width, height) = padded, padded.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, scaled to [0, 1] then normalized by mean/std."""
    array = pixels.astype(np.float32) / np.float32(255.0)
    array = (array - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def eval_pixels(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB PIL image -> uint8 HWC array at the model's input size (what an embedded-preprocessing model takes)."""
    return np.asarray(resize_and_crop(image, prep), dtype=np.uint8)


def eval_array(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB PIL image -> float32 CHW model input: THE evaluation transform of the project."""
    return normalize(eval_pixels(image, prep), prep)
