"""Verification of an exported file, kept apart from the export as optimum keeps `validate_model_outputs`: the ONNX
checker, declared output shapes, onnxruntime against PyTorch on real images at batch 1 and 3, the preprocessing
graph against the Python path, and the verdict against each precision's stated tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from transfer.core.errors import VerificationError
from transfer.core.images import BadImageError, open_image
from transfer.core.preprocess import Preprocessing, decode_size, eval_array

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


def verification_images(prep: Preprocessing, paths: Sequence[Path], count: int = 8) -> tuple[list, str]:
    """Real images for verification: the given ones, else scikit-image's photos, else seeded synthetic ones."""
    images = []
    for path in paths:  # a run's validation images were scanned by their headers: skip a broken body
        if len(images) == count:
            break
        try:
            images.append(open_image(path, draft_size=decode_size(prep)))
        except BadImageError:
            continue
    if images:
        return images, f"{len(images)} validation image(s) of the run"
    try:
        from skimage import data as photos

        names = ("chelsea", "coffee", "astronaut", "rocket", "camera", "cat", "immunohistochemistry", "coins")

        images = [Image.fromarray(getattr(photos, n)()).convert("RGB") for n in names[:count]]
        return images, "scikit-image photos"
    except ImportError:
        rng = np.random.default_rng(0)
        size = prep.resize
        images = [Image.fromarray(rng.integers(0, 256, (size, size + 13 * i, 3), dtype=np.uint8)) for i in range(count)]
        return images, "synthetic noise images (install scikit-image for real photos)"


def check_model(path: Path) -> str:
    """onnx.checker with full_check (shape inference included); a rejection is a `VerificationError`."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"onnx.checker rejected the export: {exc}") from None
    return "passed (full check)"


def output_shapes(path: Path) -> dict[str, list]:
    """Each output's declared shape, symbolic dimensions by name."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = {}
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_param or d.dim_value for d in dims]
    return shapes


def model_inputs(images, prep: Preprocessing) -> np.ndarray:
    """The evaluation transform of `images`, stacked: the batch both sides of a comparison get."""
    return np.stack([eval_array(image, prep) for image in images])


def compare(path: Path, model: nn.Module, images, prep: Preprocessing,
            names: list[str]) -> tuple[dict[str, float], dict[str, float], list[int]]:
    """onnxruntime (CPU) vs PyTorch on the same real images at batch 1 and 3."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    abs_diff = dict.fromkeys(names, 0.0)
    rel_diff = dict.fromkeys(names, 0.0)
    checked = []
    for batch in (1, 3):
        if len(images) < batch:
            continue
        x = model_inputs(images[:batch], prep)
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


def compare_in_graph(path: Path, nchw_path: Path, images, prep: Preprocessing, output_kind: str, names: list[str],
                     note: str, tolerance: float) -> dict:
    """The file with preprocessing in the graph, fed each decoded image at its own size (batch 1), against the
    same model fed `eval_array` (the Python path): max differences and top-1 agreement."""
    with_graph = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    python_path = ort.InferenceSession(str(nchw_path), providers=["CPUExecutionProvider"])
    worst_abs = worst_rel = 0.0
    same_top1 = 0
    sizes = []
    for image in images:
        ours = with_graph.run(names, {"input": np.asarray(image.convert("RGB"), dtype=np.uint8)[None]})
        reference = python_path.run(names, {"input": eval_array(image, prep)[None]})
        for got, ref in zip(ours, reference, strict=True):
            diff = float(np.abs(got - ref).max())
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(float(np.abs(ref).max()), 1e-12))
        same_top1 += int(ours[0].reshape(1, -1).argmax() == reference[0].reshape(1, -1).argmax())
        sizes.append(f"{image.width}x{image.height}")
    return {"images": f"{note} at their own sizes ({', '.join(sizes)})", "max_abs_diff": worst_abs,
            "max_rel_diff": worst_rel, "tolerance": tolerance,
            "same_top1": f"{same_top1}/{len(images)}" if output_kind == "logits" else None}


def judge(record, output_kind: str, output: Path, max_accuracy_loss: float | None = None) -> None:
    """Refuse the file (a `VerificationError`, nothing written to `output`) when onnxruntime differs from PyTorch
    beyond the precision's tolerance; when an int8 classifier agrees with fp32 on fewer than MIN_INT8_AGREEMENT of
    the held-out images, or, with `max_accuracy_loss` (percentage points), when its accuracy on the run's held-out
    validation images is more than that below fp32's; or when the preprocessing graph differs from the Python path
    beyond its tolerance."""
    worst = max(record.max_rel_diff.values())
    judged_by_agreement = record.precision == "int8" and output_kind == "logits"
    if worst > record.tolerance and not judged_by_agreement:
        raise VerificationError(
            f"export verification failed: onnxruntime differs from PyTorch by {worst:.3g} (relative) > "
            f"tolerance {record.tolerance:g} for {record.precision}; no file written to {output}")
    if judged_by_agreement and max_accuracy_loss is not None:
        report = record.int8
        if report.accuracy_loss is None or report.accuracy_loss > max_accuracy_loss:
            measured = ("no labelled held-out image to measure it on" if report.accuracy_loss is None else
                        f"{report.accuracy_loss:.2f} points ({100 * report.fp32_accuracy:.2f}% fp32, "
                        f"{100 * report.int8_accuracy:.2f}% int8 on {report.accuracy_images} held-out validation "
                        "images)")
            limit = f"--max-accuracy-loss {max_accuracy_loss:g}" + (" (no loss allowed)" if max_accuracy_loss == 0
                                                                     else "")
            raise VerificationError(f"int8 accuracy loss {measured} > {limit}; no file written to {output}. Keep "
                                    "this model in fp32 (or --fp16 for a GPU)")
    elif judged_by_agreement and record.top1_agreement < MIN_INT8_AGREEMENT:
        raise VerificationError(
            f"int8 top-1 agreement with fp32 is {record.top1_agreement:.3f} < {MIN_INT8_AGREEMENT} (logit cosine "
            f"{record.int8.logit_cosine:.3f}) on {record.int8.agreement_images}; no file written to {output}. "
            f"Keep this model in fp32 (or --fp16 for a GPU)")
    in_graph = record.preprocessing_in_graph
    if in_graph is not None and in_graph["max_rel_diff"] > in_graph["tolerance"]:
        raise VerificationError(
            f"the preprocessing graph differs from the Python path by {in_graph['max_rel_diff']:.3g} (relative) "
            f"> {in_graph['tolerance']:g}; no file written to {output}")
