"""`transfer serve`: a real uvicorn on 127.0.0.1, real photos, bad uploads, a bounded load test, a real browser."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import cli
from exporters.export import export_onnx
from exporters.runtime import OnnxModel
from tests.conftest import png_header_only

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = shutil.which("transfer") or str(Path(sys.executable).parent / "transfer")
CATS = {"tabby", "tiger cat", "Egyptian cat"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`transfer serve` in a subprocess on a free local port; stopped (and waited for) on exit."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([TRANSFER, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("serve did not answer /health within 90 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def classifier(imagenet_lite0_onnx) -> Path:
    return imagenet_lite0_onnx[0]  # shared (conftest: exported once per worker)


@pytest.fixture(scope="module")
def server(classifier):
    running = Server("--onnx", str(classifier), "--max-batch", "8", "--max-wait-ms", "20", "--max-upload-mb", "1",
                     "--max-request-mb", "2", "--max-pixels", "4000000", "--device", "cpu")
    yield running
    running.stop()


@pytest.fixture()
def cat_jpeg(tmp_path, photos) -> Path:
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(photos["chelsea"]).save(path, quality=95)
    return path


def test_predict_health_metadata_and_bad_uploads(server, classifier, cat_jpeg, tmp_path):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "lite0.onnx"
    meta = httpx.get(server.url + "/metadata").json()
    assert meta["output_kind"] == "logits" and len(meta["classes"]) == 1000 and meta["max_batch"] == 8
    files = [("files", ("chelsea.jpg", cat_jpeg.read_bytes(), "image/jpeg"))] * 2
    answer = httpx.post(server.url + "/predict?top_k=3", files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    expected = OnnxModel(classifier, device="cpu").predict([cat_jpeg], top_k=3)[0]
    assert len(predictions) == 2 and predictions[0]["labels"][0] in CATS
    assert predictions[0]["labels"] == expected.labels
    assert predictions[0]["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)

    corrupt = httpx.post(server.url + "/predict", files=[("files", ("broken.jpg", b"\xff\xd8 not a jpeg", "x"))])
    assert corrupt.status_code == 400 and "broken.jpg: not a readable image" in corrupt.json()["detail"]
    png_header_only(tmp_path / "bomb.png", 5000, 5000)
    bomb = httpx.post(server.url + "/predict", files=[("files", ("bomb.png", (tmp_path / "bomb.png").read_bytes()))])
    assert bomb.status_code == 413 and "5000x5000 is over the limit of 4000000 pixels" in bomb.json()["detail"]
    big = httpx.post(server.url + "/predict", files=[("files", ("big.jpg", b"\xff" * (1024 * 1024 + 1)))])
    assert big.status_code == 413 and "over the limit of 1048576" in big.json()["detail"]
    empty = httpx.post(server.url + "/predict", files=[("files", ("none.jpg", b""))])
    assert empty.status_code == 400 and "empty upload" in empty.json()["detail"]
    wrong = httpx.post(server.url + "/embed", files=[("files", ("chelsea.jpg", cat_jpeg.read_bytes()))])
    assert wrong.status_code == 400 and "classifier" in wrong.json()["detail"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving
    again = httpx.post(server.url + "/predict", files=files[:1], timeout=60).json()["predictions"][0]
    assert again["labels"][0] == expected.labels[0]
    assert httpx.get(server.url + "/docs").status_code == 404  # off by default: Swagger UI needs a CDN


def test_bounded_load_is_batched_without_errors(server, classifier, cat_jpeg, photos, tmp_path):
    """200 requests, 16 at a time, each bounded by a timeout: no error, every answer right, batches formed."""
    images = {}
    for name in ("chelsea", "coffee", "rocket"):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(photos[name]).save(path, quality=95)
        images[name] = (path.read_bytes(), OnnxModel(classifier, device="cpu").predict([path], top_k=1)[0].labels[0])
    before = httpx.get(server.url + "/health").json()

    async def load() -> list[bool]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=60) as client:
            async def one(index: int) -> bool:
                name = ("chelsea", "coffee", "rocket")[index % 3]
                async with limit:
                    reply = await client.post(server.url + "/predict?top_k=1",
                                              files=[("files", (f"{name}.jpg", images[name][0]))])
                return reply.status_code == 200 and reply.json()["predictions"][0]["labels"][0] == images[name][1]
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), timeout=300)

    assert all(asyncio.run(load()))
    after = httpx.get(server.url + "/health").json()
    assert after["images"] - before["images"] == 200
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 200


def in_browser(url: str, image: Path, wait_for: str, read: str) -> dict:
    """Headless Chromium (Debian's, installed by `make`) opens the page, uploads `image`, waits until the JavaScript
    condition `wait_for` holds, and returns the value of the JavaScript expression `read`."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url + "/", timeout=30_000)
            page.set_input_files("#file", str(image))
            page.wait_for_function(wait_for, timeout=60_000)
            return page.evaluate(read)
        finally:
            browser.close()


def test_page_classifies_a_dropped_image_in_a_real_browser(server, cat_jpeg):
    seen = in_browser(server.url, cat_jpeg, "document.querySelector('#top1').textContent.length > 0",
                      "({top1: document.querySelector('#top1').textContent, "
                      "items: [...document.querySelectorAll('#results li')].map(li => li.textContent)})")
    assert seen["top1"] in CATS and len(seen["items"]) == 5 and seen["items"][0].startswith(seen["top1"])


def test_serve_command_refuses_bad_input(runner, tmp_path):
    result = runner.invoke(cli.app, ["serve"])
    assert result.exit_code == 2 and "serve needs a model: --onnx MODEL.onnx" in result.output
    result = runner.invoke(cli.app, ["serve", "--onnx", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and "model file not found" in result.output
    assert os.listdir(tmp_path) == []


def test_similar_and_embed_over_http(tmp_path, photos):
    """An extractor file served with the index built from it: /embed gives its output, /similar the neighbours."""
    from tests.test_search import write_crops
    from transfer.apps.index import build_index

    write_crops(tmp_path / "crops", photos, per_class=3, seed=0)
    extractor = tmp_path / "extractor.onnx"
    export_onnx(extractor, backbone="efficientnet_lite0", layers=["avg_pool"], input_size=96)
    build_index(tmp_path / "crops", tmp_path / "idx", onnx=extractor, workers=0)
    query = tmp_path / "crops" / "coffee" / "coffee_0_1.jpg"
    running = Server("--onnx", str(extractor), "--index", str(tmp_path / "idx"), "--device", "cpu")
    try:
        files = [("files", (query.name, query.read_bytes()))]
        embedded = httpx.post(running.url + "/embed", files=files, timeout=60)
        assert embedded.status_code == 200, embedded.text
        output = embedded.json()["embeddings"][0]["outputs"]["avg_pool"]
        assert output["shape"] == [1280] and len(output["values"]) == 1280
        hits = httpx.post(running.url + "/similar?k=3", files=files, timeout=60).json()["similar"][0]["neighbours"]
        assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert [h["label"] for h in hits] == ["coffee"] * 3
        again = httpx.get(running.url + f"/similar/{hits[0]['row']}?k=3", timeout=60).json()["similar"][0]
        assert again["path"] == str(query) and [h["row"] for h in again["neighbours"]] == [h["row"] for h in hits]
        assert httpx.post(running.url + "/predict", files=files).status_code == 400  # an extractor, not a classifier
        # the page shows the neighbours, with thumbnails the server makes of the indexed images
        shown = in_browser(running.url, query, "document.querySelectorAll('#neighbours li img').length > 0 && "
                           "[...document.querySelectorAll('#neighbours img')].every(i => i.complete)",
                           "[...document.querySelectorAll('#neighbours li')].map(li => ({width: "
                           "li.querySelector('img').naturalWidth, text: li.textContent}))")
        assert len(shown) == 8 and all(item["width"] > 0 for item in shown)
        assert shown[0]["text"].startswith("#1  1.000") and shown[0]["text"].endswith("coffee")
        assert httpx.get(running.url + "/thumbnail/9999").status_code == 404
    finally:
        running.stop()
    bare = Server("--onnx", str(extractor), "--device", "cpu")  # no index: the page gives the embedding and a hint
    try:
        seen = in_browser(bare.url, query, "document.querySelector('#hint').textContent.length > 0",
                          "({items: [...document.querySelectorAll('#results li')].map(li => li.textContent), "
                          "hint: document.querySelector('#hint').textContent, "
                          "error: document.querySelector('#error').textContent})")
    finally:
        bare.stop()
    assert seen["error"] == "" and seen["items"][0].startswith("avg_pool: shape [1280], 1280 values")
    assert "--index DIR" in seen["hint"]
    other = tmp_path / "other.onnx"
    export_onnx(other, backbone="efficientnet_lite0", layers=["avg_pool"], input_size=64)
    refused = subprocess.run([TRANSFER, "serve", "--onnx", str(other), "--index", str(tmp_path / "idx")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert refused.returncode == 2 and "built with another model" in refused.stderr
    assert "serving" not in refused.stderr  # announced only once the model and its index have loaded


def test_serving_imports_no_torch(classifier):
    code = ("import sys\nfrom transfer.serving.serve import create_app\n"
            f"app = create_app({str(classifier)!r}, device='cpu')\n"
            "from fastapi.testclient import TestClient\n"
            "with TestClient(app) as client:\n"
            "    assert client.get('/health').json()['status'] == 'ok'\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- trust, second round: limits that bound work, isolation, bounded shutdown -----------------------------------
THIN_PROBE = """
import json, resource, sys
from exporters.runtime import OnnxModel
model = OnnxModel(sys.argv[1], device="cpu")
model.predict([sys.argv[2]])  # a normal photo first: the model and its arena are warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = model.predict([sys.argv[3]])[0]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"error": result.error, "grew_mb": (after - before) / 1024}))
"""


def thin_png(path: Path, width: int = 4000, height: int = 1) -> Path:
    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def test_a_thin_image_is_refused_from_its_header_with_bounded_memory(classifier, cat_jpeg, tmp_path):
    """A 96-byte 4000x1 PNG needed 1.2 GB in `predict`: --max-pixels bounded the decoded image, not its resize to
    256 x 1,024,000. Peak RSS is measured in a fresh process, around that one image."""
    thin = thin_png(tmp_path / "thin.png")
    assert thin.stat().st_size < 200
    probe = subprocess.run([sys.executable, "-c", THIN_PROBE, str(classifier), str(cat_jpeg), str(thin)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert probe.returncode == 0, probe.stderr
    measured = json.loads(probe.stdout)
    assert "too thin to resize: 4000x1 has an aspect ratio over the limit of 50:1" in measured["error"]
    assert measured["grew_mb"] < 50, measured


def test_thin_and_bomb_uploads_are_413_and_a_request_is_cut_off_while_it_streams(server, cat_jpeg, tmp_path):
    thin = httpx.post(server.url + "/predict", files=[("files", ("thin.png", thin_png(tmp_path / "t.png")
                                                                 .read_bytes()))], timeout=30)
    assert thin.status_code == 413 and "thin.png: too thin to resize" in thin.json()["detail"]
    png_header_only(tmp_path / "huge.png", 20_000, 20_000)  # over twice Pillow's own limit: refused at open
    bomb = httpx.post(server.url + "/predict", files=[("files", ("huge.png", (tmp_path / "huge.png").read_bytes()))])
    assert bomb.status_code == 413 and "huge.png" in bomb.json()["detail"]
    # a declared 200 MB body is refused before any of it is read
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 209715200\r\n\r\n--b\r\n")
        started = time.monotonic()
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5
    # a chunked body (no length given) is cut off once it passes --max-request-mb 2, long before its 8 MB are sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        part = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n"
        sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
        chunk = b"\0" * 131072
        sent, answer = 0, b""
        while sent < 64 and not answer:
            try:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except OSError:
                break  # the server closed the connection: cut off
            sent += 1
            if select.select([sock], [], [], 0.05)[0]:
                answer = sock.recv(4096)
        answer = answer or sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413") and 16 <= sent < 60, (sent, answer[:40])  # 64 would be all of it
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving


def test_a_requests_images_run_in_one_batch_and_a_bad_part_is_a_short_422(server, cat_jpeg):
    before = httpx.get(server.url + "/health").json()
    files = [("files", (f"cat{i}.jpg", cat_jpeg.read_bytes())) for i in range(16)]
    answer = httpx.post(server.url + "/predict?top_k=1", files=files, timeout=120)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 16
    after = httpx.get(server.url + "/health").json()
    assert after["batches"] - before["batches"] == 2 and after["largest_batch"] == 8  # --max-batch 8: 16 in 2 runs
    secret = b"SECRET-BYTES-" * 100
    empty_name = httpx.post(server.url + "/predict", files=[("files", ("", secret, "image/jpeg"))], timeout=30)
    assert empty_name.status_code == 422 and b"SECRET" not in empty_name.content
    assert "multipart field 'files'" in empty_name.json()["detail"] and len(empty_name.content) < 500
    meta = httpx.get(server.url + "/metadata")
    assert "transfer.classes" not in meta.json()["transfer"] and len(meta.content) < 30_000


def test_one_failing_image_fails_only_its_own_request():
    """Under a memory cap one bad image made every request batched with it answer 500."""
    import numpy as np

    from transfer.serving.serve import BatchStats, DynamicBatcher

    class Model:
        def run(self, batch):
            if np.isnan(batch).any():
                raise MemoryError("cannot allocate")
            return [batch.sum(axis=(1, 2, 3))]

    async def scenario():
        batcher = DynamicBatcher(Model(), max_batch=8, max_wait_ms=50, stats=BatchStats())
        batcher.start()
        rows = [np.full((3, 2, 2), float(i), np.float32) for i in range(6)]
        rows[2][0, 0, 0] = np.nan
        results = await asyncio.gather(*(batcher.outputs(row) for row in rows), return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[2], MemoryError)
    assert [float(r[0]) for i, r in enumerate(results) if i != 2] == [12.0 * i for i in (0, 1, 3, 4, 5)]


def test_with_no_wait_what_queued_meanwhile_runs_together_and_a_lone_row_runs_at_once():
    """The default `--max-wait-ms 0` must still batch: rows queued while a batch runs form the next batch (up to
    max_batch), and a lone row is not held back for others (a 5 ms wait cost every lone /similar that much)."""
    import time

    import numpy as np

    from transfer.serving.serve import BatchStats, DynamicBatcher

    class Model:
        def __init__(self):
            self.sizes = []

        def run(self, batch):
            self.sizes.append(len(batch))
            time.sleep(0.05)  # a model run long enough for the next requests to queue behind it
            return [batch.sum(axis=(1, 2, 3))]

    async def scenario(model, stats):
        batcher = DynamicBatcher(model, max_batch=4, max_wait_ms=0, stats=stats)
        batcher.start()
        lone = await batcher.outputs(np.ones((3, 2, 2), np.float32))
        first = asyncio.ensure_future(batcher.outputs(np.zeros((3, 2, 2), np.float32)))
        await asyncio.sleep(0.01)  # the first row is running alone; six more arrive meanwhile
        rows = [np.full((3, 2, 2), float(i), np.float32) for i in range(1, 7)]
        results = await asyncio.gather(first, *(batcher.outputs(row) for row in rows))
        await batcher.stop()
        return lone, results

    model, stats = Model(), BatchStats()
    lone, results = asyncio.run(scenario(model, stats))
    assert float(lone[0]) == 12.0 and [float(r[0]) for r in results] == [12.0 * i for i in range(7)]
    assert model.sizes == [1, 1, 4, 2] and stats.batches == 4 and stats.largest_batch == 4


def test_onnxruntime_threads_sleep_between_runs(classifier):
    """A spinning intra-op pool took the cores a search or decode needed right after a run (6x slower search on
    2 cores) and starves itself on a busy machine: spinning is off in every session transfer opens."""
    from exporters.runtime import OnnxModel

    options = OnnxModel(classifier, device="cpu").session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_sigterm_ends_the_server_while_a_client_stalls_mid_upload(classifier):
    """SIGTERM never ended `serve` while one client held an unfinished upload (alive after 40 s)."""
    running = Server("--onnx", str(classifier), "--read-timeout", "3", "--shutdown-timeout", "2", "--device", "cpu")
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as stalled:
            stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
            time.sleep(0.5)
            started = time.monotonic()
            running.process.send_signal(signal.SIGTERM)
            running.process.wait(timeout=20)
            assert time.monotonic() - started < 15
            assert running.process.returncode in (0, -signal.SIGTERM)  # uvicorn ends by the signal it got
    finally:
        if running.process.poll() is None:
            running.process.kill()


def test_a_stalled_upload_gets_408_and_the_server_goes_on(classifier, cat_jpeg):
    running = Server("--onnx", str(classifier), "--read-timeout", "1", "--device", "cpu")
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as stalled:
            stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
            assert stalled.recv(4096).startswith(b"HTTP/1.1 408")
        ok = httpx.post(running.url + "/predict", files=[("files", ("c.jpg", cat_jpeg.read_bytes()))], timeout=60)
        assert ok.status_code == 200
    finally:
        running.stop()


def test_a_port_in_use_is_one_line_and_nothing_is_announced(classifier, runner):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli.app, ["serve", "--onnx", str(classifier), "--port", str(port), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.output and "serving" not in result.output
    infinite = runner.invoke(cli.app, ["serve", "--onnx", str(classifier), "--max-upload-mb", "inf"])
    assert infinite.exit_code == 2 and "--max-upload-mb" in infinite.output and "Traceback" not in infinite.output


def test_metadata_shows_no_server_paths(tmp_path, photos):
    from fastapi.testclient import TestClient

    from tests.conftest import digits_folder
    from transfer.apps.index import build_index
    from transfer.serving.serve import create_app

    digits = digits_folder(tmp_path / "digits", per_class=2, size=32, classes=3)
    extractor = tmp_path / "extractor.onnx"
    export_onnx(extractor, backbone="lenet5", pretrained=False, layers=["fc1"])
    build_index(digits, tmp_path / "idx", onnx=extractor, workers=0)
    with TestClient(create_app(extractor, device="cpu", index=tmp_path / "idx")) as client:
        text = client.get("/metadata").text
        assert client.get("/docs").status_code == 404
    assert str(tmp_path) not in text and json.loads(text)["index"] == {"images": 6, "dim": 120, "layer": "fc1",
                                                                       "search": "exact"}


def test_a_server_reads_its_ann_file_whole_in_the_background(tmp_path):
    """Serving starts on the memory-mapped ANN file; a copy read whole (faster to scan) replaces it in the
    background, with the same answers; /metadata says which one answers."""
    import time

    from fastapi.testclient import TestClient

    from tests.test_search import clustered_unit_vectors
    from transfer.core.io import file_sha256
    from transfer.serving.search import SearchIndex, index_folder, write_index
    from transfer.serving.serve import create_app

    extractor = tmp_path / "extractor.onnx"
    export_onnx(extractor, backbone="lenet5", pretrained=False, layers=["fc1"])
    vectors = clustered_unit_vectors(2_000, 120, 20, seed=4)
    record = {"format": 3, "count": 2_000, "dim": 120, "paths": [f"/nowhere/{i}.png" for i in range(2_000)],
              "classes": [], "model": {"backbone": None, "run": None, "onnx": str(extractor),
                                       "onnx_sha256": file_sha256(extractor), "layer": "fc1", "input_size": None}}
    with index_folder(tmp_path / "idx") as folder:
        write_index(folder, record, vectors, ann_min_rows=1_000)
    mapped = SearchIndex.load(tmp_path / "idx")
    expected = [hit["row"] for hit in mapped.nearest(vectors[7], 10)]
    with TestClient(create_app(extractor, device="cpu", index=tmp_path / "idx")) as client:
        kinds = set()
        for _ in range(200):  # bounded: at most 20 s for a 1 MB file
            kinds.add(client.get("/metadata").json()["index"]["search"])
            if "approximate, in memory" in kinds:
                break
            time.sleep(0.1)
        answer = client.get("/similar/7?k=10").json()["similar"][0]
    assert "approximate, in memory" in kinds and kinds <= {"approximate, memory-mapped", "approximate, in memory"}
    assert [hit["row"] for hit in answer["neighbours"]] == expected and answer["neighbours"][0]["row"] == 7
