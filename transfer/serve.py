"""`transfer serve`: an exported ONNX file behind HTTP (FastAPI on uvicorn), with dynamic batching. No torch.

Requests that arrive together are run together: each decoded image waits at most `max_wait_ms` for others, and up to
`max_batch` go through one `session.run` (decoding runs in threads meanwhile). Every upload is checked before it
is decoded (bytes, then pixels from the header), and a bad image is a 4xx with the reason; the server keeps
serving. Endpoints: GET / (a page to drop an image on), GET /health, GET /metadata, POST /predict (classifier
files), POST /embed (feature-extractor files), POST /similar (with an index), and FastAPI's /docs.
"""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from PIL import Image

from exporters.runtime import OnnxModel
from transfer.images import BadImageError, open_image
from transfer.preprocess import decode_size

Files = Annotated[list[UploadFile], File(description="one or more images")]
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PIXELS = 40_000_000  # a 8000 x 5000 photo; Pillow's own bomb limit is about 89 million


@dataclass
class ServeLimits:
    """What one request may send: bytes per image, pixels per image, images per request."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 64


class RejectedImage(Exception):
    """An upload refused with an HTTP status and a reason (the server goes on)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_upload(data: bytes, name: str, limits: ServeLimits,
                  draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes of one upload -> RGB image, refusing oversize (413) and unreadable (400) uploads with the reason."""
    if len(data) > limits.max_upload_bytes:
        raise RejectedImage(413, f"{name}: {len(data)} bytes is over the limit of {limits.max_upload_bytes}")
    if not data:
        raise RejectedImage(400, f"{name}: empty upload")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only: no pixel is decoded yet
            width, height = probe.size
    except Exception as exc:  # Pillow raises several types for data that is not an image
        raise RejectedImage(400, f"{name}: not a readable image ({type(exc).__name__})") from None
    if width * height > limits.max_pixels:
        raise RejectedImage(413, f"{name}: {width}x{height} is over the limit of {limits.max_pixels} pixels")
    try:
        return open_image(io.BytesIO(data), max_pixels=limits.max_pixels, draft_size=draft_size, name=name)
    except BadImageError as exc:
        raise RejectedImage(400, f"{name}: {exc.reason}") from None


@dataclass
class _Pending:
    row: np.ndarray
    future: asyncio.Future


@dataclass
class BatchStats:
    """Counters for /health: how well the batching works."""

    requests: int = 0
    images: int = 0
    batches: int = 0
    largest_batch: int = 0
    started: float = field(default_factory=time.time)


class DynamicBatcher:
    """Collects preprocessed rows from concurrent requests and runs them through the model together."""

    def __init__(self, model: OnnxModel, max_batch: int, max_wait_ms: float, stats: BatchStats):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000.0
        self.stats = stats
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def outputs(self, row: np.ndarray) -> list[np.ndarray]:
        """This row's outputs, once its batch has run."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(row, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except TimeoutError:
                    break
            rows = [item.row for item in batch]
            same = all(r.shape == rows[0].shape for r in rows)
            try:
                outputs = await loop.run_in_executor(None, self.model.run, np.stack(rows) if same else rows)
            except Exception as exc:  # the model failed on this batch: every waiting request gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for index, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result([output[index] for output in outputs])


def page_html() -> str:
    """The drop-an-image page served at /."""
    return resources.files("transfer").joinpath("serve_page.html").read_text(encoding="utf-8")


def create_app(model_path: str | Path, device: str = "cpu", max_batch: int = 16, max_wait_ms: float = 5.0,
               limits: ServeLimits | None = None, index: str | Path | None = None):
    """The FastAPI application serving `model_path` (and `index` for /similar)."""
    limits = limits or ServeLimits()
    model = OnnxModel(model_path, device=device)
    search = None
    if index is not None:
        from transfer.search import SearchIndex

        search = SearchIndex.load(index)
        search.check_model(model)
    stats = BatchStats()
    draft = None if model.exact_decode else decode_size(model.prep)  # decode as `predict` does: same answers
    batcher = DynamicBatcher(model, max_batch, max_wait_ms, stats)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="transfer serve", description=f"{Path(model_path).name}: {model.output_kind}",
                  lifespan=lifespan)

    async def rows_of(files: list[UploadFile]) -> list[tuple[str, np.ndarray]]:
        if not files:
            raise HTTPException(400, "no image: send one or more files in the multipart field 'files'")
        if len(files) > limits.max_images:
            raise HTTPException(413, f"{len(files)} images in one request; the limit is {limits.max_images}")
        rows = []
        for upload in files:
            data = await upload.read(limits.max_upload_bytes + 1)
            name = upload.filename or "upload"
            try:
                image = await run_in_threadpool(decode_upload, data, name, limits, draft)
                rows.append((name, await run_in_threadpool(model.preprocess_one, image)))
            except RejectedImage as exc:
                raise HTTPException(exc.status, exc.reason) from None
        stats.requests += 1
        stats.images += len(rows)
        return rows

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": Path(model_path).name, "provider": model.provider,
                "requests": stats.requests, "images": stats.images, "batches": stats.batches,
                "largest_batch": stats.largest_batch, "uptime_s": round(time.time() - stats.started, 1)}

    @app.get("/metadata")
    async def metadata() -> dict:
        return {"file": Path(model_path).name, "output_kind": model.output_kind, "outputs": model.output_names,
                "layout": model.layout, "input_size": model.prep.input_size, "classes": model.classes,
                "transfer": dict(model.metadata), "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                "limits": limits.__dict__, "index": str(index) if index else None}

    @app.post("/predict")
    async def predict(files: Files, top_k: Annotated[int, Query(ge=1, le=1000)] = 5) -> dict:
        if model.output_kind != "logits":
            raise HTTPException(400, "this file is a feature extractor: use POST /embed")
        results = []
        for name, row in await rows_of(files):
            logits = (await batcher.outputs(row))[0]
            top = model.top_k(name, logits, top_k)
            results.append({"filename": name, "labels": top.labels, "probabilities": top.probabilities})
        return {"predictions": results}

    @app.post("/embed")
    async def embed(files: Files) -> dict:
        if model.output_kind != "features":
            raise HTTPException(400, "this file is a classifier: use POST /predict (or export an extractor)")
        results = []
        for name, row in await rows_of(files):
            outputs = await batcher.outputs(row)
            results.append({"filename": name, "outputs": {
                key: {"shape": list(value.shape), "values": value.ravel().tolist()}
                for key, value in zip(model.output_names, outputs, strict=True)}})
        return {"embeddings": results}

    @app.post("/similar")
    async def similar(files: Files, k: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict:
        if search is None:
            raise HTTPException(400, "no index: start the server with --index DIR")
        results = []
        for name, row in await rows_of(files):
            outputs = await batcher.outputs(row)
            vector = search.vector(dict(zip(model.output_names, outputs, strict=True)))
            results.append({"filename": name, "neighbours": search.nearest(vector, k)})
        return {"similar": results}

    return app


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          max_batch: int = 16, max_wait_ms: float = 5.0, limits: ServeLimits | None = None,
          index: str | Path | None = None, announce=None) -> None:
    """Run the app with uvicorn until interrupted; `announce()` is called once the model (and index) loaded."""
    import uvicorn

    app = create_app(model_path, device, max_batch, max_wait_ms, limits, index)
    if announce is not None:
        announce()
    uvicorn.run(app, host=host, port=port, log_level="warning")
