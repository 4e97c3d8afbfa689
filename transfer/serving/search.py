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
leaves the old index readable there, and the next build or load recovers it. Search is exact for collections under
`ann.ANN_MIN_ROWS` (a matrix product over chunks of rows, every query of a batch at once) and approximate above it
(`ann.faiss`, FAISS IVF-SQ8 re-ranked exactly, its measured recall@10 in index.json; `exact=True` keeps exact
search). Loading reads no vector into memory: vectors.npy and ann.faiss are memory-mapped (a server then reads
ann.faiss whole in the background, for twice the search speed), and the vector check runs in float32.
This module imports no torch: `transfer.apps.index` embeds images (through `transfer.apps.extract`) and hands the
vectors here.
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
from transfer.core.progress import SILENT, Progress
from transfer.core.rundir import run_fingerprint
from transfer.serving.ann import ANN_FILE, ANN_MIN_ROWS, build_ann, exact_top_k, load_ann, search_ann
from transfer.serving.index_checks import (
    CHUNK_ROWS,
    INDEX_FILE,
    INDEX_FORMAT,
    MARKER_FILE,
    VECTORS_FILE,
    check_record,
    check_vectors,
    image_status,
    label_text,
)

INDEX_FILES = (INDEX_FILE, VECTORS_FILE, MARKER_FILE, ANN_FILE)  # all an index folder may hold
PREVIOUS_SUFFIX = ".previous-index"  # the old index, aside while a new one is moved in


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


def write_index(output: Path, record: dict, vectors: np.ndarray | list[np.ndarray], exact: bool = False,
                progress: Progress = SILENT, ann_min_rows: int = ANN_MIN_ROWS) -> None:
    """vectors.npy, index.json, the ANN file when the collection has `ann_min_rows` or more (and `exact` is off)
    and the marker into a temporary folder, then swapped in for `output` (call inside `index_folder`). `vectors`:
    one array, or a list of parts written one after another (`save_rows`). Sets record["ann"] (None: exact
    search); the ANN structure is built from the stored, memory-mapped vectors."""
    with temp_dir_beside(output) as work:
        save_rows(work / VECTORS_FILE, vectors if isinstance(vectors, list) else [vectors])
        stored = np.load(work / VECTORS_FILE, mmap_mode="r")
        record["ann"] = None if exact or len(stored) < ann_min_rows else build_ann(stored, work / ANN_FILE,
                                                                                  progress=progress)
        del stored
        write_json(work / INDEX_FILE, record)
        write_json(work / MARKER_FILE, {"format": INDEX_FORMAT, "written_by": "transfer index"})
        _swap_in(work, output)


class RowSelection:
    """Some rows of a (memory-mapped) matrix, read a slice at a time: what an index update keeps, never copied whole."""

    def __init__(self, vectors: np.ndarray, rows: Sequence[int]):
        self.vectors, self.rows = vectors, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), vectors.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, part: slice) -> np.ndarray:
        return np.asarray(self.vectors[self.rows[part]])


