"""Heatmaps on the user's own image: where the model's input crop lies in it, the peak and the box of the strongest
region in the image's pixel coordinates, and a coloured overlay.

Torch-free (numpy and Pillow), so `explain` (Grad-CAM in PyTorch), `predict --cam` and an embedding app (the ONNX
file's CAM output) all turn a heatmap over the model's input into the same pictures and the same numbers.
A heatmap covers the model's input: the centre crop of the resized image (`transfer.core.preprocess`), which is
`crop_box` in the original image; the parts of the image outside it are shown dimmed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from transfer.core.preprocess import Preprocessing

PLATEAU = 1e-6  # an upsampled map's edge cell is a flat top (bilinear, edges clamped): its peak is the top's middle
REGION_LEVEL = 0.5  # the box: the connected area around the peak where the heat is at least this share of its range
_COLOURS = np.array([[48, 18, 59], [70, 107, 227], [40, 187, 236], [50, 242, 152], [164, 252, 60], [237, 208, 58],
                     [251, 128, 34], [210, 49, 5], [122, 4, 3]], dtype=np.float64)  # the turbo colormap's anchors


def crop_box(width: int, height: int, prep: Preprocessing) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in the image's pixels of the square the model sees: the short side resized to
    `prep.resize`, then the centre `input_size` crop (the rounding of `resize_and_crop`)."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = prep.resize, int(prep.resize * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    size = prep.input_size
    left, top = int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))
    scale_x, scale_y = width / new_width, height / new_height
    return left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y


def normalized(heat: np.ndarray) -> np.ndarray:
    """The heatmap scaled to [0, 1] (a flat one becomes zeros)."""
    heat = np.asarray(heat, dtype=np.float64)
    low, high = float(heat.min()), float(heat.max())
    return np.zeros_like(heat) if high - low <= 1e-12 else (heat - low) / (high - low)


def _region(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected part of `mask` that holds `seed` (grown one step at a time with array shifts)."""
    region = np.zeros_like(mask)
    region[seed] = True
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if (grown == region).all():
            return region
        region = grown


def peak_and_box(heat: np.ndarray, box: Sequence[float]) -> dict:
    """The heatmap's peak (x, y) and the box (x0, y0, x1, y1) around its strongest connected region, both in the
    image's pixels; `heat` covers `box` (the model's crop, `crop_box`), row 0 at its top."""
    heat = normalized(heat)
    rows, cols = heat.shape
    first = tuple(int(i) for i in np.unravel_index(int(heat.argmax()), heat.shape))
    plateau_rows, plateau_cols = np.nonzero(_region(heat >= 1.0 - PLATEAU, first))
    peak_row, peak_col = plateau_rows.mean(), plateau_cols.mean()  # the middle of the top, not its first pixel
    region = _region(heat >= REGION_LEVEL, first)
    region_rows, region_cols = np.nonzero(region)
    x0, y0, x1, y1 = box
    scale_x, scale_y = (x1 - x0) / cols, (y1 - y0) / rows
    return {"peak": [round(float(x0 + (peak_col + 0.5) * scale_x), 1),
                     round(float(y0 + (peak_row + 0.5) * scale_y), 1)],
            "box": [round(x0 + region_cols.min() * scale_x, 1), round(y0 + region_rows.min() * scale_y, 1),
                    round(x0 + (region_cols.max() + 1) * scale_x, 1), round(y0 + (region_rows.max() + 1) * scale_y, 1)]}


def colourize(heat: np.ndarray) -> np.ndarray:
    """A [0, 1] heatmap as uint8 RGB (turbo: dark blue low, dark red high)."""
    position = np.clip(heat, 0.0, 1.0) * (len(_COLOURS) - 1)
    anchors = np.arange(len(_COLOURS))
    return np.stack([np.interp(position, anchors, _COLOURS[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, box: Sequence[float], found: dict | None = None,
            alpha: float = 0.5) -> Image.Image:
    """`image` (RGB) with the heatmap blended over the model's crop (`box`), the rest dimmed, and the peak (a ring)
    and region box of `found` (`peak_and_box`) drawn in white."""
    image = image.convert("RGB")
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(image.width, x1), min(image.height, y1)
    shown = Image.blend(image, Image.new("RGB", image.size), 0.45)  # outside the crop: dimmed
    if x1 > x0 and y1 > y0:
        colours = Image.fromarray(colourize(normalized(heat))).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
        shown.paste(Image.blend(image.crop((x0, y0, x1, y1)), colours, alpha), (x0, y0))
    if found is not None:
        draw = ImageDraw.Draw(shown)
        width = max(1, round(min(image.size) / 150))
        draw.rectangle(found["box"], outline="white", width=width)
        px, py = found["peak"]
        radius = max(3, round(min(image.size) / 40))
        draw.ellipse((px - radius, py - radius, px + radius, py + radius), outline="white", width=width)
    return shown
