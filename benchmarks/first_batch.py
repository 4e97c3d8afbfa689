"""How soon `extract`, `index` and `finetune` start work on a 100,000-file folder, now that their scans read headers
only.

    python benchmarks/first_batch.py                  # 100,000 files (about 10 minutes, most of it writing them)
    python benchmarks/first_batch.py --files 20000

Images as in benchmarks/batch.py (crops of scikit-image's photos, 64-256 px, JPEG and PNG). Model: an
efficientnet_lite0 `avg_pool` extractor exported as `transfer export --layer avg_pool` writes it. Each command runs in a
fresh process (`-q`, batch 32); its first batch is done when its job record (`rank0.json` in the partial folder,
written after every batch) appears: the seconds from launch to then, after which the process is killed. `finetune`
(the same files hard-linked into two class folders; efficientnet_lite0, `--epochs-head 0 --epochs-finetune 1`, so
the first batch is a training step, not stage 1's feature cache) runs in a fresh process too, its first batch done
when the loop's `on_batch` hook fires after the first optimisation step. Also, in
this process: the scan itself, headers only (what `extract` and `index` do) and with a full decode of every file
(what they, and training, did before) on the first 10,000 files. Writes benchmarks/first_batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TRANSFER = str(Path(sys.executable).parent / "transfer")


def first_batch(command: list[str], record: Path, timeout: float = 600) -> float:
    """Seconds from launching `command` until `record` exists (its first batch is on disk); the process is then
    killed."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not record.exists():
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)}: exit {process.returncode}: {process.stderr.read()[-800:]}")
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"{' '.join(command)}: no batch within {timeout} s")
            time.sleep(0.05)
        return round(time.perf_counter() - started, 2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


FINETUNE_PROBE = """
import sys
from pathlib import Path
from transfer.training import FinetuneConfig, finetune

def first(description, done, total):
    Path(sys.argv[3]).write_text(description)
    raise SystemExit(0)

config = FinetuneConfig(backbone="efficientnet_lite0", epochs_head=0, epochs_finetune=1, batch_size=32)
finetune(sys.argv[1], config, output=sys.argv[2], device="cpu", log=lambda line: None, on_batch=first)
"""


def finetune_first_batch(classes: Path, work: Path) -> float:
    """Seconds from launching a finetune process on `classes` to its first training step done."""
    marker = work / "finetune_first_batch"
    return first_batch([sys.executable, "-c", FINETUNE_PROBE, str(classes), str(work / "run"), str(marker)], marker)


def scan_seconds(folder: Path, decode: bool) -> float:
    from transfer.data.scan import scan_folder

    started = time.perf_counter()
    report = scan_folder(folder, decode=decode)
    assert report.samples
    return round(time.perf_counter() - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()
    from batch import make_folder

    from exporters.export import export_onnx
    from transfer.serving.predict import machine_name

    with tempfile.TemporaryDirectory(dir=os.environ.get("BATCH_BENCH_DIR")) as name:
        work = Path(name)
        model = work / "lite0_avg_pool.onnx"
        export_onnx(model, backbone="efficientnet_lite0", layers=["avg_pool"])
        images = work / "images"
        made = make_folder(images, args.files)
        sample = work / "first10k"
        sample.mkdir()
        for path in sorted(images.iterdir())[:10_000]:
            os.link(path, sample / path.name)
        classes = work / "classes"
        for index, path in enumerate(sorted(images.iterdir())):
            folder = classes / ("even" if index % 2 == 0 else "odd")
            folder.mkdir(parents=True, exist_ok=True)
            os.link(path, folder / path.name)
        row = {"files": args.files, "made_seconds": made,
               "extract_first_batch_seconds": first_batch(
                   [TRANSFER, "extract", str(images), "--onnx", str(model), "-o", str(work / "f.npy"), "-q"],
                   work / ".f.npy.transfer-partial" / "rank0.json"),
               "index_first_batch_seconds": first_batch(
                   [TRANSFER, "index", str(images), "--onnx", str(model), "-o", str(work / "a.idx"), "-q"],
                   work / ".a.idx.embedding" / ".features.npy.transfer-partial" / "rank0.json"),
               "finetune_first_batch_seconds": finetune_first_batch(classes, work),
               "scan_headers_seconds": scan_seconds(images, decode=False),
               "scan_10k_headers_seconds": scan_seconds(sample, decode=False),
               "scan_10k_full_decode_seconds": scan_seconds(sample, decode=True)}
        shutil.rmtree(images)
        shutil.rmtree(classes)
        print(json.dumps(row), flush=True)
    record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"),
              "model": "efficientnet_lite0 avg_pool extractor (offline ImageNet weights), 224 px, fp32 ONNX", **row}
    (ROOT / "benchmarks" / "first_batch.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
