"""Torch-free ONNX runtime: what `transfer predict`/`bench` use and what other apps embed.

Imports only onnxruntime, numpy and pillow (plus this project's torch-free `transfer.core.preprocess`/`images`).
Everything a model needs (classes, input size, resize/crop/interpolation, mean/std, layout, output kind) comes
from the file's `transfer.*` metadata, and preprocessing is the very function training evaluates with.

    model = OnnxModel("model.onnx", device="auto")
    for prediction in model.predict(["cat.jpg", "cup.png"], top_k=3):
        print(prediction.path, prediction.labels, prediction.probabilities)
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporters.cuda_libraries import load_cuda_libraries, missing_libraries
from transfer.core.cpus import session_threads, usable_cpus
from transfer.core.errors import DataError, DeviceError, first_line
from transfer.core.images import BadImageError, as_rgb_image
from transfer.core.interpret import sigmoid, softmax
from transfer.core.model_metadata import MetadataError, ModelMetadata, read_model_metadata
from transfer.core.preprocess import (
    Preprocessing,
    check_decode_floor,
    corner_crop,
    decode_size,
    eval_array,
    eval_pixels,
    tta_views,
)

ImageLike = str | os.PathLike | np.ndarray  # or a PIL image


@dataclass
class Prediction:
    """Top-k of one image; `error` is set (and the rest empty) when the image could not be read."""

    path: str
    indices: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None


def choose_providers(device: str) -> list:
    """Explicit execution providers; `cuda` without the CUDA provider is an error, never a silent CPU run; `auto`
    is the CPU where onnxruntime's CUDA build has no CUDA to load (the printed provider says which ran)."""
    available = ort.get_available_providers()
    cuda_options = {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "1", "do_copy_in_default_stream": "1"}
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device in ("cuda", "gpu"):
        if "CUDAExecutionProvider" not in available:
            raise DeviceError("--device cuda: onnxruntime has no CUDAExecutionProvider here "
                              f"(available: {', '.join(available)}); install onnxruntime-gpu with CUDA, or use cpu")
        load_cuda_libraries()  # a torch-free process finds pip-installed CUDA and cuDNN (cuda_libraries)
        return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
    if device == "auto":  # the CUDA build listed, and its CUDA and cuDNN loadable (not a card without them)
        if "CUDAExecutionProvider" in available and not missing_libraries():  # loads them, as above
            return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda")


INPUT_TYPES = {"NCHW_float32": "tensor(float)", "NHWC_uint8": "tensor(uint8)", "NHWC_uint8_any": "tensor(uint8)"}


def read_metadata(session: ort.InferenceSession) -> ModelMetadata:
    """The file's `transfer.*` metadata (`read_model_metadata`, the checks embedded apps share), then checked
    against the graph: class count = output width, layout = input dtype and shape. A violation is a `DataError`
    naming the key, so a damaged or hand-edited file never predicts with wrong labels or NaN probabilities."""
    try:
        info = read_model_metadata(session.get_modelmeta().custom_metadata_map)
    except MetadataError as exc:
        raise DataError(str(exc)) from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise DataError(f"the graph has {len(inputs)} inputs; a transfer model has one image input")
    graph_input = inputs[0]
    size, layout = info.input_size, info.layout
    expected = {"NCHW_float32": [None, 3, size, size], "NHWC_uint8": [None, size, size, 3],
                "NHWC_uint8_any": [None, None, None, 3]}[layout]
    shape = list(graph_input.shape)
    if graph_input.type != INPUT_TYPES[layout] or len(shape) != 4 or any(
            isinstance(got, int) and want is not None and got != want
            for got, want in zip(shape, expected, strict=True)):
        raise DataError(f"metadata transfer.layout {layout!r} (input size {size}) contradicts the graph input "
                        f"{graph_input.name} {graph_input.type} {shape}")
    if info.output_kind == "logits":
        width = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(width, int) and width != len(info.classes):
            raise DataError(f"metadata transfer.classes has {len(info.classes)} names, the output "
                            f"{outputs[0].name} has {width}")
    if info.cam is not None and [o.name for o in outputs] != ["logits", "cam"]:
        raise DataError(f"metadata transfer.cam {info.cam!r}, but the graph's outputs are "
                        f"{', '.join(o.name for o in outputs)}, not logits and cam")
    return info


