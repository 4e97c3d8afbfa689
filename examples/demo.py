"""The demo behind `make demo`: real handwritten digits -> fine-tuned EfficientNet-Lite0 -> ONNX -> predictions.

Runs offline on a 2-core CPU in about two minutes: the ImageNet weights ship in a package, the digits in
scikit-learn. Everything it writes goes under demo_data/ and runs/demo/.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = ROOT / "demo_data" / "digits"
RUN = ROOT / "runs" / "demo"


def transfer(*args: str) -> None:
    print(f"\n$ transfer {' '.join(args)}", flush=True)
    subprocess.run([str(BIN / "transfer"), *args], check=True, cwd=ROOT)


def main() -> int:
    from transfer.data.samples import write_digits_folder

    if not DATA.is_dir():
        write_digits_folder(DATA, size=64)
        print(f"wrote scikit-learn's 1,797 handwritten digits as PNG class folders in {DATA}")
    if RUN.exists():
        shutil.rmtree(RUN)  # the demo's own output from a previous run
    transfer("scan", str(DATA))
    transfer("finetune", str(DATA), "--backbone", "efficientnet_lite0", "--input-size", "96", "--crop-pct", "1.0",
             "--output", str(RUN))
    transfer("export", "--run", str(RUN), "--output", str(RUN / "model.onnx"))
    samples = [str(sorted((DATA / str(d)).iterdir())[-1]) for d in (0, 3, 7, 9)]
    transfer("predict", *samples, "--onnx", str(RUN / "model.onnx"), "--top-k", "3")
    report = json.loads((RUN / "report.json").read_text())
    print(f"\nvalidation accuracy {report['accuracy']:.4f} on {report['count']} images; "
          f"curves in {RUN / 'curves.png'}, ONNX model in {RUN / 'model.onnx'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
