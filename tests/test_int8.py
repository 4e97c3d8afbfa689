"""int8: weights chosen by the CPU's int8 kernels, and agreement judged on images the calibration never saw."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from exporters.export import export_onnx
from exporters.int8 import cpu_flags, gemm_kernel_nodes, kernel_plan, quantize_int8, split_images
from transfer.core.errors import TransferError
from transfer.core.images import open_image
from transfer.core.preprocess import Preprocessing, eval_array


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_1 avx2 fma avx512_vnni\nbogomips\t: 4000\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse4_1", "avx2", "fma", "avx512_vnni"}
    assert cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize(("flags", "seven_bit", "named"), [
    ({"avx2", "fma"}, True, "VPMADDUBSW"),
    ({"avx2", "avx512_vnni"}, False, "avx512_vnni"),
    ({"avx2", "avx_vnni"}, False, "avx_vnni"),
    ({"sse4_1"}, True, "VPMADDUBSW"),
    (set(), False, "no x86 u8s8 saturation"),  # e.g. ARM, whose int8 dot products accumulate in int32
])
def test_kernel_plan_follows_cpu_flags(flags, seven_bit, named):
    plan = kernel_plan(flags)
    assert plan.seven_bit_weights is seven_bit and named in plan.reason


def _int8_weights(path) -> dict[str, tuple[np.ndarray, bool]]:
    """conv/gemm node name -> (its int8 weight values, whether it goes through the GEMM kernel)."""
    model = onnx.load(str(path))
    values = {item.name: numpy_helper.to_array(item) for item in model.graph.initializer}
    dequantized = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") and dequantized.get(node.input[1]) in values:
            depthwise = any(attr.name == "group" and attr.i > 1 for attr in node.attribute)
            found[node.name] = (values[dequantized[node.input[1]]].astype(int), not depthwise)
    return found


def test_quantized_weights_follow_the_kernel_plan(tmp_path, photo_dir):
    """Without VNNI every GEMM-kernel weight fits 7 bits (no int16 saturation in VPMADDUBSW) while depthwise keeps
    8; with VNNI every weight uses 8 bits. Checked on the int8 values in the files themselves."""
    fp32 = tmp_path / "lite0.onnx"
    record = export_onnx(fp32, backbone="efficientnet_lite0", pretrained=False, input_size=64)
    # stem, block 0's pointwise, 15 expand/project pairs, head conv, classifier; not the 16 depthwise convs
    assert len(gemm_kernel_nodes(onnx.load(str(fp32)))) == 34
    prep = Preprocessing.from_metadata(record.metadata)
    paths = []  # nine distinct images: calibration and the held-out judgement never share content
    for photo in sorted(photo_dir.iterdir()):
        for angle in (0, 90, 180):
            paths.append(tmp_path / f"{photo.stem}_{angle}.jpg")
            Image.open(photo).rotate(angle, expand=True).save(paths[-1], quality=90)

    def to_batch(chunk):
        return np.stack([eval_array(open_image(p), prep) for p in chunk]).astype(np.float32)

    spans = {}
    for method in ("onnxruntime", "nncf"):
        for name, flags in (("avx2", {"avx2"}), ("vnni", {"avx2", "avx512_vnni"})):
            path = tmp_path / f"{method}_{name}.onnx"
            report = quantize_int8(fp32, path, paths, [], to_batch, judge_logits=True, flags=flags, method=method)
            assert report.method.startswith(f"{method} ") and 0 <= report.top1_agreement <= 1
            weights = _int8_weights(path)
            assert sum(gemm for _, gemm in weights.values()) > 10 and sum(not gemm for _, gemm in weights.values()) > 5
            spans[method, name] = {kind: max(int(np.abs(w).max()) for w, gemm in weights.values() if gemm == kind)
                                   for kind in (True, False)}
            assert _float_convolutions_after_fusion(path) == 0  # every convolution runs on int8 kernels
    assert spans["onnxruntime", "avx2"][True] <= 64 and spans["onnxruntime", "avx2"][False] == 127
    assert spans["onnxruntime", "vnni"][True] == 127 and spans["onnxruntime", "vnni"][False] == 127
    # NNCF's overflow fix makes the same choice: 7 bits through the GEMM kernel without VNNI, depthwise keeps 8
    assert spans["nncf", "avx2"][True] <= 64 and spans["nncf", "avx2"][False] == 127
    assert spans["nncf", "vnni"][True] == 127 and spans["nncf", "vnni"][False] == 127


def _float_convolutions_after_fusion(path) -> int:
    """How many Conv nodes onnxruntime's CPU graph optimizer leaves in float (not fused into QLinearConv)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    kinds = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert kinds.count("QLinearConv") > 40
    return kinds.count("Conv") + kinds.count("FusedConv")


