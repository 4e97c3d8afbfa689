"""`transfer serve`: an exported ONNX file behind HTTP (FastAPI on uvicorn), with dynamic batching. No torch.

Requests that arrive together are run together: the images of one request are queued at once, and everything queued
while the previous batch ran goes into the next one, up to `max_batch` per `session.run` (decoding runs in threads
meanwhile). `max_wait_ms` (default 0, Triton's default queue delay) makes an image also wait that long for others:
on a CPU it buys no throughput (benchmarks/serve_load.py) and costs every lone request that much latency.
If a batch fails, its images run one by one, so a bad image fails only its own request.

Limits bound the work, not just the pixels (`ServeLimits`): the request body is cut off with 413 as soon as it
passes `max_request_bytes` (FastAPI's own body limit, also checked against Content-Length before reading); each
upload's bytes, then from its header its pixels and its aspect ratio (the resize of a 4000x1 image would take
gigabytes) are checked before it is decoded; a body that stalls for `read_timeout_s` ends with 408, and on SIGTERM
the server stops within `shutdown_timeout_s` whatever its clients do. A bad image is a 4xx with the reason
(413 for sizes, 400 for content, 422 for a malformed form); the server keeps serving.

Endpoints: GET / (a page to drop an image on), GET /health, GET /metadata (no server paths), POST /predict
(classifier files), POST /embed (feature-extractor files), POST /similar (with an index); /docs only with
`docs=True` (Swagger UI loads its assets from a CDN, which an offline browser cannot reach).
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from exporters.runtime import OnnxModel
from transfer.core.errors import TransferError, first_line
from transfer.core.images import BadImageError, open_image
from transfer.serving.cam import cam_answer
from transfer.serving.limits import ReadTimeout, RejectedImage, ServeLimits, decode_upload

Files = Annotated[list[UploadFile], File(description="one or more images")]


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
            while len(batch) < self.max_batch and not self.queue.empty():  # what queued while the last batch ran
                batch.append(self.queue.get_nowait())
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
            except Exception as exc:  # the model failed on this batch: find the image(s) it failed on
                if len(batch) == 1:
                    _settle(batch[0].future, exception=exc)
                    continue
                for item in batch:  # one at a time, so a bad image fails only its own request
                    try:
                        alone = await loop.run_in_executor(None, self.model.run, item.row[None])
                        _settle(item.future, result=[output[0] for output in alone])
                    except Exception as single:
                        _settle(item.future, exception=single)
                continue
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for index, item in enumerate(batch):
                _settle(item.future, result=[output[index] for output in outputs])


def _settle(future: asyncio.Future, result=None, exception: BaseException | None = None) -> None:
    """Resolve a waiting request's future unless it is gone (its client disconnected)."""
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)


def page_html() -> str:
    """The drop-an-image page served at /."""
    return resources.files("transfer.serving").joinpath("serve_page.html").read_text(encoding="utf-8")


HIDDEN_METADATA = ("transfer.classes", "transfer.run", "transfer.source")  # listed once, or server paths


