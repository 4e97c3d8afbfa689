"""Small real datasets written as image folders, for the demo, tests and benchmarks (needs scikit-learn)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_folder(root: str | os.PathLike, per_class: int | None = None, size: int = 64,
                        classes: int = 10, margin: float = 0.15) -> Path:
    """scikit-learn's 1,797 real handwritten digits as PNG class folders (dark ink on white, with a margin).

    The 8x8 scans are upscaled to `size` with a white border of `margin` on each side, so a centre crop of the
    evaluation transform does not cut the strokes.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    inner = max(1, round(size * (1 - 2 * margin)))
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(label)
        if label >= classes or (per_class is not None and counts.get(label, 0) >= per_class):
            continue
        counts[label] = counts.get(label, 0) + 1
        ink = Image.fromarray((255 - image * 255 / 16).astype(np.uint8)).resize((inner, inner),
                                                                                Image.Resampling.BICUBIC)
        canvas = Image.new("L", (size, size), 255)
        canvas.paste(ink, ((size - inner) // 2, (size - inner) // 2))
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        canvas.convert("RGB").save(folder / f"{index:04d}.png")
    return root
