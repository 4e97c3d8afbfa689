"""Classify images with a `transfer`-exported ONNX file, using only onnxruntime, numpy and pillow.

    python examples/embed_app.py model.onnx cat.jpg cup.png
    python examples/embed_app.py model_cam.onnx cat.jpg --cam heatmaps/   # a file exported with --cam

Everything the model needs is in the file's metadata: classes, input size, resize/crop, interpolation,
mean/std and input layout (and, for several labels per image, each label's threshold: the app prints label sets).
The metadata is read by `model_metadata.py`, the very checks `transfer` runs (standard library only: an app copies
that one file beside itself), so a damaged or hand-edited file is refused here as it is there: one line, exit 2.
This is the whole integration an app needs (no torch, no `transfer`), and it decodes exactly as `transfer predict`
does (tests/test_surfaces.py compares the two on 16-bit, transparent, palette, CMYK, EXIF-rotated and animated
images). A file exported with `--cam` also says where the model looked: each answer's heatmap peak (x, y) in the
image's own pixels, and with `--cam DIR` the heatmap over the image as DIR/NAME.cam.png.
"""

import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before onnxruntime loads: no device id, no usage events
import onnxruntime as ort  # noqa: E402


def load_metadata_checks():
    """`model_metadata.py`: the copy beside this app, else transfer's own (this example runs from the repository)."""
    here = Path(__file__).resolve().parent
    path = next(p for p in (here / "model_metadata.py", here.parent / "transfer" / "core" / "model_metadata.py")
                if p.is_file())
    spec = importlib.util.spec_from_file_location("model_metadata", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_metadata"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


model_metadata = load_metadata_checks()

FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB as `transfer` decodes: 16-bit and 32-bit grey scaled to 0..255 (not clipped, which
    would turn a 16-bit photo white), transparent pixels composited onto white (not dropped to black)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image).astype(np.float64)
        peak = float(values.max(initial=0))
        if image.mode == "F":
            top = 1.0 if peak <= 1.0 else peak
        else:
            top = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode(path: str, floor: int) -> Image.Image:
    """Upright RGB, a JPEG decoded at 1/2, 1/4 or 1/8 scale but never below `floor` on either side."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (floor, floor))
        image.load()  # the first frame of an animated image
        return to_rgb(ImageOps.exif_transpose(image))


def preprocess(path: str, meta) -> np.ndarray:
    """Short side to `resize`, centre crop `crop`; float NCHW normalized, or uint8 NHWC. A file exported with
    --embed-preprocessing (layout NHWC_uint8_any) does all but the decoding itself. `meta`: the file's checked
    metadata (`model_metadata.read_model_metadata`)."""
    resize, crop = meta.resize, meta.input_size
    image = decode(path, math.ceil(resize * meta.draft_factor))
    if meta.layout == "NHWC_uint8_any":
        return np.asarray(image, dtype=np.uint8)
    width, height = image.size
    size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
    if size != image.size:
        image = image.resize(size, FILTERS[meta.interpolation])
    left, top = round((image.width - crop) / 2), round((image.height - crop) / 2)
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
    if meta.layout == "NHWC_uint8":
        return pixels
    mean, std = np.array(meta.mean, np.float32), np.array(meta.std, np.float32)
    return ((pixels.astype(np.float32) / np.float32(255.0) - mean) / std).transpose(2, 0, 1).copy()


def upright_size(path: str) -> tuple[int, int]:
    """The image's (width, height) after its EXIF rotation, from the header."""
    with Image.open(path) as image:
        turned = image.getexif().get(0x0112) in (5, 6, 7, 8)
        return (image.height, image.width) if turned else image.size


def cam_peak(path: str, meta, heat: np.ndarray, folder: str | None) -> str:
    """The heatmap's peak in the image's pixels (the map covers the centre crop of the resized image, as
    `preprocess` cuts it), and with `folder` the heatmap blended over that part of the image there."""
    width, height = upright_size(path)
    new_long = int(meta.resize * max(width, height) / min(width, height))
    new_width, new_height = (meta.resize, new_long) if width <= height else (new_long, meta.resize)
    left, top = round((new_width - meta.input_size) / 2), round((new_height - meta.input_size) / 2)
    scale_x, scale_y = width / new_width, height / new_height
    top_rows, top_cols = np.nonzero(heat >= heat.max() - 1e-6 * (heat.max() - heat.min()))
    row, col = top_rows.mean(), top_cols.mean()  # the middle of the top: an upsampled edge cell is flat
    if folder is not None:
        unit = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)  # blue low, red high
        colours = Image.fromarray((np.stack([unit, 0.2 + 0 * unit, 1 - unit], axis=-1) * 255).astype(np.uint8))
        box = (round(left * scale_x), round(top * scale_y), round((left + meta.input_size) * scale_x),
               round((top + meta.input_size) * scale_y))
        image = decode(path, max(width, height))
        region = image.crop(box)
        image.paste(Image.blend(region, colours.resize(region.size), 0.5), box[:2])
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, Path(path).stem + ".cam.png"))
    return f"peak {(left + col + 0.5) * scale_x:.0f},{(top + row + 0.5) * scale_y:.0f}"


def fail(message: str) -> None:
    """One line on stderr and exit code 2, as `transfer` answers a file it refuses."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(model_path: str, image_paths: list[str], cam_folder: str | None = None) -> None:
    session = ort.InferenceSession(model_path, providers=ort.get_available_providers())
    try:
        meta = model_metadata.read_model_metadata(session.get_modelmeta().custom_metadata_map)
    except model_metadata.MetadataError as exc:
        fail(f"{model_path}: {exc}")
    if meta.output_kind != "logits":
        fail(f"{model_path}: a feature extractor (transfer.output_kind features); this app classifies")
    classes = meta.classes
    rows = [preprocess(path, meta) for path in image_paths]
    name = session.get_inputs()[0].name
    outputs = ["logits", "cam"] if meta.cam else ["logits"]  # a file exported with --cam also gives its heatmaps
    if all(row.shape == rows[0].shape for row in rows):
        answers = session.run(outputs, {name: np.stack(rows)})
    else:  # decoded images of several sizes: one at a time
        each = [session.run(outputs, {name: row[None]}) for row in rows]
        answers = [np.concatenate(parts) for parts in zip(*each, strict=True)]
    logits = answers[0]

    def where(index: int, class_index: int) -> str:
        if not meta.cam:
            return ""
        heat = answers[1][index, 0 if meta.cam == "top" else class_index]
        return "\t" + cam_peak(image_paths[index], meta, heat, cam_folder)

    if meta.task == "multilabel":  # several labels per image: each label at its own threshold
        probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        thresholds = np.array(meta.thresholds)
        for index, (path, row) in enumerate(zip(image_paths, probabilities, strict=True)):
            chosen = [i for i in np.argsort(-row, kind="stable") if row[i] >= thresholds[i]]
            print(f"{path}\t{','.join(classes[i] for i in chosen)}\t{' '.join(f'{row[i]:.4f}' for i in chosen)}"
                  + (where(index, chosen[0]) if chosen else ""))
        return
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for index, (path, row) in enumerate(zip(image_paths, probabilities, strict=True)):
        best = int(row.argmax())
        print(f"{path}\t{classes[best]}\t{row[best]:.4f}{where(index, best)}")


if __name__ == "__main__":
    arguments = sys.argv[2:]
    folder = None
    if "--cam" in arguments:
        at = arguments.index("--cam")
        folder, arguments = arguments[at + 1], arguments[:at] + arguments[at + 2:]
    main(sys.argv[1], arguments, folder)