class UnitRows:
    """A (memory-mapped) matrix's rows scaled to unit length a slice at a time: freshly extracted features become
    an index's vectors without ever being held in memory whole."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.shape = rows, rows.shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, part: slice) -> np.ndarray:
        return normalise(self.rows[part])


def save_rows(path: Path, parts: list) -> None:
    """The parts' rows, one after another, into one float32 .npy file, CHUNK_ROWS at a time: the rows an update
    keeps are copied from the old memory-mapped file without ever being held in memory whole."""
    rows, dim = sum(len(part) for part in parts), parts[0].shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    start = 0
    for part in parts:
        for begin in range(0, len(part), CHUNK_ROWS):
            chunk = np.asarray(part[begin:begin + CHUNK_ROWS], dtype=np.float32)
            out[start:start + len(chunk)] = chunk
            start += len(chunk)
    out.flush()
    del out


def neighbours(search: SearchIndex, paths: Sequence, vectors: np.ndarray, k: int,
               exclude_self: bool = False) -> list[dict]:
    """Each query's k nearest images (all queries searched together); a query that is itself indexed finds itself
    first (`self: true` on that hit), unless `exclude_self` drops it."""
    found = []
    every_hits = search.nearest_many(vectors, k + 1 if exclude_self else k) if len(paths) else []
    for path, hits in zip(paths, every_hits, strict=True):
        itself = str(Path(path).resolve())
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


@dataclass
class SearchIndex:
    """A loaded index: unit vectors (memory-mapped), their images, and the model that made them."""

    folder: Path
    vectors: np.ndarray
    record: dict
    ann: object | None = None  # the FAISS index (memory-mapped) when index.json records one and search is not exact
    database: object | None = None  # a `vectordb.MilvusIndex` when index.json points to one and search is not exact
    ann_file: Path | None = None  # where `ann` was read from
    ann_in_memory: bool = False  # `ann` read whole (`read_ann_whole`) rather than memory-mapped

    @classmethod
    def load(cls, folder: str | os.PathLike, exact: bool = False) -> SearchIndex:
        """Read and validate an index folder (or the old index a killed rebuild left aside, see module doc);
        `exact` searches every vector even when the index has an ANN file."""
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
        ann = database = None
        if record.get("database") and not exact:
            from transfer.serving.vectordb import MilvusIndex

            database = MilvusIndex(record, where=f"--index {display(folder)}")
        elif record.get("ann") and not exact:
            try:
                ann = load_ann(source / ANN_FILE, record["ann"]["nprobe"])
            except RuntimeError as exc:  # FAISS raises RuntimeError for a missing or damaged file
                raise DataError(f"--index {display(folder)}: {ANN_FILE} unreadable ({first_line(exc)[:200]}); "
                                "rebuild the index, or search it exactly") from None
            if ann.ntotal != record["count"] or ann.d != record["dim"]:
                raise DataError(f"--index {display(folder)}: {ANN_FILE} holds {ann.ntotal} x {ann.d} vectors, "
                                f"{INDEX_FILE} says {record['count']} x {record['dim']}: rebuild the index")
        return cls(folder, vectors, record, ann, database, source / ANN_FILE if ann is not None else None)

    def read_ann_whole(self) -> None:
        """Swap the memory-mapped ANN file for a copy read whole: FAISS scans in-memory lists about twice as fast
        (`ann.load_ann`), but reading the file (1.3 GB at a million vectors) takes seconds, so a server starts on
        the mapped file and calls this in the background; searches meanwhile use the mapped one (the swap is one
        assignment)."""
        if self.ann is not None and self.ann_file is not None and not self.ann_in_memory:
            self.ann = load_ann(self.ann_file, self.record["ann"]["nprobe"], in_memory=True)
            self.ann_in_memory = True

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
        """The k most cosine-similar images to one unit vector, best first (see `nearest_many`)."""
        return self.nearest_many(np.asarray(query, dtype=np.float32)[None], k)[0]

    def nearest_many(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        """For each query row, the k most cosine-similar images, best first: through the vector database or the
        ANN file when the index has one, else exactly (all queries against one chunk of rows at a time). Each hit
        has `status` 'ok', or 'missing' / 'changed' when its file is gone or differs from the one indexed."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(len(queries), -1)
        k = min(k, len(self.vectors))
        if k == 0:
            return [[] for _ in queries]
        if self.database is not None:
            return self.database.nearest_many(queries, k)
        if self.ann is not None:
            scores, rows = search_ann(self.ann, self.vectors, queries, k)
        else:
            scores, rows = exact_top_k(self.vectors, queries, k, file_reads=False)
        return [[self._hit(row, score) for row, score in zip(row_ids.tolist(), row_scores.tolist(), strict=True)
                 if row >= 0] for row_ids, row_scores in zip(rows, scores, strict=True)]

    def _hit(self, row: int, score: float) -> dict:
        labels, classes = self.record.get("labels"), self.record.get("classes") or []
        stamps = self.record.get("stamps")
        return {"row": row, "path": self.record["paths"][row], "score": float(score),
                "label": label_text(labels[row], classes) if labels and classes else None,
                "status": image_status(self.record["paths"][row], stamps[row] if stamps else None)}


def spec_for_embedding(model: dict) -> dict:
    """The index's model record as `embed` takes it."""
    return {key: model.get(key) for key in ("backbone", "run", "onnx", "layer", "input_size", "decode_floor")}


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
