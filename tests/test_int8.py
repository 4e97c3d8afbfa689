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
    for name, flags in (("avx2", {"avx2"}), ("vnni", {"avx2", "avx512_vnni"})):
        quantize_int8(fp32, tmp_path / f"{name}.onnx", paths, [], to_batch, judge_logits=True, flags=flags)
        weights = _int8_weights(tmp_path / f"{name}.onnx")
        assert sum(gemm for _, gemm in weights.values()) > 10 and sum(not gemm for _, gemm in weights.values()) > 5
        spans[name] = {kind: max(int(np.abs(w).max()) for w, gemm in weights.values() if gemm == kind)
                       for kind in (True, False)}
    assert spans["avx2"][True] <= 64 and spans["avx2"][False] == 127
    assert spans["vnni"][True] == 127 and spans["vnni"][False] == 127


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