class OnnxModel:
    """A `transfer`-exported ONNX file with its preprocessing, ready to run batched on CPU or CUDA."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 decode_workers: int | None = None, exact_decode: bool = False, decode_floor: float | None = None):
        self.path = Path(path)
        self.exact_decode = exact_decode  # True: full-size JPEG decode (slower; what training saw is the default)
        if not self.path.is_file():
            raise DataError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or session_threads()  # the CPUs the process may use (core.cpus)
        # Idle threads sleep instead of spinning for the next run: a spinning pool takes the cores that decoding,
        # a search or another process needs (a search right after a run was 6x slower on 2 cores, and a lone run
        # under load waits for every thread to get a core); throughput of back-to-back batches is unchanged.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = choose_providers(device)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise DataError(f"cannot load {self.path} with onnxruntime: {first_line(exc)}") from None
        wants_cuda = isinstance(providers[0], tuple)
        self.provider = self.session.get_providers()[0]
        if wants_cuda and self.provider != "CUDAExecutionProvider" and device != "auto":  # auto: no card here
            raise DeviceError(f"onnxruntime could not start the CUDA provider for {self.path} (fell back to "
                              f"{self.provider}); check the CUDA and cuDNN libraries{missing_libraries()}")
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.input_name = self.session.get_inputs()[0].name
        self.all_outputs = [o.name for o in self.session.get_outputs()]
        self.output_names = [name for name in self.all_outputs if name != "cam"]  # the map only when asked
        try:
            info = read_metadata(self.session)
        except DataError as exc:
            raise DataError(f"{self.path}: {exc}") from None
        self.info = info
        self.prep = Preprocessing(info.input_size, info.crop_pct, info.interpolation, info.mean, info.std,
                                  info.draft_factor if decode_floor is None else check_decode_floor(decode_floor))
        self.classes, self.layout, self.output_kind = info.classes, info.layout, info.output_kind
        self.cam_mode = info.cam  # "top" | "all" | None (no map in the file)
        self.thresholds = None if info.thresholds is None else np.asarray(info.thresholds, dtype=np.float64)
        self.decode_workers = decode_workers or min(8, usable_cpus())  # more only fight onnxruntime

    @property
    def draft_size(self) -> tuple[int, int] | None:
        """The JPEG draft request of the file's decode floor, or the one `decode_floor` chose (None: full-size
        decode, with exact_decode)."""
        return None if self.exact_decode else decode_size(self.prep)

    @property
    def draft_factor(self) -> float:
        return self.prep.draft_factor

    @property
    def device(self) -> str:
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    # --- preprocessing --------------------------------------------------------------------------------------------
    def preprocess_one(self, image, corner: str | None = None) -> np.ndarray:
        """One image (path, PIL image or uint8 array) -> the model's input row, by the file's own metadata: the
        decoded RGB pixels themselves when the file does resize, crop and normalization in its graph. `corner`:
        that corner of the decoded image first (a test-time-augmentation view, `corner_crop`)."""
        rgb = as_rgb_image(image, draft_size=self.draft_size)
        if corner is not None:
            rgb = corner_crop(rgb, corner)
        if self.layout == "NHWC_uint8_any":
            return np.asarray(rgb, dtype=np.uint8)
        return eval_pixels(rgb, self.prep) if self.layout == "NHWC_uint8" else eval_array(rgb, self.prep)

    def _load(self, image, corner: str | None = None) -> np.ndarray | BadImageError:
        try:
            return self.preprocess_one(image, corner)
        except BadImageError as exc:
            return exc

    def iter_batches(self, images: Sequence, batch_size: int = 32, prefetch: int = 2,
                     corner: str | None = None) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
        """Decode in a thread pool, `prefetch` batches ahead of the model: (row indices, batch, errors)."""
        if batch_size < 1:
            raise DataError("batch size must be at least 1")
        starts = iter(range(0, len(images), batch_size))
        with ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            pending: deque[tuple[int, list[Future]]] = deque()

            def submit_next() -> None:
                start = next(starts, None)
                if start is not None:
                    chunk = images[start:start + batch_size]
                    pending.append((start, [pool.submit(self._load, item, corner) for item in chunk]))

            for _ in range(prefetch + 1):
                submit_next()
            while pending:
                start, futures = pending.popleft()
                submit_next()
                rows, arrays, errors = [], [], []
                for offset, future in enumerate(futures):
                    result = future.result()
                    if isinstance(result, BadImageError):
                        errors.append((start + offset, result.reason))
                    else:
                        rows.append(start + offset)
                        arrays.append(result)
                yield rows, (_batch(arrays) if arrays else None), errors

    # --- running --------------------------------------------------------------------------------------------------
    def run(self, batch: np.ndarray | list[np.ndarray], names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Raw outputs (`names`, default all but the class activation map) for a preprocessed batch; on CUDA
        through IO binding (one copy in, outputs on device).

        A list (decoded images of different sizes, for a file with preprocessing in its graph) runs one image at
        a time and stacks the outputs."""
        names = self.output_names if names is None else list(names)
        if isinstance(batch, list):
            outputs = [self.run(image[None], names) for image in batch]
            return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]
        if self.device != "cuda":
            return self.session.run(names, {self.input_name: batch})
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        for name in names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def mirrored(self, batch: np.ndarray | list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """Model inputs flipped left to right, whatever the layout (the width axis of NCHW, NHWC, or HWC rows)."""
        if isinstance(batch, list):
            return [np.ascontiguousarray(row[:, ::-1]) for row in batch]
        return np.ascontiguousarray(batch[..., ::-1] if self.layout == "NCHW_float32" else batch[:, :, ::-1])

    def require_classifier(self) -> None:
        """A `DataError` that names the right command when this file is a feature extractor."""
        if self.output_kind != "logits":
            raise DataError(f"{self.path} is a feature extractor (outputs {', '.join(self.output_names)}), not a "
                            f"classifier: use `transfer extract --onnx {self.path}` (OnnxModel.features in Python)")

    def _class_logits(self, batch: np.ndarray) -> np.ndarray:
        logits = self.run(batch)[0]
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise DataError(f"{self.path}: metadata transfer.classes has {len(self.classes)} names, the output "
                            f"{self.output_names[0]} has shape {list(logits.shape)}")
        return logits

    def logits(self, images: Sequence, batch_size: int = 32, progress=None, mirror: bool = False,
               corner: str | None = None) -> np.ndarray:
        """Logits of every image; an unreadable image is an error here (use `predict` to skip and report).
        Test-time-augmentation views: `mirror` flips the model inputs left to right; `corner` takes that corner
        of each decoded image first."""
        self.require_classifier()
        out = []
        for _, batch, errors in self.iter_batches(list(images), batch_size, corner=corner):
            if errors:
                index, reason = errors[0]
                raise DataError(f"{images[index]}: {reason}")
            out.append(self._class_logits(self.mirrored(batch) if mirror else batch))
            if progress is not None:
                progress(len(batch))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities of a batch of logits: softmax, or a sigmoid per label with several labels."""
        logits = logits.astype(np.float64)
        return sigmoid(logits) if self.multilabel else softmax(logits)

    def predict(self, images: Iterable, top_k: int = 5, batch_size: int = 32, progress=None,
                views: Sequence[tuple[str, str | None, bool]] = tta_views()) -> list[Prediction]:
        """Top-k labels and softmax probabilities per image (several labels per image: every label at or above its
        threshold, most probable first); unreadable images come back with `error` set. `iter_predict`, all at once.

        `views` (`tta_views`): with more than one, the probabilities are the average over the views (test-time
        augmentation; each view decodes the images again). `progress` advances once per image and view."""
        return [item for chunk in self.iter_predict(images, top_k, batch_size, progress, views) for item in chunk]

    def iter_predict(self, images: Iterable, top_k: int = 5, batch_size: int = 32, progress=None,
                     views: Sequence[tuple[str, str | None, bool]] = tta_views(),
                     batches_per_chunk: int = 8) -> Iterator[list[Prediction]]:
        """`predict`'s answers in input order, a chunk at a time as each is done: one batch (one view), or
        `batches_per_chunk` batches (several views, each decoding the chunk again). Chunks start at multiples of
        `batch_size`, so a run continued from the end of any chunk batches the rest as an uninterrupted run does,
        and memory holds one chunk, whatever the number of images."""
        self.require_classifier()
        images = list(images)
        if len(views) == 1:
            _, corner, mirror = views[0]
            for rows, batch, errors in self.iter_batches(images, batch_size, corner=corner):
                probabilities = None if batch is None else self.probabilities(
                    self._class_logits(self.mirrored(batch) if mirror else batch))
                yield self._answers(images, rows, probabilities, dict(errors), top_k)
                if progress is not None:
                    progress(len(rows) + len(errors))
            return
        step = batch_size * batches_per_chunk
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            errors_by_row: dict[int, str] = {}
            summed = np.zeros((len(chunk), len(self.classes)), np.float64)
            for _, corner, mirror in views:
                for rows, batch, errors in self.iter_batches(chunk, batch_size, corner=corner):
                    errors_by_row.update(errors)
                    if batch is not None:
                        summed[rows] += self.probabilities(self._class_logits(self.mirrored(batch) if mirror
                                                                              else batch))
                    if progress is not None:
                        progress(len(rows) + len(errors))
            readable = [row for row in range(len(chunk)) if row not in errors_by_row]
            yield self._answers(chunk, readable, summed[readable] / len(views), errors_by_row, top_k)

    def _answers(self, images: list, rows: list[int], probabilities: np.ndarray | None, errors: dict[int, str],
                 top_k: int) -> list[Prediction]:
        """The Predictions of `rows` (their probabilities in that order) and of the unreadable rows, by row."""
        ranked = {row: self.ranked(_name(images[row]), probabilities[position], top_k)
                  for position, row in enumerate(rows)}
        ranked.update({row: Prediction(_name(images[row]), error=reason) for row, reason in errors.items()})
        return [ranked[row] for row in sorted(ranked)]

    def top_k(self, name: str, logits: np.ndarray, top_k: int) -> Prediction:
        """One image's top-k labels and probabilities from its logits (its label set, with several labels)."""
        return self.ranked(name, self.probabilities(logits[None])[0], top_k)

    def ranked(self, name: str, probabilities: np.ndarray, top_k: int) -> Prediction:
        """One image's top-k labels from its class probabilities; with several labels per image, every label at or
        above its threshold (perhaps none), most probable first."""
        order = np.argsort(-probabilities, kind="stable")[:max(1, top_k)]
        if self.multilabel:
            order = [i for i in np.argsort(-probabilities, kind="stable") if probabilities[i] >= self.thresholds[i]]
        labels = [self.classes[i] for i in order]
        return Prediction(name, [int(i) for i in order], labels, [float(probabilities[i]) for i in order])

    def features(self, images: Sequence, batch_size: int = 32) -> dict[str, np.ndarray]:
        """Every output of a feature-extractor file, stacked over the images (unreadable ones are an error)."""
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        for _, batch, errors in self.iter_batches(list(images), batch_size):
            if errors:
                index, reason = errors[0]
                raise DataError(f"{images[index]}: {reason}")
            for name, value in zip(self.output_names, self.run(batch), strict=True):
                chunks[name].append(value)
        return {name: np.concatenate(parts) for name, parts in chunks.items()}

    # --- speed ----------------------------------------------------------------------------------------------------
    def benchmark(self, batch_size: int, seconds: float = 3.0, warmup: int = 3, min_runs: int = 5) -> dict:
        """images/s and latency p50/p95 on synthetic input of this batch size, after warm-up."""
        size = self.prep.input_size
        rng = np.random.default_rng(0)
        if self.layout == "NHWC_uint8":
            batch = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        elif self.layout == "NHWC_uint8_any":  # a 4:3 photo at twice the resize length
            height = 2 * self.prep.resize
            batch = rng.integers(0, 256, (batch_size, height, height * 4 // 3, 3), dtype=np.uint8)
        else:
            batch = rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)
        for _ in range(warmup):
            self.run(batch)
        latencies = []
        started = time.perf_counter()
        while len(latencies) < min_runs or time.perf_counter() - started < seconds:
            tick = time.perf_counter()
            self.run(batch)
            latencies.append(time.perf_counter() - tick)
        return latency_summary(batch_size, latencies)


def _batch(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One array when the rows have one shape; else the list (images of several sizes, run one by one)."""
    if all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    return arrays


def latency_summary(batch_size: int, latencies: Sequence[float]) -> dict:
    seconds = np.asarray(latencies)
    return {
        "batch_size": batch_size,
        "images_per_s": round(batch_size * len(seconds) / float(seconds.sum()), 2),
        "p50_ms": round(float(np.percentile(seconds, 50)) * 1e3, 2),
        "p95_ms": round(float(np.percentile(seconds, 95)) * 1e3, 2),
        "runs": len(seconds),
    }


def _name(item) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"<{type(item).__name__}>"
