"""The benchmark suite: `python benchmarks/run.py --suite cpu` writes benchmarks/RESULTS.md and results_cpu.json.

Every comparison runs its sides interleaved in one process after a warm-up (rounds of: onnxruntime fp32, onnxruntime
int8, PyTorch eager NCHW, PyTorch eager channels_last), so a noisy neighbour hits all sides alike. PyTorch's row is
the better of NCHW and channels_last. Backbones without offline weights run with random weights: speed does not
depend on them (int8 speed neither; its answers are judged elsewhere).

`python benchmarks/run.py --suite gpu --out DIR` is the GPU suite (benchmarks/gpu_suite.py; on a lent card through
benchmarks/gpu/run.sh, `--rehearse` on CPU). Its results_gpu.json, copied into benchmarks/, adds the GPU section.

Also in the file: `predict` end to end on large JPEGs vs decode-only vs model-only (benchmarks/decode.py), stage 1
on cached features vs the frozen forward (benchmarks/stage1_cache.py) and training throughput against a minimal
PyTorch loop (benchmarks/train_speed.py), each rerun here; the timm zoo (benchmarks/zoo.py, an hour) is read from
its zoo.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
MODELS = ("resnet50", "vgg16", "inception_v3", "efficientnet_lite0")


def machine() -> dict:
    """CPU model, cores, the instruction-set flags that decide int8 kernels, library versions."""
    import onnxruntime
    import psutil
    import timm
    import torch

    from transfer.serving.predict import machine_name

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")
    return {"cpu": machine_name(), "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(), "flags": {flag: flag in flags for flag in wanted},
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "date": time.strftime("%Y-%m-%d")}


def calibration_images(count: int = 16) -> list:
    from PIL import Image
    from skimage import data

    names = ("chelsea", "coffee", "astronaut", "rocket")
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        photo = getattr(data, names[index % len(names)])()
        height, width = photo.shape[:2]
        top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
        images.append(Image.fromarray(photo[top:, left:]).convert("RGB"))
    return images


def quantize(fp32: Path, int8: Path, prep) -> None:
    """Static QDQ int8 exactly as `transfer export --int8` makes it on this CPU (exporters.int8)."""
    from exporters.int8 import quantize_int8
    from transfer.core.images import open_image
    from transfer.core.preprocess import eval_array

    paths = []
    for index, image in enumerate(calibration_images()):
        paths.append(fp32.with_name(f"calibration_{index}.png"))
        image.save(paths[-1])
    quantize_int8(fp32, int8, paths, [], lambda chunk: np.stack([eval_array(open_image(p), prep) for p in chunk]),
                  judge_logits=False)


def interleaved(engines: dict, batch_size: int, size: int, seconds: float, rounds: int = 3) -> dict:
    """images/s per engine from the median latency of runs interleaved over `rounds` rounds, after a warm-up."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    for run in engines.values():
        run(x)
        run(x)
    for _ in range(rounds):
        for name, run in engines.items():
            started = time.perf_counter()
            while True:
                tick = time.perf_counter()
                run(x)
                latencies[name].append(time.perf_counter() - tick)
                if time.perf_counter() - started >= seconds / rounds and len(latencies[name]) >= 2:
                    break
    return {name: {"images_per_s": round(batch_size / float(np.median(values)), 2),
                   "p50_ms": round(float(np.median(values)) * 1e3, 1), "runs": len(values)}
            for name, values in latencies.items()}


