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


def write_photos_folder(root: str | os.PathLike) -> Path:
    """scikit-image's real photos (a cat, a coffee cup, a rocket, an astronaut, ...) as JPEGs in a flat folder."""
    from skimage import data

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(root / f"{name}.jpg", quality=95)
    return root


def main(argv: list[str] | None = None) -> int:
    """`python -m transfer.data.samples digits DIR [--per-class N]` or `photos DIR`: real data for a first try."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m transfer.data.samples", description=main.__doc__)
    parser.add_argument("kind", choices=("digits", "photos"))
    parser.add_argument("folder")
    parser.add_argument("--per-class", type=int, default=None, help="digits per class (default: all 1,797)")
    parser.add_argument("--size", type=int, default=64, help="side of each digit image in pixels")
    args = parser.parse_args(argv)
    if Path(args.folder).exists():
        parser.error(f"{args.folder} exists; name a new folder")
    if args.kind == "digits":
        write_digits_folder(args.folder, per_class=args.per_class, size=args.size)
    else:
        write_photos_folder(args.folder)
    print(f"wrote {args.kind} to {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
