"""Large JPEGs: reduced-scale decoding vs the full decode, end to end and per part, and its effect on answers.

    python benchmarks/decode.py          # writes benchmarks/decode.json, prints a summary

Speed: 96 JPEGs of 2000x1500 cut from scikit-image's real photos (crops of different places and sizes, upscaled,
quality 90), the efficientnet_lite0 ImageNet classifier exported to ONNX. Measured in one process, interleaved after
a warm-up: `OnnxModel.predict` with the exact decode and with the reduced-scale one, decoding + preprocessing alone
(the same thread pool), and the model alone on preprocessed batches.

The floor (`DRAFT_FACTOR`: decode to no less than this many times the resize length): 600 JPEGs of varied size
(short side 300 to 3,000 px, landscape, portrait and square) cut from every real photo the installed packages ship,
each classified after the exact decode and after the reduced-scale decode at each floor; top-1 agreement with the
exact decode, the decode + preprocess rate at each floor, and the top-1 probability of every flipped image.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_jpegs(folder: Path, count: int = 96, size: tuple[int, int] = (2000, 1500)) -> list[Path]:
    from skimage import data

    names = ("chelsea", "coffee", "astronaut", "rocket", "cat", "immunohistochemistry", "retina", "colorwheel")
    photos = [np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB")) for n in names]
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        crop = rng.uniform(0.6, 1.0)
        h, w = int(height * crop), int(width * crop)
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize(size, Image.Resampling.BICUBIC)
        path = folder / f"{index:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def varied_jpegs(folder: Path, count: int = 600, seed: int = 0) -> list[Path]:
    """Crops of every real photo the packages ship, saved at random sizes (short side 300-3000 px, three aspect
    ratios) and JPEG qualities 80-95, so every DCT reduction (1, 1/2, 1/4, 1/8) is chosen by some of them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from int8 import photos

    sources = list(photos().values())
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = sources[index % len(sources)]
        width, height = photo.size
        side = rng.uniform(0.4, 1.0) * min(width, height)
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
        crop = photo.crop((int(left), int(top), int(left + side), int(top + side)))
        short = int(rng.uniform(300, 3000))
        aspect = rng.choice([1.0, 4 / 3, 3 / 4])
        size = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
        paths.append(folder / f"{index:03d}.jpg")
        crop.resize(size, Image.Resampling.BICUBIC).save(paths[-1], quality=int(rng.integers(80, 96)))
    return paths


def floors(model_path: Path, paths: list[Path], factors: tuple[float, ...]) -> dict:
    """Top-1 agreement with the exact decode and the decode + preprocess rate at each draft floor."""
    import onnxruntime as ort

    from exporters.runtime import OnnxModel
    from transfer.core.images import open_image
    from transfer.core.interpret import softmax
    from transfer.core.preprocess import decode_size, eval_array

    prep = OnnxModel(model_path, device="cpu").prep
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def classify(draft) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        rows = [eval_array(open_image(p, draft_size=draft), prep) for p in paths]
        decode_seconds = time.perf_counter() - started
        logits = np.concatenate([session.run(None, {"input": np.stack(rows[i:i + 32])})[0]
                                 for i in range(0, len(rows), 32)])
        return softmax(logits), decode_seconds

    exact, exact_seconds = classify(None)
    result = {"exact": {"decode_images_per_s": round(len(paths) / exact_seconds, 1)}}
    # how far an equally valid path moves the answers: the full decode resized with Pillow's reducing_gap=3
    # (what Image.thumbnail does), the noise level any floor is compared against
    rows = [eval_array(reduced_gap_resize(open_image(p), prep), prep) for p in paths]
    other = softmax(np.concatenate([session.run(None, {"input": np.stack(rows[i:i + 32])})[0]
                                    for i in range(0, len(rows), 32)]))
    result["noise"] = {"what": "full decode, resized with reducing_gap=3.0",
                       "top1_agreement": round(float((exact.argmax(1) == other.argmax(1)).mean()), 4)}
    print("noise", result["noise"], flush=True)
    for factor in factors:
        probabilities, seconds = classify(decode_size(prep, factor))
        flipped = exact.argmax(1) != probabilities.argmax(1)
        result[str(factor)] = {"top1_agreement": round(1 - flipped.mean(), 4), "flips": int(flipped.sum()),
                               "flipped_top1_probabilities": sorted(round(float(v), 3)
                                                                    for v in exact.max(1)[flipped]),
                               "decode_images_per_s": round(len(paths) / seconds, 1)}
        print(factor, result[str(factor)], flush=True)
    return result


def reduced_gap_resize(image: Image.Image, prep) -> Image.Image:
    """The short side to the resize length in Pillow's two-step way (a box reduction, then the filter)."""
    width, height = image.size
    size = ((prep.resize, int(prep.resize * height / width)) if width <= height else
            (int(prep.resize * width / height), prep.resize))
    return image.resize(size, Image.Resampling.BICUBIC if prep.interpolation == "bicubic" else
                        Image.Resampling.BILINEAR, reducing_gap=3.0)


def timed(function, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


FLOORS = (1.0, 1.5, 2.0, 3.0, 4.0)


def main() -> int:
    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel
    from transfer.core import preprocess
    from transfer.serving.predict import machine_name

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        paths = make_jpegs(work)
        export_onnx(work / "lite0.onnx", backbone="efficientnet_lite0")
        exact = OnnxModel(work / "lite0.onnx", device="cpu", exact_decode=True)
        fast = OnnxModel(work / "lite0.onnx", device="cpu")
        batch = 32

        def decode_only(model):
            for _ in model.iter_batches(paths, batch):
                pass

        rows = np.stack([fast.preprocess_one(p) for p in paths[:batch]])
        fast.run(rows)
        exact.predict(paths[:8])
        fast.predict(paths[:8])
        seconds = {
            "predict_exact": timed(lambda: exact.predict(paths, batch_size=batch)),
            "predict_reduced": timed(lambda: fast.predict(paths, batch_size=batch)),
            "decode_exact": timed(lambda: decode_only(exact)),
            "decode_reduced": timed(lambda: decode_only(fast)),
            "model_only": timed(lambda: [fast.run(rows) for _ in range(len(paths) // batch)]),
        }
        by_floor = floors(work / "lite0.onnx", varied_jpegs(work / "varied"), FLOORS)
    rates = {name: round(len(paths) / value, 1) for name, value in seconds.items()}
    record = {
        "machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "images": len(paths), "size": [2000, 1500],
        "model": "efficientnet_lite0 ImageNet classifier, fp32 ONNX, batch 32", "images_per_s": rates,
        "speedup_predict": round(rates["predict_reduced"] / rates["predict_exact"], 2),
        "predict_reduced_vs_model_only": round(rates["predict_reduced"] / rates["model_only"], 3),
        "draft_factor": preprocess.DRAFT_FACTOR, "floor_images": "600 JPEGs, short side 300-3000 px, varied",
        "by_draft_factor": by_floor,
    }
    (ROOT / "benchmarks" / "decode.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
