"""`transfer serve`: a real uvicorn on 127.0.0.1, real photos, bad uploads, a bounded load test, a real browser."""

from __future__ import annotations

import asyncio
import os
import shutil
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
def classifier(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "lite0.onnx"
    export_onnx(path, backbone="efficientnet_lite0")
    return path


@pytest.fixture(scope="module")
def server(classifier):
    running = Server("--onnx", str(classifier), "--max-batch", "8", "--max-wait-ms", "20", "--max-upload-mb", "1",
                     "--max-pixels", "4000000", "--device", "cpu")
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
    assert httpx.get(server.url + "/docs").status_code == 200


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


def test_page_classifies_a_dropped_image_in_a_real_browser(server, cat_jpeg):
    """Headless Chromium (Debian's, installed by `make`) uploads through the page at / and reads the top-1."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/", timeout=30_000)
            page.set_input_files("#file", str(cat_jpeg))
            page.wait_for_function("document.querySelector('#top1').textContent.length > 0", timeout=60_000)
            top1 = page.text_content("#top1")
            items = page.locator("#results li").all_text_contents()
        finally:
            browser.close()
    assert top1 in CATS and len(items) == 5 and items[0].startswith(top1)


def test_serve_command_refuses_bad_input(runner, tmp_path):
    result = runner.invoke(cli.app, ["serve"])
    assert result.exit_code == 2 and "serve needs a model: --onnx MODEL.onnx" in result.output
    result = runner.invoke(cli.app, ["serve", "--onnx", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2 and "model file not found" in result.output
    assert os.listdir(tmp_path) == []


def test_similar_and_embed_over_http(tmp_path, photos):
    """An extractor file served with the index built from it: /embed gives its output, /similar the neighbours."""
    from tests.test_search import write_crops
    from transfer.search import build_index

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
        assert httpx.post(running.url + "/predict", files=files).status_code == 400  # an extractor, not a classifier
    finally:
        running.stop()
    other = tmp_path / "other.onnx"
    export_onnx(other, backbone="efficientnet_lite0", layers=["avg_pool"], input_size=64)
    refused = subprocess.run([TRANSFER, "serve", "--onnx", str(other), "--index", str(tmp_path / "idx")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert refused.returncode == 2 and "built with another model" in refused.stderr
    assert "serving" not in refused.stderr  # announced only once the model and its index have loaded


def test_serving_imports_no_torch(classifier):
    code = ("import sys\nfrom transfer.serve import create_app\n"
            f"app = create_app({str(classifier)!r}, device='cpu')\n"
            "from fastapi.testclient import TestClient\n"
            "with TestClient(app) as client:\n"
            "    assert client.get('/health').json()['status'] == 'ok'\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
