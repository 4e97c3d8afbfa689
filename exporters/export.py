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

from exporters.cam import CamModel, check_exact
from exporters.graph_preprocessing import IN_GRAPH_LAYOUT, with_preprocessing
from exporters.int8 import Int8Report, check_int8_options, quantize_int8, shape_arithmetic_nodes
from exporters.run_data import run_thresholds, run_validation_samples
from exporters.verify import (
    IN_GRAPH_TOLERANCE,
    TOLERANCE,
    check_model,
    compare,
    compare_in_graph,
    judge,
    model_inputs,
    output_shapes,
    verification_images,
)
from models.imagenet import classifier_labels
from models.layers import FeatureTap, check_input_size, resolve_layer
from models.registry import get_backbone
from models.weights import create_backbone
from transfer.core.errors import ExportError, first_line
from transfer.core.io import output_lock, temp_dir_beside
from transfer.core.preprocess import Preprocessing, check_decode_floor, decode_size
from transfer.core.progress import SILENT, Progress
from transfer.data.scan import usable_images
from transfer.training.model import resolve_run_layer
from transfer.training.tracking import log_export, mlflow_run_of

DEFAULT_OPSET = 18  # well handled by torch's exporter and onnxruntime >= 1.16
MIN_DYNAMO_OPSET = 18  # torch.export-based exporter; below it only the TorchScript exporter can write the file


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
    mlflow_run_id: str | None = None  # a run tracked in MLflow got the file and this record as artifacts
    mlflow_error: str | None = None  # its MLflow store failed: the file is written all the same

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
        return tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()


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
    thresholds: list[float] | None = None  # several labels per image: each label's decision threshold
    validation_labels: dict[Path, int] = field(default_factory=dict)  # class index of each labelled validation image


def _refuse_unexportable(run: str | os.PathLike | None, backbone: str | None) -> None:
    """Say in one line, before any work, that an architecture no exporter can trace will not become a file."""
    from transfer.training.runs import load_run_config

    name = backbone if run is None else load_run_config(run).get("backbone")
    spec = get_backbone(name) if name else None
    if spec is not None and spec.not_exportable:
        raise ExportError(f"{spec.name} cannot be exported to ONNX: {spec.not_exportable}. finetune, extract and "
                          "index work with it in PyTorch; pick another backbone for an ONNX file")


