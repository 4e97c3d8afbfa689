"""The pointing game: does a heatmap's peak fall on the object? For `explain` (Grad-CAM) and for the ONNX CAM output.

    python benchmarks/explain.py                 # 300 training and 100 held-out composites per canvas (~10 min)
    python benchmarks/explain.py --held-out 20 --train 100

Composites nobody can tune by eye: a real photo of one object (scikit-image's cat, coffee cup, rocket, astronaut,
motorcycle: a random 80-100% crop of the region around the object, flipped at random, so the photo's own background
stays small) scaled so its long side is 100-170 px, pasted at a random place (seeded) on a 336 x 336 canvas, inside
the part the model sees (its centre crop, 21 to 315 px), the canvas either plain grey or cluttered (a mosaic of
scikit-image's brick, grass and gravel textures, tinted: real-image clutter holding no ImageNet object).

Two models per canvas. (1) A run trained on such composites (`finetune`, efficientnet_lite0 from its offline
ImageNet weights, `--head linear`, 6 head epochs, the 5 objects as classes, `--input-size 448`: a 14 x 14 last
feature map; at 224 px it is 7 x 7, cells of 42 canvas pixels, and 0.625 of 40 peaks hit), judged on held-out
composites drawn with another seed. (2) The ImageNet classifier itself, unchanged, at 224 px. A hit: the peak of
the predicted class's heatmap, in the composite's own pixels, lies inside the pasted photo's box; `explain`
(Grad-CAM on the last feature map) and the file's CAM output (`export --cam`) are both scored. Chance level: the
box's mean share of the canvas, what a peak placed at random scores (the share of the model's view is given too).
Writes benchmarks/explain.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CANVAS = 336
VIEW = 21  # efficientnet_lite0 resizes 336 to 256 and crops the centre 224: it sees the canvas from 21 px to 315 px
OBJECTS = {  # photo -> (left, top, right, bottom) around its object
    "chelsea": (60, 0, 400, 300), "coffee": (120, 30, 520, 330), "rocket": (250, 0, 420, 427),
    "astronaut": (120, 0, 460, 512), "stereo_motorcycle": (60, 80, 700, 460),
}


@functools.cache
def textures() -> tuple[np.ndarray, ...]:
    """scikit-image's brick, grass and gravel photos (grey), read once."""
    from skimage import data

    return tuple(getattr(data, name)() for name in ("brick", "grass", "gravel"))


def texture_canvas(rng: np.random.Generator) -> Image.Image:
    """A 336 x 336 mosaic of 84 px tiles of brick, grass and gravel, each tinted at random."""
    canvas = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    for top in range(0, CANVAS, 84):
        for left in range(0, CANVAS, 84):
            texture = textures()[rng.integers(len(textures()))]
            y, x = rng.integers(0, texture.shape[0] - 84), rng.integers(0, texture.shape[1] - 84)
            tile = texture[y:y + 84, x:x + 84].astype(np.float64)[..., None]
            tint = rng.uniform(0.5, 1.0, size=3)
            canvas[top:top + 84, left:left + 84] = np.clip(tile * tint, 0, 255).astype(np.uint8)
    return Image.fromarray(canvas)


