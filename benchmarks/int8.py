"""int8 methods on held-out images: NNCF (the default), onnxruntime's quantizer, and AIMET when it is installed.

Judged as users judge them. The efficientnet_lite0 ImageNet classifier: top-1 agreement and logit cosine with fp32
on random square crops of every real colour photo the installed packages ship (scikit-image, matplotlib,
scikit-learn), one seed to calibrate and another to judge, overall and on the crops fp32 is confident about (top-1
probability >= 0.5). A fine-tuned efficientnet_lite0 digits run: accuracy on its own validation images, fp32 vs
int8 (calibrated on 100 of its training images). resnet50 (seeded random weights): speed. Speed is the int8 file
against the fp32 file on this CPU (fused kernels, batch 16, interleaved).

Each method is run with this CPU's kernel plan (7-bit GEMM weights without VNNI). "VNNI plan, exact arithmetic"
rows give the answers a VNNI CPU computes with 8-bit weights (int32 accumulation), run here without fusion so no
int16 saturates; they have no speed. AIMET (`pip install aimet-onnx`, about 330 MB with bokeh and panel, not a
dependency) gets cross-layer equalisation and min-max; its QDQ export takes only 8-bit types, so it has no 7-bit
plan. Writes benchmarks/int8.json. Run: `python benchmarks/int8.py` (about 10 minutes on 2 cores;
`--resnet50-only` retimes resnet50 alone).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "colorwheel", "cat", "brick", "grass", "gravel", "camera", "coins", "moon", "page")
VNNI = {"avx2", "avx512_vnni"}


def photos() -> dict[str, Image.Image]:
    """Every real photo the installed packages ship, as RGB."""
    import matplotlib
    import sklearn.datasets
    from skimage import data

    found = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS if hasattr(data, name)}
    found["grace_hopper"] = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    for index, image in enumerate(sklearn.datasets.load_sample_images().images):
        found[f"sklearn_{index}"] = Image.fromarray(image)
    return {name: image.convert("RGB") for name, image in found.items()}


def write_crops(folder: Path, per_photo: int, seed: int) -> list[Path]:
    """Random square crops (35-100% of the short side, half of them mirrored) of each photo, as JPEGs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in photos().items():
        width, height = image.size
        for index in range(per_photo):
            side = rng.uniform(0.35, 1.0) * min(width, height)
            left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
            crop = image.crop((int(left), int(top), int(left + side), int(top + side)))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            paths.append(folder / f"{name}_{index}.jpg")
            crop.save(paths[-1], quality=92)
    return paths


def session(path: Path, exact: bool = False):
    """An onnxruntime CPU session; `exact` runs the QDQ graph unfused (the arithmetic a VNNI CPU's kernels do)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def aimet_quantize(fp32: Path, int8: Path, calibrate: list[Path], to_batch) -> str | None:
    """AIMET's cross-layer equalisation and min-max 8-bit QDQ, activations moved to uint8; None when not installed."""
    try:
        import onnx
        from aimet_onnx import qtype
        from aimet_onnx.cross_layer_equalization import equalize_model
        from aimet_onnx.quantsim import QuantizationSimModel
    except ImportError:
        return None
    from exporters.int8_nncf import unsigned_activations

    model = onnx.load(str(fp32))
    equalize_model(model)
    sim = QuantizationSimModel(model, param_type=qtype.int(8), activation_type=qtype.int(8), quant_scheme="min_max",
                               providers=["CPUExecutionProvider"])
    sim.compute_encodings([{"input": to_batch(calibrate[i:i + 8])} for i in range(0, len(calibrate), 8)])
    onnx.save(unsigned_activations(sim.to_onnx_qdq()), str(int8))
    import aimet_onnx

    return f"aimet-onnx {getattr(aimet_onnx, '__version__', '')}: cross-layer equalisation, min-max, 8-bit".strip()


def measure(model: str, fp32: Path, calibration: list[Path], judge: list[Path], judged_on: str, to_batch,
            work: Path, labels: dict[Path, int] | None = None, answers: bool = True) -> list[dict]:
    """One row per method and plan: answers on `judge` and, for fused files, speed against fp32."""
    from exporters.int8 import Int8Report, judge_answers, quantize_int8, speedup

    rows = []

    def row(method: str, plan: str, report: Int8Report, speed: float | None) -> None:
        rows.append({"model": model, "method": method, "plan": plan,
                     "top1_agreement": _round(report.top1_agreement), "logit_cosine": _round(report.logit_cosine),
                     "confident_agreement": _round(report.confident_agreement),
                     "confident_images": report.confident_images,
                     "fp32_accuracy": _round(report.fp32_accuracy), "int8_accuracy": _round(report.int8_accuracy),
                     "accuracy_loss_points": _round(report.accuracy_loss, 2), "speedup_vs_fp32": _round(speed, 2),
                     "calibration_images": len(calibration), "judged_on": f"{len(judge)} {judged_on}"})
        print(json.dumps(rows[-1]), flush=True)

    reference = session(fp32)
    sample = to_batch(judge[:16])
    for method in ("nncf", "onnxruntime"):
        for plan, flags in (("this CPU's plan", None), ("VNNI plan, exact arithmetic", VNNI))[:2 if answers else 1]:
            path = work / f"{model.split()[0]}.{method}.{'vnni' if flags else 'cpu'}.onnx"
            report = quantize_int8(fp32, path, calibration, judge, to_batch, judge_logits=answers, flags=flags,
                                   validation_name=judged_on, method=method, labels=labels)
            if flags:
                judge_answers(report, reference, session(path, exact=True), judge, to_batch, labels or {})
            row(f"{method}: {report.method}", plan, report, None if flags else report.speedup)
    path = work / f"{model.split()[0]}.aimet.onnx"
    made_by = aimet_quantize(fp32, path, calibration, to_batch)
    if made_by is not None:
        plans = (("8-bit weights, fused on this CPU", False), ("VNNI plan, exact arithmetic", True))
        for plan, exact in plans[:2 if answers else 1]:
            report = Int8Report(None, None, judged_on, len(calibration), 0.0, plan, made_by)
            if answers:
                judge_answers(report, reference, session(path, exact=exact), judge, to_batch, labels or {})
            row(made_by, plan, report, None if exact else speedup(reference, session(path), sample))
    return rows


