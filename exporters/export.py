"""ONNX export that verifies itself and writes every `transfer.*` metadata key the runtime needs.

`export_onnx` returns an `ExportRecord` (paths, names, shapes, dynamic axes, checker result, max differences vs
PyTorch, tolerance). The file only appears at `output` once verification passed; otherwise nothing is left.
This module needs torch; the runtime (`exporters.runtime`) does not.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from exporters.graph_preprocessing import IN_GRAPH_LAYOUT, with_preprocessing
from exporters.int8 import Int8Report, quantize_int8
from models.layers import FeatureTap, resolve_layer
from models.registry import get_backbone
from models.weights import create_backbone
from transfer.errors import ExportError, TransferError, VerificationError
from transfer.io import output_lock, temp_dir_beside
from transfer.model import resolve_run_layer
from transfer.options import check_input_size
from transfer.preprocess import Preprocessing, decode_size, eval_array
from transfer.progress import SILENT, Progress

DEFAULT_OPSET = 18  # well handled by torch's exporter and onnxruntime >= 1.16
MIN_DYNAMO_OPSET = 18  # torch.export-based exporter; below it only the TorchScript exporter can write the file
# max |onnx - torch| / max |torch|. An int8 classifier is judged by top-1 agreement instead: quantization moves
# logits by design, more so on images unlike the calibration set.
# fp16 is compared with the fp32 PyTorch model, so its tolerance covers half-precision rounding through the net.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "int8": 0.3}
MIN_INT8_AGREEMENT = 0.9
# --embed-preprocessing: max |graph - Python path| / max |Python path| on real photos at their own sizes, the same
# model on both sides. Measured in fp32 0.004 on efficientnet_lite0 over 57 photos of 19 scenes and 3 sizes (the
# Resize emulates Pillow's two rounded passes; what remains is Pillow's fixed-point filter weights); int8 turns
# those last pixel differences into different quantization steps (0.038 measured on a fine-tuned lite0 run).
IN_GRAPH_TOLERANCE = {"fp32": 2e-2, "fp16": 3e-2, "int8": 0.15}


@dataclass
class ExportRecord:
    """What was exported and how well it matches PyTorch."""

    path: str
    precision: str
    opset: int
    input_name: str
    input_shape: list
    input_dtype: str
    output_names: list[str]
    output_shapes: dict[str, list]
    dynamic_axes: dict[str, dict[int, str]]
    checker: str
    batch_sizes_checked: list[int]
    max_abs_diff: dict[str, float]
    max_rel_diff: dict[str, float]
    tolerance: float
    verify_images: str
    size_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    fp32_size_bytes: int | None = None
    exporter: str = "dynamo"
    int8: Int8Report | None = None  # agreement, logit cosine, held-out images, speed ratio, kernel choice
    preprocessing_in_graph: dict | None = None  # with --embed-preprocessing: the graph vs the Python path

    @property
    def top1_agreement(self) -> float | None:
        return self.int8.top1_agreement if self.int8 else None

    @property
    def agreement_images(self) -> str | None:
        return self.int8.agreement_images if self.int8 else None

    def to_dict(self) -> dict:
        return asdict(self)


class _Half(nn.Module):
    """fp16 weights and compute with float32 inputs and outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()  # the fp32 original stays the verification reference

    def forward(self, x: torch.Tensor):
        outputs = self.model(x.half())
        if isinstance(outputs, tuple):
            return tuple(o.float() for o in outputs)
        return outputs.float()


@dataclass
class _Source:
    model: nn.Module
    prep: Preprocessing
    classes: list[str]
    backbone: str
    layers: dict[str, str]  # name -> module path
    output_kind: str
    description: str
    verify_paths: list[Path]
    validation_paths: list[Path] = field(default_factory=list)
    run_dir: str | None = None  # absolute path of the run the file came from (for `bench --against-torch`)


