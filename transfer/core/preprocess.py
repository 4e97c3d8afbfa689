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

from transfer.core.errors import DataError
from transfer.core.model_metadata import (  # noqa: F401 (LAYOUTS, OUTPUT_KINDS: the names callers know)
    DRAFT_FACTOR_RANGE,
    LAYOUTS,
    MAX_INPUT_SIZE,
    MAX_RESIZE,
    OUTPUT_KINDS,
    MetadataError,
    read_draft_factor,
    read_size,
    read_triple,
)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
DRAFT_FACTOR = 3.0  # JPEGs decode to no less than this many times the resize length (benchmarks/decode.py)
DECODER = ("pillow; a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8, by its DCT) to no less than "
           "transfer.draft_factor x the resize length on both sides, then resized with the stated interpolation")


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn a decoded RGB image into a model input."""

    input_size: int
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    draft_factor: float = DRAFT_FACTOR  # the decode floor: JPEGs decode to at least this x the resize length

    @property
    def resize(self) -> int:
        """Length the short side is resized to before the centre crop (timm: floor(size / crop_pct))."""
        return math.floor(self.input_size / self.crop_pct)

    def to_dict(self) -> dict:
        return {**asdict(self), "resize": self.resize, "crop": self.input_size}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """From a run's config.json; a bad value is a `DataError` naming the field."""
        try:
            prep = cls(
                input_size=int(data["input_size"]),
                crop_pct=float(data["crop_pct"]),
                interpolation=str(data["interpolation"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                draft_factor=float(data.get("draft_factor", DRAFT_FACTOR)),  # runs before it was recorded: 3.0
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"preprocessing: missing or malformed value ({type(exc).__name__}: {exc})") from None
        prep.check("preprocessing.")
        return prep

    def check(self, prefix: str = "") -> None:
        """Raise `DataError` naming the field unless every value is usable: sizes positive and bounded,
        crop inside the resize, a known interpolation, three finite means and three finite stds > 0."""
        if not 1 <= self.input_size <= MAX_INPUT_SIZE:
            raise DataError(f"{prefix}input_size {self.input_size}: must be 1..{MAX_INPUT_SIZE}")
        if not (math.isfinite(self.crop_pct) and 0 < self.crop_pct <= 1):
            raise DataError(f"{prefix}crop_pct {self.crop_pct}: must be in (0, 1] (the crop lies inside the resize)")
        if self.resize > MAX_RESIZE:
            raise DataError(f"{prefix}resize {self.resize}: must be at most {MAX_RESIZE}")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"{prefix}interpolation {self.interpolation!r}: use one of {', '.join(INTERPOLATIONS)}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise DataError(f"{prefix}{name} {list(values)}: needs 3 finite numbers (R, G, B)")
        if not all(v > 0 for v in self.std):
            raise DataError(f"{prefix}std {list(self.std)}: every value must be > 0")
        check_decode_floor(self.draft_factor, f"{prefix}draft_factor")

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
            "transfer.decoder": DECODER,
            "transfer.draft_factor": repr(self.draft_factor),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Preprocessing:
        """From a file's `transfer.*` metadata, checked by the rules embedded apps share (`model_metadata`): a bad
        value is a `DataError` naming the key."""
        try:
            size, crop_pct = read_size(meta)
            mean, std = read_triple(meta, "transfer.mean"), read_triple(meta, "transfer.std")
            draft_factor = read_draft_factor(meta)
        except MetadataError as exc:
            raise DataError(str(exc)) from None
        prep = cls(input_size=size, crop_pct=crop_pct, interpolation=meta.get("transfer.interpolation", ""),
                   mean=mean, std=std, draft_factor=draft_factor)
        prep.check("metadata transfer.")  # the same rules as a run's config.json, named by metadata key
        return prep


def check_decode_floor(value: float, flag: str = "--decode-floor") -> float:
    """A decode floor inside DRAFT_FACTOR_RANGE (1: the fastest decode; 8: in effect a full-size decode)."""
    low, high = DRAFT_FACTOR_RANGE
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise DataError(f"{flag} {value}: must be between {low:g} and {high:g} (times the resize length)")
    return float(value)


def decode_size(prep: Preprocessing, factor: float | None = None) -> tuple[int, int]:
    """The JPEG draft request of the evaluation path: PIL picks the largest DCT reduction (1/2, 1/4, 1/8) that
    keeps both sides >= `factor` (default: the preprocessing's decode floor) x the resize length, so the resize
    that follows never upsamples what the DCT dropped. Training, evaluation, extract and the ONNX runtime all decode
    with it. benchmarks/decode.json measures the floor's cost in speed and agreement."""
    side = math.ceil(prep.resize * (prep.draft_factor if factor is None else factor))
    return (side, side)


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


CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
CORNER_FRACTION = 0.875  # each side of a corner view (224 of 256, the classic ten-crop ratio)


TTA_FLIP = (("identity", None, False), ("horizontal flip", None, True))
TTA_CROPS = tuple((f"{corner}{' flipped' if mirror else ''}", corner, mirror)
                  for corner in CORNERS for mirror in (False, True))


def tta_views(tta: bool = False, tta_crops: bool = False) -> tuple[tuple[str, str | None, bool], ...]:
    """(name, corner, mirror) of each test-time-augmentation view: the image alone; with `tta` also its mirror;
    with `tta_crops` also the four corners (CORNER_FRACTION of each side) and their mirrors, ten views like the
    classic ten-crop. Their softmax probabilities are averaged."""
    if tta_crops:
        return TTA_FLIP + TTA_CROPS
    return TTA_FLIP if tta else TTA_FLIP[:1]


def corner_crop(image: Image.Image, corner: str, fraction: float = CORNER_FRACTION) -> Image.Image:
    """The `corner` part of the decoded image, `fraction` of each side (a test-time-augmentation view; the
    normal resize and centre crop follow)."""
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; use one of {', '.join(CORNERS)}")
    width, height = image.size
    crop_width, crop_height = max(1, round(width * fraction)), max(1, round(height * fraction))
    left = 0 if corner.endswith("left") else width - crop_width
    top = 0 if corner.startswith("top") else height - crop_height
    return image.crop((left, top, left + crop_width, top + crop_height))


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