def test_unsigned_activations_are_exact():
    """int8 activation Q/DQ pairs moved to uint8 (zero point + 128) dequantize to the same values; weights keep
    int8. Checked by running both graphs without fusion on random inputs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from exporters.int8_nncf import unsigned_activations

    weight = np.random.default_rng(0).integers(-64, 64, (4, 3, 1, 1)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "wscale", "wzero"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y"])]
    constants = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
                 numpy_helper.from_array(np.array(3, np.int8), "zero"),
                 numpy_helper.from_array(weight, "w"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "wscale"),
                 numpy_helper.from_array(np.array(0, np.int8), "wzero")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])], constants)
    signed = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    unsigned = unsigned_activations(onnx.ModelProto.FromString(signed.SerializeToString()))
    zero_points = {item.name: numpy_helper.to_array(item) for item in unsigned.graph.initializer}
    assert zero_points["zero"].dtype == np.uint8 and int(zero_points["zero"]) == 131
    assert zero_points["wzero"].dtype == np.int8 and (zero_points["w"] == weight).all()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = {"x": np.random.default_rng(1).normal(0, 4, (2, 3, 5, 5)).astype(np.float32)}  # some values clip
    before, after = (ort.InferenceSession(m.SerializeToString(), options).run(None, x)[0] for m in (signed, unsigned))
    assert np.array_equal(before, after) and np.abs(before).max() > 0


def test_nncf_is_imported_without_telemetry(tmp_path):
    """NNCF would send usage events and write a client id under the home folder; imported through
    import_nncf it does neither, and the environment is left as it was."""
    import subprocess
    import sys

    code = ("import os; from exporters.int8_nncf import import_nncf; import_nncf(); "
            "from nncf.telemetry import wrapper; print(isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub), "
            "os.environ.get('NNCF_CI'), os.environ.get('CI'))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("NNCF_CI", "CI", "PYTEST_CURRENT_TEST")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env | {
        "HOME": str(tmp_path)}, cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "None", "None"]  # the stub that sends nothing
    assert list(tmp_path.iterdir()) == []  # no consent or client-id folder in the home folder


def test_judgement_images_never_calibrate(tmp_path, monkeypatch):
    files = []
    for index in range(12):
        files.append(tmp_path / f"{index}.jpg")
        files[-1].write_bytes(f"image {index}".encode())
    monkeypatch.chdir(tmp_path)
    # a run whose validation images are partly in --calibration, named by another spelling of the same path
    calibration = [files[0], files[1], tmp_path / "." / "2.jpg"]
    validation = [files[1], files[2], files[3], files[4]]
    used, judged, note = split_images(calibration, validation)
    assert used == calibration and judged == [files[3], files[4]]
    assert note == "2 validation images of the run (none used for calibration, compared by content)"
    # no run validation images: every 4th calibration image judges instead
    used, judged, note = split_images(files, [])
    assert judged == [files[3], files[7], files[11]] and not set(used) & set(judged) and len(used) == 9
    assert note.startswith("3 held-out calibration images")
    # every validation image was used to calibrate: the same hold-out rule applies
    used, judged, _ = split_images(files, files[:4])
    assert judged == [files[3], files[7], files[11]]
    with pytest.raises(TransferError, match="at least 8"):
        split_images(files[:7], [])


def test_byte_identical_copies_of_calibration_images_never_judge(tmp_path):
    """The record once said "none used for calibration" when --calibration held copies of the validation images:
    the split compared paths. Contents are compared now."""
    validation = tmp_path / "val"
    calibration = tmp_path / "calibration"
    validation.mkdir()
    calibration.mkdir()
    for index in range(6):
        (validation / f"{index}.jpg").write_bytes(f"image {index}".encode())
        (calibration / f"copy_of_{index}.jpg").write_bytes(f"image {index}".encode())  # same bytes, other name
    (validation / "only_in_val.jpg").write_bytes(b"unseen image")
    before = {p: p.read_bytes() for p in [*validation.iterdir(), *calibration.iterdir()]}
    used, judged, note = split_images(sorted(calibration.iterdir()), sorted(validation.iterdir()))
    assert judged == [validation / "only_in_val.jpg"] and len(used) == 6
    assert note.startswith("1 validation images of the run (none used for calibration, compared by content)")
    # calibration images that are copies of each other count once, and the hold-out still never shares content
    for index in range(8):
        (calibration / f"dup_{index}.jpg").write_bytes(f"extra {index % 4}".encode())
    everything = sorted(calibration.iterdir())
    used, judged, _ = split_images(everything, [])
    digests = {p: p.read_bytes() for p in everything}
    assert not {digests[p] for p in used} & {digests[p] for p in judged}
    assert len({digests[p] for p in used + judged}) == len(used) + len(judged) == 10
    with pytest.raises(TransferError, match="6 usable images of distinct content"):
        split_images(sorted(calibration.glob("copy_of_*")) + sorted(validation.glob("[0-9].jpg")), [])
    assert all(p.read_bytes() == content for p, content in before.items())  # the user's files are untouched


def test_accuracy_loss_threshold_refuses_and_passes(tmp_path):
    """--max-accuracy-loss replaces the agreement rule for a run: 0.95 agreement can pass or fail by accuracy."""
    from types import SimpleNamespace

    from exporters.int8 import Int8Report
    from exporters.verify import judge
    from transfer.core.errors import VerificationError

    def record(fp32_accuracy, int8_accuracy, agreement=0.95):
        report = Int8Report(agreement, 0.99, "200 validation images", 100, 1.5, "plan", "nncf 3.4.0",
                            fp32_accuracy=fp32_accuracy, int8_accuracy=int8_accuracy, accuracy_images=200)
        return SimpleNamespace(precision="int8", max_rel_diff={"logits": 0.2}, tolerance=0.3, int8=report,
                               top1_agreement=agreement, preprocessing_in_graph=None)

    judge(record(0.900, 0.895), "logits", tmp_path / "m.onnx", max_accuracy_loss=0.5)  # 0.5 points: kept
    with pytest.raises(VerificationError, match=r"int8 accuracy loss 1\.00 points \(90\.00% fp32, 89\.00% int8 on "
                                                r"200 held-out validation images\) > --max-accuracy-loss 0\.5"):
        judge(record(0.90, 0.89), "logits", tmp_path / "m.onnx", max_accuracy_loss=0.5)
    judge(record(0.90, 0.60, agreement=0.91), "logits", tmp_path / "m.onnx")  # without it: today's agreement rule
    with pytest.raises(VerificationError, match="top-1 agreement with fp32 is 0.850 < 0.9"):
        judge(record(0.90, 0.90, agreement=0.85), "logits", tmp_path / "m.onnx")
    no_labels = record(None, None)
    with pytest.raises(VerificationError, match="no labelled held-out image"):
        judge(no_labels, "logits", tmp_path / "m.onnx", max_accuracy_loss=0.5)
