"""Similar-image search: `transfer index` (pooled, L2-normalised features) and `transfer similar` (cosine top-k).

An index is a folder: `vectors.npy` (float32, one unit-length row per image, memory-mapped when searched) and
`index.json` (paths, labels, classes, and the model that made the vectors). Queries are embedded with that same
model, read back from `index.json`, so a query never meets vectors of another model; `serve --index` accepts only
the ONNX file the index was built with (same SHA-256). Search is exact (a matrix product over chunks of rows, so a
million vectors of 1,280 floats need no more than one chunk in memory). This module imports no torch: building and
querying with a PyTorch backbone import it through `transfer.features`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from transfer.errors import DataError, TransferError
from transfer.io import (
    Lock,
    OutputError,
    display,
    make_parent,
    os_error_message,
    output_lock,
    probe_folder,
    remove_stale_temps,
    temp_dir_beside,
    temp_name,
    write_json,
)
from transfer.progress import SILENT, Progress

INDEX_FILE, VECTORS_FILE = "index.json", "vectors.npy"
CHUNK_ROWS = 65_536


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalise(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero): cosine similarity becomes a dot product."""
    rows = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _model_spec(backbone: str | None, run, onnx, layer: str | None, input_size: int | None) -> dict:
    """Which model embeds images for this index; the layer defaults to the pooled features."""
    if sum(x is not None for x in (run, onnx)) > 1:
        raise TransferError("--run and --onnx exclude each other; give one model")
    spec: dict = {"backbone": None, "run": None, "onnx": None, "onnx_sha256": None, "input_size": input_size}
    if onnx is not None:
        from exporters.runtime import OnnxModel

        model = OnnxModel(onnx, device="cpu")
        if model.output_kind != "features":
            raise TransferError(f"--onnx {onnx} is a classifier; index needs a feature extractor (transfer export "
                                "--layer NAME)")
        if layer is None and len(model.output_names) > 1:
            raise TransferError(f"--onnx {onnx} has outputs {', '.join(model.output_names)}: choose one with --layer")
        spec.update(onnx=str(Path(onnx).resolve()), onnx_sha256=file_sha256(onnx),
                    layer=layer or model.output_names[0])
    elif run is not None:
        spec.update(run=str(Path(run).resolve()), layer=layer or "avg_pool")
    else:
        from models.registry import get_backbone

        name = backbone or "efficientnet_lite0"
        entry = get_backbone(name)
        spec.update(backbone=name, layer=layer or ("avg_pool" if "avg_pool" in entry.aliases else entry.feature_layer))
    return spec


def embed(images, spec: dict, batch_size: int = 32, device: str = "auto", workers: int | None = None,
          progress: Progress = SILENT):
    """(unit vectors, ExtractResult) of `images` with the index's model: avg-pooled `spec['layer']`."""
    from transfer.features import extract

    result = extract(images, backbone=spec["backbone"] or "vgg16", layers=[spec["layer"]], pool="avg",
                     run=spec["run"], onnx=spec["onnx"], input_size=spec["input_size"], batch_size=batch_size,
                     device=device, workers=workers, progress=progress)
    return normalise(result.features[spec["layer"]]), result


