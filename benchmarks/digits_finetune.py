"""The issue's accuracy runs: efficientnet_lite0 on scikit-learn digits, pretrained vs --no-pretrained,
all 1,797 images vs 10 training images per class. Times and validation accuracy on this machine.

Run: .venv/bin/python benchmarks/digits_finetune.py   (writes benchmarks/digits_finetune.json)
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from transfer.data.samples import write_digits_folder
from transfer.serving.predict import machine_name
from transfer.training import FinetuneConfig, finetune

HERE = Path(__file__).parent


def run(data: Path, output: Path, pretrained: bool, epochs_head: int, epochs_finetune: int) -> dict:
    config = FinetuneConfig(backbone="efficientnet_lite0", epochs_head=epochs_head, epochs_finetune=epochs_finetune,
                            input_size=96, crop_pct=1.0, augment=False, pretrained=pretrained, patience=99)
    started = time.perf_counter()
    result = finetune(data, config, output=output, device="cpu", log=lambda _: None)
    return {"pretrained": pretrained, "val_accuracy": round(result.best_val_acc, 4), "epochs": result.epochs_run,
            "schedule": f"{epochs_head} head + {epochs_finetune} finetune" if pretrained
            else f"{epochs_head + epochs_finetune} from scratch (all layers)",
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = write_digits_folder(tmp / "full", size=64)
        few = write_digits_folder(tmp / "few", per_class=13, size=64)  # 10 train + 3 val per class
        for name, data in (("all 1,797 (1,438 train / 359 val)", full), ("10 train images per class", few)):
            for pretrained in (True, False):
                row = run(data, tmp / f"{data.name}-{pretrained}", pretrained, 10, 2)
                rows.append({"data": name, **row})
                print(json.dumps(rows[-1]), flush=True)
    result = {"machine": f"{machine_name()}, CPU only", "backbone": "efficientnet_lite0 at 96 px, crop_pct 1.0",
              "runs": rows}
    (HERE / "digits_finetune.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