def _source(run: str | os.PathLike | None, backbone: str | None, weights, layers: Sequence[str], pretrained,
            input_size: int | None) -> _Source:
    """The PyTorch model to export, with its preprocessing, classes and layer names."""
    from transfer.train import load_run

    run_dir = str(Path(run).resolve()) if run is not None else None
    if run is not None:
        model, config = load_run(run)
        spec = get_backbone(config["backbone"])
        prep = Preprocessing.from_dict(config["preprocessing"])
        network, classes, description = model, list(config["classes"]), f"fine-tuned run {run}"
        validation = _run_validation_images(config)
        verify = validation[:8]
    else:
        if backbone is None:
            raise ExportError("give a RUN_DIR or --backbone NAME")
        spec = get_backbone(backbone)
        network, description = create_backbone(spec, pretrained, weights)
        prep = spec.preprocessing
        classes = _imagenet_or_index_labels(spec, network)
        verify, validation = [], []
    if input_size is not None:
        prep = replace(prep, input_size=check_input_size(spec.name, input_size))
    if layers:
        if run is not None:
            paths = [resolve_run_layer(spec, name, network) for name in layers]
        else:
            paths = [resolve_layer(spec, name, network) for name in layers]
        tap = FeatureTap(network, paths, stop_early=False)
        return _Source(tap, prep, [], spec.name, dict(zip(layers, paths, strict=True)), "features", description,
                       verify, validation, run_dir)
    return _Source(network, prep, classes, spec.name, {}, "logits", description, verify, validation, run_dir)


def _imagenet_or_index_labels(spec, network: nn.Module) -> list[str]:
    from models.imagenet import imagenet_labels

    num_classes = getattr(network, "num_classes", 1000)
    if spec.has_pretrained and num_classes == 1000:
        return list(imagenet_labels())
    return [str(i) for i in range(num_classes)]


def _run_validation_images(config: dict) -> list[Path]:
    """The run's own validation images, when its data folder is still there."""
    from transfer.data import train_val_samples
    from transfer.scan import scan_folder

    data_dir = config.get("data_dir")
    if not data_dir or not Path(data_dir).is_dir():
        return []
    settings = config["settings"]
    _, val = train_val_samples(scan_folder(data_dir), settings["val_split"], settings["seed"])
    return [s.path for s in val]


def verification_images(prep: Preprocessing, paths: Sequence[Path], count: int = 8) -> tuple[list, str]:
    """Real images for verification: the given ones, else scikit-image's photos, else seeded synthetic ones."""
    from transfer.images import open_image

    if paths:
        images = [open_image(p, draft_size=decode_size(prep)) for p in list(paths)[:count]]
        return images, f"{len(images)} validation image(s) of the run"
    try:
        from PIL import Image
        from skimage import data as photos

        names = ("chelsea", "coffee", "astronaut", "rocket", "camera", "cat", "immunohistochemistry", "coins")

        images = [Image.fromarray(getattr(photos, n)()).convert("RGB") for n in names[:count]]
        return images, "scikit-image photos"
    except ImportError:
        from PIL import Image

        rng = np.random.default_rng(0)
        size = prep.resize
        images = [Image.fromarray(rng.integers(0, 256, (size, size + 13 * i, 3), dtype=np.uint8)) for i in range(count)]
        return images, "synthetic noise images (install scikit-image for real photos)"


def _metadata(source: _Source, record_layout: str, precision: str) -> dict[str, str]:
    from transfer import __version__

    meta = {
        **source.prep.to_metadata(),
        "transfer.classes": json.dumps(source.classes),
        "transfer.layout": record_layout,
        "transfer.backbone": source.backbone,
        "transfer.layers": json.dumps(source.layers),
        "transfer.output_kind": source.output_kind,
        "transfer.precision": precision,
        "transfer.source": source.description,
        **({"transfer.run": source.run_dir} if source.run_dir else {}),
        "transfer.version": __version__,
    }
    return meta


