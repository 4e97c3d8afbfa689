"""The CIFAR-10 ConvNet (Keras's cifar10_cnn) trained from scratch on the 1,797 scikit-learn digits at 32 px.

The texts' recipe: RMSprop lr 1e-4, batch 32; 40 epochs here (the texts ran 100 on CIFAR-10's 50,000 images), 80/20
stratified split, three seeds, without and with augmentation (shifts 0.1 and zoom 0.1 only: the texts' rotation and
flips do not suit digits). Writes benchmarks/cifar_convnet.json. Run: `python benchmarks/cifar_convnet.py`
(about 6 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EPOCHS, SEEDS = 40, (0, 1, 2)


def main() -> int:
    from transfer.data.augment import Augment
    from transfer.data.samples import write_digits_folder
    from transfer.serving.predict import machine_name
    from transfer.training import FinetuneConfig, finetune

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits_folder(Path(tmp) / "digits", size=32)
        for augment in (False, True):
            for seed in SEEDS:
                config = FinetuneConfig(backbone="cifar_convnet", epochs_head=EPOCHS, epochs_finetune=0,
                                        head_optimizer="rmsprop", lr_head=1e-4, batch_size=32, augment=augment,
                                        seed=seed, workers=2, patience=EPOCHS,
                                        augmentation=Augment(rotation=0, shift=0.1, zoom=0.1, hflip=False,
                                                             color_jitter=0).to_dict())
                started = time.perf_counter()
                result = finetune(data, config, output=Path(tmp) / f"run_{augment}_{seed}", device="cpu",
                                  log=lambda _: None)
                rows.append({"augment": augment, "seed": seed, "val_acc": round(result.best_val_acc, 4),
                             "seconds": round(time.perf_counter() - started, 1)})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for augment in (False, True):
        accs = [r["val_acc"] for r in rows if r["augment"] == augment]
        summary["with augmentation" if augment else "without augmentation"] = {
            "mean": round(statistics.mean(accs), 4), "stdev": round(statistics.stdev(accs), 4)}
    record = {"machine": f"{machine_name()}, CPU only", "date": time.strftime("%Y-%m-%d"),
              "data": "1,797 scikit-learn digits at 32 px, 1,438 train / 359 val",
              "recipe": f"cifar_convnet from scratch, RMSprop lr 1e-4, batch 32, {EPOCHS} epochs, best val loss epoch",
              "runs": rows, "summary": summary}
    (ROOT / "benchmarks" / "cifar_convnet.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
