"""Batch work at scale: `transfer predict -o` on 1k, 5k and 20k images, a killed run resumed, and the first batch
of a 100,000-file folder.

    python benchmarks/batch.py                          # 1k, 5k, 20k and the 100k start (about 35 minutes)
    python benchmarks/batch.py --sizes 1000 --first 0   # one size, no 100k folder

Images: crops of scikit-image's photos at random sides from 64 to 256 px, every other one a JPEG (quality 90) or a
PNG, written once into a folder per size. Model: efficientnet_lite0 with its offline ImageNet weights, exported as
`transfer export` writes it (224 px, preprocessing outside the graph). Each run is `transfer predict DIR --onnx
FILE -o preds.csv -q` in a fresh process (batch 32, default decode threads): wall time, images/s, peak RSS of the
process (sampled every 50 ms), and the time from launch until the first data row is in preds.csv. At the largest
size the run is killed (SIGKILL) once half the rows are written, run again with the same arguments, and the final
file compared byte for byte with the uninterrupted run's. The 100k folder: the time from launch to the first row.
Writes benchmarks/batch.json; run.py puts it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = str(Path(sys.executable).parent / "transfer")
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "brick", "grass", "gravel", "camera")


def write_images(folder: str, first: int, count: int) -> None:
    """Images first..first+count-1 of a folder (deterministic: image i depends on i only)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    for index in range(first, first + count):
        rng = np.random.default_rng(index)
        photo = photos[index % len(photos)]
        side = int(min(photo.size) * rng.uniform(0.3, 0.9))
        left, top = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
        size = int(rng.integers(64, 257))
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size))
        if index % 2:
            crop.save(Path(folder) / f"{index:06d}.png")
        else:
            crop.save(Path(folder) / f"{index:06d}.jpg", quality=90)


def make_folder(folder: Path, count: int) -> float:
    """`count` images in `folder`, written by two processes; the seconds it took."""
    started = time.perf_counter()
    folder.mkdir(parents=True)
    step = 2_000
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(write_images, [str(folder)] * len(range(0, count, step)), range(0, count, step),
                      [min(step, count - start) for start in range(0, count, step)]))
    os.sync()  # the new files reach the disk now, not during a timed run
    return round(time.perf_counter() - started, 1)


def data_rows(path: Path) -> int:
    """Data rows in a predictions CSV so far (lines after the header)."""
    try:
        with open(path, "rb") as handle:
            return max(0, handle.read().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def run_predict(images: Path, model: Path, output: Path, kill_at: int | None = None,
                timeout: float = 3_600) -> dict:
    """One `transfer predict` process: wall seconds, peak RSS, seconds to the first data row; with `kill_at`,
    SIGKILL once that many rows are in the file."""
    import psutil

    command = [TRANSFER, "predict", str(images), "--onnx", str(model), "-o", str(output), "-q", "--batch-size", "32"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched, peak, first_row, killed = psutil.Process(process.pid), 0, None, False
    while process.poll() is None and time.perf_counter() - started < timeout:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            pass
        rows = data_rows(output) if first_row is None or kill_at else 0
        if first_row is None and rows > 0:
            first_row = time.perf_counter() - started
        if kill_at is not None and rows >= kill_at:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    process.wait()
    seconds = time.perf_counter() - started
    if not killed and process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {process.returncode}: {process.stderr.read()[-800:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), "first_row_seconds":
            None if first_row is None else round(first_row, 2), "killed_at_rows": data_rows(output) if killed else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--first", type=int, default=100_000, help="files in the folder whose first row is timed "
                        "(0: skip)")
    args = parser.parse_args()
    from exporters.export import export_onnx
    from transfer.serving.predict import machine_name

    sizes = [int(size) for size in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BATCH_BENCH_DIR")) as name:
        work = Path(name)
        model = work / "lite0.onnx"
        export_onnx(model, backbone="efficientnet_lite0")
        for size in sizes:
            images = work / f"images{size}"
            made = make_folder(images, size)
            whole = run_predict(images, model, work / f"whole{size}.csv")
            row = {"n": size, "made_seconds": made, **whole,
                   "images_per_s": round(size / whole["seconds"], 1)}
            if size == max(sizes):
                target = work / f"resumed{size}.csv"
                row["killed"] = run_predict(images, model, target, kill_at=size // 2)
                row["resumed"] = run_predict(images, model, target)
                row["resumed_identical"] = target.read_bytes() == (work / f"whole{size}.csv").read_bytes()
                row["resume_fraction_of_full"] = round(row["resumed"]["seconds"] / whole["seconds"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
        first = None
        if args.first:
            images = work / f"images{args.first}"
            made = make_folder(images, args.first)
            first = {"n": args.first, "made_seconds": made,
                     **run_predict(images, model, work / "first.csv", kill_at=1)}
            print(json.dumps(first), flush=True)
    record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"),
              "model": "efficientnet_lite0 ImageNet (offline weights), 224 px, fp32 ONNX", "rows": rows,
              "first_row_of_a_large_folder": first}
    (ROOT / "benchmarks" / "batch.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
