"""`transfer index` and `transfer similar` with any model: images embedded through `transfer.apps.extract` (a
PyTorch backbone, a run, or an ONNX file), the vectors handed to the torch-free `transfer.serving.search`, which
owns the index folder, its checks and the exact top-k.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np

from exporters.runtime import OnnxModel
from models.registry import get_backbone
from transfer.apps.extract import ExtractResult, collect_samples, extract
from transfer.core.errors import DataError, TransferError
from transfer.core.io import OutputError, display, file_sha256, write_json
from transfer.core.preprocess import check_decode_floor
from transfer.core.progress import SILENT, Progress
from transfer.core.rundir import run_fingerprint
from transfer.core.world import World
from transfer.data.labels import LabelsFile
from transfer.serving.index_checks import INDEX_FILE, VECTORS_FILE, file_stamp, image_status
from transfer.serving.search import (
    INDEX_FORMAT,
    RowSelection,
    SearchIndex,
    UnitRows,
    check_index_folder,
    check_model_unchanged,
    index_folder,
    neighbours,
    normalise,
    spec_for_embedding,
    write_index,
)
from transfer.serving.vectordb import collection_name, connect, database_uri, default_collection, push


def _model_spec(backbone: str | None, run, onnx, layer: str | None, input_size: int | None,
                decode_floor: float | None = None) -> dict:
    """Which model embeds images for this index (queries later too); the layer defaults to the pooled features."""
    if sum(x is not None for x in (run, onnx)) > 1:
        raise TransferError("--run and --onnx exclude each other; give one model")
    spec: dict = {"backbone": None, "run": None, "onnx": None, "onnx_sha256": None, "input_size": input_size,
                  "decode_floor": None if decode_floor is None else check_decode_floor(decode_floor)}
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
          progress: Progress = SILENT, labels: LabelsFile | None = None, scratch: Path | None = None):
    """(unit vectors, ExtractResult) of `images` with the index's model: avg-pooled `spec['layer']`. With a
    `scratch` folder the features stream to a file there as batches finish, and the vectors come back as
    `UnitRows` over it (memory-mapped, normalised a slice at a time): a million images never sit in memory."""
    output = None if scratch is None else scratch / "features.npy"
    result = extract(images, backbone=spec["backbone"] or "vgg16", layers=[spec["layer"]], pool="avg",
                     run=spec["run"], onnx=spec["onnx"], input_size=spec["input_size"], batch_size=batch_size,
                     device=device, workers=workers, progress=progress, labels=labels, output=output,
                     decode_floor=spec.get("decode_floor"))
    if output is None:
        return normalise(result.features[spec["layer"]]), result
    if not World.from_env().main:  # under torchrun rank 0 alone reads the joined features
        return None, result
    return UnitRows(np.load(output, mmap_mode="r")), result


def embedding_path(folder: str | os.PathLike) -> Path:
    """Where an index's features stream while it builds: `.NAME.embedding` beside it (see `embedding_scratch`)."""
    return Path(folder).with_name(f".{Path(folder).name}.embedding")


@contextmanager
def embedding_scratch(folder: Path):
    """`.NAME.embedding` beside the index: the features stream there (every torchrun rank its part, joined by
    `extract`) before they become the index's vectors. Removed once the index is written; an interrupted build
    leaves it, and the same build run again continues its extraction where it stopped (`feature_parts`)."""
    scratch = embedding_path(folder)
    if scratch.is_symlink() or (scratch.exists() and not scratch.is_dir()):
        raise OutputError(f"--output {display(folder)}: {display(scratch)} is in the way (a file `transfer index` "
                          "streams features into while it builds); move it")
    scratch.mkdir(exist_ok=True)
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


