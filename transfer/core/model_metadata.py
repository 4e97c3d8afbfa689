"""Every `transfer.*` metadata key a program needs to run an exported file, read and checked in one place.

`exporters.runtime.OnnxModel` (predict, evaluate, serve, search) and `examples/embed_app.py` both call
`read_model_metadata`, so an app that embeds a file refuses exactly what `transfer` refuses: a value missing, of the
wrong type, out of range, NaN or infinite is a `MetadataError` naming the key, never an answer from a damaged file.
Checks against the graph itself (input dtype and shape, output width) live in the runtime, which has the session.

Standard library only and no import of this project, on purpose: an app that embeds a model copies this one file
beside its code (examples/embed_app.py shows how) and needs nothing else from `transfer`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

INTERPOLATION_NAMES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
MAX_INPUT_SIZE = 4096  # model input side; larger is a typo or a file meant to exhaust memory
MAX_RESIZE = 8192  # short side before the centre crop
LAYOUTS = ("NCHW_float32", "NHWC_uint8", "NHWC_uint8_any")  # _any: resize, crop, normalize in the graph
OUTPUT_KINDS = ("logits", "features")
TASKS = ("single", "multilabel")
CAM_MODES = ("top", "all")  # transfer.cam: a second output `cam`, the top class's map or every class's
DRAFT_FACTOR_RANGE = (1.0, 8.0)


class MetadataError(ValueError):
    """A `transfer.*` key that is missing or unusable; the message names it. `transfer` reports it as a DataError."""


@dataclass(frozen=True)
class ModelMetadata:
    """What a file says about itself: its preprocessing, classes, input layout and how to read its output."""

    input_size: int
    resize: int  # the short side before the centre crop of input_size
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str]
    layout: str = "NCHW_float32"
    output_kind: str = "logits"
    task: str = "single"
    thresholds: list[float] | None = None  # one per class for multilabel files, each in (0, 1)
    draft_factor: float = 1.0  # files written before the key decoded JPEGs to the resize length itself
    layers: dict = field(default_factory=dict)
    cam: str | None = None  # "top" | "all": the file has a class-activation-map output `cam` (`export --cam`)


def read_model_metadata(meta: Mapping[str, str]) -> ModelMetadata:
    """The checked metadata of a file (`session.get_modelmeta().custom_metadata_map`)."""
    if "transfer.input_size" not in meta:
        raise MetadataError("no transfer.* metadata; export the file with `transfer export`")
    size, crop_pct = read_size(meta)
    interpolation = meta.get("transfer.interpolation", "")
    if interpolation not in INTERPOLATION_NAMES:
        raise MetadataError(f"metadata transfer.interpolation {short(interpolation)}: use one of "
                            f"{', '.join(INTERPOLATION_NAMES)}")
    mean, std = read_triple(meta, "transfer.mean"), read_triple(meta, "transfer.std")
    if not all(v > 0 for v in std):
        raise MetadataError(f"metadata transfer.std {list(std)}: every value must be > 0")
    layout = meta.get("transfer.layout", "NCHW_float32")
    if layout not in LAYOUTS:
        raise MetadataError(f"metadata transfer.layout {short(layout)}: use one of {', '.join(LAYOUTS)}")
    output_kind = meta.get("transfer.output_kind", "logits")
    if output_kind not in OUTPUT_KINDS:
        raise MetadataError(f"metadata transfer.output_kind {short(output_kind)}: use one of "
                            f"{', '.join(OUTPUT_KINDS)}")
    classes = read_json(meta, "transfer.classes", list, default=[])
    if not all(isinstance(c, str) for c in classes):
        raise MetadataError("metadata transfer.classes: must be a JSON list of strings")
    if output_kind == "logits" and not classes:
        raise MetadataError("metadata transfer.classes is empty; a classifier needs its class names")
    cam = meta.get("transfer.cam")
    if cam is not None and (cam not in CAM_MODES or output_kind != "logits"):
        raise MetadataError(f"metadata transfer.cam {short(cam)}: use top or all, on a classifier")
    task = meta.get("transfer.task", "single")
    if task not in TASKS:
        raise MetadataError(f"metadata transfer.task {short(task)}: use single or multilabel")
    return ModelMetadata(size, math.floor(size / crop_pct), crop_pct, interpolation, mean, std, classes, layout,
                         output_kind, task, read_thresholds(meta, len(classes), task), read_draft_factor(meta),
                         read_json(meta, "transfer.layers", dict, default={}), cam)


def read_size(meta: Mapping[str, str]) -> tuple[int, float]:
    """(input size, crop_pct): the crop equals the input size; crop_pct from its key, else from the resize length
    (files written by other tools)."""
    size = read_int(meta, "transfer.input_size", 1, MAX_INPUT_SIZE)
    if "transfer.crop" in meta and read_int(meta, "transfer.crop", 1, MAX_INPUT_SIZE) != size:
        raise MetadataError(f"metadata transfer.crop {short(meta['transfer.crop'])}: must equal "
                            f"transfer.input_size {size}")
    if "transfer.crop_pct" in meta:
        crop_pct = read_float(meta, "transfer.crop_pct")
        if not 0 < crop_pct <= 1:
            raise MetadataError(f"metadata transfer.crop_pct {crop_pct}: must be in (0, 1] (the crop lies inside "
                                "the resize)")
    else:
        resize = read_int(meta, "transfer.resize", 1, MAX_RESIZE)
        if resize < size:
            raise MetadataError(f"metadata transfer.resize {resize}: smaller than the crop {size}")
        crop_pct = size / resize
    if math.floor(size / crop_pct) > MAX_RESIZE:
        raise MetadataError(f"metadata transfer.resize {math.floor(size / crop_pct)}: must be at most {MAX_RESIZE}")
    return size, crop_pct


def read_thresholds(meta: Mapping[str, str], count: int, task: str) -> list[float] | None:
    """A multilabel file's per-label decision thresholds: one number strictly between 0 and 1 per class (no
    booleans, NaN or infinities); None for one label per image."""
    if task == "single":
        return None
    thresholds = read_json(meta, "transfer.thresholds", list) if "transfer.thresholds" in meta else None
    if (thresholds is None or len(thresholds) != count or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1 for t in thresholds)):
        raise MetadataError(f"metadata transfer.thresholds: a multi-label file needs one threshold in (0, 1) per "
                            f"class ({count})")
    return [float(t) for t in thresholds]


def read_draft_factor(meta: Mapping[str, str]) -> float:
    """`transfer.draft_factor`: JPEGs decode to no less than this many times the resize length; files written
    before the key existed decoded to the resize length itself (1.0)."""
    if "transfer.draft_factor" not in meta:
        return 1.0
    factor = read_float(meta, "transfer.draft_factor")
    low, high = DRAFT_FACTOR_RANGE
    if not low <= factor <= high:
        raise MetadataError(f"metadata transfer.draft_factor {factor:g}: must be between {low:g} and {high:g}")
    return factor


def read_json(meta: Mapping[str, str], key: str, kind: type, default=None):
    """A JSON value of metadata `key` of type `kind` (`default` when absent and a default is given)."""
    if key not in meta:
        if default is not None:
            return default
        raise MetadataError(f"metadata {key} is missing")
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError):
        raise MetadataError(f"metadata {key} {short(meta[key])}: not valid JSON") from None
    if not isinstance(value, kind):
        raise MetadataError(f"metadata {key} {short(meta[key])}: must be a JSON {kind.__name__}")
    return value


def read_int(meta: Mapping[str, str], key: str, low: int, high: int) -> int:
    text = meta.get(key)
    if text is None:
        raise MetadataError(f"metadata {key} is missing")
    try:
        value = int(text.strip())
    except ValueError:
        raise MetadataError(f"metadata {key} {short(text)}: not an integer") from None
    if not low <= value <= high:
        raise MetadataError(f"metadata {key} {value}: must be {low}..{high}")
    return value


def read_float(meta: Mapping[str, str], key: str) -> float:
    """A finite number (`nan`, `inf` and text are refused)."""
    text = meta.get(key)
    if text is None:
        raise MetadataError(f"metadata {key} is missing")
    try:
        value = float(text)
    except ValueError:
        raise MetadataError(f"metadata {key} {short(text)}: not a number") from None
    if not math.isfinite(value):
        raise MetadataError(f"metadata {key} {short(text)}: not a finite number")
    return value


def read_triple(meta: Mapping[str, str], key: str) -> tuple[float, float, float]:
    values = read_json(meta, key, list)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in values):
        raise MetadataError(f"metadata {key} {short(meta[key])}: needs 3 finite numbers (R, G, B)")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