def export_onnx(
    output: str | os.PathLike,
    run: str | os.PathLike | None = None,
    backbone: str | None = None,
    weights: str | os.PathLike | None = None,
    layers: Sequence[str] = (),
    pretrained: bool | None = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    int8: bool = False,
    calibration: str | os.PathLike | None = None,
    embed_preprocessing: bool = False,
    input_size: int | None = None,
    verify_images: str | os.PathLike | None = None,
    progress: Progress = SILENT,
) -> ExportRecord:
    """Export, verify against PyTorch, and only then move the file to `output`."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ExportError(f"--output {output}: the file name must end in .onnx")
    if fp16 and int8:
        raise ExportError("--fp16 and --int8 exclude each other")
    if int8 and calibration is None:
        raise ExportError("--int8 needs --calibration DIR (a folder of representative images)")
    if calibration is not None and not Path(calibration).is_dir():
        raise ExportError(f"--calibration: folder not found: {calibration}")
    if not 11 <= opset <= 20:
        raise ExportError(f"--opset {opset}: use 11..20 (18+ with the dynamo exporter, 11..17 with TorchScript)")
    layers = list(dict.fromkeys(layers))
    with output_lock(output):
        return _export(output, run, backbone, weights, layers, pretrained, opset, fp16, int8, calibration,
                       embed_preprocessing, input_size, verify_images, progress)


def export_graph(model: nn.Module, dummy: torch.Tensor, path: Path, output_names: list[str], opset: int,
                 exporter: str) -> None:
    """torch.onnx.export with a dynamic batch axis, quietly.

    The maintained torch.export-based exporter ("dynamo") is used from opset 18 on; it passes the same
    verification for every registry backbone (tests/test_export.py, slow). The TorchScript exporter stays only
    for opsets 11..17, which the dynamo exporter does not write. Neither may print: their progress chatter and
    tracer warnings are ours to report or not.
    """
    import contextlib
    import io
    import warnings

    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=output_names,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                  opset_version=opset, dynamo=True, external_data=False, verbose=False)
            else:
                dynamic_axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
                torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=output_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
    except Exception as exc:  # the exporters raise many types; any of them means this model cannot be written
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx ({exporter}) cannot export this model: {first[:300]}") from None


def _export(output: Path, run, backbone, weights, layers, pretrained, opset, fp16, int8, calibration,
            embed_preprocessing, input_size, verify_images, progress: Progress) -> ExportRecord:
    if embed_preprocessing and opset < MIN_DYNAMO_OPSET:
        raise ExportError(f"--embed-preprocessing needs --opset {MIN_DYNAMO_OPSET} or higher (Resize with antialias)")
    source = _source(run, backbone, weights, layers, pretrained, input_size)
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    model = source.model.eval()
    export_model: nn.Module = (_Half(model) if fp16 else model).eval()
    output_names = list(source.layers) if source.output_kind == "features" else ["logits"]
    size = source.prep.input_size
    dynamic_axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    layout = IN_GRAPH_LAYOUT if embed_preprocessing else "NCHW_float32"

    with temp_dir_beside(output) as work:
        fp32_path = Path(work) / "model.onnx"
        exporter = "dynamo" if opset >= MIN_DYNAMO_OPSET else "torchscript"
        with progress.task(f"exporting {source.backbone} to ONNX ({exporter}, opset {opset})"):
            export_graph(export_model, torch.zeros(2, 3, size, size), fp32_path, output_names, opset, exporter)
        meta = _metadata(source, layout, precision)
        nchw_meta = meta | {"transfer.layout": "NCHW_float32"}
        final_path = fp32_path
        images, verify_note = verification_images(source.prep, _verify_paths(verify_images, source))
        int8_report, fp32_size = None, None
        if int8:
            _write_metadata(fp32_path, nchw_meta | {"transfer.precision": "fp32"})
            final_path = Path(work) / "model.int8.onnx"
            with progress.task("calibrating and quantizing to int8"):
                int8_report = _quantize(fp32_path, final_path, source, calibration)
            fp32_size = fp32_path.stat().st_size
        _write_metadata(final_path, nchw_meta)
        with progress.task("verifying: onnx.checker and onnxruntime vs PyTorch at batch 1 and 3"):
            checker = None if embed_preprocessing else _check(final_path)  # else checked once composed, below
            abs_diff, rel_diff, checked = _compare(final_path, model, images, source, output_names)
        in_graph = None
        if embed_preprocessing:
            nchw_path, final_path = final_path, Path(work) / "model.preprocessing.onnx"
            with progress.task("putting the preprocessing in the graph and checking it against Python's"):
                onnx.save(with_preprocessing(onnx.load(str(nchw_path)), source.prep), str(final_path))
                _write_metadata(final_path, meta)
                checker = _check(final_path)
                in_graph = _compare_in_graph(final_path, nchw_path, images, source, output_names, verify_note,
                                             IN_GRAPH_TOLERANCE[precision])
        tolerance = TOLERANCE[precision]
        record = ExportRecord(
            path=str(output), precision=precision, opset=opset, input_name="input",
            input_shape=["batch", "height", "width", 3] if embed_preprocessing else ["batch", 3, size, size],
            input_dtype="uint8" if embed_preprocessing else "float32", output_names=output_names,
            output_shapes=_output_shapes(final_path), dynamic_axes=dynamic_axes, checker=checker,
            batch_sizes_checked=checked, max_abs_diff=abs_diff, max_rel_diff=rel_diff, tolerance=tolerance,
            verify_images=verify_note, size_bytes=final_path.stat().st_size, metadata=meta,
            fp32_size_bytes=fp32_size, exporter=exporter, int8=int8_report, preprocessing_in_graph=in_graph)
        worst = max(rel_diff.values())
        judged_by_agreement = int8 and source.output_kind == "logits"
        if worst > tolerance and not judged_by_agreement:
            raise VerificationError(
                f"export verification failed: onnxruntime differs from PyTorch by {worst:.3g} (relative) > "
                f"tolerance {tolerance:g} for {precision}; no file written to {output}")
        if judged_by_agreement and record.top1_agreement < MIN_INT8_AGREEMENT:
            raise VerificationError(
                f"int8 top-1 agreement with fp32 is {record.top1_agreement:.3f} < {MIN_INT8_AGREEMENT} (logit cosine "
                f"{int8_report.logit_cosine:.3f}) on {int8_report.agreement_images}; no file written to {output}. "
                f"Keep this model in fp32 (or --fp16 for a GPU)")
        if in_graph is not None and in_graph["max_rel_diff"] > in_graph["tolerance"]:
            raise VerificationError(
                f"the preprocessing graph differs from the Python path by {in_graph['max_rel_diff']:.3g} (relative) "
                f"> {in_graph['tolerance']:g}; no file written to {output}")
        os.replace(final_path, output)
    return record


def _compare_in_graph(path: Path, nchw_path: Path, images, source: _Source, names: list[str], note: str,
                      tolerance: float) -> dict:
    """The file with preprocessing in the graph, fed each decoded image at its own size (batch 1), against the
    same model fed `eval_array` (the Python path): max differences and top-1 agreement."""
    import onnxruntime as ort

    with_graph = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    python_path = ort.InferenceSession(str(nchw_path), providers=["CPUExecutionProvider"])
    worst_abs = worst_rel = 0.0
    same_top1 = 0
    sizes = []
    for image in images:
        ours = with_graph.run(names, {"input": np.asarray(image.convert("RGB"), dtype=np.uint8)[None]})
        reference = python_path.run(names, {"input": eval_array(image, source.prep)[None]})
        for got, ref in zip(ours, reference, strict=True):
            diff = float(np.abs(got - ref).max())
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(float(np.abs(ref).max()), 1e-12))
        same_top1 += int(ours[0].reshape(1, -1).argmax() == reference[0].reshape(1, -1).argmax())
        sizes.append(f"{image.width}x{image.height}")
    return {"images": f"{note} at their own sizes ({', '.join(sizes)})", "max_abs_diff": worst_abs,
            "max_rel_diff": worst_rel, "tolerance": tolerance,
            "same_top1": f"{same_top1}/{len(images)}" if source.output_kind == "logits" else None}


def _verify_paths(verify_images, source: _Source) -> list[Path]:
    if verify_images is None:
        return source.verify_paths
    from transfer.scan import scan_folder

    return [s.path for s in scan_folder(verify_images).samples]


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "transfer"
    onnx.save(model, str(path))


def _check(path: Path) -> str:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"onnx.checker rejected the export: {exc}") from None
    return "passed (full check)"


def _output_shapes(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    shapes = {}
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param or d.dim_value for d in dims]
    return shapes


def _inputs(images, source: _Source) -> np.ndarray:
    return np.stack([eval_array(image, source.prep) for image in images])


def _compare(path: Path, model: nn.Module, images, source: _Source,
             names: list[str]) -> tuple[dict[str, float], dict[str, float], list[int]]:
    """onnxruntime (CPU) vs PyTorch on the same real images at batch 1 and 3."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    abs_diff = dict.fromkeys(names, 0.0)
    rel_diff = dict.fromkeys(names, 0.0)
    checked = []
    for batch in (1, 3):
        if len(images) < batch:
            continue
        x = _inputs(images[:batch], source)
        got = session.run(names, {"input": x})
        with torch.no_grad():
            reference = model(torch.from_numpy(x))
        reference = reference if isinstance(reference, tuple) else (reference,)
        for name, ours, ref in zip(names, got, reference, strict=True):
            ref = ref.float().numpy()
            if ours.shape != ref.shape:
                raise VerificationError(f"output {name}: onnxruntime shape {ours.shape} != PyTorch {ref.shape}")
            diff = float(np.abs(ours - ref).max())
            abs_diff[name] = max(abs_diff[name], diff)
            rel_diff[name] = max(rel_diff[name], diff / max(float(np.abs(ref).max()), 1e-12))
        checked.append(batch)
    return abs_diff, rel_diff, checked