def resnet50_speed(work: Path, calibration: list[Path], seconds: float = 8.0) -> dict:
    """resnet50 (seeded random weights) int8 / fp32 at batch 16 for each method, timed longer than the rows."""
    import torch

    from exporters.export import export_onnx
    from exporters.int8 import quantize_int8
    from models.registry import get_backbone
    from transfer.core.images import open_image
    from transfer.core.preprocess import eval_array

    prep = get_backbone("resnet50").preprocessing

    def to_batch(chunk):
        return np.stack([eval_array(open_image(p), prep) for p in chunk]).astype(np.float32)

    torch.manual_seed(0)
    fp32 = work / "resnet50_timing.onnx"
    export_onnx(fp32, backbone="resnet50", pretrained=False)
    batch = {"input": to_batch(calibration[:16])}
    result: dict = {"seconds": seconds, "batch": 16}
    for method in ("nncf", "onnxruntime"):
        path = work / f"resnet50_timing.{method}.onnx"
        quantize_int8(fp32, path, calibration[::4], [], to_batch, judge_logits=False, method=method)
        sessions = {"fp32": session(fp32), "int8": session(path)}
        latencies: dict[str, list[float]] = {"fp32": [], "int8": []}
        for item in sessions.values():
            item.run(None, batch)
        started = time.perf_counter()
        while time.perf_counter() - started < 2 * seconds:
            for name, item in sessions.items():
                tick = time.perf_counter()
                item.run(None, batch)
                latencies[name].append(time.perf_counter() - tick)
        rates = {name: 16 / float(np.median(values)) for name, values in latencies.items()}
        result[method] = {"fp32_images_per_s": round(rates["fp32"], 2), "int8_images_per_s": round(rates["int8"], 2),
                          "speedup": round(rates["int8"] / rates["fp32"], 2)}
        print(method, result[method], flush=True)
    return result


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def main() -> int:
    if sys.argv[1:] == ["--resnet50-only"]:  # retime resnet50 into the existing int8.json
        out = ROOT / "benchmarks" / "int8.json"
        record = json.loads(out.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            record["resnet50_speed"] = resnet50_speed(Path(tmp), write_crops(Path(tmp) / "crops", 8, seed=0))
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    from exporters.export import export_onnx
    from exporters.int8 import cpu_flags, kernel_plan
    from exporters.run_data import run_validation_samples
    from models.registry import get_backbone
    from transfer.core.images import open_image
    from transfer.core.preprocess import Preprocessing, eval_array
    from transfer.data.samples import write_digits_folder
    from transfer.serving.predict import machine_name
    from transfer.training import FinetuneConfig, finetune

    def batches(prep):
        return lambda chunk: np.stack([eval_array(open_image(p), prep) for p in chunk]).astype(np.float32)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calibration = write_crops(work / "calibration", per_photo=8, seed=0)
        judge = write_crops(work / "judge", per_photo=16, seed=1)
        export_onnx(work / "lite0.onnx", backbone="efficientnet_lite0")
        lite0 = get_backbone("efficientnet_lite0").preprocessing
        rows += measure("efficientnet_lite0 ImageNet", work / "lite0.onnx", calibration, judge,
                        "photo crops drawn with another seed", batches(lite0), work)
        digits = write_digits_folder(work / "digits", per_class=170)
        config = FinetuneConfig(backbone="efficientnet_lite0", input_size=96, epochs_head=4, epochs_finetune=3,
                                workers=0)
        result = finetune(digits, config, output=work / "run", device="cpu", log=lambda _: None)
        export_onnx(work / "run.onnx", run=work / "run")
        run_config = json.loads((work / "run" / "config.json").read_text())
        validation = run_validation_samples(run_config)
        validation_paths = {s.path for s in validation}
        train = [p for p in sorted(digits.rglob("*.png")) if p not in validation_paths][::13][:100]
        rows += measure(f"efficientnet_lite0 digits run (val acc {result.best_val_acc:.3f})", work / "run.onnx",
                        train, [s.path for s in validation], "validation images of the run",
                        batches(Preprocessing.from_dict(run_config["preprocessing"])), work,
                        labels={s.path: s.label for s in validation})
        spec = get_backbone("resnet50")
        export_onnx(work / "resnet50.onnx", backbone="resnet50", pretrained=False)
        rows += measure("resnet50 (random weights)", work / "resnet50.onnx", calibration[::4], judge[:32],
                        "photo crops (speed only: random weights)", batches(spec.preprocessing), work, answers=False)
        resnet_timing = resnet50_speed(work, calibration)
    out = ROOT / "benchmarks" / "int8.json"
    machine = {"cpu": machine_name(), "vnni": sorted(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}),
               "plan": kernel_plan(cpu_flags()).reason}
    out.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "rows": rows,
                               "resnet50_speed": resnet_timing}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
