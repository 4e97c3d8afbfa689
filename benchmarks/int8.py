"""int8 answers and speed, as `transfer export --int8` makes the file: 8-bit weights vs this CPU's 7-bit plan.

Judged on images never used for calibration: random square crops of every real colour photo the installed
packages ship (scikit-image, matplotlib, scikit-learn), drawn with two seeds, one set to calibrate and one to
judge; and a fine-tuned efficientnet_lite0 run on scikit-learn digits, judged on its validation images. "8-bit
weights" is what a VNNI CPU gets (forced here with its flags, so its fused kernels saturate on this CPU); "7-bit
plan" is what this CPU gets. Writes benchmarks/int8.json. Run: `python benchmarks/int8.py` (about 4 minutes).
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


def measure(name: str, fp32: Path, calibration: list[Path], judge: list[Path], judged_on: str, prep, work: Path
            ) -> list[dict]:
    from exporters.int8 import quantize_int8
    from transfer.core.images import open_image
    from transfer.core.preprocess import eval_array

    def to_batch(chunk):
        return np.stack([eval_array(open_image(p), prep) for p in chunk]).astype(np.float32)

    rows = []
    for variant, flags in (("8-bit weights (the VNNI plan)", {"avx2", "avx512_vnni"}),
                           ("7-bit GEMM weights (this CPU's plan)", {"avx2"})):
        report = quantize_int8(fp32, work / f"{name}.int8.onnx", calibration, judge, to_batch, judge_logits=True,
                               flags=flags, validation_name=judged_on)
        row = {"model": name, "variant": variant, "top1_agreement": round(report.top1_agreement, 4),
               "logit_cosine": round(report.logit_cosine, 4), "speedup_vs_fp32": round(report.speedup, 2),
               "calibration_images": report.calibration_images, "judged_on": report.agreement_images}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    from exporters.export import export_onnx, run_validation_images
    from exporters.int8 import cpu_flags, kernel_plan
    from models.registry import get_backbone
    from transfer.core.preprocess import Preprocessing
    from transfer.data.samples import write_digits_folder
    from transfer.data.scan import scan_folder
    from transfer.serving.predict import machine_name
    from transfer.training import FinetuneConfig, finetune

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calibration = write_crops(work / "calibration", per_photo=8, seed=0)
        judge = write_crops(work / "judge", per_photo=8, seed=1)
        spec = get_backbone("efficientnet_lite0")
        export_onnx(work / "lite0.onnx", backbone="efficientnet_lite0")
        rows += measure("efficientnet_lite0 ImageNet", work / "lite0.onnx", calibration, judge,
                        "photo crops drawn with another seed", spec.preprocessing, work)
        digits = write_digits_folder(work / "digits", per_class=60)
        config = FinetuneConfig(backbone="efficientnet_lite0", input_size=96, epochs_head=4, epochs_finetune=3,
                                workers=0)
        result = finetune(digits, config, output=work / "run", device="cpu", log=lambda _: None)
        export_onnx(work / "run.onnx", run=work / "run")
        run_config = json.loads((work / "run" / "config.json").read_text())
        digits_calibration = [s.path for s in scan_folder(write_digits_folder(work / "cal", per_class=10)).samples]
        rows += measure(f"efficientnet_lite0 digits run (val acc {result.best_val_acc:.3f})", work / "run.onnx",
                        digits_calibration, run_validation_images(run_config),
                        "validation images of the run", Preprocessing.from_dict(run_config["preprocessing"]), work)
    out = ROOT / "benchmarks" / "int8.json"
    machine = {"cpu": machine_name(), "vnni": sorted(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}),
               "plan": kernel_plan(cpu_flags()).reason}
    out.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