def create_app(model_path: str | Path, device: str = "cpu", max_batch: int = 16, max_wait_ms: float = 0.0,
               limits: ServeLimits | None = None, index: str | Path | None = None, docs: bool = False,
               decode_floor: float | None = None):
    """The FastAPI application serving `model_path` (and `index` for /similar)."""
    limits = (limits or ServeLimits()).check()
    model = OnnxModel(model_path, device=device, decode_floor=decode_floor)  # a floor given replaces the file's
    search = None
    if index is not None:
        from transfer.serving.search import SearchIndex

        search = SearchIndex.load(index)
        search.check_model(model)
        if search.ann is not None:  # serving starts on the mapped file; the faster in-memory copy follows
            threading.Thread(target=read_ann_whole, args=(search,), daemon=True, name="read-ann").start()
    stats = BatchStats()
    draft = model.draft_size  # decode as `predict` does: same answers
    batcher = DynamicBatcher(model, max_batch, max_wait_ms, stats)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="transfer serve", description=f"{Path(model_path).name}: {model.output_kind}",
                  lifespan=lifespan, max_body_size=limits.max_request_bytes,
                  docs_url="/docs" if docs else None, redoc_url=None)
    app.add_middleware(ReadTimeout, seconds=limits.read_timeout_s)

    @app.exception_handler(RequestValidationError)
    async def malformed_form(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 in one line, without echoing the request (FastAPI's default repeats the whole upload)."""
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                             for error in exc.errors()[:3])
        return JSONResponse({"detail": f"{problems} (send images as files, each with a file name, in the multipart "
                                       "field 'files')"}, status_code=422)

    async def rows_of(files: list[UploadFile]) -> list[tuple[str, np.ndarray]]:
        if not files:
            raise HTTPException(400, "no image: send one or more files in the multipart field 'files'")
        if len(files) > limits.max_images:
            raise HTTPException(413, f"{len(files)} images in one request; the limit is {limits.max_images}")

        def prepared(data: bytes, name: str) -> np.ndarray:
            image = decode_upload(data, name, limits, draft)
            try:
                return model.preprocess_one(image)
            except BadImageError as exc:  # the model's own preprocessing refused it: this image's fault, not ours
                raise RejectedImage(413 if exc.too_large else 422, f"{name}: {exc.reason}") from None

        async def decoded(upload: UploadFile) -> tuple[str, np.ndarray]:
            data = await upload.read(limits.max_upload_bytes + 1)
            name = upload.filename or "upload"
            return name, await run_in_threadpool(prepared, data, name)

        try:
            rows = list(await asyncio.gather(*(decoded(upload) for upload in files)))
        except RejectedImage as exc:
            raise HTTPException(exc.status, exc.reason) from None
        stats.requests += 1
        stats.images += len(rows)
        return rows

    async def outputs_of(rows: list[tuple[str, np.ndarray]]) -> list[list[np.ndarray]]:
        """Every image of a request queued at once, so they run in the same batch."""
        results = await asyncio.gather(*(batcher.outputs(row) for _, row in rows), return_exceptions=True)
        for (name, _), result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                raise HTTPException(500, f"{name}: the model failed on this image ({type(result).__name__}: "
                                         f"{first_line(result)[:200]})")
        return results

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
        shown = {key: value for key, value in model.metadata.items() if key not in HIDDEN_METADATA}
        source = model.metadata.get("transfer.source", "")
        if source and os.sep not in source:
            shown["transfer.source"] = source
        return {"file": Path(model_path).name, "output_kind": model.output_kind, "outputs": model.output_names,
                "layout": model.layout, "input_size": model.prep.input_size, "classes": model.classes,
                "transfer": shown, "max_batch": max_batch, "max_wait_ms": max_wait_ms, "limits": limits.public(),
                "index": None if search is None else {"images": search.record["count"], "dim": search.record["dim"],
                                                      "layer": search.model["layer"], "search": search_kind(search)}}

    @app.get("/thumbnail/{row}", include_in_schema=False)
    async def thumbnail(row: int, size: Annotated[int, Query(ge=16, le=512)] = 160) -> Response:
        """A JPEG thumbnail of indexed image `row` (the page shows neighbours with it); only indexed images."""
        if search is None or not 0 <= row < search.record["count"]:
            raise HTTPException(404, "no such indexed image")
        path = search.record["paths"][row]

        def small() -> bytes:
            image = open_image(path, max_pixels=limits.max_pixels, draft_size=(size, size))
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            return buffer.getvalue()

        try:
            return Response(await run_in_threadpool(small), media_type="image/jpeg")
        except BadImageError:
            raise HTTPException(404, "the indexed image is missing or unreadable now") from None

    @app.post("/predict")
    async def predict(files: Files, top_k: Annotated[int, Query(ge=1, le=1000)] = 5,
                      cam: Annotated[bool, Query(description="heatmaps from a file exported with --cam")] = False
                      ) -> dict:
        if model.output_kind != "logits":
            raise HTTPException(400, "this file is a feature extractor: use POST /embed")
        if cam:  # full decode, so peaks and boxes are in the upload's own pixels; one image at a time
            if model.cam_mode is None:
                raise HTTPException(400, "this file has no class activation map: export it with --cam")
            if len(files) > limits.max_images:
                raise HTTPException(413, f"{len(files)} images in one request; the limit is {limits.max_images}")

            async def answer(upload: UploadFile) -> dict:
                data, name = await upload.read(limits.max_upload_bytes + 1), upload.filename or "upload"
                return await run_in_threadpool(lambda: cam_answer(model, decode_upload(data, name, limits), name,
                                                                  top_k))
            try:
                answers = [await answer(upload) for upload in files]
            except (RejectedImage, BadImageError) as exc:
                raise HTTPException(getattr(exc, "status", 422), str(getattr(exc, "reason", exc))) from None
            stats.requests, stats.images = stats.requests + 1, stats.images + len(answers)
            return {"predictions": answers, "task": "multilabel" if model.multilabel else "single"}
        rows = await rows_of(files)
        results = []
        for (name, _), outputs in zip(rows, await outputs_of(rows), strict=True):
            top = model.top_k(name, outputs[0], top_k)
            results.append({"filename": name, "labels": top.labels, "probabilities": top.probabilities})
        return {"predictions": results, "task": "multilabel" if model.multilabel else "single"}

    @app.post("/embed")
    async def embed(files: Files) -> dict:
        if model.output_kind != "features":
            raise HTTPException(400, "this file is a classifier: use POST /predict (or export an extractor)")
        rows = await rows_of(files)
        results = []
        for (name, _), outputs in zip(rows, await outputs_of(rows), strict=True):
            results.append({"filename": name, "outputs": {
                key: {"shape": list(value.shape), "values": value.ravel().tolist()}
                for key, value in zip(model.output_names, outputs, strict=True)}})
        return {"embeddings": results}

    @app.post("/similar")
    async def similar(files: Files, k: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict:
        if search is None:
            raise HTTPException(400, "no index: start the server with --index DIR")
        rows = await rows_of(files)
        results = []
        for (name, _), outputs in zip(rows, await outputs_of(rows), strict=True):
            vector = search.vector(dict(zip(model.output_names, outputs, strict=True)))
            results.append({"filename": name, "neighbours": await run_in_threadpool(search.nearest, vector, k)})
        return {"similar": results}

    @app.get("/similar/{row}")
    async def similar_to_indexed(row: int, k: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict:
        """The neighbours of indexed image `row` (a hit's `row`): its stored vector is the query, nothing is
        decoded or embedded, so the answer costs the search alone ("more like this" on a result)."""
        if search is None:
            raise HTTPException(400, "no index: start the server with --index DIR")
        if not 0 <= row < search.record["count"]:
            raise HTTPException(404, f"no indexed image {row}: rows are 0..{search.record['count'] - 1}")
        query = np.asarray(search.vectors[row], dtype=np.float32)
        return {"similar": [{"row": row, "path": search.record["paths"][row],
                             "neighbours": await run_in_threadpool(search.nearest, query, k)}]}

    return app


def read_ann_whole(search) -> None:
    """The server's background read of its ANN file into memory; a failure is said on stderr and the mapped file
    keeps answering (the same answers, at its speed)."""
    try:
        search.read_ann_whole()
    except (RuntimeError, MemoryError, OSError) as exc:
        print(f"warning: {search.ann_file} could not be read into memory ({first_line(exc)[:200]}); searching the "
              "memory-mapped file", file=sys.stderr, flush=True)


def search_kind(search) -> str:
    """How the index answers: 'milvus', 'approximate, in memory', 'approximate, memory-mapped' or 'exact'."""
    if search.database is not None:
        return "milvus"
    if search.ann is not None:
        return "approximate, in memory" if search.ann_in_memory else "approximate, memory-mapped"
    return "exact"


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port before anything is announced; an address in use or not ours is a one-line
    `TransferError` (exit code 2)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise TransferError(f"--host {host}: cannot listen there ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise TransferError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server may be using "
                            "the port: choose another with --port)") from None
    sock.set_inheritable(True)
    return sock


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          max_batch: int = 16, max_wait_ms: float = 0.0, limits: ServeLimits | None = None,
          index: str | Path | None = None, announce=None, docs: bool = False,
          decode_floor: float | None = None) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM; `announce()` is called once the model (and index) loaded and
    the port is bound. A shutdown waits at most `limits.shutdown_timeout_s` for requests in flight."""
    import uvicorn

    limits = (limits or ServeLimits()).check()
    app = create_app(model_path, device, max_batch, max_wait_ms, limits, index, docs, decode_floor)
    sock = listening_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5,
                                           timeout_graceful_shutdown=max(1, math.ceil(limits.shutdown_timeout_s))))
    if announce is not None:
        announce()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
