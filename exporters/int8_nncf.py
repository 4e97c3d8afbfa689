"""int8 with NNCF (OpenVINO's Neural Network Compression Framework, ONNX backend): the default `--int8` method.

Measured against onnxruntime's own quantizer on the same held-out images (benchmarks/int8.py, RESULTS.md), NNCF's
min-max with fast bias correction keeps the answers much closer to fp32 on efficientnet_lite0 at the same speed.
Two settings make its file right for onnxruntime's CPU kernels:

- activations are quantized per tensor: NNCF would give depthwise inputs one scale per channel, which onnxruntime's
  QLinearConv cannot take (those convolutions then run in float, slower than fp32);
- NNCF's `overflow_fix` is the same cure as this project's kernel plan: 7-bit weights where the CPU multiplies u8 x
  s8 pairs into a saturating int16 (x86 without VNNI; depthwise convolutions keep 8), 8-bit weights otherwise.

Its file then gets one exact rewrite (`unsigned_activations`): NNCF writes symmetric activations as int8, and
onnxruntime's x86 kernels fuse only uint8 activations, so each int8 activation zero point moves by 128 to uint8
(q + 128 with zero point z + 128 dequantizes to the same values).

NNCF sends usage telemetry (Google Analytics) unless told not to and writes a client id under the home folder when
imported; `import_nncf` imports it with its own CI switches set for the duration of the import, so neither happens.
Its progress bars and log lines (and torch's CUDA notice, printed when NNCF imports torch's extension loader) are
kept out of the terminal: `transfer export` reports its own progress and the record says what NNCF did.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from transfer.core.errors import ExportError, first_line

TELEMETRY_OFF = {"NNCF_CI": "1", "CI": "true"}  # NNCF's switch, and openvino_telemetry's "running in CI" check


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block only, then restored exactly."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Standard output captured and the named loggers raised to ERROR for the block only, then restored."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def import_nncf():
    """The `nncf` module, imported with telemetry off (it decides at import time) and quietly."""
    try:
        with _environment(TELEMETRY_OFF), _quiet("torch.utils.cpp_extension", "nncf"):
            import nncf
    except ImportError as exc:
        raise ExportError(f"--int8-method nncf needs the nncf package ({first_line(exc)}): pip install 'nncf>=3.4', "
                          "or use --int8-method onnxruntime") from None
    return nncf


def nncf_method(seven_bit_weights: bool) -> str:
    """What the record says made the file."""
    nncf = import_nncf()
    weights = "7-bit GEMM weights, 8-bit depthwise (overflow fix)" if seven_bit_weights else "8-bit weights"
    return f"nncf {nncf.__version__}: min-max, fast bias correction, per-channel {weights}, per-tensor activations"


def quantize_with_nncf(fp32_path: Path, int8_path: Path, calibrate: Sequence[Path],
                       to_batch: Callable[[Sequence[Path]], np.ndarray], seven_bit_weights: bool,
                       exclude: Sequence[str] = ()) -> None:
    """Write `int8_path`: NNCF's QDQ quantization of `fp32_path`, calibrated on every image in `calibrate`."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )

    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.ENABLE if seven_bit_weights else OverflowFix.DISABLE,
        activations_quantization_params=QuantizationParameters(per_channel=False))
    ignored = nncf.IgnoredScope(names=list(exclude), validate=False) if exclude else None
    images = nncf.Dataset(calibrate, lambda path: {"input": to_batch([path])})  # one image at a time, decoded lazily
    try:
        with _quiet("torch.utils.cpp_extension", "nncf"):
            quantized = nncf.quantize(onnx.load(str(fp32_path)), images, subset_size=len(calibrate),
                                      fast_bias_correction=True, ignored_scope=ignored, advanced_parameters=advanced)
    except Exception as exc:  # NNCF raises many types; any of them means it cannot quantize this graph
        raise ExportError(f"nncf cannot quantize this model: {first_line(exc)[:300]}; --int8-method onnxruntime "
                          "uses onnxruntime's quantizer instead") from None
    onnx.save(unsigned_activations(quantized), str(int8_path))


def unsigned_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every int8 activation Q/DQ pair moved to uint8 (zero point + 128): exact, and what
    onnxruntime's x86 kernels need to fuse them. Weights (DequantizeLinear of a constant) keep int8."""
    constants = {item.name: item for item in model.graph.initializer}
    weight_quantizers = {node.input[2] for node in model.graph.node
                         if node.op_type == "DequantizeLinear" and node.input[0] in constants}
    moved = set()
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zero_point = node.input[2]
        if node.input[0] in constants or zero_point in moved or zero_point in weight_quantizers:
            continue
        values = numpy_helper.to_array(constants[zero_point])
        if values.dtype == np.int8:
            constants[zero_point].CopyFrom(
                numpy_helper.from_array((values.astype(np.int16) + 128).astype(np.uint8), zero_point))
            moved.add(zero_point)
    if moved:
        del model.graph.value_info[:]  # the inferred int8 types of the moved tensors; onnxruntime infers them again
    return model