def build_index(images, output: str | os.PathLike, backbone: str | None = None, run=None, onnx=None,
                layer: str | None = None, input_size: int | None = None, batch_size: int = 32,
                device: str = "auto", workers: int | None = None, progress: Progress = SILENT,
                labels: LabelsFile | None = None, exact: bool = False,
                database: tuple[str, str | None] | None = None, decode_floor: float | None = None) -> dict | None:
    """Embed `images` and write the index folder `output` in one step (a new or empty folder, or an index to
    replace whole); returns its index.json record. Whatever is refused is refused before any image is embedded.
    `labels`: the images and labels a labels file names in the folder, instead of its class sub-folders. From
    `ann.ANN_MIN_ROWS` images the index gets an approximate-search file (record["ann"]) unless `exact`.
    `database`: (Milvus URI, collection or None) to copy the index into once written (`publish_index`).
    `decode_floor` (recorded; queries are decoded alike) replaces the model's own for JPEG decoding.
    Under torchrun every process embeds its block of the images into its part of the features file, as `extract`
    does, and rank 0 writes the index; the other ranks return None."""
    database = _checked_database(database)
    if not World.from_env().main:
        check_index_folder(Path(output))  # refused on every rank alike, before any image is embedded
        embed(images, _model_spec(backbone, run, onnx, layer, input_size, decode_floor), batch_size, device,
              workers, SILENT, labels, embedding_path(output))
        return None
    with index_folder(output) as folder, embedding_scratch(folder) as scratch:
        spec = _model_spec(backbone, run, onnx, layer, input_size, decode_floor)
        vectors, result = embed(images, spec, batch_size, device, workers, progress, labels, scratch)
        record = index_record(spec, vectors, result)
        write_index(folder, record, [vectors], exact=exact, progress=progress)
        if database is not None:
            _publish(folder, record, *database, progress)
    return record


def publish_index(output: str | os.PathLike, uri: str, collection: str | None = None,
                  progress: Progress = SILENT) -> dict:
    """Copy an existing index into a Milvus collection (`collection`: default the folder's name) and point its
    index.json there, so `similar` and `serve` search the collection; returns the updated record."""
    if not (Path(output) / INDEX_FILE).is_file():  # before index_folder, which would make missing parent folders
        raise DataError(f"--output {display(output)}: no index there to copy; build one with `transfer index "
                        "IMAGES -o DIR`")
    database = _checked_database((uri, collection))
    with index_folder(output) as folder:
        search = SearchIndex.load(folder, exact=True)  # validated before it is copied anywhere
        _publish(folder, search.record, *database, progress, vectors=search.vectors)
        return search.record


def _checked_database(database: tuple[str, str | None] | None) -> tuple[str, str | None] | None:
    """The Milvus URI and collection name checked, and the server reached, before any image is embedded (each
    failure is one line)."""
    if database is None:
        return None
    uri, collection = database_uri(database[0]), collection_name(database[1]) if database[1] else None
    connect(uri).close()
    return uri, collection


def _publish(folder: Path, record: dict, uri: str, collection: str | None, progress: Progress,
             vectors: np.ndarray | None = None) -> None:
    """Push the index in `folder` (its index.json `record`, under its lock) to Milvus at a checked `uri`
    (`_checked_database`) and record where in `record` and index.json. `vectors`: the stored ones, memory-mapped
    from the folder unless given (an index just written needs no second check)."""
    if vectors is None:
        vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
    record["database"] = push(record, vectors, uri, collection or default_collection(folder), progress)
    write_json(folder / INDEX_FILE, record)


def check_same_weights(model: dict, result: ExtractResult, where: str) -> None:
    """The images were embedded with the weights the index was built with (a backbone's source can change: a
    cache filled, a package installed), else a `DataError`: its vectors could not be compared."""
    if result.metadata.get("weights") != model.get("weights"):
        raise DataError(f"{where}: built with weights from {model.get('weights')}, but the model now loads "
                        f"{result.metadata.get('weights')}; rebuild the index")


