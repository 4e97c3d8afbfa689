"""Which recipe `transfer finetune` should run by default: candidate recipes x every real dataset the packages ship
x 3 seeds, judged on held-out test images no run saw (issue #42).

    python benchmarks/defaults.py              # about 45 minutes on 2 idle cores; resumable
    python benchmarks/defaults.py --only digits-10
    python benchmarks/defaults.py --timing     # before vs the defaults, back to back per dataset (seed 0)

Model: efficientnet_lite0 with its offline ImageNet weights at 96 px, `--crop-pct 1.0`, batch 32, everything else
the recipe's. Each data folder is split by finetune itself (80/20, seeded); the test images are a separate folder:
- digits-10 / digits-30 / digits-all: scikit-learn's digits (as `write_digits_folder` draws them), a fixed
  stratified 20% (359 images) held out as the test set; the data folder holds 10, 30 or all of the rest per class;
- textures: scikit-image's brick, grass and gravel, random crops (40 per class to the data folder, 20 to test);
- photo-crops: 8 real photos, one class each, random crops (15 per class to the data folder, 15 to test);
- digit-pairs: multi-label, one or two real digits per image (`write_digit_pairs`, 600 to the data folder from
  seed 0, 300 test images from seed 1), judged by macro F1 at the run's own thresholds.
Every finished run is appended to benchmarks/defaults.rows.jsonl (removed once its rows are in the summary) and a
run already in benchmarks/defaults.json or that file is skipped, so an interrupted or partial run continues; the
summary (mean, stdev and worst over seeds, mean wall time of `finetune`) goes to benchmarks/defaults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SEEDS = (0, 1, 2)
ROWS = ROOT / "benchmarks" / "defaults.rows.jsonl"
BASE = {"backbone": "efficientnet_lite0", "input_size": 96, "crop_pct": 1.0}
CANDIDATES = {
    "before: 3 + 3 epochs, augmentation in both stages": {"epochs_head": 3, "epochs_finetune": 3, "augment": True,
                                                          "cache_features": False, "lr_finetune": 1e-4},
    "demo: 10 cached + 2, no augmentation": {"epochs_head": 10, "epochs_finetune": 2, "augment": False,
                                             "lr_finetune": 1e-4},
    "10 cached + 3, augmentation in stage 2": {"epochs_head": 10, "epochs_finetune": 3, "augment": True,
                                               "cache_features": True, "lr_finetune": 1e-4},
    "25 cached + 3, no augmentation": {"epochs_head": 25, "epochs_finetune": 3, "augment": False,
                                       "lr_finetune": 1e-4},
    "25 cached + 3, augmentation in stage 2": {"epochs_head": 25, "epochs_finetune": 3, "augment": True,
                                               "cache_features": True, "lr_finetune": 1e-4},
    "25 cached + 3 at lr-finetune 1e-3, no augmentation": {"epochs_head": 25, "epochs_finetune": 3,
                                                           "augment": False, "lr_finetune": 1e-3},
    "25 cached + 3 at lr-finetune 1e-3, augmentation in stage 2": {"epochs_head": 25, "epochs_finetune": 3,
                                                                   "augment": True, "cache_features": True,
                                                                   "lr_finetune": 1e-3},
    "defaults (no flags; this commit's code)": {},
    "25 cached + 3 at lr-finetune 1e-4, no augmentation (this commit's code)": {"lr_finetune": 1e-4},
    "tune's best on digits-10: 15 + 5, unfreeze 1": {"epochs_head": 15, "epochs_finetune": 5, "augment": False,
                                                     "unfreeze": "1", "lr_head": 0.0019, "lr_finetune": 6.75e-5,
                                                     "label_smoothing": 0.02},
}


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, target)


def digits_data(work: Path) -> dict[str, tuple[Path, Path, dict | None]]:
    """Three data folders (10, 30, all per class) and one shared held-out test folder."""
    from transfer.data.samples import write_digits_folder

    every = write_digits_folder(work / "digits-every", size=64)
    rng = np.random.default_rng(0)
    test, rest = work / "digits-test", {}
    for folder in sorted(p for p in every.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        order = rng.permutation(len(files))
        held = round(len(files) * 0.2)
        for index in order[:held]:
            _link(files[index], test / folder.name / files[index].name)
        rest[folder.name] = [files[index] for index in order[held:]]
    datasets = {}
    for name, per_class in (("digits-10", 10), ("digits-30", 30), ("digits-all", None)):
        root = work / name
        for label, files in rest.items():
            for path in files[:per_class]:
                _link(path, root / label / path.name)
        datasets[name] = (root, test, None)
    return datasets


def crops_data(work: Path, name: str, images: dict[str, Image.Image], data_count: int, test_count: int,
               scale: tuple[float, float]) -> tuple[Path, Path, None]:
    """Random square crops of each image, one class per image: `data_count` to the data folder, `test_count` to test."""
    rng = np.random.default_rng(0)
    for split, count in (("data", data_count), ("test", test_count)):
        for label, image in images.items():
            folder = work / name / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                side = int(rng.uniform(*scale) * min(image.size))
                left, top = int(rng.uniform(0, image.width - side)), int(rng.uniform(0, image.height - side))
                image.crop((left, top, left + side, top + side)).save(folder / f"{index}.jpg", quality=90)
    return work / name / "data", work / name / "test", None


def pairs_data(work: Path) -> tuple[Path, Path, dict]:
    from transfer.data.samples import write_digit_pairs

    data = write_digit_pairs(work / "pairs", count=600, size=64, seed=0)
    test = write_digit_pairs(work / "pairs-test", count=300, size=64, seed=1)
    return data / "images", test, {"path": str(data / "labels.csv")}


def datasets(work: Path) -> dict[str, tuple[Path, Path, dict | None]]:
    from int8 import photos
    from skimage import data as skdata

    found = digits_data(work)
    textures = {name: Image.fromarray(getattr(skdata, name)()).convert("RGB") for name in ("brick", "grass", "gravel")}
    found["textures"] = crops_data(work, "textures", textures, 40, 20, (0.2, 0.5))
    found["photo-crops"] = crops_data(work, "photos", dict(list(photos().items())[:8]), 15, 15, (0.3, 0.8))
    found["digit-pairs"] = pairs_data(work)
    return found


def one_run(data: Path, test: Path, labels: dict | None, recipe: dict, seed: int, output: Path) -> dict:
    from transfer.apps.evaluate import evaluate
    from transfer.data.labels import LabelsFile
    from transfer.training import FinetuneConfig, finetune

    config = FinetuneConfig(**BASE, **recipe, seed=seed, labels=labels)
    started = time.perf_counter()
    result = finetune(data, config, output=output, device="cpu", log=lambda _: None)
    seconds = round(time.perf_counter() - started, 1)
    if labels:
        report = evaluate(output, test / "images", device="cpu",
                          labels=LabelsFile(path=str(test / "labels.csv")))
        score = report["macro_f1"]
    else:
        report = evaluate(output, test, device="cpu")
        score = report["accuracy"]
    shutil.rmtree(output)
    return {"score": round(score, 4), "metric": "macro F1" if labels else "accuracy", "seconds": seconds,
            "epochs": result.epochs_run}


def summarize(rows: list[dict]) -> dict:
    summary: dict = {}
    for row in rows:
        summary.setdefault(row["data"], {}).setdefault(row["recipe"], []).append(row)
    out = {}
    for data, by_recipe in summary.items():
        for recipe, picked in by_recipe.items():
            scores = [r["score"] for r in picked]
            out.setdefault(data, {})[recipe] = {
                "metric": picked[0]["metric"], "seeds": len(picked), "mean": round(statistics.mean(scores), 4),
                "stdev": round(statistics.stdev(scores), 4) if len(scores) > 1 else 0.0, "worst": min(scores),
                "seconds": round(statistics.mean(r["seconds"] for r in picked), 1)}
    return out


def timing(only: list[str] | None) -> int:
    """Wall time of `finetune` for the old and the new defaults, run back to back on each dataset (seed 0), so a
    slower spell of the machine hits both; written to benchmarks/defaults_timing.json."""
    from transfer.serving.predict import machine_name

    before, after = "before: 3 + 3 epochs, augmentation in both stages", "defaults (no flags; this commit's code)"
    rows = []
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        for data_name, (data, test, labels) in datasets(work).items():
            if only and data_name not in only:
                continue
            for recipe_name in (before, after):
                rows.append({"data": data_name, "recipe": recipe_name,
                             **one_run(data, test, labels, CANDIDATES[recipe_name], 0, work / "run")})
                print(json.dumps(rows[-1]), flush=True)
    summary = {data: {recipe: round(statistics.mean(r["seconds"] for r in rows
                                                    if (r["data"], r["recipe"]) == (data, recipe)), 1)
                      for recipe in (before, after)} for data in dict.fromkeys(r["data"] for r in rows)}
    record = {"machine": f"{machine_name()}, CPU only", "date": time.strftime("%Y-%m-%d"),
              "setup": "seed 0; before, then the defaults, on each dataset; seconds of finetune",
              "summary": summary, "runs": rows}
    (ROOT / "benchmarks" / "defaults_timing.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def main() -> int:
    from transfer.serving.predict import machine_name

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", action="append", help="a dataset name (repeatable)")
    parser.add_argument("--recipe", action="append", help="a candidate's name (repeatable)")
    parser.add_argument("--timing", action="store_true", help="time the first two candidates back to back")
    args = parser.parse_args()
    if args.timing:
        return timing(args.only)
    summary_path = ROOT / "benchmarks" / "defaults.json"
    rows = json.loads(summary_path.read_text())["runs"] if summary_path.exists() else []
    if ROWS.exists():  # an interrupted run's rows
        rows += [json.loads(line) for line in ROWS.read_text().splitlines() if line.strip()]
    rows = list({(r["data"], r["recipe"], r["seed"]): r for r in rows}.values())  # each run once
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        for data_name, (data, test, labels) in datasets(work).items():
            if args.only and data_name not in args.only:
                continue
            for recipe_name, recipe in CANDIDATES.items():
                if args.recipe and recipe_name not in args.recipe:
                    continue
                for seed in SEEDS:
                    if any((r["data"], r["recipe"], r["seed"]) == (data_name, recipe_name, seed) for r in rows):
                        continue
                    row = {"data": data_name, "recipe": recipe_name, "seed": seed,
                           **one_run(data, test, labels, recipe, seed, work / "run")}
                    rows.append(row)
                    with ROWS.open("a") as rows_file:
                        rows_file.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    record = {"machine": f"{machine_name()}, CPU only", "date": time.strftime("%Y-%m-%d"),
              "setup": "efficientnet_lite0 (offline ImageNet weights), 96 px, crop-pct 1.0, batch 32; held-out test "
                       "folders; seeds " + ", ".join(map(str, SEEDS)),
              "candidates": CANDIDATES, "summary": summarize(rows), "runs": rows}
    summary_path.write_text(json.dumps(record, indent=1) + "\n")
    ROWS.unlink(missing_ok=True)  # its rows are in defaults.json now
    print(json.dumps(record["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
