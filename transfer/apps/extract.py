"""`transfer extract`: outputs of intermediate layers (Keras or timm names), streamed to .npy/.npz.

The forward pass stops after the deepest requested layer; tapped tensors are cloned before any in-place op can
touch them; features go to disk batch by batch, so a folder larger than RAM works.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from models.layers import FeatureTap, check_input_size, resolve_layer
from models.registry import get_backbone
from models.weights import create_backbone
from transfer.apps.feature_parts import (
    RankParts,
    check_sidecar,
    finalize,
    job_fingerprint,
    join_parts,
    open_partial,
    partial_path,
    sidecar_path,
)
from transfer.core.errors import DataError, TransferError
from transfer.core.io import file_sha256, output_lock, write_json
from transfer.core.options import check_int
from transfer.core.preprocess import Preprocessing, check_decode_floor
from transfer.core.progress import SILENT, Progress
from transfer.core.rundir import run_fingerprint
from transfer.core.world import DEFAULT_TIMEOUT_S, World
from transfer.data.datasets import eval_dataset, make_loader
from transfer.data.labels import LabelsFile, scan_data
from transfer.data.scan import Sample, Skipped, check_image, expand_inputs
from transfer.training import collectives
from transfer.training.model import resolve_run_layer

POOLS, LAYOUTS = ("none", "avg", "max"), ("nchw", "nhwc")


@dataclass
class ExtractResult:
    """Features per requested layer name (arrays in memory, or None when streamed to `output`), and their rows."""

    features: dict[str, np.ndarray | None]
    paths: list[str]
    labels: list[int] | list[list[int]] | None  # class indices, or each image's label set (several per image)
    classes: list[str]
    metadata: dict
    skipped: list[Skipped] = field(default_factory=list)
    output: Path | None = None
    continued: int = 0  # images an interrupted run of the same job had done (not extracted again)
    not_continued: str | None = None  # why an interrupted run's partial folder was emptied instead


def collect_samples(images: str | os.PathLike | Sequence[str | os.PathLike], progress: Progress = SILENT,
                    labels: LabelsFile | None = None) -> tuple[list[Sample], list[str], list[Skipped]]:
    """One folder (flat, or class sub-folders giving labels; or with `labels`, the images a labels file names in
    it), or files, folders and glob patterns (unlabelled) -> usable samples, classes, skipped files with reasons.
    Only headers are read here (seconds for 100,000 files): an image whose body fails to decode is skipped, with
    the same reasons, when it is extracted."""
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise DataError("no images given")
    if labels is not None and (len(items) != 1 or not Path(items[0]).is_dir()):
        raise DataError("--labels reads the images of one folder: give that folder as the only input")
    if len(items) == 1 and Path(items[0]).is_dir():
        report = scan_data(items[0], labels, progress=progress, decode=False)
        if not report.samples:
            raise DataError(f"{items[0]}: no usable images found")
        return report.samples, report.classes, report.skipped
    samples, skipped = [], []
    paths = expand_inputs(items)
    with progress.task("checking images", total=len(paths), unit="files") as advance:
        for path in paths:
            reason = check_image(path, decode=False)
            if reason is None:
                samples.append(Sample(path, None))
            else:
                skipped.append(Skipped(str(path), reason))
            advance(1)
    if not samples:
        raise DataError("no usable images among the given files")
    return samples, [], skipped


def default_layers(backbone: str, run: str | os.PathLike | None, onnx: str | os.PathLike | None) -> list[str]:
    """Without --layer: every output of an extractor file, else the backbone's documented feature layer
    (`transfer backbones` lists it: block4_pool for vgg16, mixed7 for inception_v3, ...)."""
    if onnx is not None:
        from exporters.runtime import OnnxModel

        return list(OnnxModel(onnx, device="cpu").output_names)
    if run is not None:
        from transfer.training.runs import load_run_config

        backbone = load_run_config(run)["backbone"]
    return [get_backbone(backbone).feature_layer]


def _post_process(array: np.ndarray, pool: str, layout: str) -> np.ndarray:
    """Spatial pooling or NHWC layout for 4-D outputs, pooling over the tokens of 3-D (batch, tokens, channels)
    outputs (a ViT block's); other outputs pass unchanged."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 3 and pool != "none":
        array = array.mean(axis=1) if pool == "avg" else array.max(axis=1)
    if array.ndim == 4:
        if pool == "avg":
            array = array.mean(axis=(2, 3))
        elif pool == "max":
            array = array.max(axis=(2, 3))
        elif layout == "nhwc":
            array = array.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(array)


def extract(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    backbone: str = "efficientnet_lite0",
    layers: Sequence[str] | None = None,
    pool: str = "none",
    layout: str = "nchw",
    weights: str | os.PathLike | None = None,
    run: str | os.PathLike | None = None,
    onnx: str | os.PathLike | None = None,
    pretrained: bool | None = None,
    input_size: int | None = None,
    output: str | os.PathLike | None = None,
    batch_size: int = 32,
    device: str = "auto",
    workers: int | None = None,
    progress: Progress = SILENT,
    seed: int = 0,
    dist_timeout: float = DEFAULT_TIMEOUT_S,
    labels: LabelsFile | None = None,
    decode_floor: float | None = None,
) -> ExtractResult:
    """Features of `layers` for every usable image; in memory, or streamed to `output` (.npy one layer, .npz more).

    `run` uses a fine-tuned run's weights and preprocessing instead of the pretrained backbone's; `onnx` runs an
    exported feature extractor with onnxruntime (its outputs are the layers). A backbone without pretrained weights
    (`pretrained=False`, or a net that has none) is initialised from `seed`: the same features every time and on
    every torchrun rank. `labels` takes the images and their labels from a labels file instead of class folders.
    `decode_floor` replaces the model's own for JPEG decoding (recorded in the sidecar's preprocessing)."""
    if run is not None and onnx is not None:
        raise TransferError("--run and --onnx exclude each other; give one model")
    if pool not in POOLS:
        raise TransferError(f"--pool {pool!r}: use one of {', '.join(POOLS)}")
    if layout not in LAYOUTS:
        raise TransferError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    layers = list(dict.fromkeys(layers or default_layers(backbone, run, onnx)))
    if output is not None and Path(output).suffix not in (".npy", ".npz"):
        raise TransferError(f"--output {output}: use a .npy (one layer) or .npz file")
    if output is not None and Path(output).suffix == ".npy" and len(layers) > 1:
        raise TransferError(f"--output {output}: several layers need a .npz file")
    check_int(batch_size, "--batch-size", 1)
    if workers is not None:
        check_int(workers, "--workers", 0, 64)
    if decode_floor is not None:
        check_decode_floor(decode_floor)
    output = Path(output) if output is not None else None
    if output is not None:
        check_sidecar(output)
    world = World.from_env()
    # gloo: only small objects travel between ranks; the features go in files
    joined = collectives.join(world, "cpu", dist_timeout)
    try:
        with output_lock(output) if output is not None and world.main else contextlib.nullcontext():
            return _extract(images, backbone, layers, pool, layout, weights, run, onnx, pretrained, input_size,
                            output, batch_size, device, workers, progress if world.main else SILENT, world, seed,
                            labels, decode_floor)
    except RuntimeError as exc:
        lost = collectives.lost_peer(world, exc, dist_timeout)
        if lost is None:
            raise
        raise lost from None
    finally:
        if joined:
            collectives.leave(world)


def _extract(images, backbone, layers, pool, layout, weights, run, onnx, pretrained, input_size, output,
             batch_size, device, workers, progress, world: World, seed: int,
             labels_file: LabelsFile | None = None, decode_floor: float | None = None) -> ExtractResult:
    if onnx is not None:
        make_batches, metadata = _onnx_batches(onnx, layers, batch_size, device, input_size, decode_floor)
    else:
        make_batches, metadata = _torch_batches(backbone, layers, weights, run, pretrained, input_size,
                                                batch_size, device, workers, seed, decode_floor)
    samples, classes, skipped = collect_samples(images, progress, labels_file)
    mine = world.batch_block(len(samples), batch_size)
    metadata.update(pool=pool, layout=layout)
    with contextlib.ExitStack() as stack:
        parts, not_continued = None, None
        if output is not None:  # rank 0 finds or makes the job's partial folder; every rank streams into it
            fingerprint = job_fingerprint(_model_digest(weights, run, onnx), metadata,
                                          [str(s.path) for s in samples], batch_size, world.size)
            found = open_partial(output, fingerprint) if world.main else None
            folder, not_continued = collectives.all_gather(world, found and (str(found[0]), found[1]))[0]
            parts = RankParts(Path(folder), world.rank, layers)
            stack.callback(parts.close)
        done = parts.resume() if parts is not None else 0
        advance = stack.enter_context(progress.task("extracting", total=len(samples), unit="images"))
        advance(done)
        todo = samples[mine.start + done:mine.stop]
        arrays, failed = _run_block(make_batches(todo) if todo else iter(()), layers, pool, layout, parts, advance)
        failed = [tuple(f) for rank_failed in collectives.all_gather(world, failed) for f in rank_failed]
        shapes = [shape for shape in collectives.all_gather(world, parts.shapes if parts else
                                                            {n: list(a.shape[1:]) for n, a in arrays.items()}) if shape]
        if not shapes:
            raise DataError("no features were produced" + (f" (every image failed to decode; first: {failed[0][0]}: "
                                                           f"{failed[0][1]})" if failed else ""))
        gone = {path for path, _ in failed}
        samples = [s for s in samples if str(s.path) not in gone]
        skipped = sorted(skipped + [Skipped(path, reason) for path, reason in failed], key=lambda s: s.path)
        metadata["shapes"] = {name: [len(samples), *shapes[0][name]] for name in layers}
        if output is None:
            gathered = collectives.all_gather(world, arrays)
            features: dict[str, np.ndarray | None] = {
                name: np.concatenate([part[name] for part in gathered if part]) for name in layers}
        else:
            parts.finish()
            collectives.barrier(world)  # every part is complete before rank 0 joins them
            if world.main:
                for name in layers:
                    join_parts(parts.folder, name, world.size, metadata["shapes"][name])
                finalize(output, parts.folder, layers)
            features = {name: None for name in layers}
    labels = [list(s.labels) if s.labels else s.label for s in samples] if classes else None  # label sets: multi
    result = ExtractResult(features, [str(s.path) for s in samples], labels, classes, metadata, skipped, output,
                           done, not_continued)
    if output is not None and world.main:
        write_json(sidecar_path(output), {
            "output": output.name, **metadata, "paths": result.paths, "labels": labels, "classes": classes,
            "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        })
        shutil.rmtree(partial_path(output), ignore_errors=True)
    collectives.barrier(world)  # every rank returns once the output exists
    return result


def _model_digest(weights, run, onnx) -> str:
    """What names the model's numbers for a resumed job: the ONNX file's or run's content, a weights file's bytes
    (a registry backbone's pretrained weights are named by the settings: backbone and source)."""
    if onnx is not None:
        return file_sha256(onnx)
    if run is not None:
        return run_fingerprint(run)
    return file_sha256(weights) if weights is not None and Path(weights).is_file() else ""


def _run_block(batches, layers: list[str], pool: str, layout: str, parts: RankParts | None,
               advance) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Features of this rank's images, streamed to its parts (or kept in memory when `parts` is None), and the
    images that failed to decode (path, reason): skipped, as a scan would have."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    failed: list[tuple[str, str]] = []
    for count, outputs, batch_failed in batches:
        arrays = {name: _post_process(raw, pool, layout) for name, raw in zip(layers, outputs, strict=True)
                  if raw is not None}
        failed += batch_failed
        if parts is not None:
            parts.write(arrays, count, batch_failed)
        else:
            for name, array in arrays.items():
                chunks[name].append(array)
        advance(count)
    if parts is not None:
        return {}, [tuple(f) for f in parts.failed]
    return {name: np.concatenate(chunks[name]) for name in layers if chunks[name]}, failed


def _torch_batches(backbone, layers, weights, run, pretrained, input_size, batch_size, device, workers, seed,
                   decode_floor=None):
    """The model and its layers, resolved before any image is read; returns `batches(samples)` yielding
    (batch length, [array per layer]) from a registry backbone or a run, tapped with `FeatureTap`."""
    from transfer.training.device import resolve_device
    from transfer.training.runs import load_run

    if run is not None:
        network, config = load_run(run)
        spec = get_backbone(config["backbone"])
        prep = Preprocessing.from_dict(config["preprocessing"])
        source = f"run {run}"
        paths_in_model = [resolve_run_layer(spec, name, network) for name in layers]
    else:
        spec = get_backbone(backbone)
        network, source = create_backbone(spec, pretrained, weights, seed=seed)
        prep = spec.preprocessing
        paths_in_model = [resolve_layer(spec, name, network) for name in layers]
    if input_size is not None:
        prep = replace(prep, input_size=check_input_size(spec.name, input_size))
    prep = prep if decode_floor is None else replace(prep, draft_factor=decode_floor)
    target = resolve_device(device)
    tap = FeatureTap(network.eval().to(target), paths_in_model, stop_early=True)
    metadata = {"backbone": spec.name, "weights": source, "layers": dict(zip(layers, paths_in_model, strict=True)),
                "input_size": prep.input_size, "preprocessing": prep.to_dict()}
    if source.startswith("random init"):
        metadata["seed"] = seed

    def generate(samples):
        """(images in the batch, [array per layer of those that decoded, or None], [(path, reason) that failed])"""
        loader = make_loader(eval_dataset(samples, prep, report_bad=True), batch_size, workers=workers,
                             device=target.type)
        done = 0
        with torch.no_grad():
            for images_batch, _, reasons, _ in loader:
                good = [i for i, reason in enumerate(reasons) if not reason]
                failed = [(str(samples[done + i].path), reason) for i, reason in enumerate(reasons) if reason]
                done += len(reasons)
                if not good:
                    yield len(reasons), [None] * len(layers), failed
                    continue
                outputs = tap(images_batch[good].to(target))
                yield len(reasons), [t.float().cpu().numpy() for t in outputs], failed
        tap.close()

    return generate, metadata


def _onnx_batches(onnx, layers, batch_size, device, input_size, decode_floor=None):
    """(batch length, [array per layer]) from an exported feature extractor run by onnxruntime."""
    from exporters.runtime import OnnxModel
    from transfer.core.errors import UnknownNameError

    runtime = OnnxModel(onnx, device=device, decode_floor=decode_floor)
    if runtime.output_kind != "features":
        raise TransferError(f"--onnx {onnx} is a classifier (its output is logits): export an extractor with "
                            "`transfer export -b NAME --layer LAYER` (or `--run RUN_DIR --layer LAYER`), or use "
                            "`transfer predict --onnx` for its labels")
    if input_size and input_size != runtime.prep.input_size:
        raise TransferError(f"--input-size {input_size}: {onnx} was exported at {runtime.prep.input_size}")
    for name in layers:
        if name not in runtime.output_names:
            raise UnknownNameError(f"layer in {onnx}", name, runtime.output_names)
    indices = [runtime.output_names.index(name) for name in layers]
    metadata = {"backbone": runtime.metadata.get("transfer.backbone", ""), "weights": f"onnx {onnx}",
                "layers": {name: json.loads(runtime.metadata.get("transfer.layers", "{}")).get(name, name)
                           for name in layers},
                "input_size": runtime.prep.input_size, "preprocessing": runtime.prep.to_dict()}

    def generate(samples):
        """(images in the batch, [array per layer of those that decoded, or None], [(path, reason) that failed])"""
        for rows, batch, errors in runtime.iter_batches([s.path for s in samples], batch_size):
            failed = [(str(samples[index].path), reason) for index, reason in errors]
            outputs = runtime.run(batch) if rows else None
            yield len(rows) + len(errors), [outputs[i] if outputs else None for i in indices], failed

    return generate, metadata


def load_features(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read back what `extract` wrote: {layer: array} (memory-mapped for .npy) and the sidecar metadata."""
    path = Path(path)
    meta = json.loads(sidecar_path(path).read_text())
    if path.suffix == ".npy":
        return {next(iter(meta["layers"])): np.load(path, mmap_mode="r")}, meta
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}, meta
