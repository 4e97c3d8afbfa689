"""Features streamed to disk in parts, and a killed `extract` (or `index`) continued where it stopped.

Each process (one, or each torchrun rank) streams its block of the images, layer by layer, into
`.NAME.transfer-partial/LAYER.partRANK.npy` beside the output, and after every batch records in `rankRANK.json` how
many of its images are done, how many rows they gave and which failed to decode (skipped, with the reason). The
folder's `job.json` names the job: a fingerprint of the model's content, the images and the settings that shape the
numbers (layers, pooling, layout, batch size, process count, preprocessing). Run again with the same arguments, the
job finds its folder, cuts each part back to the rows recorded (a kill may leave half a batch after them) and goes
on from the next image. Batches start where they started before, so the finished file is byte for byte the one an
uninterrupted run writes. A folder of another job is emptied and the run starts over, saying why. The folder is
removed once the output is in place; an interrupted run (an error, Ctrl-C, a kill) leaves it for the next.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from transfer.core.io import OutputError, atomic_path, display, make_parent, os_error_message, write_json

PARTIAL_SUFFIX = ".transfer-partial"
JOB_FILE = "job.json"


def partial_path(output: str | os.PathLike) -> Path:
    """`.NAME.transfer-partial` beside the output: where its parts stream until it is complete."""
    output = Path(output)
    return output.with_name(f".{output.name}{PARTIAL_SUFFIX}")


def job_fingerprint(model_digest: str, settings: dict, paths: list[str], batch_size: int, processes: int) -> str:
    """Names one extraction: the model's content, what shapes its numbers and where batches start, and the images."""
    digest = hashlib.sha256()
    for item in (model_digest, json.dumps(settings, sort_keys=True, default=str), batch_size, processes,
                 *(os.fsencode(path) for path in paths)):
        digest.update(item if isinstance(item, bytes) else str(item).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def open_partial(output: Path, fingerprint: str) -> tuple[Path, str | None]:
    """The job's partial folder beside `output` (made, or found from an interrupted run of the same job) and, when
    a folder of another job had to be emptied, why it was not continued."""
    folder = partial_path(output)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"--output {display(output)}: {display(folder)} is in the way (the folder `transfer` "
                          "streams features into until they are complete); move it")
    reason = None
    if folder.is_dir():
        try:
            found = json.loads((folder / JOB_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            found = None
        if found == fingerprint:
            return folder, None
        reason = "it was written by another model, images or settings" if found else "its job record is unreadable"
        shutil.rmtree(folder)
    make_parent(folder)
    try:
        folder.mkdir()
        write_json(folder / JOB_FILE, {"fingerprint": fingerprint, "output": output.name})
    except OSError as exc:
        raise OutputError(os_error_message(exc, folder.parent)) from None
    return folder, reason


def npy_header(shape: tuple[int, ...]) -> bytes:
    """numpy's own float32 .npy header for `shape`. numpy pads it so the first axis can grow to any count in place
    (its length does not change with the row count), so a part's header is rewritten with its final count, and the
    bytes are those `np.save` writes (one process's file equals the joined file of several)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


class RankParts:
    """One process's parts in the partial folder: `resume()` (images already done), `write(...)` after each
    batch, `finish()` (the parts' headers set to the rows written)."""

    def __init__(self, folder: Path, rank: int, layers: list[str]):
        self.folder, self.rank, self.layers = folder, rank, layers
        self.record = folder / f"rank{rank}.json"
        self.images, self.rows, self.failed = 0, 0, []
        self.shapes: dict[str, list[int]] = {}
        self.handles: dict = {}

    def part(self, name: str) -> Path:
        return self.folder / f"{name}.part{self.rank}.npy"

    def resume(self) -> int:
        """Reopen the parts an interrupted run of this job left, cut back to the rows its record counts; how many
        of this process's images are done (0 when nothing usable was left)."""
        try:
            state = json.loads(self.record.read_text())
            images, rows, failed, shapes = state["images"], state["rows"], state["failed"], state["shapes"]
            row_bytes = {name: 4 * int(np.prod(shapes[name], dtype=np.int64)) for name in self.layers}
            header_bytes = {name: len(npy_header((rows, *shapes[name]))) for name in self.layers}
            if rows and any(self.part(name).stat().st_size < header_bytes[name] + rows * row_bytes[name]
                            for name in self.layers):
                raise ValueError("a part is shorter than its record")
        except (OSError, ValueError, KeyError, TypeError):
            for name in self.layers:
                self.part(name).unlink(missing_ok=True)
            return 0
        self.images, self.rows, self.failed, self.shapes = images, rows, [tuple(f) for f in failed], shapes
        for name in self.layers if rows else ():
            handle = open(self.part(name), "r+b")
            handle.truncate(header_bytes[name] + rows * row_bytes[name])  # half a batch a kill left after the last
            handle.seek(0, os.SEEK_END)  # whole one
            self.handles[name] = handle
        return images

    def write(self, outputs: dict[str, np.ndarray], images: int, failed: list[tuple[str, str]]) -> None:
        """One batch: its rows per layer (images that decoded), how many images it covered, those that failed."""
        for name in self.layers:
            array = outputs.get(name)
            if array is None or not len(array):
                continue
            if name not in self.handles:
                self.shapes[name] = list(array.shape[1:])
                self.handles[name] = open(self.part(name), "wb")
                self.handles[name].write(npy_header((0, *array.shape[1:])))
            np.ascontiguousarray(array, dtype="<f4").tofile(self.handles[name])
            self.handles[name].flush()  # the data reaches the file before the record counts it
        self.images += images
        self.rows += next((len(a) for a in outputs.values() if a is not None), 0)
        self.failed += failed
        write_json(self.record, {"images": self.images, "rows": self.rows, "failed": self.failed,
                                 "shapes": self.shapes})

    def finish(self) -> None:
        """Set each part's header to the rows it holds (images that failed give none), and close it."""
        for name, handle in self.handles.items():
            header = npy_header((self.rows, *self.shapes[name]))
            if len(header) != len(npy_header((0, *self.shapes[name]))):
                raise RuntimeError(f"numpy's .npy header for {self.rows} rows changed length")  # padded for 21 digits
            handle.seek(0)
            handle.write(header)
        self.close()

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles = {}


def join_parts(folder: Path, name: str, ranks: int, shape: list[int]) -> Path:
    """FOLDER/NAME.part0.npy, part1, ... -> FOLDER/NAME.npy in rank order, streamed (one part's data at a time);
    a single part is renamed. Ranks with no rows (every image failed, or none given) have no part."""
    parts = [folder / f"{name}.part{rank}.npy" for rank in range(ranks)]
    parts = [part for part in parts if part.exists()]
    joined = folder / f"{name}.npy"
    if len(parts) == 1:
        os.replace(parts[0], joined)
        return joined
    with open(joined, "wb") as target:
        target.write(npy_header(tuple(shape)))
        for part in parts:
            with open(part, "rb") as handle:
                np.lib.format.read_magic(handle)
                np.lib.format.read_array_header_1_0(handle)
                shutil.copyfileobj(handle, target, 1 << 22)
            part.unlink()
    return joined


def finalize(output: Path, folder: Path, names: list[str]) -> None:
    """Move one .npy into place, or pack several into an uncompressed .npz (streamed from disk)."""
    with atomic_path(output) as temp:
        if output.suffix == ".npy":
            os.replace(folder / f"{names[0]}.npy", temp)
        else:
            with zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name in names:  # a fixed timestamp: the same features give the same bytes
                    source = folder / f"{name}.npy"
                    entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    with open(source, "rb") as handle, archive.open(
                            entry, "w", force_zip64=source.stat().st_size >= zipfile.ZIP64_LIMIT) as target:
                        shutil.copyfileobj(handle, target, 1 << 22)


def sidecar_path(output: str | os.PathLike) -> Path:
    """features.npy -> features.json: ordered file paths, labels and metadata of the rows."""
    return Path(output).with_suffix(".json")


def check_sidecar(output: Path) -> None:
    """feats.npz must not take the sidecar of feats.npy (both would be feats.json): refused before any work."""
    sidecar = sidecar_path(output)
    if not sidecar.is_file():
        return
    try:
        owner = json.loads(sidecar.read_text()).get("output")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner is None:  # written by an earlier version, or not ours: the other features file beside it tells
        other = output.with_suffix(".npz" if output.suffix == ".npy" else ".npy")
        owner = other.name if other.exists() else None
    if owner is not None and owner != output.name:
        raise OutputError(f"--output {output}: its sidecar {sidecar.name} belongs to {owner}, which would be left "
                          f"without it; choose another name (for example {output.stem}_2{output.suffix})")
