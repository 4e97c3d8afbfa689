"""The checks of an index folder's files on load: index.json (every key `transfer index` writes) and vectors.npy
(float32 rows of the recorded shape, each finite and of unit length). The first violation is a `DataError` naming
the file and the key or row: a damaged index is one line, never a wrong answer. Also what a stored row means to a
reader (its file stamp and status, its label text), shared by `search` and `vectordb`. Split from `search` to keep
each module small; numpy only.
"""

from __future__ import annotations

import os

import numpy as np

from transfer.core.errors import DataError
from transfer.serving.ann import ANN_FILE

INDEX_FILE, VECTORS_FILE, MARKER_FILE = "index.json", "vectors.npy", ".transfer-index"
INDEX_FORMAT = 3  # 3: an optional ANN file or vector database; 2: marker, absolute paths with file stamps, run
# fingerprint; 1: earlier
CHUNK_ROWS = 65_536
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed for a stored vector (float32 rounding is ~1e-7)


def check_record(record, where: str) -> None:
    """index.json as `transfer index` writes it; the first violation is a `DataError` naming the key."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be a JSON object")

    def fail(key: str, problem: str):
        raise DataError(f"{where}: {key} {problem}")

    for key in ("count", "dim"):
        if not isinstance(record.get(key), int) or isinstance(record.get(key), bool) or record[key] < 0:
            fail(key, "is missing or not a whole number >= 0")
    count = record["count"]
    fmt = record.get("format", 1)
    if not isinstance(fmt, int) or not 1 <= fmt <= INDEX_FORMAT:
        fail("format", f"{fmt!r} is not one this version reads (1..{INDEX_FORMAT}); rebuild the index")
    model = record.get("model")
    if not isinstance(model, dict):
        fail("model", "is missing or not an object")
    if not isinstance(model.get("layer"), str) or not model["layer"]:
        fail("model.layer", "is missing or not a name")
    sources = [key for key in ("backbone", "run", "onnx") if model.get(key) is not None]
    if len(sources) != 1 or not all(isinstance(model[key], str) for key in sources):
        fail("model", "must name exactly one of backbone, run, onnx")
    if model.get("onnx") is not None and not isinstance(model.get("onnx_sha256"), str):
        fail("model.onnx_sha256", "is missing")
    if model.get("input_size") is not None and (not isinstance(model["input_size"], int) or model["input_size"] < 1):
        fail("model.input_size", "must be a whole number >= 1 or null")
    paths = record.get("paths")
    if not isinstance(paths, list) or len(paths) != count or not all(isinstance(p, str) for p in paths):
        fail("paths", f"must list {count} file names (count)")
    classes = record.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        fail("classes", "must be a list of names")
    labels = record.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or len(labels) != count:
            fail("labels", f"must be null or list {count} labels (count)")
        for row, label in enumerate(labels):
            if label is not None and not all(_class_index(i, len(classes)) for i in
                                             (label if isinstance(label, list) else [label])):
                fail(f"labels[{row}]", f"{label!r} is not a class index 0..{len(classes) - 1} (or a list of them)")
    stamps = record.get("stamps")
    if stamps is not None and (not isinstance(stamps, list) or len(stamps) != count or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in stamps)):
        fail("stamps", f"must list {count} [size, mtime] pairs (count)")
    ann = record.get("ann")
    if ann is not None and (not isinstance(ann, dict) or ann.get("file") != ANN_FILE or not all(
            isinstance(ann.get(key), int) and not isinstance(ann.get(key), bool) and ann[key] >= 1
            for key in ("nlist", "nprobe"))):
        fail("ann", f"must be null or name {ANN_FILE} with whole numbers nlist and nprobe >= 1")
    database = record.get("database")
    if database is not None and (not isinstance(database, dict) or database.get("kind") != "milvus" or not all(
            isinstance(database.get(key), str) and database[key] for key in ("uri", "collection", "build"))):
        fail("database", "must be null or a Milvus collection (kind milvus, with uri, collection and build)")


def check_vectors(vectors: np.ndarray, record: dict, where: str) -> None:
    """float32 rows of the recorded shape, every one finite and of unit length (or all zero), read chunk by chunk
    in float32 (a sum of squares is never negative, so NaN and infinities show in it; no float64 temporaries)."""
    if vectors.ndim != 2 or vectors.shape != (record["count"], record["dim"]):
        raise DataError(f"{where}: shape {vectors.shape}, but {INDEX_FILE} says {record['count']} x {record['dim']}")
    if vectors.dtype != np.float32:
        raise DataError(f"{where}: dtype {vectors.dtype}, not float32")
    for start in range(0, len(vectors), CHUNK_ROWS):
        chunk = np.asarray(vectors[start:start + CHUNK_ROWS])
        squares = np.einsum("ij,ij->i", chunk, chunk)
        bad = ~np.isfinite(squares) | ((np.abs(np.sqrt(squares) - 1.0) > UNIT_TOLERANCE) & (squares != 0.0))
        if bad.any():
            row = start + int(np.argmax(bad))
            values = np.asarray(vectors[row], dtype=np.float64)
            problem = "is not finite" if not np.isfinite(values).all() else \
                f"has length {np.linalg.norm(values):.6g}, not 1"
            raise DataError(f"{where}: row {row} ({record['paths'][row]}) {problem}; the file was changed after "
                            "`transfer index` wrote it: rebuild the index")



def _class_index(value, classes: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < classes


def file_stamp(path: str | os.PathLike) -> list[int]:
    """[size in bytes, modification time in ns]: enough to notice an image that changed after it was indexed."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def image_status(path: str, stamp: list[int] | None) -> str:
    """'ok', 'missing' (gone since the index was built) or 'changed' (other size or modification time)."""
    try:
        now = file_stamp(path)
    except OSError:
        return "missing"
    return "ok" if stamp is None or now == list(stamp) else "changed"


def label_text(label: int | list[int] | None, classes: list[str]) -> str | None:
    """A row's label as shown: its class name, or with several labels per image their names joined by ', '."""
    if label is None:
        return None
    if isinstance(label, list):
        return ", ".join(classes[i] for i in label)
    return classes[label]
