"""Similar-image search: `transfer index` (pooled, L2-normalised features) and `transfer similar` (cosine top-k).

An index is a folder holding exactly three files: `vectors.npy` (float32, one unit-length row per image,
memory-mapped when searched), `index.json` (absolute paths with each file's size and modification time, labels,
classes, and the model that made the vectors) and the marker `.transfer-index`, which only `transfer index` writes.
A folder without the marker, or with anything else in it, is never replaced or emptied.

Queries are embedded with the index's own model, named by content: an ONNX file by its SHA-256, a run by the
SHA-256 of its best weights and model config (`run_fingerprint`), so a query never meets vectors of another model
even when a file was replaced or a run trained on under the same path. Both files are validated on load (every
key of index.json, finite unit-length vectors): a damaged index is one line naming the file and key.

Replacing an index is two renames (old aside as `.NAME.previous-index`, new in); a build killed between them
leaves the old index readable there, and the next build or load recovers it. Search is exact (a matrix product
over chunks of rows, so a million vectors of 1,280 floats need no more than one chunk in memory). This module
imports no torch: `transfer.apps.index` embeds images (through `transfer.apps.extract`) and hands the vectors here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transfer.core.errors import DataError, first_line
from transfer.core.io import (
    Lock,
    OutputError,
    display,
    file_sha256,
    make_parent,
    os_error_message,
    output_lock,
    probe_folder,
    remove_stale_temps,
    temp_dir_beside,
    write_json,
)
from transfer.core.rundir import run_fingerprint

INDEX_FILE, VECTORS_FILE, MARKER_FILE = "index.json", "vectors.npy", ".transfer-index"
INDEX_FILES = (INDEX_FILE, VECTORS_FILE, MARKER_FILE)  # all an index folder may hold
INDEX_FORMAT = 2  # 2: marker, absolute paths with file stamps, run fingerprint; 1: earlier indexes (still load)
PREVIOUS_SUFFIX = ".previous-index"  # the old index, aside while a new one is moved in
CHUNK_ROWS = 65_536
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed for a stored vector (float32 rounding is ~1e-7)


def normalise(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero): cosine similarity becomes a dot product."""
    rows = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


