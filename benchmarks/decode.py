"""Large JPEGs: reduced-scale decoding vs the full decode, end to end and per part, and its effect on answers.

    python benchmarks/decode.py          # writes benchmarks/decode.json, prints a summary

96 JPEGs of 2000x1500 cut from scikit-image's real photos (crops of different places and sizes, upscaled, quality
90), the efficientnet_lite0 ImageNet classifier exported to ONNX. Measured in one process, interleaved after a
warm-up: `OnnxModel.predict` with the exact decode and with the reduced-scale one, decoding + preprocessing alone
(the same thread pool), and the model alone on preprocessed batches. Top-1 agreement is between the two decodes.
"""

from __future__ import annotations

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


def timed(function, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> int:
    from exporters import runtime
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
        reference = exact.predict(paths, top_k=1)
        agreement = {}
        for factor in (1.0, 1.5, 2.0):  # how close each draft floor stays to the exact decode, and what it costs
            runtime.decode_size = functools.partial(preprocess.decode_size, factor=factor)
            started = time.perf_counter()
            got = fast.predict(paths, top_k=1, batch_size=batch)
            elapsed = time.perf_counter() - started
            flips = [round(a.probabilities[0], 3) for a, b in zip(reference, got, strict=True)
                     if a.indices[0] != b.indices[0]]
            agreement[str(factor)] = {"top1_agreement": round(1 - len(flips) / len(paths), 4),
                                      "flipped_top1_probabilities": flips,
                                      "predict_images_per_s": round(len(paths) / elapsed, 1)}
        runtime.decode_size = preprocess.decode_size
    rates = {name: round(len(paths) / value, 1) for name, value in seconds.items()}
    record = {
        "machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "images": len(paths), "size": [2000, 1500],
        "model": "efficientnet_lite0 ImageNet classifier, fp32 ONNX, batch 32", "images_per_s": rates,
        "speedup_predict": round(rates["predict_reduced"] / rates["predict_exact"], 2),
        "predict_reduced_vs_model_only": round(rates["predict_reduced"] / rates["model_only"], 3),
        "draft_factor": preprocess.DRAFT_FACTOR, "by_draft_factor": agreement,
    }
    (ROOT / "benchmarks" / "decode.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
