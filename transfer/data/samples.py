"""Small real datasets written as image folders (or images and a labels file), for the demo, tests and benchmarks
(needs scikit-learn)."""

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


def write_digit_pairs(root: str | os.PathLike, count: int = 600, size: int = 32, classes: int = 10,
                      seed: int = 0) -> Path:
    """Several labels per image from real digits: `count` images under `root/images`, each one or two different
    handwritten digits (scikit-learn's scans) side by side, and `root/labels.csv` naming them (`image,labels`, the
    labels separated by ';'). A quarter of the images hold one digit, so the number of labels varies."""
    from sklearn.datasets import load_digits

    root = Path(root)
    (root / "images").mkdir(parents=True)
    digits = load_digits()
    by_class = {c: np.flatnonzero(digits.target == c) for c in range(classes)}
    rng = np.random.default_rng(seed)
    half = size // 2
    rows = ["image,labels"]
    for index in range(count):
        chosen = rng.choice(classes, size=1 if rng.random() < 0.25 else 2, replace=False)
        canvas = Image.new("L", (size, size), 255)
        slots = rng.permutation(2)[:len(chosen)]
        for digit, slot in zip(chosen, slots, strict=True):
            scan = digits.images[rng.choice(by_class[int(digit)])]
            ink = Image.fromarray((255 - scan * 255 / 16).astype(np.uint8)).resize((half, half),
                                                                                  Image.Resampling.BICUBIC)
            canvas.paste(ink, (int(slot) * half, (size - half) // 2))
        name = f"{index:04d}.png"
        canvas.convert("RGB").save(root / "images" / name)
        rows.append(f"{name},{';'.join(str(int(d)) for d in sorted(chosen))}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
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
    """`python -m transfer.data.samples digits DIR [--per-class N]`, `digit-pairs DIR` (images and labels.csv, one or
    two digits per image) or `photos DIR`: real data for a first try."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m transfer.data.samples", description=main.__doc__)
    parser.add_argument("kind", choices=("digits", "digit-pairs", "photos"))
    parser.add_argument("folder")
    parser.add_argument("--per-class", type=int, default=None, help="digits per class (default: all 1,797)")
    parser.add_argument("--size", type=int, default=64, help="side of each digit image in pixels")
    parser.add_argument("--count", type=int, default=600, help="digit-pairs: how many images")
    parser.add_argument("--classes", type=int, default=10, help="digit-pairs: use the digits 0 .. N-1")
    args = parser.parse_args(argv)
    if Path(args.folder).exists():
        parser.error(f"{args.folder} exists; name a new folder")
    if args.kind == "digits":
        write_digits_folder(args.folder, per_class=args.per_class, size=args.size)
    elif args.kind == "digit-pairs":
        write_digit_pairs(args.folder, count=args.count, size=args.size, classes=args.classes)
    else:
        write_photos_folder(args.folder)
    print(f"wrote {args.kind} to {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
