"""Peak memory of `transfer extract --pool none` on 500, 2,000 and 4,000 small images vs the size of what it writes:
if features were held in RAM, peak memory would grow with the image count; streamed, it stays flat.

Run: .venv/bin/python benchmarks/extract_memory.py  (writes benchmarks/extract_memory.json)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transfer.data.samples import write_digits_folder
from transfer.serving.predict import machine_name

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
        for name, size in (("a", 48), ("b", 40), ("c", 56)):  # 3 x 1,797 real digits at different sizes
            write_digits_folder(tmp / name, size=size)
        everything = sorted(tmp.glob("[abc]/*/*.png"))
        runs = []
        for count in (500, 2000, 4000):
            images = tmp / f"images{count}"
            images.mkdir()
            for path in everything[:count]:
                (images / f"{path.parent.parent.name}_{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
            runs.append(measure(images, tmp / f"features{count}.npy"))
            print(json.dumps(runs[-1]), flush=True)
        result = {
            "machine": f"{machine_name()}, CPU only",
            "layer": "resnet18 conv3_block2_out (128x28x28 at 224), --pool none, batch 32, 4 decode workers",
            "runs": runs,
        }
    print(json.dumps(result, indent=2))
    (HERE / "extract_memory.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
