"""Static int8 quantization for CPU: weights chosen for the CPU's int8 kernels, judged on images it never saw.

Why the kernel matters: without VNNI, onnxruntime's x86 u8s8 convolutions multiply with VPMADDUBSW, which adds two
u8 x s8 products into a saturating int16. With 8-bit weights and u8 activations (zero point near 128 for signed
tensors) those pair sums overflow; measured on efficientnet_lite0, the fused file then agreed with fp32 on 0.57
of held-out crops against 0.80 for the same file run unfused. 7-bit weights (`reduce_range`) cannot overflow, so on
such CPUs every convolution and Gemm that goes through the GEMM kernel gets them; depthwise convolutions have their
own int32 kernel and keep 8 bits. With VNNI (VPDPBUSD accumulates in int32) all weights keep 8 bits.
benchmarks/int8.json has the measurements behind these choices.

Two methods make the file: NNCF (the default, exporters/int8_nncf.py) and onnxruntime's own quantizer
(`--int8-method onnxruntime`, MinMax), both following the kernel plan. benchmarks/int8.py measures them.

Calibration and judgement never share an image, compared by content: a run's validation images (less any whose
bytes are also in `--calibration`) judge it; otherwise every fourth distinct calibration image is held out. Where
the judged images have labels (a run's validation images), the record has both files' accuracy on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from transfer.core.errors import TransferError
from transfer.core.interpret import softmax

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
HOLD_OUT_EVERY = 4  # without a run's validation set, calibration image 3, 7, 11, ... judge the file instead
MIN_AGREEMENT_IMAGES = 4
METHODS = ("nncf", "onnxruntime")
CONFIDENT = 0.5  # "images fp32 is confident about": its top-1 softmax probability is at least this


def check_int8_options(int8: bool, method: str, max_accuracy_loss: float | None, from_run: bool) -> None:
    """`--int8-method` and `--max-accuracy-loss` checked before any work (an `ExportError` naming the flag)."""
    from transfer.core.errors import ExportError

    check_method(method)
    if max_accuracy_loss is None:
        return
    if not int8:
        raise ExportError("--max-accuracy-loss judges an --int8 file")
    if not from_run:
        raise ExportError("--max-accuracy-loss needs a run (its labelled validation images judge the file); a "
                          "--backbone export is judged by top-1 agreement")
    if not 0 <= max_accuracy_loss <= 100:
        raise ExportError(f"--max-accuracy-loss {max_accuracy_loss:g}: percentage points, 0..100")


def check_method(method: str) -> None:
    """`--int8-method`: one of METHODS, else an `ExportError` naming the flag."""
    from transfer.core.errors import ExportError

    if method not in METHODS:
        raise ExportError(f"--int8-method {method}: use one of {', '.join(METHODS)}")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (x86 Linux `flags` line); empty where the file or line is absent."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class KernelPlan:
    """Which weights get 7 bits, and why (stated in the export record)."""

    seven_bit_weights: bool
    reason: str


def kernel_plan(flags: set[str]) -> KernelPlan:
    """7-bit GEMM weights where u8s8 products go through VPMADDUBSW (x86 with AVX2 or SSE4.1 and no VNNI)."""
    vnni = sorted(flags & set(VNNI_FLAGS))
    if vnni:
        return KernelPlan(False, f"8-bit weights: the CPU has {', '.join(vnni)} (int32 accumulation)")
    if flags & {"avx2", "sse4_1"}:
        return KernelPlan(True, "7-bit weights on GEMM-kernel layers, 8-bit depthwise: the CPU has no VNNI, so "
                                "8-bit u8s8 products would saturate int16 (VPMADDUBSW)")
    return KernelPlan(False, "8-bit weights: no x86 u8s8 saturation on this CPU")


def gemm_kernel_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv (not depthwise) and Gemm/MatMul nodes with a constant weight: the ones quantized through the GEMM kernel."""
    initializers = {item.name for item in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            continue
        nodes.append(node)
    return nodes


def seven_bit_overrides(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """onnxruntime `TensorQuantOverrides` giving every GEMM-kernel weight a reduced (7-bit) range."""
    dims = {item.name: list(item.dims) for item in model.graph.initializer}
    overrides: dict[str, list[dict]] = {}
    for node in gemm_kernel_nodes(model):
        weight = node.input[1]
        if node.op_type == "Conv":  # per-channel along the output channels: one entry per channel, axis on the first
            overrides[weight] = [{"reduce_range": True, **({"axis": 0} if index == 0 else {})}
                                 for index in range(dims[weight][0])]
        else:
            overrides[weight] = [{"reduce_range": True}]
    return overrides


def split_images(calibration: Sequence[Path], validation: Sequence[Path],
                 validation_name: str = "validation images of the run") -> tuple[list[Path], list[Path], str]:
    """(calibration images, judgement images, what the judgement images are): disjoint by content (SHA-256 of
    the bytes), so a copy of a calibration image under another name never judges the file. Byte-identical
    calibration images count once."""
    from transfer.core.io import file_sha256

    distinct: dict[str, Path] = {}
    for path in calibration:
        distinct.setdefault(file_sha256(path), path)  # the first image of each content calibrates
    calibration = list(distinct.values())
    held_out, judged = [], set(distinct)
    for path in validation:
        digest = file_sha256(path)
        if digest not in judged:
            judged.add(digest)
            held_out.append(path)
    if held_out:
        return calibration, held_out, (f"{len(held_out)} {validation_name} (none used for calibration, compared by "
                                       "content)")
    if len(calibration) < 2 * MIN_AGREEMENT_IMAGES:
        raise TransferError(f"--calibration: {len(calibration)} usable images of distinct content; int8 needs at "
                            f"least {2 * MIN_AGREEMENT_IMAGES} (every {HOLD_OUT_EVERY}th is held out to judge the "
                            "file)")
    judge = calibration[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY]
    rest = [p for i, p in enumerate(calibration) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    return rest, judge, (f"{len(judge)} held-out calibration images (every {HOLD_OUT_EVERY}th; not used to "
                         "calibrate, distinct by content)")


@dataclass
class Int8Report:
    """What quantization measured: answers on held-out images and speed against the fp32 file, and what made it."""

    top1_agreement: float | None
    logit_cosine: float | None
    agreement_images: str
    calibration_images: int
    speedup: float
    kernel: str
    method: str = ""
    confident_agreement: float | None = None  # on the judged images whose fp32 top-1 probability >= CONFIDENT
    confident_images: int | None = None
    fp32_accuracy: float | None = None  # on the judged images that have labels (a run's validation images)
    int8_accuracy: float | None = None
    accuracy_images: int | None = None

    @property
    def accuracy_loss(self) -> float | None:
        """fp32 accuracy minus int8 accuracy, in percentage points (negative: int8 answered better)."""
        if self.fp32_accuracy is None or self.int8_accuracy is None:
            return None
        # rounded: 0.9 - 0.895 is 0.5 points, not 0.5000000000000004, when judged against a threshold
        return round(100 * (self.fp32_accuracy - self.int8_accuracy), 9)


class _Batches:
    """onnxruntime CalibrationDataReader over image paths, a batch at a time."""

    def __init__(self, paths: Sequence[Path], to_batch: Callable[[Sequence[Path]], np.ndarray], batch_size: int = 8):
        self.paths, self.to_batch, self.batch_size, self.position = list(paths), to_batch, batch_size, 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.paths):
            return None
        chunk = self.paths[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return {"input": self.to_batch(chunk)}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: Sequence[Path], validation: Sequence[Path],
                  to_batch: Callable[[Sequence[Path]], np.ndarray], judge_logits: bool,
                  exclude: Sequence[str] = (), flags: set[str] | None = None,
                  validation_name: str = "validation images of the run", method: str = "nncf",
                  labels: Mapping[Path, int] | None = None) -> Int8Report:
    """Static QDQ int8 of `fp32_path` by `method` (per-channel weights, uint8 activations, weights by the kernel
    plan), then judged on held-out images (with their accuracy where `labels` has them) and timed."""
    check_method(method)
    plan = kernel_plan(cpu_flags() if flags is None else flags)
    calibrate, judge, judge_note = split_images(calibration, validation, validation_name)
    if method == "nncf":
        from exporters.int8_nncf import nncf_method, quantize_with_nncf

        quantize_with_nncf(fp32_path, int8_path, calibrate, to_batch, plan.seven_bit_weights, exclude)
        made_by = nncf_method(plan.seven_bit_weights)
    else:
        made_by = _quantize_with_onnxruntime(fp32_path, int8_path, calibrate, to_batch, plan, exclude)
    fp32, quant = _session(fp32_path), _session(int8_path)
    report = Int8Report(None, None, judge_note, len(calibrate), speedup(fp32, quant, to_batch(judge[:16])),
                        plan.reason, made_by)
    if judge_logits:
        judge_answers(report, fp32, quant, judge, to_batch, labels or {})
    return report


def _quantize_with_onnxruntime(fp32_path: Path, int8_path: Path, calibrate: Sequence[Path],
                               to_batch: Callable[[Sequence[Path]], np.ndarray], plan: KernelPlan,
                               exclude: Sequence[str]) -> str:
    """onnxruntime's quantize_static (MinMax), 7-bit GEMM weights where the kernel plan says; returns the method."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = fp32_path.with_name("model.prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    extra = {"TensorQuantOverrides": seven_bit_overrides(model)} if plan.seven_bit_weights else {}
    quantize_static(str(prepared), str(int8_path), _Batches(calibrate, to_batch), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude), extra_options=extra)
    weights = "7-bit GEMM weights, 8-bit depthwise" if plan.seven_bit_weights else "8-bit weights"
    return f"onnxruntime {onnxruntime.__version__} quantize_static: MinMax, per-channel {weights}"


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def judge_answers(report: Int8Report, fp32, quant, judge: Sequence[Path],
                  to_batch: Callable[[Sequence[Path]], np.ndarray], labels: Mapping[Path, int]) -> None:
    """Fill `report`'s answers: top-1 agreement and mean logit cosine over `judge`, agreement on the images fp32 is
    confident about, and both files' accuracy on the judged images that have a label."""
    reference, ours = [], []
    for start in range(0, len(judge), 32):
        batch = {"input": to_batch(judge[start:start + 32])}
        reference.append(fp32.run(None, batch)[0])
        ours.append(quant.run(None, batch)[0])
    reference_logits, int8_logits = np.concatenate(reference), np.concatenate(ours)
    agree = reference_logits.argmax(1) == int8_logits.argmax(1)
    norms = np.linalg.norm(reference_logits, axis=1) * np.linalg.norm(int8_logits, axis=1)
    report.top1_agreement = float(agree.mean())
    report.logit_cosine = float(((reference_logits * int8_logits).sum(1) / np.maximum(norms, 1e-12)).mean())
    confident = softmax(reference_logits).max(1) >= CONFIDENT
    report.confident_images = int(confident.sum())
    report.confident_agreement = float(agree[confident].mean()) if confident.any() else None
    labelled = [index for index, path in enumerate(judge) if path in labels]
    if labelled:
        truth = np.array([labels[judge[index]] for index in labelled])
        report.fp32_accuracy = float((reference_logits[labelled].argmax(1) == truth).mean())
        report.int8_accuracy = float((int8_logits[labelled].argmax(1) == truth).mean())
        report.accuracy_images = len(labelled)


def speedup(fp32, quant, batch: np.ndarray, seconds: float = 1.0) -> float:
    """int8 / fp32 images per second on one batch, the two timed alternately after a warm-up (median latency)."""
    feed = {"input": batch}
    latencies: dict[str, list[float]] = {"fp32": [], "int8": []}
    sessions = {"fp32": fp32, "int8": quant}
    for session in sessions.values():
        session.run(None, feed)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or min(len(v) for v in latencies.values()) < 3:
        for name, session in sessions.items():
            tick = time.perf_counter()
            session.run(None, feed)
            latencies[name].append(time.perf_counter() - tick)
    return float(np.median(latencies["fp32"]) / np.median(latencies["int8"]))


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