def build_index(images, output: str | os.PathLike, backbone: str | None = None, run=None, onnx=None,
                layer: str | None = None, input_size: int | None = None, batch_size: int = 32,
                device: str = "auto", workers: int | None = None, progress: Progress = SILENT) -> dict:
    """Embed `images` and write the index folder `output` in one step (a new folder, or a previous index
    replaced whole); returns its index.json record."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output}: a file is in the way; an index is a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / INDEX_FILE).is_file():
        raise OutputError(f"--output {output}: the folder holds other files; give a new or empty folder (or an "
                          "index to replace)")
    make_parent(output, "--output")  # an unwritable destination fails before any image is embedded
    try:
        probe_folder(output.parent)
    except OSError as exc:
        raise OutputError(f"--output {os_error_message(exc, output.parent)}") from None
    spec = _model_spec(backbone, run, onnx, layer, input_size)
    vectors, result = embed(images, spec, batch_size, device, workers, progress)
    record = {"count": int(len(vectors)), "dim": int(vectors.shape[1]), "model": {**spec,
              "weights": result.metadata.get("weights"), "preprocessing": result.metadata.get("preprocessing")},
              "paths": result.paths, "labels": result.labels, "classes": result.classes,
              "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped],
              "created": datetime.now().isoformat(timespec="seconds")}
    with Lock(output.with_name(f".{output.name}.lock"), f"--output {display(output)}"):
        remove_stale_temps(output.parent, output.name)  # what a killed writer left
        with temp_dir_beside(output) as work:
            np.save(work / VECTORS_FILE, vectors)
            write_json(work / INDEX_FILE, record)
            _swap_in(work, output)
    return record


def _swap_in(new: Path, output: Path) -> None:
    """Replace `output` by the folder `new`: renames only, so a reader sees the old index or the new one."""
    old = None
    if output.is_dir():
        if any(output.iterdir()):
            old = temp_name(output)
            os.replace(output, old)
        else:
            output.rmdir()
    os.replace(new, output)
    new.mkdir()  # temp_dir_beside removes its folder on exit
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class SearchIndex:
    """A loaded index: unit vectors (memory-mapped), their images, and the model that made them."""

    folder: Path
    vectors: np.ndarray
    record: dict

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SearchIndex:
        folder = Path(folder)
        if not (folder / INDEX_FILE).is_file() or not (folder / VECTORS_FILE).is_file():
            raise DataError(f"--index {folder}: not an index (no {INDEX_FILE} and {VECTORS_FILE}); build one with "
                            "`transfer index IMAGES -o DIR`")
        try:
            record = json.loads((folder / INDEX_FILE).read_text())
            vectors = np.load(folder / VECTORS_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"--index {folder}: unreadable ({exc})") from None
        if vectors.ndim != 2 or vectors.shape != (record.get("count"), record.get("dim")):
            raise DataError(f"--index {folder}: {VECTORS_FILE} has shape {vectors.shape}, index.json says "
                            f"{record.get('count')} x {record.get('dim')}")
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
        """The k most cosine-similar images, best first, searched chunk by chunk (exact)."""
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
        return [{"path": self.record["paths"][row], "score": float(score),
                 "label": classes[labels[row]] if labels and labels[row] is not None and classes else None}
                for row, score in zip(best_rows.tolist(), best_scores.tolist(), strict=True)]


def similar(queries, index: str | os.PathLike, k: int = 10, device: str = "auto",
            progress: Progress = SILENT) -> list[dict]:
    """For each query image: its k nearest images in the index, embedded with the index's own model."""
    search = SearchIndex.load(index)
    spec = search.model
    if spec.get("onnx") and (not Path(spec["onnx"]).is_file() or file_sha256(spec["onnx"]) != spec["onnx_sha256"]):
        raise DataError(f"--index {index}: its model {spec['onnx']} is gone or changed since the index was built")
    if spec.get("run") and not Path(spec["run"]).is_dir():
        raise DataError(f"--index {index}: its run {spec['run']} is gone")
    vectors, result = embed(queries, spec, device=device, workers=0, progress=progress)
    if result.metadata.get("weights") != spec.get("weights"):
        raise DataError(f"--index {index}: built with weights from {spec.get('weights')}, but the model now loads "
                        f"{result.metadata.get('weights')}; rebuild the index")
    return [{"query": path, "neighbours": search.nearest(vector, k)}
            for path, vector in zip(result.paths, vectors, strict=True)]


def contact_sheet(results: Sequence[dict], output: str | os.PathLike, thumb: int = 160) -> Path:
    """One row per query: the query, then its neighbours with rank, score and label; written atomically."""
    from PIL import Image, ImageDraw

    from transfer.images import BadImageError, open_image
    from transfer.io import atomic_path

    columns = 1 + max((len(r["neighbours"]) for r in results), default=0)
    caption = 34
    sheet = Image.new("RGB", (columns * (thumb + 8) + 8, len(results) * (thumb + caption + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for row, result in enumerate(results):
        neighbours = enumerate(result["neighbours"], 1)
        cells = [(result["query"], "query", "")] + [
            (n["path"], f"#{rank} {n['score']:.3f}", n["label"] or "") for rank, n in neighbours]
        for column, (path, top, bottom) in enumerate(cells):
            x, y = 8 + column * (thumb + 8), 8 + row * (thumb + caption + 8)
            try:
                image = open_image(path, draft_size=(thumb, thumb))
                image.thumbnail((thumb, thumb))
                sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
            except BadImageError:
                draw.rectangle((x, y, x + thumb, y + thumb), outline="red")
            if column == 0:
                draw.rectangle((x - 3, y - 3, x + thumb + 3, y + thumb + 3), outline="blue", width=3)
            draw.text((x, y + thumb + 2), top, fill="black")
            draw.text((x, y + thumb + 16), (bottom or Path(path).name)[:24], fill="dimgray")
    output = Path(output)
    with output_lock(output), atomic_path(output) as temp:
        sheet.save(temp, format="PNG")
    return output