def update_index(images, output: str | os.PathLike, add: bool = True, remove: bool = False, batch_size: int = 32,
                 device: str = "auto", workers: int | None = None, progress: Progress = SILENT,
                 labels: LabelsFile | None = None, exact: bool = False,
                 database: tuple[str, str | None] | None = None) -> dict:
    """Grow an index without re-embedding it: with `add`, embed only the images of `images` it does not hold yet
    (or whose file changed since: their old rows are replaced); with `remove`, drop the rows whose files are gone.
    The index's own model embeds them, under the same identity rules as `similar` (its ONNX file or run unchanged,
    by content). Kept rows are copied from the stored vectors; the ANN file is rebuilt from the stored vectors.
    An index that points to a Milvus collection is pushed there again (from the stored vectors), or to `database`.
    Returns the new index.json record, with `embedded`, `replaced` and `removed` counts."""
    database = _checked_database(database)
    if not Path(output).is_dir():  # before index_folder, which would make the missing parent folders
        raise DataError(f"--output {display(output)}: no index there to update; build one with `transfer index "
                        "IMAGES -o DIR`")
    with index_folder(output) as folder, embedding_scratch(folder) as scratch:
        search = SearchIndex.load(folder, exact=True)
        check_model_unchanged(search.model, folder)
        record, count = search.record, search.record["count"]
        stamps = record.get("stamps") or [None] * count
        status = [image_status(path, stamps[row]) for row, path in enumerate(record["paths"])]
        fresh, classes, skipped = ([], [], []) if images is None else collect_samples(images, progress, labels)
        held = {path for row, path in enumerate(record["paths"]) if status[row] == "ok"}
        new = [s for s in fresh if str(Path(s.path).resolve()) not in held] if add else []
        replaced = {str(Path(s.path).resolve()) for s in new} & set(record["paths"])
        keep = [row for row, path in enumerate(record["paths"])
                if path not in replaced and not (remove and status[row] == "missing")]
        vectors = None
        if new:
            vectors, result = embed([s.path for s in new], spec_for_embedding(search.model), batch_size, device,
                                    workers, progress, scratch=scratch)
            check_same_weights(search.model, result, f"--output {display(folder)}")
            skipped += result.skipped
        merged = _merged(record, keep, new, classes, result.paths if new else [])
        merged.update(embedded=len(merged["paths"]) - len(keep), replaced=len(replaced), removed=count - len(keep)
                      - len(replaced), skipped=[{"path": s.path, "reason": s.reason} for s in skipped],
                      updated=datetime.now().isoformat(timespec="seconds"))
        kept_rows = search.vectors if len(keep) == count else RowSelection(search.vectors, keep)
        parts = [part for part in (kept_rows, vectors) if part is not None and len(part)]
        if not parts:
            raise DataError(f"--output {display(folder)}: nothing would be left in the index")
        write_index(folder, merged, parts, exact=exact, progress=progress)
        if database is None and merged.get("database"):
            database = merged["database"]["uri"], merged["database"]["collection"]
        if database is not None:
            _publish(folder, merged, *database, progress)
    return merged


def _merged(record: dict, keep: list[int], new: list, classes: list[str], embedded: list) -> dict:
    """index.json of the kept rows followed by the newly embedded images (new class names appended, so the old
    rows' class indices stay)."""
    names = list(record.get("classes") or [])
    names += [name for name in classes if name not in names]
    label_of = {str(Path(s.path).resolve()): (None if s.label is None else names.index(classes[s.label]))
                for s in new}
    paths = [str(Path(path).resolve()) for path in embedded]
    old_labels = record.get("labels") or [None] * record["count"]
    stamps = record.get("stamps") or [None] * record["count"]
    return {**record, "count": len(keep) + len(paths), "classes": names,
            "paths": [record["paths"][row] for row in keep] + paths,
            "stamps": [stamps[row] for row in keep] + [file_stamp(path) for path in paths],
            "labels": [old_labels[row] for row in keep] + [label_of.get(path) for path in paths]}


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
            progress: Progress = SILENT, exclude_self: bool = False, exact: bool = False) -> list[dict]:
    """For each query image: its k nearest images in the index, embedded with the index's own model (checked to
    be the same content as when the index was built). A query that cannot be read comes back with `error` set
    and no neighbours. A query that is itself indexed finds itself first (`self: true` on that hit), unless
    `exclude_self` drops it. All queries are embedded in batches and searched together; `exact` ignores the
    index's approximate-search file."""
    search = SearchIndex.load(index, exact=exact)
    check_model_unchanged(search.model, index)
    vectors, result = embed(queries, spec_for_embedding(search.model), device=device, workers=0, progress=progress)
    check_same_weights(search.model, result, f"--index {display(index)}")
    found = neighbours(search, result.paths, vectors, k, exclude_self)
    return found + [{"query": item.path, "neighbours": [], "error": item.reason} for item in result.skipped]
