"""Peak memory of `transfer extract --pool none` on 500 and 2,000 small images vs the size of what it writes:
if features were held in RAM, peak memory would grow with the image count; streamed, it stays flat.

Run: .venv/bin/python benchmarks/extract_memory.py  (writes benchmarks/extract_memory.json)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transfer.samples import write_digits_folder

HERE = Path(__file__).parent


PEAK = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def measure(images: Path, output: Path) -> dict:
    """Run extract in a fresh process tree and read the peak RSS of its largest process."""
    command = [str(Path(sys.executable).parent / "transfer"), "extract", str(images), "--backbone", "resnet18",
               "--no-pretrained", "--layer", "conv3_block2_out", "--pool", "none", "--output", str(output)]
    started = time.perf_counter()
    peak_kb = int(subprocess.run([sys.executable, "-c", PEAK, *command], check=True, capture_output=True,
                                 text=True).stdout.strip())
    return {"images": len(list(images.iterdir())), "output_mb": round(output.stat().st_size / 2**20, 1),
            "peak_rss_mb_largest_process": round(peak_kb / 1024, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits_folder(tmp / "a", size=48)
        write_digits_folder(tmp / "b", per_class=21, size=40)  # 1,797 + 210 = 2,007 images
        images = tmp / "images"
        images.mkdir()
        for path in sorted(tmp.glob("[ab]/*/*.png")):
            path.rename(images / f"{path.parent.parent.name}_{path.parent.name}_{path.name}")
        small = tmp / "small"
        small.mkdir()
        for path in sorted(images.iterdir())[:500]:
            (small / path.name).write_bytes(path.read_bytes())
        runs = [measure(small, tmp / "small.npy"), measure(images, tmp / "features.npy")]
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, CPU only",
            "layer": "resnet18 conv3_block2_out (128x28x28 at 224), --pool none, batch 32, 4 decode workers",
            "runs": runs,
        }
    print(json.dumps(result, indent=2))
    (HERE / "extract_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