@contextmanager
def index_folder(output: str | os.PathLike):
    """Hold `output`'s lock while an index is built into it: refuses, before any image is embedded, a file in the
    way, an unwritable parent, or a folder that is not an index (`check_index_folder`); finishes a replacement a
    kill interrupted. Yields the checked folder; `write_index` then replaces it whole."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {display(output)}: a file is in the way; an index is a folder")
    make_parent(output, "--output")  # an unwritable destination fails before any image is embedded
    try:
        probe_folder(output.parent)
    except OSError as exc:
        raise OutputError(f"--output {os_error_message(exc, output.parent)}") from None
    with Lock(output.with_name(f".{output.name}.lock"), f"--output {display(output)}"):
        remove_stale_temps(output.parent, output.name)  # what a killed writer left
        recover_previous(output)
        check_index_folder(output)
        yield output


def write_index(output: Path, record: dict, vectors: np.ndarray) -> None:
    """vectors.npy, index.json and the marker into a temporary folder, then swapped in for `output` (call inside
    `index_folder`)."""
    with temp_dir_beside(output) as work:
        np.save(work / VECTORS_FILE, vectors)
        write_json(work / INDEX_FILE, record)
        write_json(work / MARKER_FILE, {"format": INDEX_FORMAT, "written_by": "transfer index"})
        _swap_in(work, output)


def neighbours(search: SearchIndex, paths: Sequence, vectors: np.ndarray, k: int,
               exclude_self: bool = False) -> list[dict]:
    """Each query's k nearest images; a query that is itself indexed finds itself first (`self: true` on that
    hit), unless `exclude_self` drops it."""
    found = []
    for path, vector in zip(paths, vectors, strict=True):
        itself = str(Path(path).resolve())
        hits = search.nearest(vector, k + 1 if exclude_self else k)
        for hit in hits:
            hit["self"] = hit["path"] == itself
        if exclude_self:
            hits = [hit for hit in hits if not hit["self"]][:k]
        found.append({"query": path, "neighbours": hits})
    return found


def check_index_folder(output: Path) -> None:
    """An existing, non-empty `output` must be an index (its marker present) holding nothing but index files."""
    if not output.is_dir():
        return
    entries = sorted(entry.name for entry in output.iterdir())
    if entries and MARKER_FILE not in entries:
        raise OutputError(f"--output {display(output)}: the folder holds files that `transfer index` did not write "
                          f"({_listed(entries)}); give a new or empty folder")
    foreign = [name for name in entries if name not in INDEX_FILES]
    if foreign:
        raise OutputError(f"--output {display(output)}: besides an index the folder holds {_listed(foreign)}; an "
                          f"index folder holds only {', '.join(INDEX_FILES)}, so it is not replaced: move them out "
                          "or give another folder")


def _listed(names: list[str], shown: int = 3) -> str:
    return ", ".join(display(n) for n in names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown
                                                            else "")


def previous_path(output: Path) -> Path:
    return output.with_name(f".{output.name}{PREVIOUS_SUFFIX}")


def recover_previous(output: Path) -> None:
    """Finish a replacement that a kill interrupted: the old index moves back if no new one arrived, and is
    removed if the new one is in place. Only a folder carrying the marker is touched. Call under the lock."""
    previous = previous_path(output)
    if not (previous / MARKER_FILE).is_file():
        return
    if output.is_dir() and (output / MARKER_FILE).is_file():
        shutil.rmtree(previous, ignore_errors=True)
        return
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        os.replace(previous, output)


def _swap_in(new: Path, output: Path) -> None:
    """Replace `output` by the folder `new` with renames: the old index is aside, whole, until the new one is in."""
    previous = previous_path(output)
    if output.is_dir() and any(output.iterdir()):
        os.replace(output, previous)
    elif output.is_dir():
        output.rmdir()
    os.replace(new, output)
    new.mkdir()  # temp_dir_beside removes its folder on exit
    shutil.rmtree(previous, ignore_errors=True)


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


@dataclass
class SearchIndex:
    """A loaded index: unit vectors (memory-mapped), their images, and the model that made them."""

    folder: Path
    vectors: np.ndarray
    record: dict

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SearchIndex:
        """Read and validate an index folder (or the old index a killed rebuild left aside, see module doc)."""
        folder = Path(folder)
        source = folder
        if not (folder / INDEX_FILE).is_file() and (previous_path(folder) / INDEX_FILE).is_file():
            source = previous_path(folder)
        if not (source / INDEX_FILE).is_file() or not (source / VECTORS_FILE).is_file():
            raise DataError(f"--index {display(folder)}: not an index (no {INDEX_FILE} and {VECTORS_FILE}); build "
                            "one with `transfer index IMAGES -o DIR`")
        try:
            record = json.loads((source / INDEX_FILE).read_text())
            vectors = np.load(source / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DataError(f"--index {display(folder)}: unreadable ({first_line(exc)})") from None
        where = f"--index {display(folder)}: {INDEX_FILE}"
        check_record(record, where)
        check_vectors(vectors, record, f"--index {display(folder)}: {VECTORS_FILE}")
        return cls(folder, vectors, record)

    @property
    def model(self) -> dict:
        return self.record["model"]

    def check_model(self, model) -> None:
        """Refuse a served ONNX file other than the one the index was built with."""
        expected = self.model.get("onnx_sha256")
        if expected is None:
            raise DataError(f"--index {self.folder} was built with {self._described()}, not an ONNX file; build it "
                            f"with `transfer index IMAGES --onnx {model.path} -o DIR` to serve it")
        if file_sha256(model.path) != expected:
            raise DataError(f"--index {self.folder} was built with another model ({self.model['onnx']}); its "
                            f"vectors cannot be compared with {model.path}'s")

    def _described(self) -> str:
        return (f"run {self.model['run']}" if self.model.get("run") else
                f"onnx {self.model['onnx']}" if self.model.get("onnx") else f"backbone {self.model['backbone']}")

    def vector(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """One image's outputs of the index's model -> its unit vector (avg-pooled like the index)."""
        value = np.asarray(outputs[self.model["layer"]], dtype=np.float32)
        if value.ndim == 3:
            value = value.mean(axis=(1, 2))
        return normalise(value[None])[0]

    def nearest(self, query: np.ndarray, k: int) -> list[dict]:
        """The k most cosine-similar images, best first, searched chunk by chunk (exact); each with `status`
        'ok', or 'missing' / 'changed' when its file is gone or differs from the one indexed."""
        k = min(k, len(self.vectors))
        best_scores = np.empty(0, np.float32)
        best_rows = np.empty(0, np.int64)
        for start in range(0, len(self.vectors), CHUNK_ROWS):
            scores = np.asarray(self.vectors[start:start + CHUNK_ROWS]) @ query
            keep = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
            best_scores = np.concatenate([best_scores, scores[keep]])
            best_rows = np.concatenate([best_rows, keep + start])
            order = np.argsort(-best_scores, kind="stable")[:k]
            best_scores, best_rows = best_scores[order], best_rows[order]
        labels, classes = self.record.get("labels"), self.record.get("classes") or []
        stamps = self.record.get("stamps")
        return [{"row": row, "path": self.record["paths"][row], "score": float(score),
                 "label": label_text(labels[row], classes) if labels and classes else None,
                 "status": image_status(self.record["paths"][row], stamps[row] if stamps else None)}
                for row, score in zip(best_rows.tolist(), best_scores.tolist(), strict=True)]


def spec_for_embedding(model: dict) -> dict:
    """The index's model record as `embed` takes it."""
    return {key: model.get(key) for key in ("backbone", "run", "onnx", "layer", "input_size")}


