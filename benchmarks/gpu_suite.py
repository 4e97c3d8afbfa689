"""The GPU suite (issue 13): onnxruntime's CUDA provider against PyTorch on the same card, in the same run.

`python benchmarks/run.py --suite gpu --out DIR` (benchmarks/gpu/run.sh calls it on a lent card) writes
DIR/results_gpu.json row by row, so a run cut short still keeps what it measured. Per model (resnet50, vgg16,
inception_v3, efficientnet_lite0; random weights, since speed does not depend on them and the card has no
internet) and batch (1, 32, 256), all fp16, input already on the card unless said:

- onnxruntime, the fp16 file `transfer export --fp16` writes: CUDA provider at its default options with host
  arrays (`session.run`); our options (NHWC, exhaustive cuDNN search) through `OnnxModel.run` (host input, IO
  binding); our options with device-resident input and output (IO binding of CUDA OrtValues); the same plus CUDA
  graphs (fixed shapes, replayed).
- PyTorch: eager channels_last fp16 (inference_mode); `torch.compile` (default mode) on the models in
  `--compile`, at batches 32 and 256 only (each shape compiles anew: device minutes are scarce).

Then `predict` end to end on JPEGs (decode + batches on the card), training images/s of the whole network
unfrozen (SGD, channels_last) in fp32 and in bf16 autocast, the way `finetune` trains on CUDA, and what CAM in the
ONNX file (`export --cam`) costs: the fp32 classifier with and without its `cam` output.

`--rehearse` runs the same code on CPU with one small model, small batches and short timings: the script's
rehearsal on a machine without a GPU (the CUDA-only engines are skipped and say so).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

MODELS = ("resnet50", "vgg16", "inception_v3", "efficientnet_lite0")
BATCHES = (1, 32, 256)
COMPILE_BATCHES = (32, 256)
MLPERF_RESNET50_H100 = 88_714  # images/s, MLPerf Inference v4.1 offline, TensorRT int8 (issue 13)


class Suite:
    """Collects rows and errors and rewrites OUT/results_gpu.json after each."""

    def __init__(self, out: Path, device: str, seconds: float):
        self.out, self.device, self.seconds = out, device, seconds
        self.record = {"machine": device_info(device), "rows": [], "errors": []}
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results_gpu.json").write_text(json.dumps(self.record, indent=1) + "\n")

    def add(self, section: str, row: dict) -> None:
        self.record["rows"].append({"section": section, **row})
        print(json.dumps(self.record["rows"][-1]), flush=True)
        self.save()

    def failed(self, what: str, exc: BaseException) -> None:
        """An engine that could not run is recorded with its reason (never dropped silently)."""
        line = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.record["errors"].append({"what": what, "error": line, "trace": traceback.format_exc(limit=3)})
        print(f"FAILED {what}: {line}", flush=True)
        self.save()


def device_info(device: str) -> dict:
    import onnxruntime
    import timm
    import torch

    from transfer.serving.predict import machine_name

    info = {"device": device, "host_cpu": machine_name(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "timm": timm.__version__,
            "providers": onnxruntime.get_available_providers(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(card=properties.name, memory_gib=round(properties.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def timed(step: Callable[[], None], sync: Callable[[], None], seconds: float, warmup: int = 5,
          min_runs: int = 10) -> float:
    """Median seconds per call after `warmup` calls, timing for at least `seconds` and `min_runs` calls."""
    for _ in range(warmup):
        step()
    sync()
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < min_runs or time.perf_counter() - started < seconds:
        tick = time.perf_counter()
        step()
        sync()
        latencies.append(time.perf_counter() - tick)
    return float(np.median(latencies))


# --- inference ------------------------------------------------------------------------------------------------------
def ort_engines(path: Path, batch: np.ndarray, device: str) -> dict[str, Callable[[], None]]:
    """Each onnxruntime configuration as a zero-argument step on the same fp16 file and input."""
    import onnxruntime as ort

    from exporters.runtime import OnnxModel, choose_providers

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    plain_provider = ["CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"]
    default = ort.InferenceSession(str(path), options, providers=plain_provider)
    name = default.get_inputs()[0].name
    ours = OnnxModel(path, device=device)
    engines = {"ort default options, host arrays": lambda: default.run(None, {name: batch}),
               "ort our options, host input": lambda: ours.run(batch)}
    engines["ort our options, device-resident io"] = resident_io(ours, batch, device)
    if device == "cuda":
        graph_options = {**dict(choose_providers("cuda")[0][1]), "enable_cuda_graph": "1"}
        graphed = ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", graph_options)])
        graph_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        outputs = [ort.OrtValue.ortvalue_from_shape_and_type(
            [len(batch), *ours.session.get_outputs()[i].shape[1:]], np.float32, "cuda", 0)
            for i in range(len(ours.output_names))]
        graph_binding = graphed.io_binding()
        graph_binding.bind_ortvalue_input(ours.input_name, graph_input)
        for output_name, value in zip(ours.output_names, outputs, strict=True):
            graph_binding.bind_ortvalue_output(output_name, value)
        engines["ort our options + CUDA graph, device io"] = lambda: graphed.run_with_iobinding(graph_binding)
    return engines


def resident_io(model, batch: np.ndarray, device: str) -> Callable[[], None]:
    """A step of `model` (an OnnxModel) on input already on `device`, its outputs left there (IO binding)."""
    import onnxruntime as ort

    ort_device = "cuda" if device == "cuda" else "cpu"
    binding = model.session.io_binding()
    binding.bind_ortvalue_input(model.input_name, ort.OrtValue.ortvalue_from_numpy(batch, ort_device, 0))
    for output in model.output_names:
        binding.bind_output(output, ort_device)
    return lambda: model.session.run_with_iobinding(binding)


def torch_engines(name: str, batch: np.ndarray, device: str, compile_it: bool) -> dict[str, Callable[[], None]]:
    import torch

    from models.registry import get_backbone
    from models.weights import create_backbone

    model, _ = create_backbone(get_backbone(name), pretrained=False)
    model = model.eval().to(device).half().to(memory_format=torch.channels_last)
    tensor = torch.from_numpy(batch).to(device).half().to(memory_format=torch.channels_last)

    def eager() -> None:
        with torch.inference_mode():
            model(tensor)

    engines = {"pytorch eager channels_last": eager}
    if compile_it:
        compiled = torch.compile(model)

        def run_compiled() -> None:
            with torch.inference_mode():
                compiled(tensor)

        engines["pytorch torch.compile"] = run_compiled
    return engines


def inference(suite: Suite, name: str, batches: tuple[int, ...], compile_models: set[str], work: Path,
              compile_batches: tuple[int, ...] = COMPILE_BATCHES) -> None:
    import torch

    from exporters.export import export_onnx
    from models.registry import get_backbone

    size = get_backbone(name).preprocessing.input_size
    path = work / f"{name}.fp16.onnx"
    started = time.perf_counter()
    record = export_onnx(path, backbone=name, pretrained=False, fp16=True)
    suite.add("export", {"model": name, "seconds": round(time.perf_counter() - started, 1),
                         "max_rel_diff": max(record.max_rel_diff.values()), "tolerance": record.tolerance})
    sync = torch.cuda.synchronize if suite.device == "cuda" else (lambda: None)
    for batch_size in batches:
        batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
        engines: dict[str, Callable[[], None]] = {}
        try:
            engines.update(ort_engines(path, batch, suite.device))
        except Exception as exc:  # noqa: BLE001 - recorded, the others still run
            suite.failed(f"onnxruntime engines for {name} batch {batch_size}", exc)
        try:
            engines.update(torch_engines(name, batch, suite.device,
                                         name in compile_models and batch_size in compile_batches))
        except Exception as exc:  # noqa: BLE001
            suite.failed(f"pytorch engines for {name} batch {batch_size}", exc)
        row = {"model": name, "batch": batch_size}
        for engine, step in engines.items():
            try:
                seconds = timed(step, sync, suite.seconds)
                row[engine] = round(batch_size / seconds, 1)
            except Exception as exc:  # noqa: BLE001
                suite.failed(f"{engine}, {name} batch {batch_size}", exc)
        eager = row.get("pytorch eager channels_last")
        best_ort = max((v for k, v in row.items() if k.startswith("ort ")), default=None)
        if eager and best_ort:
            row["best ort / eager"] = round(best_ort / eager, 3)
        if row.get("pytorch torch.compile") and best_ort:
            row["best ort / compile"] = round(best_ort / row["pytorch torch.compile"], 3)
        suite.add("inference", row)
        if suite.device == "cuda":
            torch.cuda.empty_cache()


def cam_cost(suite: Suite, name: str, batch_size: int, work: Path) -> None:
    """What CAM in the ONNX file costs on the card: images/s of the fp32 ImageNet classifier without and with its
    `cam` output (export --cam: the top class's map, upsampled to the input side), input and outputs on the card."""
    import torch

    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel
    from models.registry import get_backbone

    size = get_backbone(name).preprocessing.input_size
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
    sync = torch.cuda.synchronize if suite.device == "cuda" else (lambda: None)
    row = {"model": f"{name} fp32", "batch": batch_size}
    for label, cam in (("without cam", None), ("with cam (top class)", "top")):
        path = work / f"{name}.{cam or 'plain'}.onnx"
        export_onnx(path, backbone=name, pretrained=False, cam=cam)
        step = resident_io(OnnxModel(path, device=suite.device), batch, suite.device)
        row[f"images/s {label}"] = round(batch_size / timed(step, sync, suite.seconds), 1)
    row["with / without"] = round(row["images/s with cam (top class)"] / row["images/s without cam"], 3)
    suite.add("cam", row)


# --- predict end to end and training -------------------------------------------------------------------------------
def jpeg_folder(root: Path, count: int, side: int) -> list[Path]:
    """`count` JPEG crops of scikit-image's photos, about `side` pixels on the long side."""
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()) for n in ("chelsea", "coffee", "astronaut", "rocket")]
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        photo = photos[index % len(photos)]
        scale = side / max(photo.size) * rng.uniform(0.9, 1.1)
        image = photo.resize((round(photo.width * scale), round(photo.height * scale)))
        paths.append(root / f"{index}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def predict_end_to_end(suite: Suite, name: str, images: int, work: Path) -> None:
    from exporters.runtime import OnnxModel

    path = work / f"{name}.fp16.onnx"
    if not path.exists():
        from exporters.export import export_onnx

        export_onnx(path, backbone=name, pretrained=False, fp16=True)
    paths = jpeg_folder(work / "jpegs", images, 640)
    model = OnnxModel(path, device=suite.device)
    model.predict(paths[:64], batch_size=64)  # warm-up: cuDNN search, threads
    started = time.perf_counter()
    results = model.predict(paths, batch_size=64)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in model.iter_batches(paths, 64):
        pass
    decode_seconds = time.perf_counter() - started
    suite.add("predict", {"model": f"{name} fp16", "images": len(paths), "size": "640 px JPEG",
                          "batch": 64, "decode_workers": model.decode_workers,
                          "predict_images_per_s": round(len(results) / seconds, 1),
                          "decode_only_images_per_s": round(len(paths) / decode_seconds, 1)})


def training(suite: Suite, name: str, batch_size: int, steps: int) -> None:
    """Images/s of SGD steps on the whole network, channels_last, fp32 and bf16 autocast (finetune's CUDA path)."""
    import torch

    row = {"model": name, "batch": batch_size}
    for label, autocast in (("fp32", False), ("bf16 autocast", True)):
        try:
            row[f"train images/s, {label}"] = train_speed(name, batch_size, torch.device(suite.device), autocast,
                                                           suite.seconds, steps)
        except Exception as exc:  # noqa: BLE001
            suite.failed(f"training {label}, {name}", exc)
        if suite.device == "cuda":
            torch.cuda.empty_cache()
    suite.add("training", row)


def train_speed(name: str, batch_size: int, device, autocast: bool, seconds: float, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from models.registry import get_backbone
    from models.weights import create_backbone
    from transfer.training.model import build_transfer_model

    spec = get_backbone(name)
    size = spec.preprocessing.input_size
    backbone, _ = create_backbone(spec, pretrained=False)
    model = build_transfer_model(spec, backbone, 10, size).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images = torch.randn(batch_size, 3, size, size, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return round(batch_size / timed(step, sync, seconds, warmup=3, min_runs=steps), 1)


GPU_MODELS = ("resnet50", "vgg16", "inception_v3", "efficientnet_lite0", "convnext_tiny", "vit_small_patch16_224")
REHEARSAL_MODELS = ("efficientnet_lite0", "convnext_atto", "deit_tiny_patch16_224")  # small, for the CPU rehearsal


def run_suite(out: Path, rehearse: bool, models: list[str], compile_models: set[str], seconds: float) -> dict:
    """The whole GPU suite (or its CPU rehearsal); returns the record also written to OUT/results_gpu.json."""
    import torch

    device = "cpu" if rehearse else "cuda"
    if not rehearse and not torch.cuda.is_available():
        raise SystemExit("the GPU suite needs CUDA (torch.cuda.is_available() is False); use --rehearse on CPU")
    if device == "cuda":
        from exporters.cuda_libraries import load_cuda_libraries

        load_cuda_libraries()  # before the plain sessions of `ort_engines`, as OnnxModel does
    suite = Suite(out, device, seconds)
    batches = (1, 2) if rehearse else BATCHES
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        main_model = models[0]  # the acceptance row's model (resnet50) first, then what uses it, then the rest
        for name in models[:1]:
            try:
                inference(suite, name, batches, compile_models, work, (2,) if rehearse else COMPILE_BATCHES)
            except Exception as exc:  # noqa: BLE001
                suite.failed(f"inference {name}", exc)
        try:
            predict_end_to_end(suite, main_model, 32 if rehearse else 512, work)
        except Exception as exc:  # noqa: BLE001
            suite.failed(f"predict {main_model}", exc)
        try:
            training(suite, main_model, 4 if rehearse else 128, 3 if rehearse else 20)
        except Exception as exc:  # noqa: BLE001
            suite.failed(f"training {main_model}", exc)
        try:
            cam_cost(suite, main_model, 2 if rehearse else 256, work)
        except Exception as exc:  # noqa: BLE001
            suite.failed(f"cam {main_model}", exc)
        for name in models[1:]:
            try:
                inference(suite, name, batches, compile_models, work, COMPILE_BATCHES)
            except Exception as exc:  # noqa: BLE001
                suite.failed(f"inference {name}", exc)
    return suite.record


def markdown(record: dict) -> list[str]:
    """The GPU section of RESULTS.md from a results_gpu.json."""
    info = record["machine"]
    rows = [r for r in record["rows"] if r["section"] == "inference"]
    engines = list(dict.fromkeys(k for r in rows for k in r if k not in ("section", "model", "batch")))
    lines = ["## GPU: onnxruntime CUDA provider vs PyTorch, fp16, images/s", "",
             f"{info.get('card', info['device'])}, {info['date']}; torch {info['torch']}, onnxruntime "
             f"{info['onnxruntime']}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}. Random weights; input "
             "already on the card unless marked host. Rerun: `bash benchmarks/gpu/run.sh` on a lent card.", "",
             "| model | batch | " + " | ".join(engines) + " |", "|---|---|" + "---|" * len(engines)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['batch']} | " + " | ".join(str(row.get(e, "")) for e in engines)
                     + " |")
    resnet = next((r for r in rows if r["model"] == "resnet50" and r["batch"] == 256), None)
    if resnet:
        best = max(v for k, v in resnet.items() if k.startswith("ort "))
        lines += ["", f"resnet50 at batch 256: best onnxruntime {best} images/s = {resnet.get('best ort / eager')}x "
                  f"PyTorch eager channels_last, {resnet.get('best ort / compile', 'n/a')}x torch.compile, "
                  f"{best / MLPERF_RESNET50_H100:.3f}x the MLPerf H100 record ({MLPERF_RESNET50_H100:,} images/s, "
                  "TensorRT int8)."]
    for row in record["rows"]:
        if row["section"] in ("predict", "training", "cam"):
            lines += ["", f"{row['section']}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "section")]
    for error in record["errors"]:
        lines += ["", f"not measured: {error['what']} ({error['error']})"]
    return lines + [""]