def composites(folder: Path, count: int, cluttered: bool, seed: int,
               by_class: bool = False) -> dict[str, tuple[int, int, int, int]]:
    """`count` composites in `folder` (in a sub-folder per object with `by_class`); returns each file's pasted box
    (x0, y0, x1, y1)."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = {}
    for name, region in OBJECTS.items():
        pixels = getattr(data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels
        photos[name] = Image.fromarray(pixels).convert("RGB").crop(region)
    boxes = {}
    names = list(photos)
    folder.mkdir(parents=True)
    for index in range(count):
        name = names[index % len(names)]
        photo = photos[name]
        share = rng.uniform(0.8, 1.0)
        width, height = round(photo.width * share), round(photo.height * share)
        left, top = int(rng.integers(0, photo.width - width + 1)), int(rng.integers(0, photo.height - height + 1))
        photo = photo.crop((left, top, left + width, top + height))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        long_side = int(rng.integers(100, 171))
        scale = long_side / max(photo.size)
        piece = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))),
                             Image.Resampling.BICUBIC)
        canvas = texture_canvas(rng) if cluttered else Image.new("RGB", (CANVAS, CANVAS), (128, 128, 128))
        low, high = VIEW, CANVAS - VIEW  # inside the model's centre crop
        x = int(rng.integers(low, high - piece.width + 1))
        y = int(rng.integers(low, high - piece.height + 1))
        canvas.paste(piece, (x, y))
        path = (folder / name if by_class else folder) / f"{index:04d}_{name}.png"
        path.parent.mkdir(exist_ok=True)
        canvas.save(path)
        boxes[str(path)] = (x, y, x + piece.width, y + piece.height)
    return boxes


def hits(records: list[dict], boxes: dict) -> float:
    inside = 0
    for record in records:
        x0, y0, x1, y1 = boxes[record["path"]]
        px, py = record["classes"][0]["peak"]
        inside += x0 <= px <= x1 and y0 <= py <= y1
    return round(inside / len(records), 4)


def score(source, cam_file: Path, boxes: dict, work: Path) -> dict:
    """Both heatmaps of the predicted class on every held-out composite: hit rates, agreement, seconds, accuracy."""
    from exporters.runtime import OnnxModel
    from transfer.apps.explain import heatmaps
    from transfer.serving.cam import iter_cam

    paths = sorted(boxes)
    started = time.perf_counter()
    grad = heatmaps(source, [Path(p) for p in paths], work)
    grad_seconds = time.perf_counter() - started
    started = time.perf_counter()
    onnx_records = list(iter_cam(OnnxModel(cam_file, device="cpu"), paths))
    cam_seconds = time.perf_counter() - started
    same = np.mean([a["classes"][0]["peak"] == b["classes"][0]["peak"]
                    for a, b in zip(grad.records, onnx_records, strict=True)])
    row = {"explain_gradcam_hits": hits(grad.records, boxes), "onnx_cam_hits": hits(onnx_records, boxes),
           "same_peak_gradcam_and_cam": round(float(same), 4),
           "explain_seconds_per_image": round(grad_seconds / len(paths), 3),
           "onnx_cam_seconds_per_image": round(cam_seconds / len(paths), 4)}
    if set(source.classes) == set(OBJECTS):
        row["accuracy"] = round(float(np.mean([r["classes"][0]["class"] in r["path"] for r in grad.records])), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--input-size", type=int, default=448, help="the trained run's input side")
    args = parser.parse_args()
    from exporters.export import export_onnx
    from transfer.apps.explain import load_source
    from transfer.serving.predict import machine_name
    from transfer.training import FinetuneConfig, finetune

    rows = {}
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        imagenet_cam = work / "lite0_cam.onnx"
        export_onnx(imagenet_cam, backbone="efficientnet_lite0", cam="top")
        imagenet = load_source(backbone="efficientnet_lite0")
        for canvas, cluttered in (("plain", False), ("cluttered", True)):
            composites(work / canvas / "train", args.train, cluttered, seed=11 if cluttered else 1, by_class=True)
            boxes = composites(work / canvas / "held_out", args.held_out, cluttered, seed=17 if cluttered else 5)
            run = work / canvas / "run"
            config = FinetuneConfig(backbone="efficientnet_lite0", head="linear", epochs_head=6, epochs_finetune=0,
                                    batch_size=32, seed=0, input_size=args.input_size)
            finetune(work / canvas / "train", config, output=run, device="cpu", log=lambda line: None)
            run_cam = work / canvas / "run_cam.onnx"
            export_onnx(run_cam, run=run, cam="top")
            chance = float(np.mean([(x1 - x0) * (y1 - y0) / CANVAS**2 for x0, y0, x1, y1 in boxes.values()]))
            view = float(np.mean([(x1 - x0) * (y1 - y0) / (CANVAS - 2 * VIEW) ** 2
                                  for x0, y0, x1, y1 in boxes.values()]))
            rows[canvas] = {"held_out": len(boxes), "train": args.train, "run_input_size": args.input_size,
                            "chance": round(chance, 4),
                            "chance_in_view": round(view, 4),
                            "trained_run": score(load_source(run=run), run_cam, boxes, work / canvas / "seen_run"),
                            "imagenet_classifier": score(imagenet, imagenet_cam, boxes, work / canvas / "seen_in")}
            print(canvas, json.dumps(rows[canvas]), flush=True)
    record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"),
              "model": "efficientnet_lite0 (offline ImageNet weights): a run trained on composites "
                       "(--head linear) and the ImageNet classifier; explain: Grad-CAM on the last feature map; "
                       "ONNX: export --cam (top class)",
              "canvas": CANVAS, "object_long_side": [100, 170], "by_canvas": rows}
    (ROOT / "benchmarks" / "explain.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
