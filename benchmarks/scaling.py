"""`transfer extract` on 1 process vs 2 under torchrun (gloo, CPU), end to end, on this machine.

The folder: 384 JPEG crops (480x480) of the real photos the installed packages ship; efficientnet_lite0 (offline
weights) at 224 px, `avg_pool` features. Each configuration runs twice, interleaved; the wall time includes process
start-up and model loading (that is what a user waits for). Writes benchmarks/scaling.json.
Run: `python benchmarks/scaling.py` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TRANSFER = shutil.which("transfer") or str(Path(sys.executable).parent / "transfer")


def make_folder(folder: Path, count: int = 384) -> int:

    import numpy as np
    from int8 import photos

    rng = np.random.default_rng(0)
    images = list(photos().values())
    for index in range(count):
        image = images[index % len(images)]
        width, height = image.size
        side = int(rng.uniform(0.5, 1.0) * min(width, height))
        left, top = int(rng.uniform(0, width - side)), int(rng.uniform(0, height - side))
        image.crop((left, top, left + side, top + side)).resize((480, 480)).save(folder / f"{index:04d}.jpg",
                                                                                 quality=90)
    return count


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    from transfer.serving.predict import machine_name

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        count = make_folder(work / "images")
        args = ["extract", str(work / "images"), "-b", "efficientnet_lite0", "--layer", "avg_pool", "-q",
                "--batch-size", "32"]
        cores = os.cpu_count() or 1
        configs = {
            f"1 process, {cores} threads": ([TRANSFER, *args, "-o", str(work / "a.npy")], {}),
            "1 process, 1 thread": ([TRANSFER, *args, "-o", str(work / "b.npy")], {"OMP_NUM_THREADS": "1"}),
            "2 processes (torchrun), 1 thread each": (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", TRANSFER,
                 *args, "-o", str(work / "c.npy")], {"OMP_NUM_THREADS": "1"}),
        }
        seconds: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(2):
            for name, (command, extra) in configs.items():
                seconds[name].append(timed(command, {**os.environ, **extra}))
                print(name, round(seconds[name][-1], 2), flush=True)
        same = (work / "b.npy").read_bytes() == (work / "c.npy").read_bytes()  # same threads per process
    best = {name: min(values) for name, values in seconds.items()}
    base = best[f"1 process, {cores} threads"]
    record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "images": count,
              "model": "efficientnet_lite0 avg_pool, 224 px, batch 32", "seconds": seconds,
              "images_per_s": {name: round(count / value, 2) for name, value in best.items()},
              "speedup_vs_1_process": {name: round(base / value, 2) for name, value in best.items()},
              "two_process_output_identical_to_one_process": same}
    (ROOT / "benchmarks" / "scaling.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
