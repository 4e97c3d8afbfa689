"""The evaluation transform as ONNX nodes, so an embedder only decodes: uint8 RGB of any size in, model input out.

`transfer.core.preprocess.eval_array` does: resize the short side to `resize` (the long side to int(resize * long /
short)) with Pillow's antialiased bilinear or bicubic filter, round to uint8, centre-crop `crop` x `crop` (offsets
rounded half to even, as Python's round), scale to [0, 1], subtract the mean, divide by the std, HWC -> CHW.
The graph below does the same steps in the same order. ONNX `Resize` with `antialias=1` (opset 18) widens the
filter when downscaling as Pillow does; Pillow rounds to uint8 between its horizontal and vertical passes and
ONNX does not, so pixels may differ by a level or so: exporters.export measures the effect on the outputs.

torch-free: `onnx` only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from transfer.core.preprocess import Preprocessing

IN_GRAPH_LAYOUT = "NHWC_uint8_any"  # metadata transfer.layout of a file that takes decoded images of any size
RESIZE_MODES = {"bilinear": "linear", "bicubic": "cubic"}
PREFIX = "preprocess/"


def preprocessing_model(prep: Preprocessing, opset: int, ir_version: int) -> onnx.ModelProto:
    """A model from `image` (uint8 [batch, height, width, 3], RGB) to `pixels` (float32 [batch, 3, crop, crop])."""
    if prep.interpolation not in RESIZE_MODES:
        raise ValueError(f"no ONNX resize mode for interpolation {prep.interpolation!r}")
    p = PREFIX

    def const(name: str, value) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), p + name)

    initializers = [
        const("resize", np.array([prep.resize], np.int64)), const("crop", np.array([prep.input_size], np.int64)),
        const("two", np.array([2.0], np.float32)), const("zero", np.array(0.0, np.float32)),
        const("max", np.array(255.0, np.float32)), const("scale", np.array(255.0, np.float32)),
        const("mean", np.asarray(prep.mean, np.float32).reshape(1, 3, 1, 1)),
        const("std", np.asarray(prep.std, np.float32).reshape(1, 3, 1, 1)),
        const("starts_nc", np.array([0], np.int64)), const("ends_nc", np.array([2], np.int64)),
        const("starts_hw", np.array([2], np.int64)), const("ends_hw", np.array([4], np.int64)),
        const("axes_hw", np.array([2, 3], np.int64)), const("end_h", np.array([3], np.int64)),
        const("one", np.array([1], np.int64)), const("two_int", np.array([2], np.int64)),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], [p + "float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", [p + "float"], [p + "nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", [p + "nchw"], [p + "shape"]),
        helper.make_node("Slice", [p + "shape", p + "starts_nc", p + "ends_nc"], [p + "nc"]),
        helper.make_node("Slice", [p + "shape", p + "starts_hw", p + "ends_hw"], [p + "hw"]),
        helper.make_node("ReduceMin", [p + "hw"], [p + "short"], keepdims=1),
        # int(resize * long / short) for the long side, exactly `resize` for the short one (integer division)
        helper.make_node("Mul", [p + "hw", p + "resize"], [p + "hw_times_resize"]),
        helper.make_node("Div", [p + "hw_times_resize", p + "short"], [p + "new_hw"]),
        # Pillow's two passes, each rounded to uint8: the width first, then the height
        helper.make_node("Slice", [p + "shape", p + "starts_nc", p + "end_h"], [p + "nch"]),
        helper.make_node("Slice", [p + "new_hw", p + "one", p + "two_int"], [p + "new_w"]),
        helper.make_node("Concat", [p + "nch", p + "new_w"], [p + "sizes_w"], axis=0),
        *_resize_pass(p + "nchw", p + "sizes_w", p + "wide", prep),
        helper.make_node("Concat", [p + "nc", p + "new_hw"], [p + "sizes"], axis=0),
        *_resize_pass(p + "wide", p + "sizes", p + "uint8_values", prep),
        # centre crop: offsets round((new - crop) / 2), half to even like Python's round
        helper.make_node("Sub", [p + "new_hw", p + "crop"], [p + "margin"]),
        helper.make_node("Cast", [p + "margin"], [p + "margin_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", [p + "margin_float", p + "two"], [p + "half_margin"]),
        helper.make_node("Round", [p + "half_margin"], [p + "offset_float"]),
        helper.make_node("Cast", [p + "offset_float"], [p + "offset"], to=TensorProto.INT64),
        helper.make_node("Add", [p + "offset", p + "crop"], [p + "offset_end"]),
        helper.make_node("Slice", [p + "uint8_values", p + "offset", p + "offset_end", p + "axes_hw"],
                         [p + "cropped"]),
        helper.make_node("Div", [p + "cropped", p + "scale"], [p + "unit"]),
        helper.make_node("Sub", [p + "unit", p + "mean"], [p + "centred"]),
        helper.make_node("Div", [p + "centred", p + "std"], ["pixels"]),
    ]
    graph = helper.make_graph(
        nodes, "transfer_preprocessing",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, prep.input_size, prep.input_size])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _resize_pass(source: str, sizes: str, target: str, prep: Preprocessing) -> list[onnx.NodeProto]:
    """Resize to `sizes` with Pillow's filter (antialiased when shrinking), then round and clip to 0..255."""
    p = PREFIX
    return [helper.make_node("Resize", [source, "", "", sizes], [target + "_float"],
                             mode=RESIZE_MODES[prep.interpolation], antialias=1, cubic_coeff_a=-0.5,
                             exclude_outside=1, coordinate_transformation_mode="half_pixel"),
            helper.make_node("Round", [target + "_float"], [target + "_rounded"]),
            helper.make_node("Clip", [target + "_rounded", p + "zero", p + "max"], [target])]


def with_preprocessing(model: onnx.ModelProto, prep: Preprocessing) -> onnx.ModelProto:
    """`model` (input `input`, float32 NCHW at the crop size) behind the preprocessing graph; the result's input
    is `input` again, now uint8 [batch, height, width, 3]."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 18:
        raise ValueError("preprocessing in the graph needs opset >= 18 (Resize with antialias)")
    front = preprocessing_model(prep, opset, model.ir_version)
    extra = [o for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    front.opset_import.extend(extra)
    merged = onnx.compose.merge_models(front, model, io_map=[("pixels", "input")])
    for graph_input in merged.graph.input:
        if graph_input.name == "image":
            graph_input.name = "input"
    for node in merged.graph.node:
        node.input[:] = ["input" if name == "image" else name for name in node.input]
    return merged
