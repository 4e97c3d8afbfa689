"""Stage 1 per epoch: head trained on cached backbone features vs the plain frozen forward pass.

Same data (scikit-learn digits as images), same backbone (efficientnet_lite0, offline weights, 96 px), same machine.
Run: .venv/bin/python benchmarks/stage1_cache.py   (writes benchmarks/stage1_cache.json)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transfer.data.samples import write_digits_folder
from transfer.serving.predict import machine_name
from transfer.training import FinetuneConfig, finetune

HERE = Path(__file__).parent


def stage1_seconds(data: Path, output: Path, cached: bool) -> list[dict]:
    config = FinetuneConfig(backbone="efficientnet_lite0", epochs_head=3, epochs_finetune=0, input_size=96,
                            crop_pct=1.0, augment=False, cache_features=cached, patience=99)
    result = finetune(data, config, output=output, device="cpu", log=lambda _: None)
    from transfer.core.metrics import read_metrics

    return [{"epoch": r["epoch"], "seconds": r["seconds"], "val_acc": r["val_acc"]}
            for r in read_metrics(result.run_dir / "metrics.csv")]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits_folder(Path(tmp) / "digits", size=64)
        cached = stage1_seconds(data, Path(tmp) / "cached", True)
        plain = stage1_seconds(data, Path(tmp) / "plain", False)
    plain_epoch = sum(r["seconds"] for r in plain) / len(plain)
    cached_later = sum(r["seconds"] for r in cached[1:]) / len(cached[1:])
    result = {
        "machine": f"{machine_name()}, CPU only",
        "data": "1,797 scikit-learn digits, 1,438 train / 359 val, efficientnet_lite0 at 96 px",
        "plain_frozen_forward": plain,
        "cached_features": cached,
        "plain_seconds_per_epoch": round(plain_epoch, 2),
        "cached_first_epoch_seconds (includes the one feature pass)": cached[0]["seconds"],
        "cached_seconds_per_later_epoch": round(cached_later, 2),
        "speedup_per_later_epoch": round(plain_epoch / cached_later, 1),
        "speedup_over_3_epochs": round(sum(r["seconds"] for r in plain) / sum(r["seconds"] for r in cached), 2),
    }
    print(json.dumps(result, indent=2))
    (HERE / "stage1_cache.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
