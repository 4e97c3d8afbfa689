"""`transfer index` and `transfer similar` with any model: images embedded through `transfer.apps.extract` (a
PyTorch backbone, a run, or an ONNX file), the vectors handed to the torch-free `transfer.serving.search`, which
owns the index folder, its checks and the exact top-k.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from exporters.runtime import OnnxModel
from models.registry import get_backbone
from transfer.apps.extract import ExtractResult, extract
from transfer.core.errors import DataError, TransferError
from transfer.core.io import display, file_sha256
from transfer.core.progress import SILENT, Progress
from transfer.core.rundir import run_fingerprint
from transfer.data.labels import LabelsFile
from transfer.serving.search import (
    INDEX_FORMAT,
    SearchIndex,
    check_model_unchanged,
    file_stamp,
    index_folder,
    neighbours,
    normalise,
    spec_for_embedding,
    write_index,
)


def _model_spec(backbone: str | None, run, onnx, layer: str | None, input_size: int | None) -> dict:
    """Which model embeds images for this index; the layer defaults to the pooled features."""
    if sum(x is not None for x in (run, onnx)) > 1:
        raise TransferError("--run and --onnx exclude each other; give one model")
    spec: dict = {"backbone": None, "run": None, "onnx": None, "onnx_sha256": None, "input_size": input_size}
    if onnx is not None:
        model = OnnxModel(onnx, device="cpu")
        if model.output_kind != "features":
            raise TransferError(f"--onnx {onnx} is a classifier; index needs a feature extractor (transfer export "
                                "--layer NAME)")
        if layer is None and len(model.output_names) > 1:
            raise TransferError(f"--onnx {onnx} has outputs {', '.join(model.output_names)}: choose one with --layer")
        spec.update(onnx=str(Path(onnx).resolve()), onnx_sha256=file_sha256(onnx),
                    layer=layer or model.output_names[0])
    elif run is not None:
        spec.update(run=str(Path(run).resolve()), run_sha256=run_fingerprint(run), layer=layer or _run_layer(run))
    else:
        name = backbone or "efficientnet_lite0"
        entry = get_backbone(name)
        spec.update(backbone=name, layer=layer or ("avg_pool" if "avg_pool" in entry.aliases else entry.feature_layer))
    return spec


def _run_layer(run) -> str:
    """A run's default index layer: the pooled input of its head, or for a classic net (which keeps its own dense
    layers) the backbone's feature layer."""
    try:
        entry = get_backbone(json.loads((Path(run) / "config.json").read_text())["backbone"])
    except (OSError, ValueError, KeyError, TypeError, TransferError):
        return "avg_pool"  # extract names what is wrong with the run
    return entry.feature_layer if entry.constructor is not None else "avg_pool"


def embed(images, spec: dict, batch_size: int = 32, device: str = "auto", workers: int | None = None,
          progress: Progress = SILENT, labels: LabelsFile | None = None):
    """(unit vectors, ExtractResult) of `images` with the index's model: avg-pooled `spec['layer']`."""
    result = extract(images, backbone=spec["backbone"] or "vgg16", layers=[spec["layer"]], pool="avg",
                     run=spec["run"], onnx=spec["onnx"], input_size=spec["input_size"], batch_size=batch_size,
                     device=device, workers=workers, progress=progress, labels=labels)
    return normalise(result.features[spec["layer"]]), result


def build_index(images, output: str | os.PathLike, backbone: str | None = None, run=None, onnx=None,
                layer: str | None = None, input_size: int | None = None, batch_size: int = 32,
                device: str = "auto", workers: int | None = None, progress: Progress = SILENT,
                labels: LabelsFile | None = None) -> dict:
    """Embed `images` and write the index folder `output` in one step (a new or empty folder, or an index to
    replace whole); returns its index.json record. Whatever is refused is refused before any image is embedded.
    `labels`: the images and labels a labels file names in the folder, instead of its class sub-folders."""
    with index_folder(output) as folder:
        spec = _model_spec(backbone, run, onnx, layer, input_size)
        vectors, result = embed(images, spec, batch_size, device, workers, progress, labels)
        record = index_record(spec, vectors, result)
        write_index(folder, record, vectors)
    return record


def index_record(spec: dict, vectors, result: ExtractResult) -> dict:
    """index.json: the model that made the vectors, and each image's absolute path, file stamp and label."""
    paths = [str(Path(path).resolve()) for path in result.paths]
    return {"format": INDEX_FORMAT, "count": int(len(vectors)), "dim": int(vectors.shape[1]),
            "model": {**spec, "weights": result.metadata.get("weights"),
                      "preprocessing": result.metadata.get("preprocessing")},
            "paths": paths, "stamps": [file_stamp(path) for path in paths], "labels": result.labels,
            "classes": result.classes, "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped],
            "created": datetime.now().isoformat(timespec="seconds")}


def similar(queries, index: str | os.PathLike, k: int = 10, device: str = "auto",
            progress: Progress = SILENT, exclude_self: bool = False) -> list[dict]:
    """For each query image: its k nearest images in the index, embedded with the index's own model (checked to
    be the same content as when the index was built). A query that cannot be read comes back with `error` set
    and no neighbours. A query that is itself indexed finds itself first (`self: true` on that hit), unless
    `exclude_self` drops it."""
    search = SearchIndex.load(index)
    check_model_unchanged(search.model, index)
    vectors, result = embed(queries, spec_for_embedding(search.model), device=device, workers=0, progress=progress)
    if result.metadata.get("weights") != search.model.get("weights"):
        raise DataError(f"--index {display(index)}: built with weights from {search.model.get('weights')}, but the "
                        f"model now loads {result.metadata.get('weights')}; rebuild the index")
    found = neighbours(search, result.paths, vectors, k, exclude_self)
    return found + [{"query": item.path, "neighbours": [], "error": item.reason} for item in result.skipped]