def model_rows(name: str, batches: tuple[int, ...], seconds: float, work: Path) -> list[dict]:
    import onnxruntime as ort
    import torch

    from exporters.export import export_onnx
    from models.availability import weights_status
    from models.registry import get_backbone
    from models.weights import create_backbone

    spec = get_backbone(name)
    pretrained = weights_status(spec).available
    fp32 = work / f"{name}.onnx"
    export_onnx(fp32, backbone=name, pretrained=pretrained)
    int8 = work / f"{name}.int8.onnx"
    quantize(fp32, int8, spec.preprocessing)
    network, _ = create_backbone(spec, pretrained=pretrained)
    network.eval()
    channels_last = create_backbone(spec, pretrained=False)[0].eval().to(memory_format=torch.channels_last)
    channels_last.load_state_dict(network.state_dict())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {kind: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for kind, path in (("fp32", fp32), ("int8", int8))}

    def torch_run(model, layout):
        def run(x):
            with torch.inference_mode():
                tensor = torch.from_numpy(x)
                model(tensor.to(memory_format=layout) if layout is torch.channels_last else tensor)
        return run

    engines = {"onnxruntime fp32": lambda x: sessions["fp32"].run(None, {"input": x}),
               "onnxruntime int8": lambda x: sessions["int8"].run(None, {"input": x}),
               "pytorch NCHW": torch_run(network, torch.contiguous_format),
               "pytorch channels_last": torch_run(channels_last, torch.channels_last)}
    rows = []
    for batch in batches:
        result = interleaved(engines, batch, spec.input_size, seconds)
        best_torch = max(("pytorch NCHW", "pytorch channels_last"), key=lambda k: result[k]["images_per_s"])
        row = {"model": name, "batch": batch, "weights": "pretrained" if pretrained else "random",
               **{engine: value["images_per_s"] for engine, value in result.items()},
               "pytorch best": best_torch.removeprefix("pytorch "),
               "ort fp32 / pytorch": round(result["onnxruntime fp32"]["images_per_s"]
                                           / result[best_torch]["images_per_s"], 2),
               "int8 / fp32": round(result["onnxruntime int8"]["images_per_s"]
                                    / result["onnxruntime fp32"]["images_per_s"], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def rerun(script: str) -> dict:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return json.loads((ROOT / "benchmarks" / script.replace(".py", ".json")).read_text())


def markdown(record: dict) -> str:
    info = record["machine"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["flags"].items())
    lines = ["# Benchmark results", "",
             f"CPU suite, {info['date']}: {info['cpu']} ({info['physical_cores']} physical / {info['logical_cores']} "
             f"logical cores; {flags}). torch {info['torch']}, onnxruntime {info['onnxruntime']}, timm "
             f"{info['timm']}. Rerun: `python benchmarks/run.py --suite cpu`.", "",
             "## Inference, images/s (fp32 unless marked; interleaved, median latency)", "",
             "| model | batch | onnxruntime fp32 | onnxruntime int8 | PyTorch NCHW | PyTorch channels_last | "
             "ort fp32 / best PyTorch | int8 / fp32 |", "|---|---|---|---|---|---|---|---|"]
    for row in record["models"]:
        lines.append(f"| {row['model']} ({row['weights']} weights) | {row['batch']} | {row['onnxruntime fp32']} | "
                     f"{row['onnxruntime int8']} | {row['pytorch NCHW']} | {row['pytorch channels_last']} | "
                     f"{row['ort fp32 / pytorch']}x | {row['int8 / fp32']}x |")
    lines += ["", f"int8 in this table is speed: static QDQ as `transfer export --int8` made it on {info['date']} "
              "(onnxruntime's quantizer then; NNCF's file runs at the same speed, see below), calibrated on 12 photo "
              "crops; random weights where none ship.", "", *int8_lines(), *decode_lines(),
              "", "## Issue 12's targets on this machine", "",
              *targets(record), "", "## Stage 1: cached features vs the frozen forward", "",
              f"{record['stage1']['data']}: {record['stage1']['plain_seconds_per_epoch']} s per frozen-forward epoch "
              f"vs {record['stage1']['cached_seconds_per_later_epoch']} s per cached epoch "
              f"({record['stage1']['speedup_per_later_epoch']}x; over 3 epochs including the one feature pass "
              f"{record['stage1']['speedup_over_3_epochs']}x).", "", *train_lines(), *scaling_lines(), *serve_lines(),
              *search_lines(), *batch_lines(), *busy_lines(), *explain_lines(), *tune_lines(),
              *gpu_lines(), *zoo_lines()]
    return "\n".join(lines)


def saved_result(name: str) -> dict | None:
    """benchmarks/NAME as written by its script, or None when it has not been run (or copied in) yet."""
    path = ROOT / "benchmarks" / name
    return json.loads(path.read_text()) if path.exists() else None


def gpu_lines() -> list[str]:
    """The GPU section, from a lent card's benchmarks/results_gpu.json when one has been copied in."""
    record = saved_result("results_gpu.json")
    if record is None:
        return ["## GPU", "", "Not measured yet: needs a session with a lent card (`bash benchmarks/gpu/run.sh`, "
                "issue 13).", ""]
    import gpu_suite

    return gpu_suite.markdown(record)


def train_lines() -> list[str]:
    """`transfer finetune` against a minimal PyTorch loop, from benchmarks/train_speed.json
    (rerun: `python benchmarks/train_speed.py`)."""
    record = saved_result("train_speed.json")
    if record is None:
        return []
    def spread(values: list[float]) -> str:
        return f"{min(values):.0f}-{max(values):.0f}"

    rows = [f"| {side} | {rates['transfer']} ({spread(record['raw'][side]['transfer'])}) | {rates['hand loop']} "
            f"({spread(record['raw'][side]['hand loop'])}) | {record['ratio_transfer_to_hand'][side]}x |"
            for side, rates in record["images_per_s"].items()]
    return ["## Training throughput: transfer finetune vs a minimal PyTorch loop", "",
            f"{record['date']}, {record['machine']}: images/s of each epoch's training pass (median of epochs 2-3 of "
            f"{record['rounds']} interleaved rounds; `python benchmarks/train_speed.py`, its docstring has the setup). "
            f"The augmenting loader alone delivers {record['loading_alone_images_per_s']} images/s at 96 px, so the "
            "loader is not what limits these stages. Target: every stage >= 0.9x the minimal loop.", "",
            "| stage | transfer, median (range) | minimal loop, median (range) | ratio of medians |",
            "|---|---|---|---|", *rows, ""]


def zoo_lines() -> list[str]:
    """The timm zoo sweep, from benchmarks/zoo.json (rerun: `python benchmarks/zoo.py`, about an hour)."""
    record = saved_result("zoo.json")
    if record is None:
        return []
    import zoo

    return zoo.summary(record).splitlines() + [""]


def serve_lines() -> list[str]:
    """`transfer serve` under load, from benchmarks/serve_load.json (rerun: `python benchmarks/serve_load.py`)."""
    record = saved_result("serve_load.json")
    if record is None:
        return []
    rows = [f"| {name} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
            f"{r['server']['batches']} |" for name, r in record["results"].items()]
    return ["## transfer serve under load", "",
            f"{record['date']}, {record['machine']}: {record['model']}; 2,000 requests, 16 concurrent, client on the "
            f"same machine (`python benchmarks/serve_load.py`). Dynamic batching / batch 1: "
            f"{record['dynamic_vs_batch1_throughput']}x.", "",
            "| server | requests/s | p50 ms | p99 ms | errors | model runs |", "|---|---|---|---|---|---|", *rows, "",
            *([record["note"], ""] if record.get("note") else [])]


def search_lines() -> list[str]:
    """Search at scale, from benchmarks/search.json (rerun: `python benchmarks/search.py`)."""
    record = saved_result("search.json")
    if record is None:
        return []
    rows = []
    for r in record["rows"]:
        ann, build, exact, hnsw = r["ann"], r["build"], r["exact"], r.get("faiss_hnsw")
        rows.append(f"| {r['n']:,} | {r['vectors_gb']} | exact | {exact['load_seconds']} | {exact['search_p50_ms']} / "
                    f"{exact['search_p95_ms']} | {exact['batched_ms_per_query']} | {exact['recall_at_10']} | | |")
        kind = "IVF-SQ8 + exact re-ranking" if "SQ8" in build["ann"]["kind"] else "IVF-Flat"
        rows.append(f"| {r['n']:,} | {r['vectors_gb']} | {kind}, nlist {build['ann']['nlist']}, nprobe "
                    f"{build['ann']['nprobe']} | {ann['load_seconds']} | {ann['search_p50_ms']} / "
                    f"{ann['search_p95_ms']} | {ann['batched_ms_per_query']} | {ann['recall_at_10']} | "
                    f"{build['seconds']} s, {build['peak_rss_gb']} GB | {r['serve_startup_seconds']} s"
                    + (f" (ANN in memory after {r['ann_in_memory_after_seconds']} s)" if "ann_in_memory_after_seconds"
                       in r else "") + "; /similar "
                    f"{r['similar_http_p50_ms']} / {r['similar_http_p95_ms']} ms; similar "
                    f"{r['similar_one_query_seconds']} s" + (f"; /similar/ROW {r['similar_row_http_p50_ms']} / "
                                                                 f"{r['similar_row_http_p95_ms']} ms"
                                                                 if "similar_row_http_p50_ms" in r else "") + " |")
        if hnsw:
            rows.append(f"| {r['n']:,} | {r['vectors_gb']} | FAISS HNSW M=32, efSearch {hnsw['efSearch']} "
                        f"(reference) | | {hnsw['search_p50_ms']} / - | | {hnsw['recall_at_10']} | "
                        f"{hnsw['build_seconds']} s, {hnsw['peak_rss_gb']} GB | |")
        usearch, milvus = r.get("usearch_hnsw"), r.get("milvus_lite")
        if usearch:
            rows.append(f"| {r['n']:,} | {r['vectors_gb']} | usearch {usearch['usearch']} HNSW, connectivity 16, "
                        f"expansion {usearch['expansion_search']} (reference) | | {usearch['search_p50_ms']} / - | | "
                        f"{usearch['recall_at_10']} | {usearch['build_seconds']} s, {usearch['peak_rss_gb']} GB | |")
        if milvus:
            rows.append(f"| {r['n']:,} | {r['vectors_gb']} | milvus-lite (`index --milvus`), through `SearchIndex` "
                        f"| {milvus['load_seconds']} | {milvus['search_p50_ms']} / - | | {milvus['recall_at_10']} | "
                        f"push {milvus['push_seconds']} s, {milvus['push_peak_rss_gb']} GB | |")
    return ["## Search at scale", "",
            f"{record['date']}, {record['machine']}: {record['dim']}-dimensional unit vectors, {record['vectors']} "
            "(Gaussian noise scaled per dimension; `python benchmarks/search.py`). Load: `SearchIndex.load` in a fresh "
            "process (index.json, the float32 check of every vector, the memory-mapped ANN file). Search: one vector, "
            "p50 / p95 ms of 200; batched: 500 queries at once, ms per query. Recall@10 against exact search on 500 "
            "held-out vectors. Build: the ANN file from the stored vectors (k-means, filling, choosing nprobe), peak "
            "RSS with memory-mapped pages. Serve: `transfer serve --index` start-up to its first /health, and "
            "`/similar` with a photo (decode, embed with efficientnet_lite0 at 224, search) and `/similar/ROW` (an "
            "indexed image's neighbours: the search alone) p50 / p95 of 50 (after 5 to warm up) on one kept-alive "
            "connection, once the server has read its ANN file into memory (it serves from the mapped file meanwhile); "
            "similar: `transfer similar` with one photo, wall time with loading the model. Up to 100k, usearch and "
            "FAISS HNSW on the same vectors as reference points, and the index pushed into milvus-lite (pure Python, "
            "brute force: a stand-in for a Milvus server, measured for the push's cost and to show the path works).",
            "",
            "| N | vectors GB | search | load s | search ms p50 / p95 | batched ms/query | recall@10 | build "
            "| serve, similar |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def batch_lines() -> list[str]:
    """Batch work at scale, from benchmarks/batch.json (rerun: `python benchmarks/batch.py`)."""
    record = saved_result("batch.json")
    if record is None:
        return []
    rows = [f"| {r['n']:,} | {r['seconds']} | {r['images_per_s']} | {r['peak_rss_mb']} | {r['first_row_seconds']} | "
            + (f"killed at {r['killed']['killed_at_rows']:,} rows; resumed in {r['resumed']['seconds']} s "
               f"({100 * r['resume_fraction_of_full']:.0f}% of the full run), identical: {r['resumed_identical']}"
               if "resumed" in r else "") + " |" for r in record["rows"]]
    first, started = record.get("first_row_of_a_large_folder"), saved_result("first_batch.json")
    tail = [] if first is None else [
        f"A folder of {first['n']:,} images: `predict`'s first row was in preds.csv {first['first_row_seconds']} s "
        "after launch (it lists the folder and decodes as it goes)."
        + ("" if started is None else
           f" {started['date']}, {started['machine']}, {started['files']:,} files (`python benchmarks/first_batch.py`):"
           f" `extract`'s first batch was on disk {started['extract_first_batch_seconds']} s after launch and "
           f"`index`'s {started['index_first_batch_seconds']} s"
           + (f", and `finetune`'s first training step (efficientnet_lite0, the files in two class folders) ended "
              f"{started['finetune_first_batch_seconds']} s after launch" if "finetune_first_batch_seconds" in started
              else "")
           + f"; their scans read headers only ({started['scan_headers_seconds']} s for the whole folder; on 10,000 of "
           f"its files {started['scan_10k_headers_seconds']} s against {started['scan_10k_full_decode_seconds']} s for "
           "the full decode they did before)."), ""]
    return ["## Batch at scale: predict", "",
            f"{record['date']}, {record['machine']}: `transfer predict DIR --onnx FILE -o preds.csv -q` in a fresh "
            f"process, {record['model']}, images 64-256 px JPEGs and PNGs (photo crops); `python benchmarks/batch.py`. "
            "Peak RSS sampled every 50 ms; first row: launch to the first data row in the file.", "",
            "| images | wall s | images/s | peak RSS MB | first row s | killed and resumed |",
            "|---|---|---|---|---|---|", *rows, "", *tail]


def busy_lines() -> list[str]:
    """A busy machine, from benchmarks/busy.json (rerun: `python benchmarks/busy.py`)."""
    record = saved_result("busy.json")
    if record is None:
        return []
    return ["## A busy machine", "",
            f"{record['date']}, {record['machine']} ({record['usable_cpus']} usable): idle, and with two other "
            "processes each spinning a core (`python benchmarks/busy.py`; its docstring has the setup).", "",
            "| work | idle | busy | busy / idle |", "|---|---|---|---|",
            f"| stage 1 on cached features, s per epoch | {record['stage1_epoch_seconds_idle']} | "
            f"{record['stage1_epoch_seconds_busy']} | {record['stage1_busy_over_idle']}x |",
            f"| the tour's finetune, s | {record['tour_finetune_seconds_idle']} | "
            f"{record['tour_finetune_seconds_busy']} | {record['tour_busy_over_idle']}x |", "",
            "The same day with OpenMP's default wait policy (threads spin between parallel regions): 8.8x and 3.15x; "
            "with one thread (`OMP_NUM_THREADS=1`): 2.08x and 1.4x, but stage 1 idle 1.5x slower.", ""]


def explain_lines() -> list[str]:
    """The pointing game, from benchmarks/explain.json (rerun: `python benchmarks/explain.py`)."""
    record = saved_result("explain.json")
    if record is None:
        return []
    rows = []
    for canvas, row in record["by_canvas"].items():
        for model, label in (("trained_run", f"run trained on composites, {row['run_input_size']} px"),
                             ("imagenet_classifier", "ImageNet classifier, 224 px")):
            scores = row[model]
            accuracy = f", accuracy {scores['accuracy']}" if "accuracy" in scores else ""
            rows.append(f"| {canvas} | {label}{accuracy} | {scores['explain_gradcam_hits']} | "
                        f"{scores['onnx_cam_hits']} | {row['chance']} ({row['chance_in_view']} of the view) | "
                        f"{scores['explain_seconds_per_image']} / {scores['onnx_cam_seconds_per_image']} |")
    first = next(iter(record["by_canvas"].values()))
    return ["## Seeing inside the model: the pointing game", "",
            f"{record['date']}, {record['machine']}: {first['held_out']} held-out composites per canvas (a real "
            f"photo of one object, long side {record['object_long_side'][0]}-{record['object_long_side'][1]} px, "
            f"pasted at random on a {record['canvas']} px canvas; `python benchmarks/explain.py`, its docstring has "
            f"the setup), {record['model']}. A hit: the predicted class's heatmap peak lies inside the pasted box.",
            "", "| canvas | model | explain (Grad-CAM) hits | ONNX CAM hits | chance | s per image (explain / ONNX) |",
            "|---|---|---|---|---|---|", *rows, "",
            "With a linear head Grad-CAM and CAM put the peak on the same pixel for every composite (their maps "
            "differ only by a positive scale). The ImageNet classifier often names something else for these crops "
            "(a rocket becomes a candle), and points where that class's evidence is.", ""]


def tune_lines() -> list[str]:
    """`transfer tune` against the defaults, from benchmarks/tune.json (rerun: `python benchmarks/tune.py`)."""
    record = saved_result("tune.json")
    if record is None:
        return []
    defaults, tuned = record["defaults"], record["tune"]
    trials = ", ".join(f"{count} {state}" for state, count in sorted(tuned["trials"].items()))
    return ["## transfer tune against the defaults", "",
            f"{record['date']}, {record['machine']}: {record['setup']} (`python benchmarks/tune.py`). Test accuracy "
            "on the held-out test images, which neither saw.", "",
            "| recipe | test accuracy | wall time |", "|---|---|---|",
            f"| `finetune` defaults | {defaults['test_accuracy']} | {defaults['seconds']} s |",
            f"| `tune --budget {tuned['budget_minutes']:g}` ({trials}), best trial by validation loss | "
            f"{tuned['test_accuracy']} | {tuned['seconds']} s for the study |", "",
            "The best recipe: " + ", ".join(f"{k} {v}" for k, v in tuned["recipe"].items() if k != "augmentation")
            + ".", ""]


def scaling_lines() -> list[str]:
    """1 vs 2 processes under torchrun, from benchmarks/scaling.json (rerun: `python benchmarks/scaling.py`)."""
    record = saved_result("scaling.json")
    if record is None:
        return []
    rows = [f"| {name} | {record['images_per_s'][name]} | {record['speedup_vs_1_process'][name]}x |"
            for name in record["images_per_s"]]
    return ["## extract on 1 vs 2 processes (torchrun, gloo)", "",
            f"{record['date']}, {record['machine']}: {record['images']} JPEGs, {record['model']}, wall time with "
            "start-up (`python benchmarks/scaling.py`). Output of 2 processes byte-identical to 1 process at one "
            f"thread each: {record['two_process_output_identical_to_one_process']}.", "",
            "| configuration | images/s | vs 1 process, all cores |", "|---|---|---|", *rows, ""]


def int8_lines() -> list[str]:
    """The int8 methods on held-out images (benchmarks/int8.json) and issue 27's int8 targets."""
    record = saved_result("int8.json")
    if record is None:
        return []
    rows = record["rows"]

    def cell(value, suffix: str = "") -> str:
        return "-" if value is None else f"{value}{suffix}"

    lines = [f"## int8 methods on held-out images ({record['date']}, {record['machine']['cpu']}, "
             "`python benchmarks/int8.py`)", "",
             f"This CPU's kernel plan: {record['machine']['plan']}. \"VNNI plan, exact arithmetic\": the answers a "
             "VNNI CPU computes with 8-bit weights (the graph run unfused here, so nothing saturates; no speed). "
             "Confident: the judged images whose fp32 top-1 probability is >= 0.5. Accuracy: on the run's own "
             "validation images, none used for calibration.", "",
             "| model | method | plan | top-1 agreement | on confident images | logit cosine | accuracy fp32 -> int8 "
             "(loss, points) | speed vs fp32 | judged on |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        accuracy = ("-" if row["fp32_accuracy"] is None else f"{row['fp32_accuracy']} -> {row['int8_accuracy']} "
                    f"({row['accuracy_loss_points']})")
        confident = ("-" if row["confident_agreement"] is None else
                     f"{row['confident_agreement']} ({row['confident_images']})")
        lines.append(f"| {row['model']} | {row['method'].split(':')[0]} | {row['plan']} | "
                     f"{cell(row['top1_agreement'])} | {confident} | {cell(row['logit_cosine'])} | {accuracy} | "
                     f"{cell(row['speedup_vs_fp32'], 'x')} | {row['judged_on']} |")
    chosen = next(row for row in rows if row["method"].startswith("nncf") and row["plan"] == "this CPU's plan")
    lines += ["", f"Chosen default: {chosen['method'].split(': ', 1)[1]}. `--int8-method onnxruntime` keeps the "
              "previous quantizer. AIMET (aimet-onnx, about 330 MB with its plotting stack, not a dependency) is "
              "measured with cross-layer equalisation and min-max at its defaults; its QDQ export takes only "
              "standard 8-bit types, so it has no 7-bit plan for this CPU, and its file did not fuse into "
              "onnxruntime's int8 kernels. AdaRound and quantization-aware fine-tuning were not needed for the run "
              "target and were not tried.", "", "Issue 27's int8 targets on this machine:", ""]
    by = {(row["model"].split(" (")[0], row["method"].split(":")[0], row["plan"]): row for row in rows}
    run = by[("efficientnet_lite0 digits run", "nncf", "this CPU's plan")]
    met = run["accuracy_loss_points"] <= 0.5 and run["speedup_vs_fp32"] >= 1.3
    lines.append(f"- fine-tuned lite0 run loses <= 0.5 points at >= 1.3x: {'met' if met else 'not met'} "
                 f"({run['fp32_accuracy']} -> {run['int8_accuracy']}, loss {run['accuracy_loss_points']} points, "
                 f"{run['speedup_vs_fp32']}x)")
    imagenet = by[("efficientnet_lite0 ImageNet", "nncf", "this CPU's plan")]
    vnni = by[("efficientnet_lite0 ImageNet", "nncf", "VNNI plan, exact arithmetic")]
    lines.append(f"- lite0 ImageNet >= 0.98 agreement on confident images: "
                 f"{'met' if imagenet['confident_agreement'] >= 0.98 else 'not met'} ({imagenet['confident_agreement']}"
                 f" on {imagenet['confident_images']}); logit cosine >= 0.99 overall: "
                 f"{'met' if imagenet['logit_cosine'] >= 0.99 else 'not met'} ({imagenet['logit_cosine']}; with a "
                 f"VNNI CPU's 8-bit weights {vnni['logit_cosine']}); >= 1.2x: "
                 f"{'met' if imagenet['speedup_vs_fp32'] >= 1.2 else 'not met'} ({imagenet['speedup_vs_fp32']}x)")
    timing = record.get("resnet50_speed")
    if timing:
        ratio = timing["nncf"]["speedup"]
        lines.append(f"- resnet50 keeps >= 1.9x: {'met' if ratio >= 1.9 else 'not met'} ({ratio}x at batch 16: "
                     f"{timing['nncf']['int8_images_per_s']} vs {timing['nncf']['fp32_images_per_s']} images/s, "
                     f"{timing['seconds']} s per file interleaved; onnxruntime's quantizer "
                     f"{timing['onnxruntime']['speedup']}x)")
    return lines + [""]


def decode_lines() -> list[str]:
    """Large-JPEG decoding: speed, and the draft floor's agreement with the full decode (benchmarks/decode.json)."""
    decode = saved_result("decode.json")
    if decode is None:
        return []
    rates = decode["images_per_s"]
    floors = {k: v for k, v in decode["by_draft_factor"].items() if k not in ("exact", "noise")}
    noise = decode["by_draft_factor"].get("noise")
    exact_rate = decode["by_draft_factor"].get("exact", {}).get("decode_images_per_s")
    chosen = str(decode["draft_factor"])
    return [f"## predict on large JPEGs ({decode['images']} x {decode['size'][0]}x{decode['size'][1]}, "
            f"{decode['model']}; {decode['date']})", "",
            "| path | images/s |", "|---|---|",
            f"| predict, full decode | {rates['predict_exact']} |",
            f"| predict, reduced-scale decode (default floor {chosen}x) | {rates['predict_reduced']} |",
            f"| decode + preprocess only, full / reduced | {rates['decode_exact']} / {rates['decode_reduced']} |",
            f"| model only | {rates['model_only']} |", "",
            f"Speed-up {decode['speedup_predict']}x; predict reaches {decode['predict_reduced_vs_model_only']} of "
            "the model alone (decoding and onnxruntime share the cores). The cost of the floor: a JPEG whose short "
            "side is under 2 x floor x resize (1,500 < 2 x 3 x 256 here) decodes at full size, so these photos gain "
            "nothing from the reduced scale: both predict rows decode them at full size and differ by run-to-run "
            "noise (at the 1x floor of 2026-11-26 predict was 2.08x faster on them).", "",
            f"### The draft floor ({decode.get('floor_images', '')}; top-1 against the full decode)", "",
            "| floor (x resize) | top-1 agreement | flips | highest fp32 top-1 probability among flips | "
            "decode + preprocess, images/s |", "|---|---|---|---|---|",
            *(f"| {k}{' (default)' if k == chosen else ''} | {v['top1_agreement']} | {v.get('flips', '-')} | "
              f"{max(v['flipped_top1_probabilities'], default='-')} | {v.get('decode_images_per_s', '-')} |"
              for k, v in floors.items()),
            f"| full decode | 1.0 | 0 | - | {exact_rate or '-'} |", "",
            f"The default is the fastest floor with top-1 agreement >= 0.99 ({chosen}x). Every flip at every floor "
            "is an image fp32 itself is unsure of; on the images it is confident about (top-1 >= 0.5) all floors "
            "agree on every one."
            + (f" For scale: an equally valid path, the {noise['what']}, agrees with the full decode on "
               f"{noise['top1_agreement']} of these photos." if noise else ""), ""]


def targets(record: dict) -> list[str]:
    """Issue 12's speed targets: met, or the measured gap."""
    rows = {(r["model"], r["batch"]): r for r in record["models"]}
    lines = []
    if ("resnet50", 16) in rows:
        ratio = rows[("resnet50", 16)]["int8 / fp32"]
        lines.append(f"- resnet50 int8 >= 2.5x fp32: {'met' if ratio >= 2.5 else 'not met'}, {ratio}x at batch 16 "
                     f"({rows[('resnet50', 16)]['onnxruntime int8']} vs {rows[('resnet50', 16)]['onnxruntime fp32']} "
                     "images/s; the 2.55x of 2026-11-25 was 31.1 vs 12.6. Not the exporter: TorchScript and dynamo "
                     "exports timed interleaved give fp32 17.5 vs 17.4 and int8 34.1 vs 34.1 images/s, 1.95x both; "
                     "today's host runs fp32 faster than that day's)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per engine and batch size")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite RESULTS.md from results_cpu.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="GPU suite: where results_gpu.json goes")
    parser.add_argument("--rehearse", action="store_true", help="GPU suite: run its code on CPU, small and short")
    parser.add_argument("--compile", nargs="*", default=["resnet50"], help="GPU suite: models to torch.compile")
    args = parser.parse_args()
    if args.markdown_only:
        record = json.loads((ROOT / "benchmarks" / "results_cpu.json").read_text())
        (ROOT / "benchmarks" / "RESULTS.md").write_text(markdown(record))
        return 0
    if args.suite == "gpu":
        import gpu_suite

        models = args.models
        if args.models == list(MODELS):  # the default: the four, then a ConvNeXt and a ViT (any timm name)
            models = list(gpu_suite.REHEARSAL_MODELS if args.rehearse else gpu_suite.GPU_MODELS)
        record = gpu_suite.run_suite(args.out, args.rehearse, models, set(args.compile),
                                     0.2 if args.rehearse else min(args.seconds, 1.0))
        print("\n".join(gpu_suite.markdown(record)))
        return 0
    record = {"machine": machine(), "models": []}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            record["models"] += model_rows(name, (1, 16), args.seconds, Path(work))
    record["decode"] = rerun("decode.py")
    record["stage1"] = rerun("stage1_cache.py")
    record["int8"] = rerun("int8.py")
    rerun("train_speed.py")  # its own JSON, read by train_lines
    (ROOT / "benchmarks" / "results_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (ROOT / "benchmarks" / "RESULTS.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
