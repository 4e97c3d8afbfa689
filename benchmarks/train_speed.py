"""Training throughput: `transfer finetune`'s stages against a minimal hand-written PyTorch loop on the same model,
data, batch size, augmentation and threads, and the data-loading rate alone.

    python benchmarks/train_speed.py              # writes benchmarks/train_speed.json, prints the table
    python benchmarks/train_speed.py --rounds 1   # quicker

Data: scikit-learn's real digits as 64 px PNG class folders (100 per class, 1,000 images, 800 of them train). Sides:
- stage 1, uncached: efficientnet_lite0 at 96 px (package weights), backbone frozen, the head trained with AdamW on
  augmented images (augmentation is what keeps stage 1 off the feature cache);
- stage 2: the top 2 unfreeze groups and the head, SGD momentum 0.9, augmented;
- scratch: the Keras cifar10_cnn (`cifar_convnet`) at 32 px, every layer, AdamW (finetune's default);
- loading alone: the augmenting loader iterated with no model.
`transfer` is timed through its progress hook around each training epoch (loader start, batches, optimizer steps;
not validation or checkpoints); the hand loop is a plain `for images, labels in loader:` forward / loss /
backward / step over a DataLoader built once, the same TransferModel, frozen modules in eval mode, the same optimizer.
Both use `min(4, cores)` decode workers and torch's default threads. Rounds interleave the two; the median of the
second and later epochs of every round is reported (the first epoch of a process pays one-off start-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = {  # name: (backbone, input size, head epochs, fine-tune epochs)
    "stage 1 (uncached)": ("efficientnet_lite0", 96, 3, 0),
    "stage 2": ("efficientnet_lite0", 96, 0, 3),
    "scratch": ("cifar_convnet", 32, 3, 0),
}


def transfer_epochs(data: Path, work: Path, side: str) -> list[float]:
    """Training-pass images/s of each epoch of `transfer finetune` on `side`, clocked through the progress hook:
    each training epoch is one progress task counted in batches, entered before the loader starts and left after
    the last optimizer step."""
    from contextlib import contextmanager

    from transfer.core.progress import Progress
    from transfer.training import FinetuneConfig, finetune

    backbone, size, head, tune = SIDES[side]
    seconds: list[float] = []

    class EpochClock(Progress):
        @contextmanager
        def task(self, description, total=None, unit="items", min_seconds=1.0):
            started = time.perf_counter()
            yield lambda _n=1: None
            if unit == "batches":
                seconds.append(time.perf_counter() - started)

    config = FinetuneConfig(backbone=backbone, input_size=size, epochs_head=head, epochs_finetune=tune,
                            unfreeze="2", batch_size=32, augment=True, cache_features=False, patience=99)
    result = finetune(data, config, output=work / f"run-{len(list(work.iterdir()))}", device="cpu",
                      log=lambda _: None, progress=EpochClock())
    train_count = len(json.loads((result.run_dir / "split.json").read_text())["train"])
    return [train_count / value for value in seconds]


def hand_epochs(data: Path, side: str, epochs: int = 3) -> list[float]:
    """The same work as a minimal PyTorch loop: images/s of each epoch's training pass."""
    from dataclasses import replace

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from models.registry import get_backbone
    from models.weights import create_backbone
    from transfer.data.augment import Augment
    from transfer.data.datasets import ImageDataset, default_workers, train_transform
    from transfer.data.scan import scan_folder
    from transfer.data.splits import train_val_samples
    from transfer.training.model import build_transfer_model, group_prefixes

    backbone_name, size, head_epochs, _ = SIDES[side]
    spec = get_backbone(backbone_name)
    prep = replace(spec.preprocessing, input_size=size)
    train, _ = train_val_samples(scan_folder(data), 0.2, 0)
    loader = DataLoader(ImageDataset(train, train_transform(prep, Augment())), batch_size=32, shuffle=True,
                        num_workers=default_workers())
    torch.manual_seed(0)
    backbone, _ = create_backbone(spec, None, None)
    model = build_transfer_model(spec, backbone, 10, size)
    if side == "scratch":
        trainable = [p for p in model.parameters()]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-4)
        model.train()
    else:
        prefixes = () if head_epochs else tuple(f"backbone.{p}" for p in group_prefixes(spec, "2"))
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(("head.", *prefixes)))
        model.eval()
        model.head.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = (torch.optim.AdamW(trainable, lr=1e-3, weight_decay=1e-4) if head_epochs
                     else torch.optim.SGD(trainable, lr=1e-4, momentum=0.9))
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(len(train) / (time.perf_counter() - started))
    return rates


def loading_rate(data: Path, size: int, epochs: int = 3) -> list[float]:
    """The augmenting loader alone: images/s of each pass."""
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from models.registry import get_backbone
    from transfer.data.augment import Augment
    from transfer.data.datasets import ImageDataset, default_workers, train_transform
    from transfer.data.scan import scan_folder
    from transfer.data.splits import train_val_samples

    prep = replace(get_backbone("efficientnet_lite0").preprocessing, input_size=size)
    train, _ = train_val_samples(scan_folder(data), 0.2, 0)
    loader = DataLoader(ImageDataset(train, train_transform(prep, Augment())), batch_size=32, shuffle=True,
                        num_workers=default_workers())
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        for _batch in loader:
            pass
        rates.append(len(train) / (time.perf_counter() - started))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "train_speed.json")
    args = parser.parse_args()
    from transfer.data.samples import write_digits_folder
    from transfer.serving.predict import machine_name

    rows = {side: {"transfer": [], "hand loop": []} for side in SIDES}
    loading: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        data = write_digits_folder(Path(scratch) / "digits", per_class=100, size=64)
        work = Path(scratch) / "runs"
        work.mkdir()
        for _ in range(args.rounds):
            for side in SIDES:
                rows[side]["transfer"] += transfer_epochs(data, work, side)[1:]
                rows[side]["hand loop"] += hand_epochs(data, side)[1:]
            loading += loading_rate(data, 96)[1:]
    table = {side: {who: round(statistics.median(rates), 1) for who, rates in sides.items()}
             for side, sides in rows.items()}
    record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
              "images_per_s": table, "loading_alone_images_per_s": round(statistics.median(loading), 1),
              "ratio_transfer_to_hand": {side: round(t["transfer"] / t["hand loop"], 3) for side, t in table.items()},
              "raw": rows}
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    for side, t in table.items():
        print(f"{side}: transfer {t['transfer']} images/s, hand loop {t['hand loop']} "
              f"({record['ratio_transfer_to_hand'][side]:.2f}x)")
    print(f"loading alone (96 px, augmented): {record['loading_alone_images_per_s']} images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