def shape_arithmetic_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that compute sizes from `Shape` outputs (e.g. TF-"SAME" padding amounts), up to the `Pad` they feed.

    They must stay in float: quantizing this integer arithmetic (its Clip looks like an activation) changes the
    padding, hence every spatial size after it. That is what broke efficientnet_lite0 int8.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    marked: dict[str, onnx.NodeProto] = {}
    frontier = [node for node in model.graph.node if node.op_type == "Shape"]
    while frontier:
        node = frontier.pop()
        if node.name in marked or node.op_type == "Pad":
            continue
        marked[node.name] = node
        frontier.extend(child for output in node.output for child in consumers.get(output, []))
    return [name for name in marked if name]


def _quantize(fp32_path: Path, int8_path: Path, source: _Source, calibration) -> Int8Report:
    """Static QDQ int8 with weights suited to this CPU's kernels, judged on images not used to calibrate it."""
    from transfer.images import open_image
    from transfer.scan import scan_folder

    paths = [s.path for s in scan_folder(calibration).samples]
    if not paths:
        raise TransferError(f"--calibration {calibration}: no usable images")

    def to_batch(chunk: Sequence[Path]) -> np.ndarray:
        return _inputs([open_image(p, draft_size=decode_size(source.prep)) for p in chunk], source)

    return quantize_int8(fp32_path, int8_path, paths, source.validation_paths, to_batch,
                         judge_logits=source.output_kind == "logits",
                         exclude=shape_arithmetic_nodes(onnx.load(str(fp32_path))))
