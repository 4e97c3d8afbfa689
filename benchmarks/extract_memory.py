"""Peak memory of `transfer extract --pool none` on 2,000 small images vs the size of what it writes.

Run: .venv/bin/python benchmarks/extract_memory.py  (writes benchmarks/extract_memory.json)
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transfer.samples import write_digits_folder

HERE = Path(__file__).parent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits_folder(tmp / "a", size=48)
        write_digits_folder(tmp / "b", per_class=21, size=40)  # 1,797 + 210 = 2,007 images
        images = tmp / "images"
        images.mkdir()
        for path in sorted(tmp.glob("[ab]/*/*.png")):
            path.rename(images / f"{path.parent.parent.name}_{path.parent.name}_{path.name}")
        output = tmp / "features.npy"
        command = [str(Path(sys.executable).parent / "transfer"), "extract", str(images), "--backbone", "resnet18",
                   "--no-pretrained", "--layer", "conv3_block2_out", "--pool", "none", "--output", str(output)]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                       "cores, CPU only",
            "images": len(list(images.iterdir())),
            "layer": "resnet18 conv3_block2_out (128x28x28 at 224), --pool none",
            "output_mb": round(output.stat().st_size / 2**20, 1),
            "peak_rss_mb_largest_process": round(peak_mb, 1),
            "seconds": round(seconds, 1),
        }
    print(json.dumps(result, indent=2))
    (HERE / "extract_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