def _source(run: str | os.PathLike | None, backbone: str | None, weights, layers: Sequence[str], pretrained,
            prep_changes: dict) -> _Source:
    """The PyTorch model to export, with its preprocessing, classes and layer names."""
    from transfer.training.runs import load_run

    run_dir = str(Path(run).resolve()) if run is not None else None
    if run is not None:
        model, config = load_run(run)
        spec = get_backbone(config["backbone"])
        prep = Preprocessing.from_dict(config["preprocessing"])
        network, classes, description = model, list(config["classes"]), f"fine-tuned run {run}"
        thresholds = run_thresholds(config, run)
        samples = run_validation_samples(config)
        validation = [sample.path for sample in samples]
        validation_labels = {sample.path: sample.label for sample in samples if sample.label is not None}
        verify = validation[:8]
    else:
        if backbone is None:
            raise ExportError("give a RUN_DIR or --backbone NAME")
        spec = get_backbone(backbone)
        network, description = create_backbone(spec, pretrained, weights)
        prep = spec.preprocessing
        classes = classifier_labels(spec.has_pretrained, getattr(network, "num_classes", 1000))
        verify, validation, validation_labels, thresholds = [], [], {}, None
    if prep_changes["input_size"] is not None:
        prep = replace(prep, input_size=check_input_size(spec.name, prep_changes["input_size"]))
    if prep_changes["draft_factor"] is not None:
        prep = replace(prep, draft_factor=check_decode_floor(prep_changes["draft_factor"]))
    if layers:
        if run is not None:
            paths = [resolve_run_layer(spec, name, network) for name in layers]
        else:
            paths = [resolve_layer(spec, name, network) for name in layers]
        tap = FeatureTap(network, paths, stop_early=False)
        return _Source(tap, prep, [], spec.name, dict(zip(layers, paths, strict=True)), "features", description,
                       verify, validation, run_dir)
    return _Source(network, prep, classes, spec.name, {}, "logits", description, verify, validation, run_dir,
                   thresholds, validation_labels)


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
        **({"transfer.task": "multilabel", "transfer.thresholds": json.dumps(source.thresholds)}
           if source.thresholds is not None else {}),
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
    int8_method: str = "nncf",
    max_accuracy_loss: float | None = None,
    decode_floor: float | None = None,
    cam: str | None = None,
) -> ExportRecord:
    """Export, verify against PyTorch, and only then move the file to `output`; `decode_floor` replaces the run's
    (or the default) in the file's metadata. int8 files are refused below MIN_INT8_AGREEMENT top-1 agreement with
    fp32, or, with `max_accuracy_loss` (points, for a run), when they answer its held-out validation images that
    much less accurately. `cam` ("top" or "all"): a classifier's class activation map as a second output `cam`
    (`exporters.cam`), for heads where it is exact."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise ExportError(f"--output {output}: the file name must end in .onnx")
    if cam is not None and (fp16 or int8 or layers):
        raise ExportError("--cam is for an fp32 classifier: leave out --fp16, --int8 and --layer")
    if fp16 and int8:
        raise ExportError("--fp16 and --int8 exclude each other")
    if int8 and calibration is None:
        raise ExportError("--int8 needs --calibration DIR (a folder of representative images)")
    if calibration is not None and not Path(calibration).is_dir():
        raise ExportError(f"--calibration: folder not found: {calibration}")
    if int8:  # scanned before any export work: a folder of bad files is refused now
        calibration = usable_images(calibration, "--calibration")
    check_int8_options(int8, int8_method, max_accuracy_loss, run is not None)
    if not 11 <= opset <= 20:
        raise ExportError(f"--opset {opset}: use 11..20 (18+ with the dynamo exporter, 11..17 with TorchScript)")
    layers, prep_changes = list(dict.fromkeys(layers)), {"input_size": input_size, "draft_factor": decode_floor}
    _refuse_unexportable(run, backbone)
    tracked = mlflow_run_of(run) if run is not None else None
    with output_lock(output):
        record = _export(output, run, backbone, weights, layers, pretrained, opset, fp16, int8, calibration,
                         embed_preprocessing, prep_changes, verify_images, progress, int8_method, max_accuracy_loss,
                         cam)
    if tracked is not None:
        try:
            record.mlflow_run_id = log_export(tracked, output, record.to_dict())
        except Exception as exc:  # the ONNX file is made and verified; a log store that fails does not undo it
            record.mlflow_error = first_line(exc)[:300]
    return record


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
        hint = "; --opset 17 tries the TorchScript exporter" if exporter == "dynamo" else ""
        raise ExportError(f"torch.onnx ({exporter}) cannot export this model: {first_line(exc)[:300]}{hint}") from None


def _export(output: Path, run, backbone, weights, layers, pretrained, opset, fp16, int8, calibration,
            embed_preprocessing, prep_changes: dict, verify_images, progress: Progress, int8_method: str,
            max_accuracy_loss: float | None, cam: str | None = None) -> ExportRecord:
    if embed_preprocessing and opset < MIN_DYNAMO_OPSET:
        raise ExportError(f"--embed-preprocessing needs --opset {MIN_DYNAMO_OPSET} or higher (Resize with antialias)")
    source = _source(run, backbone, weights, layers, pretrained, prep_changes)
    if int8 and source.thresholds is not None and source.output_kind == "logits":
        raise ExportError("--int8 is judged by top-1 agreement, which several labels per image do not have; export "
                          "this run in fp32 (or --fp16 for a GPU)")
    if max_accuracy_loss is not None and not source.validation_labels:
        raise ExportError(f"--max-accuracy-loss: the run's labelled validation images are not there "
                          f"({source.description}); without them only top-1 agreement can judge the int8 file")
    precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    model = source.model.eval()
    export_model: nn.Module = (_Half(model) if fp16 else model).eval()
    output_names = list(source.layers) if source.output_kind == "features" else ["logits"]
    size = source.prep.input_size
    if cam is not None:  # the model exported and verified is (logits, cam), its logits checked against the head's
        cam = ("all" if source.thresholds is not None else "top") if cam == "auto" else cam
        export_model = model = CamModel(model, cam)
        check_exact(model, size)
        output_names = ["logits", "cam"]
    dynamic_axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    layout = IN_GRAPH_LAYOUT if embed_preprocessing else "NCHW_float32"

    with temp_dir_beside(output) as work:
        fp32_path = Path(work) / "model.onnx"
        exporter = "dynamo" if opset >= MIN_DYNAMO_OPSET else "torchscript"
        with progress.task(f"exporting {source.backbone} to ONNX ({exporter}, opset {opset})"):
            export_graph(export_model, torch.zeros(2, 3, size, size), fp32_path, output_names, opset, exporter)
        meta = _metadata(source, layout, precision) | ({"transfer.cam": cam} if cam else {})
        nchw_meta = meta | {"transfer.layout": "NCHW_float32"}
        final_path = fp32_path
        images, verify_note = verification_images(source.prep, _verify_paths(verify_images, source))
        int8_report, fp32_size = None, None
        if int8:
            _write_metadata(fp32_path, nchw_meta | {"transfer.precision": "fp32"})
            final_path = Path(work) / "model.int8.onnx"
            with progress.task(f"calibrating and quantizing to int8 ({int8_method})"):
                int8_report = _quantize(fp32_path, final_path, source, calibration, int8_method)
            fp32_size = fp32_path.stat().st_size
        _write_metadata(final_path, nchw_meta)
        with progress.task("verifying: onnx.checker and onnxruntime vs PyTorch at batch 1 and 3"):
            checker = None if embed_preprocessing else check_model(final_path)  # else checked once composed, below
            abs_diff, rel_diff, checked = compare(final_path, model, images, source.prep, output_names)
        in_graph = None
        if embed_preprocessing:
            nchw_path, final_path = final_path, Path(work) / "model.preprocessing.onnx"
            with progress.task("putting the preprocessing in the graph and checking it against Python's"):
                onnx.save(with_preprocessing(onnx.load(str(nchw_path)), source.prep), str(final_path))
                _write_metadata(final_path, meta)
                checker = check_model(final_path)
                in_graph = compare_in_graph(final_path, nchw_path, images, source.prep, source.output_kind,
                                            output_names, verify_note, IN_GRAPH_TOLERANCE[precision])
        tolerance = TOLERANCE[precision]
        record = ExportRecord(
            path=str(output), precision=precision, opset=opset, input_name="input",
            input_shape=["batch", "height", "width", 3] if embed_preprocessing else ["batch", 3, size, size],
            input_dtype="uint8" if embed_preprocessing else "float32", output_names=output_names,
            output_shapes=output_shapes(final_path), dynamic_axes=dynamic_axes, checker=checker,
            batch_sizes_checked=checked, max_abs_diff=abs_diff, max_rel_diff=rel_diff, tolerance=tolerance,
            verify_images=verify_note, size_bytes=final_path.stat().st_size, metadata=meta,
            fp32_size_bytes=fp32_size, exporter=exporter, int8=int8_report, preprocessing_in_graph=in_graph)
        judge(record, source.output_kind, output, max_accuracy_loss)
        os.replace(final_path, output)
    return record


def _verify_paths(verify_images, source: _Source) -> list[Path]:
    if verify_images is None:
        return source.verify_paths
    from transfer.data.scan import scan_folder

    return [s.path for s in scan_folder(verify_images).samples]


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "transfer"
    onnx.save(model, str(path))


def _quantize(fp32_path: Path, int8_path: Path, source: _Source, paths: list[Path], method: str) -> Int8Report:
    """Static QDQ int8 with weights suited to this CPU's kernels, judged on images not used to calibrate it."""
    from transfer.core.images import open_image

    def to_batch(chunk: Sequence[Path]) -> np.ndarray:
        return model_inputs([open_image(p, draft_size=decode_size(source.prep)) for p in chunk], source.prep)

    return quantize_int8(fp32_path, int8_path, paths, source.validation_paths, to_batch,
                         judge_logits=source.output_kind == "logits",
                         exclude=shape_arithmetic_nodes(onnx.load(str(fp32_path))), method=method,
                         labels=source.validation_labels)
