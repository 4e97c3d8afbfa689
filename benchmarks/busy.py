"""A busy machine: stage 1 on cached features and the tour's finetune, idle and with two CPU-bound processes competing.

    python benchmarks/busy.py          # about 6 minutes on 2 cores

Stage 1: efficientnet_lite0 (offline ImageNet weights) on scikit-learn's digits, 20 per class, 96 px input, 3 head
epochs on cached features, no fine-tuning stage; the figure is the median of epochs 2-3 (epoch 1 also computes the
cache). The tour's finetune: `transfer finetune ./mydata -b efficientnet_lite0 --input-size 96 --crop-pct 1.0` on
the tour's 12 digits per class, wall time of the whole command. "Busy": two other processes each spinning one core
in a loop (`python -c 'while True: pass'`) for the whole run, as a shared CI runner or another user's job does.
Each figure is a fresh process. Writes benchmarks/busy.json; run.py puts it in RESULTS.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = str(Path(sys.executable).parent / "transfer")


@contextmanager
def competing(processes: int):
    """`processes` CPU-bound loops running while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def stage1_epoch_seconds(data: Path, output: Path) -> float:
    subprocess.run([TRANSFER, "finetune", str(data), "-b", "efficientnet_lite0", "--input-size", "96", "--crop-pct",
                    "1.0", "--no-augment", "--epochs-head", "3", "--epochs-finetune", "0", "-o", str(output), "-q"],
                   check=True, stdout=subprocess.DEVNULL)
    import csv

    with open(output / "metrics.csv") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return round(statistics.median(seconds[1:]), 3)


def tour_finetune_seconds(data: Path, output: Path) -> float:
    started = time.perf_counter()
    subprocess.run([TRANSFER, "finetune", str(data), "-b", "efficientnet_lite0", "--input-size", "96", "--crop-pct",
                    "1.0", "-o", str(output), "-q"], check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - started, 1)


def main() -> None:
    from transfer.core.cpus import usable_cpus
    from transfer.data.samples import write_digits_folder
    from transfer.serving.predict import machine_name

    record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "usable_cpus": usable_cpus(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        digits = write_digits_folder(work / "digits", per_class=20)
        tour = write_digits_folder(work / "tour", per_class=12)  # as the tour writes it
        for load in ("idle", "busy"):
            with competing(2 if load == "busy" else 0):
                record[f"stage1_epoch_seconds_{load}"] = stage1_epoch_seconds(digits, work / f"s1_{load}")
                record[f"tour_finetune_seconds_{load}"] = tour_finetune_seconds(tour, work / f"tour_{load}")
            print(json.dumps(record), flush=True)
    record["stage1_busy_over_idle"] = round(record["stage1_epoch_seconds_busy"] / record["stage1_epoch_seconds_idle"],
                                            2)
    record["tour_busy_over_idle"] = round(record["tour_finetune_seconds_busy"] / record["tour_finetune_seconds_idle"],
                                          2)
    (ROOT / "benchmarks" / "busy.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
