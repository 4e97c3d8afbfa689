"""Classify images with a `transfer`-exported ONNX file, using only onnxruntime, numpy and pillow.

    python examples/embed_app.py model.onnx cat.jpg cup.png

Everything the model needs is in the file's metadata: classes, input size, resize/crop, interpolation,
mean/std and input layout. This is the whole integration an app needs (no torch, no `transfer`).
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def preprocess(path: str, meta: dict) -> np.ndarray:
    """Upright RGB, short side to `resize`, centre crop `crop`; float NCHW normalized, or uint8 NHWC. A file
    exported with --embed-preprocessing (layout NHWC_uint8_any) does all but the decoding itself."""
    resize, crop = int(meta["transfer.resize"]), int(meta["transfer.crop"])
    image = Image.open(path)
    image.draft("RGB", (resize, resize))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below `resize`
    image = ImageOps.exif_transpose(image).convert("RGB")
    if meta["transfer.layout"] == "NHWC_uint8_any":
        return np.asarray(image, dtype=np.uint8)
    width, height = image.size
    size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    image = image.resize(size, FILTERS[meta["transfer.interpolation"]])
    left, top = round((image.width - crop) / 2), round((image.height - crop) / 2)
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
    if meta["transfer.layout"] == "NHWC_uint8":
        return pixels
    mean, std = np.array(json.loads(meta["transfer.mean"])), np.array(json.loads(meta["transfer.std"]))
    return ((pixels / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)


def main(model_path: str, image_paths: list[str]) -> None:
    session = ort.InferenceSession(model_path, providers=ort.get_available_providers())
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["transfer.classes"])
    rows = [preprocess(path, meta) for path in image_paths]
    name = session.get_inputs()[0].name
    if all(row.shape == rows[0].shape for row in rows):
        logits = session.run(["logits"], {name: np.stack(rows)})[0]
    else:  # decoded images of several sizes: one at a time
        logits = np.concatenate([session.run(["logits"], {name: row[None]})[0] for row in rows])
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for path, row in zip(image_paths, probabilities, strict=True):
        best = int(row.argmax())
        print(f"{path}\t{classes[best]}\t{row[best]:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
