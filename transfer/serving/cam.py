"""Heatmaps from an ONNX file's own class activation map (`transfer export --cam`), with onnxruntime alone.

`predict --cam DIR`, `explain --onnx`, `serve` (`/predict?cam=1`) and `examples/embed_app.py` read the `cam` output
here: each image's heatmaps (the top class in a "top" file; in an "all" file the top k classes, or for several labels
per image every label at or over its threshold), their peak and box in the image's own pixels, and overlays drawn by
`transfer.core.heatmaps`. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from exporters.runtime import OnnxModel
from transfer.core.errors import DataError
from transfer.core.heatmaps import crop_box, overlay, peak_and_box
from transfer.core.images import as_rgb_image


def require_cam(model: OnnxModel) -> None:
    """A `DataError` naming the fix when the file has no CAM output."""
    if model.cam_mode is None:
        raise DataError(f"{model.path} has no class activation map: export it with `transfer export ... --cam` "
                        "(a head of global pooling then one linear layer), or use `transfer explain --run/-b`")


def chosen(model: OnnxModel, probabilities: np.ndarray, top_k: int) -> list[int]:
    """The classes whose map the file can give for one image: its top class ("top" files), else every label over
    its threshold (several labels; the most probable when none is), else the top k."""
    order = [int(i) for i in np.argsort(-probabilities, kind="stable")]
    if model.cam_mode == "top":
        return order[:1]
    if model.multilabel:
        return [i for i in order if probabilities[i] >= model.thresholds[i]] or order[:1]
    return order[:top_k]


def image_heatmaps(model: OnnxModel, probabilities: np.ndarray, maps: np.ndarray, size: tuple[int, int],
                   top_k: int = 1) -> list[dict]:
    """One image's heatmaps: class, probability, peak and box (the image's pixels), and the map itself (`heat`,
    input size; not in JSON). `maps`: the image's `cam` output row (1 or classes x H x W)."""
    box = crop_box(size[0], size[1], model.prep)
    answers = []
    for index in chosen(model, probabilities, top_k):
        heat = maps[0] if model.cam_mode == "top" else maps[index]
        answers.append({"class": model.classes[index], "probability": round(float(probabilities[index]), 4),
                        **peak_and_box(heat, box), "heat": heat})
    return answers


def iter_cam(model: OnnxModel, images: Sequence, top_k: int = 1, batch_size: int = 8) -> Iterator[dict]:
    """Per image, in order: {"path", "size", "classes": [heatmap records]} or {"path", "error"}."""
    require_cam(model)
    images = list(images)
    for rows, batch, errors in model.iter_batches(images, batch_size):
        answers = {row: {"path": str(images[row]), "error": reason} for row, reason in errors}
        if batch is not None:
            logits, maps = model.run(batch, ["logits", "cam"])
            probabilities = model.probabilities(logits)
            for position, row in enumerate(rows):
                size = image_size(images[row])
                answers[row] = {"path": str(images[row]), "size": list(size),
                                "classes": image_heatmaps(model, probabilities[position], maps[position], size, top_k)}
        yield from (answers[row] for row in sorted(answers))


def image_size(image) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF rotation applied, as decoding does), from a file's header."""
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    if isinstance(image, Image.Image):
        return upright_size(image)
    with Image.open(image) as opened:
        return upright_size(opened)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """The size after EXIF rotation: orientations 5 to 8 turn the image a quarter."""
    turned = image.getexif().get(0x0112) in (5, 6, 7, 8)
    return (image.height, image.width) if turned else image.size


def public(record: dict) -> dict:
    """A record without the maps themselves (for JSON)."""
    if "classes" not in record:
        return record
    return {**record, "classes": [{k: v for k, v in item.items() if k != "heat"} for item in record["classes"]]}


def overlay_image(model: OnnxModel, image: Image.Image, item: dict) -> Image.Image:
    """One heatmap record drawn over the decoded, upright RGB image: the map, its peak and its box."""
    return overlay(image, item["heat"], crop_box(image.width, image.height, model.prep), item)


def write_overlays(model: OnnxModel, record: dict, image, folder: Path, index: int) -> list[Path]:
    """One PNG per heatmap of an image (`NNNN_stem_class.png`), written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = as_rgb_image(image)
    written = []
    for item in record["classes"]:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in item["class"])[:40]
        target = folder / f"{index:04d}_{Path(record['path']).stem}_{safe}.png"
        temporary = target.with_name(f".{target.name}.tmp.png")
        overlay_image(model, rgb, item).save(temporary, format="PNG")
        os.replace(temporary, target)
        written.append(target)
    return written


def write_cam_folder(model: OnnxModel, images: Sequence, folder: str | os.PathLike, top_k: int = 1,
                     batch_size: int = 8, progress=None) -> list[dict]:
    """Every image's heatmaps as overlays in `folder` and their records (class, probability, peak, box) in
    `folder/heatmaps.json`; unreadable images are records with an `error`. Returns the records."""
    from transfer.core.io import write_json

    folder = Path(folder)
    records = []
    for index, record in enumerate(iter_cam(model, images, top_k, batch_size)):
        if "classes" in record:
            record["files"] = [str(p) for p in write_overlays(model, record, record["path"], folder, index)]
        records.append(public(record))
        if progress is not None:
            progress(1)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "heatmaps.json", {"model": str(model.path), "cam": model.cam_mode,
                                          "coordinates": "the image's own pixels, x right and y down from its "
                                                         "top-left corner", "images": records})
    return records


def cam_answer(model: OnnxModel, image: Image.Image, name: str, top_k: int, overlay_side: int = 512) -> dict:
    """serve's `/predict?cam=1` for one decoded upload: its top-k labels, and its heatmaps (peak and box in the
    upload's pixels) each with a JPEG overlay (at most `overlay_side` px, as a data URL) for the page."""
    import base64
    import io

    logits, maps = model.run(model.preprocess_one(image)[None], ["logits", "cam"])
    probabilities = model.probabilities(logits)[0]
    top = model.ranked(name, probabilities, top_k)
    heatmaps = []
    for item in image_heatmaps(model, probabilities, maps[0], image.size, top_k):
        picture = overlay_image(model, image, item)
        picture.thumbnail((overlay_side, overlay_side))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        heatmaps.append({k: v for k, v in item.items() if k != "heat"}
                        | {"overlay": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()})
    return {"filename": name, "labels": top.labels, "probabilities": top.probabilities, "heatmaps": heatmaps}