def check_model_unchanged(model: dict, index) -> None:
    """The index's ONNX file or run must still hold what built the index (by SHA-256, not by path)."""
    if model.get("onnx") and (not Path(model["onnx"]).is_file() or file_sha256(model["onnx"]) != model["onnx_sha256"]):
        raise DataError(f"--index {display(index)}: its model {model['onnx']} is gone or changed since the index "
                        "was built; rebuild the index")
    if model.get("run"):
        if not Path(model["run"]).is_dir():
            raise DataError(f"--index {display(index)}: its run {model['run']} is gone")
        if not model.get("run_sha256"):
            raise DataError(f"--index {display(index)} was built by an older version that did not record its run's "
                            "weights; rebuild it with `transfer index`")
        if run_fingerprint(model["run"]) != model["run_sha256"]:
            raise DataError(f"--index {display(index)}: the run {model['run']} has changed since the index was built "
                            "(its weights or model config differ); rebuild the index")


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


def check_vectors(vectors: np.ndarray, record: dict, where: str) -> None:
    """float rows of the recorded shape, every one finite and of unit length (or all zero), read chunk by chunk."""
    if vectors.ndim != 2 or vectors.shape != (record["count"], record["dim"]):
        raise DataError(f"{where}: shape {vectors.shape}, but {INDEX_FILE} says {record['count']} x {record['dim']}")
    if vectors.dtype.kind != "f":
        raise DataError(f"{where}: dtype {vectors.dtype}, not floating point")
    for start in range(0, len(vectors), CHUNK_ROWS):
        chunk = np.asarray(vectors[start:start + CHUNK_ROWS], dtype=np.float64)
        finite = np.isfinite(chunk).all(axis=1)
        norms = np.linalg.norm(np.where(np.isfinite(chunk), chunk, 0.0), axis=1)
        bad = ~finite | ((np.abs(norms - 1.0) > UNIT_TOLERANCE) & (norms != 0.0))
        if bad.any():
            row = start + int(np.argmax(bad))
            problem = "is not finite" if not finite[row - start] else \
                f"has length {norms[row - start]:.6g}, not 1"
            raise DataError(f"{where}: row {row} ({record['paths'][row]}) {problem}; the file was changed after "
                            "`transfer index` wrote it: rebuild the index")


def contact_sheet(results: Sequence[dict], output: str | os.PathLike, thumb: int = 160,
                  title: str = "similar images") -> Path:
    """A title, then one row per query: the query (blue frame), then its neighbours with rank, score and label, in
    a font large enough to read; written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from transfer.core.images import BadImageError, open_image
    from transfer.core.io import atomic_path

    results = [r for r in results if not r.get("error")]  # unreadable queries have no row
    columns = 1 + max((len(r["neighbours"]) for r in results), default=0)
    font, bold = ImageFont.load_default(size=15), ImageFont.load_default(size=20)
    header, caption = 40, 44
    sheet = Image.new("RGB", (max(columns * (thumb + 8) + 8, 480), header + len(results) * (thumb + caption + 8) + 8),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), title, fill="black", font=bold)
    for row, result in enumerate(results):
        neighbours = enumerate(result["neighbours"], 1)
        cells = [(result["query"], "query", Path(result["query"]).name)] + [
            (n["path"], f"#{rank}  {n['score']:.3f}" + ("  itself" if n.get("self") else ""),
             n["label"] or Path(n["path"]).name) for rank, n in neighbours]
        for column, (path, top, bottom) in enumerate(cells):
            x, y = 8 + column * (thumb + 8), header + row * (thumb + caption + 8)
            try:
                image = open_image(path, draft_size=(thumb, thumb))
                image.thumbnail((thumb, thumb))
                sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
            except BadImageError:
                draw.rectangle((x, y, x + thumb, y + thumb), outline="red")
            if column == 0:
                draw.rectangle((x - 3, y - 3, x + thumb + 3, y + thumb + 3), outline="blue", width=3)
            draw.text((x, y + thumb + 3), top, fill="black", font=font)
            draw.text((x, y + thumb + 22), bottom[:20], fill="dimgray", font=font)
    output = Path(output)
    with output_lock(output), atomic_path(output) as temp:
        sheet.save(temp, format="PNG")
    return output


def _class_index(value, classes: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < classes


def label_text(label: int | list[int] | None, classes: list[str]) -> str | None:
    """A row's label as shown: its class name, or with several labels per image their names joined by ', '."""
    if label is None:
        return None
    if isinstance(label, list):
        return ", ".join(classes[i] for i in label)
    return classes[label]
