"""`transfer tune` with a budget against the defaults, judged on held-out test images neither saw.

    python benchmarks/tune.py                  # a 10-minute study, then the comparison (about 13 minutes)
    python benchmarks/tune.py --budget 3

Data: scikit-learn's digits, 10 training and 10 validation images per class, 30 test images per class
(`recipe.py`'s `digits_splits`: train/, val/ and test/ folders, so every run uses the same split). Model:
efficientnet_lite0 with its offline ImageNet weights at 96 px, `--crop-pct 1.0`, seed 0. The defaults: `finetune`
with no other flag. The study: `transfer tune` for `--budget` minutes (trials are judged by validation loss); its
best trial's run is then evaluated on test/, as the defaults' run is. Writes benchmarks/tune.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=10.0, help="minutes")
    args = parser.parse_args()
    from recipe import digits_splits

    from transfer.apps.evaluate import evaluate
    from transfer.serving.predict import machine_name
    from transfer.training import FinetuneConfig, finetune
    from transfer.training.tune import tune

    base = FinetuneConfig(backbone="efficientnet_lite0", input_size=96, crop_pct=1.0, seed=0)
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        data = digits_splits(work / "digits", 10)
        started = time.perf_counter()
        finetune(data, base, output=work / "defaults", device="cpu", log=lambda _: None)
        default_seconds = round(time.perf_counter() - started, 1)
        defaults = evaluate(work / "defaults", data, device="cpu")
        started = time.perf_counter()
        result = tune(data, base, work / "study", trials=1000, budget_minutes=args.budget, device="cpu",
                      log=lambda line: print(line, flush=True))
        tune_seconds = round(time.perf_counter() - started, 1)
        tuned = evaluate(result.best["run_dir"], data, device="cpu")
        states = {}
        for row in result.trials:
            states[row["state"]] = states.get(row["state"], 0) + 1
        record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"),
                  "setup": "efficientnet_lite0 (offline ImageNet weights), 96 px, crop-pct 1.0, seed 0; digits 10 "
                           "train + 10 val per class, 30 test per class",
                  "defaults": {"test_accuracy": round(defaults["accuracy"], 4), "seconds": default_seconds},
                  "tune": {"budget_minutes": args.budget, "seconds": tune_seconds, "trials": states,
                           "best_trial": result.best["trial"], "best_val_loss": round(result.best["val_loss"], 4),
                           "test_accuracy": round(tuned["accuracy"], 4), "recipe": result.best["knobs"]}}
    print(json.dumps(record, indent=1))
    (ROOT / "benchmarks" / "tune.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
