"""The zoo sweep: a seeded sample of timm architectures, each through every step a user takes.

    python benchmarks/zoo.py                   # 100 architectures up to 30M parameters (about an hour on 2 cores)
    python benchmarks/zoo.py --count 5         # a smoke run
    python benchmarks/zoo.py --rerun NAME ...  # sweep some again after a fix (the first records are kept)
    python benchmarks/zoo.py --summary-only    # rewrite the RESULTS.md section from zoo.json

The draw: timm.list_models(), grouped into families by the name before its first digit or underscore, sizes read on
the meta device (nothing downloaded); families are taken round-robin in a seeded order, a seeded pick from each, up
to --count models under --max-params. Each model runs: build, layers, finetune 1+1 epochs on a tiny folder, extract
at its default layer, export + verification, onnxruntime vs PyTorch images/s at batch 1. Offline, every model starts
from random weights saved as a file (`--weights`), BatchNorm statistics set from the folder's images. A step that
fails is recorded with its one-line reason (the later steps of that model are skipped); nothing ends in a traceback.
Writes benchmarks/zoo.json and the "zoo" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STEPS = ("build", "layers", "finetune", "extract", "export", "bench")


def family(name: str) -> str:
    return re.split(r"[\d_]", name, maxsplit=1)[0] or name


def draw(count: int, max_params: float, seed: int) -> list[tuple[str, int]]:
    """A seeded sample across families: (name, parameters), sizes from the meta device."""
    import timm
    import torch

    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        families.setdefault(family(name), []).append(name)
    rng = random.Random(seed)
    order = sorted(families)
    rng.shuffle(order)
    for members in families.values():
        rng.shuffle(members)
    picked: list[tuple[str, int]] = []
    while len(picked) < count and any(families.values()):
        for fam in order:
            while families[fam] and len(picked) < count:
                name = families[fam].pop()
                try:
                    with torch.device("meta"):
                        params = sum(p.numel() for p in timm.create_model(name).parameters())
                except Exception:  # a model timm cannot build without options: not drawn
                    continue
                if params <= max_params:
                    picked.append((name, params))
                    break
    return picked


def tiny_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / label).mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 120, (72, 72, 3), dtype=np.uint8)
            pixels[..., channel] = 230
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


def sweep_one(name: str, folder: Path, work: Path, seed: int) -> dict:
    """Every step for one architecture; the first failure ends it with its reason. `seed` fixes the random weights,
    so a rerun sees the same numbers."""
    import torch

    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel
    from models.layers import check_input_size, min_input_size
    from models.registry import get_backbone
    from models.weights import build_architecture
    from transfer.apps.bench import torch_benchmark
    from transfer.apps.catalog import layer_summary
    from transfer.apps.extract import extract
    from transfer.core.errors import first_line
    from transfer.core.images import open_image
    from transfer.core.preprocess import eval_array
    from transfer.training import FinetuneConfig, finetune, load_run
    from transfer.training.checkpoints import save_weights

    record: dict = {"name": name, "family": family(name), "steps": {}}

    def step(label: str, action):
        started = time.perf_counter()
        try:
            value = action()
        except Exception as exc:  # recorded, never raised: one line per failure
            record["steps"][label] = {"ok": False, "error": f"{type(exc).__name__}: {first_line(exc)[:300]}",
                                      "where": traceback.extract_tb(exc.__traceback__)[-1].filename.split("/")[-1]}
            return None
        record["steps"][label] = {"ok": True, "seconds": round(time.perf_counter() - started, 2)}
        return value

    def choose_size(spec) -> int:
        """64 pixels where the model runs at them (cheap), else its smallest, else its own size."""
        for side in (max(64, min_input_size(name)), spec.input_size):
            try:
                return check_input_size(name, side)
            except Exception:  # a size the model refuses: try its own
                continue
        return spec.input_size

    def build() -> tuple:
        """The spec, the input side the sweep uses, and seeded random weights saved as a file."""
        spec = get_backbone(name)
        size = spec.input_size if spec.fixed_input_size else choose_size(spec)
        torch.manual_seed(seed)
        model = build_architecture(spec)
        for module in model.modules():  # BatchNorm statistics from the folder's images (a cumulative average)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None
        prep = replace(spec.preprocessing, input_size=size)
        images = np.stack([eval_array(open_image(p), prep) for p in sorted(folder.rglob("*.png"))])
        with torch.no_grad():
            model.train()(torch.from_numpy(images))
        path = work / "weights.safetensors"
        save_weights(model.eval(), path)
        return spec, size, path

    built = step("build", build)
    if built is None:
        return record
    spec, size, weights = built
    record.update(input_size=size, params=spec.params)
    if step("layers", lambda: layer_summary(name, size)) is None:
        return record
    config = FinetuneConfig(backbone=name, epochs_head=1, epochs_finetune=1, unfreeze="1", input_size=size,
                            weights=str(weights), workers=0, batch_size=4, augment=False, val_split=0.34)
    if step("finetune", lambda: finetune(folder, config, output=work / "run", device="cpu",
                                         log=lambda _: None)) is None:
        return record
    if step("extract", lambda: extract(folder, backbone=name, weights=str(weights), layers=[spec.feature_layer],
                                       pool="avg", input_size=size, device="cpu", workers=0)) is None:
        return record
    exported = step("export", lambda: export_onnx(work / "model.onnx", run=work / "run"))
    if exported is None and "--opset 17" in record["steps"]["export"]["error"]:  # what the error tells a user to do
        first_error = record["steps"]["export"]["error"]
        exported = step("export", lambda: export_onnx(work / "model.onnx", run=work / "run", opset=17))
        if exported is not None:
            record["steps"]["export"]["note"] = f"--opset 17 (TorchScript); dynamo failed: {first_error[:200]}"
    if exported is None:
        return record
    record["max_rel_diff"] = max(exported.max_rel_diff.values())

    def bench() -> dict:
        onnx_row = OnnxModel(work / "model.onnx", device="cpu").benchmark(1, 1.0)
        model, _ = load_run(work / "run")
        torch_row = torch_benchmark(model, size, 1, "cpu", seconds=1.0)
        return {"onnxruntime": onnx_row["images_per_s"], "pytorch": torch_row["images_per_s"]}

    speeds = step("bench", bench)
    if speeds is not None:
        record["images_per_s"] = speeds
    return record


def summary(document: dict) -> str:
    """The "zoo" section of RESULTS.md: the draw, pass rate per step and per family, every failure with its reason,
    the export margins and onnxruntime's speed against PyTorch."""
    records, first_pass = document["models"], document.get("first_pass", {})
    lines = ["## zoo", "", f"{len(records)} timm architectures drawn by `benchmarks/zoo.py` "
             f"(seed {document.get('seed')}, up to {document.get('max_params', 0) / 1e6:.0f}M parameters, "
             "families round-robin), on "
             f"{document.get('machine')}. Offline, so random weights (seeded, BatchNorm statistics from the folder's "
             "images) saved as a `--weights` file; each model through every step: build, layers, finetune 1+1 epochs "
             "on 12 images, extract at its default layer, export + verification (fp32 tolerance 1e-4 relative), "
             "onnxruntime vs PyTorch images/s at batch 1.", "", "| step | passed |", "|---|---|"]
    if first_pass:
        lines[2] += (f" {len(first_pass)} failed a step in a first pass and were swept again after the fixes "
                     f"they led to ({', '.join(sorted(first_pass))}); zoo.json keeps both records.")
    for label in STEPS:
        done = sum(1 for r in records if r["steps"].get(label, {}).get("ok"))
        lines.append(f"| {label} | {done}/{len(records)} |")
    passed = [r for r in records if all(r["steps"].get(s, {}).get("ok") for s in STEPS)]
    families: dict[str, list[bool]] = {}
    for r in records:
        families.setdefault(r["family"], []).append(r in passed)
    failing = sorted(f"{name} {sum(flags)}/{len(flags)}" for name, flags in families.items() if not all(flags))
    lines += ["", f"Every step: {len(passed)}/{len(records)} ({100 * len(passed) / max(1, len(records)):.0f}%). "
              f"Families: {len(families)}, every model passed in {len(families) - len(failing)}"
              + (f"; not in {', '.join(failing)}." if failing else "."), ""]
    diffs = sorted(r["max_rel_diff"] for r in records if r.get("max_rel_diff") is not None)
    retried = sum(1 for r in records if "note" in r["steps"].get("export", {}))
    ratios = sorted(r["images_per_s"]["onnxruntime"] / r["images_per_s"]["pytorch"]
                    for r in records if r.get("images_per_s"))
    if diffs:
        lines.append(f"Export: worst onnxruntime-vs-PyTorch difference {diffs[-1]:.2g} (relative), median "
                     f"{diffs[len(diffs) // 2]:.2g}; {retried} exported with `--opset 17` (TorchScript) after the "
                     "dynamo exporter failed, as its error message says to.")
    if ratios:
        lines.append(f"Speed at batch 1: onnxruntime / PyTorch eager median {ratios[len(ratios) // 2]:.2f}x "
                     f"(from {ratios[0]:.2f}x to {ratios[-1]:.2f}x). Indicative only: one second per engine on random "
                     "weights, and part of a sweep may share the cores with other work; the speed claims are the CPU "
                     "suite's.")
    if document.get("note"):
        lines.append(f"Note: {document['note']}")
    lines += ["", "Failures:", ""]
    for r in records:
        for label, outcome in r["steps"].items():
            if not outcome["ok"]:
                lines.append(f"- {r['name']} ({r['family']}), {label}: {outcome['error']}")
    if not any(not o["ok"] for r in records for o in r["steps"].values()):
        lines.append("- none")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--max-params", type=float, default=30e6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(HERE / "zoo.json"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the Markdown file whose zoo section "
                        "is rewritten")
    parser.add_argument("--summary-only", action="store_true", help="rewrite the zoo section from --output, "
                        "sweeping nothing")
    parser.add_argument("--rerun", nargs="+", metavar="NAME",
                        help="sweep these again and replace their records in --output (after a fix)")
    args = parser.parse_args()
    from transfer.serving.predict import machine_name

    output = Path(args.output)
    if args.summary_only:
        print(write_section(json.loads(output.read_text()), Path(args.results)))
        return
    previous = json.loads(output.read_text()) if args.rerun and output.exists() else None
    picked = [(name, 0) for name in args.rerun] if args.rerun else draw(args.count, args.max_params, args.seed)
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = tiny_folder(Path(scratch) / "data")
        for index, (name, _) in enumerate(picked):
            work = Path(scratch) / f"m{index}"
            work.mkdir()
            started = time.perf_counter()
            records.append(sweep_one(name, folder, work, args.seed))
            records[-1]["seconds"] = round(time.perf_counter() - started, 1)
            partial = output.with_suffix(".partial.json")  # what a crash or a kill leaves: every model done so far
            partial.write_text(json.dumps({"machine": machine_name(), "models": records}, indent=1))
            print(f"[{index + 1}/{len(picked)}] {name}: "
                  + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in records[-1]["steps"].items()),
                  flush=True)
    if previous is not None:  # the rerun records replace the first pass's, which stay listed as `first_pass`
        fresh = {r["name"]: {**r, "rerun": True} for r in records}
        first = {r["name"]: r for r in previous["models"] if r["name"] in fresh}
        records = [fresh.get(r["name"], r) for r in previous["models"]]
        previous["first_pass"] = {**previous.get("first_pass", {}), **first}
        previous["models"] = records
    document = previous or {"machine": machine_name(), "seed": args.seed, "count": args.count,
                            "max_params": args.max_params, "models": records}
    output.write_text(json.dumps(document, indent=1))
    output.with_suffix(".partial.json").unlink(missing_ok=True)
    print(write_section(document, Path(args.results)))


def write_section(document: dict, results: Path) -> str:
    """Rewrite the "## zoo" section of `results` (other sections kept in place) from a sweep's document."""
    text = summary(document)
    existing = results.read_text() if results.exists() else ""
    before, _, after = existing.partition("\n## zoo\n")
    rest = after[after.index("\n## ") + 1:] if "\n## " in after else ""  # the sections after the old zoo one
    results.write_text("\n\n".join(part.strip() for part in (before, text, rest) if part.strip()) + "\n")
    return text


if __name__ == "__main__":
    main()
