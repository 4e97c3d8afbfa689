"""`transfer serve` under load: dynamic batching vs batch-1 serving, same machine, same requests.

efficientnet_lite0 ImageNet classifier (fp32 ONNX, CPU). 2,000 POST /predict requests, 16 in flight at a time, each
one 480x360 JPEG of a real photo; the client runs in the same machine (it shares the cores). Each setting is a
fresh `transfer serve` on 127.0.0.1: `--max-batch 16 --max-wait-ms 10` vs `--max-batch 1 --max-wait-ms 0`.
Writes benchmarks/serve_load.json. Run: `python benchmarks/serve_load.py` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRANSFER = shutil.which("transfer") or str(Path(sys.executable).parent / "transfer")
REQUESTS, CONCURRENCY = 2000, 16


def payloads() -> list[tuple[str, bytes]]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((480, 360)).save(buffer, "JPEG", quality=90)
        out.append((f"{name}.jpg", buffer.getvalue()))
    return out


def start(model: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([TRANSFER, "serve", "--onnx", str(model), "--port", str(port), "--device", "cpu",
                                *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start")


async def load(url: str, images: list[tuple[str, bytes]]) -> dict:
    latencies: list[float] = []
    errors = 0
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(index: int) -> None:
            nonlocal errors
            name, body = images[index % len(images)]
            async with limit:
                tick = time.perf_counter()
                try:
                    reply = await client.post(url + "/predict?top_k=1", files=[("files", (name, body))])
                    ok = reply.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - tick)
                errors += not ok
        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(REQUESTS))), timeout=1800)
        wall = time.perf_counter() - started
    seconds = np.asarray(latencies)
    return {"requests": REQUESTS, "concurrency": CONCURRENCY, "errors": errors,
            "requests_per_s": round(REQUESTS / wall, 2), "p50_ms": round(float(np.percentile(seconds, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(seconds, 99)) * 1e3, 1)}


def main() -> int:
    from exporters.export import export_onnx
    from transfer.serving.predict import machine_name

    images = payloads()
    settings = {"dynamic batching (--max-batch 16 --max-wait-ms 10)": ("--max-batch", "16", "--max-wait-ms", "10"),
                "batch 1 (--max-batch 1 --max-wait-ms 0)": ("--max-batch", "1", "--max-wait-ms", "0")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "lite0.onnx"
        export_onnx(model, backbone="efficientnet_lite0")
        for name, flags in settings.items():
            process, url = start(model, *flags)
            try:
                result = asyncio.run(load(url, images))
                result["server"] = httpx.get(url + "/health").json()
            finally:
                process.terminate()
                process.wait(timeout=30)
            results[name] = result
            print(name, json.dumps(result), flush=True)
    names = list(results)
    record = {"machine": f"{machine_name()}, CPU only", "date": time.strftime("%Y-%m-%d"),
              "model": "efficientnet_lite0 ImageNet classifier, fp32 ONNX, 480x360 JPEG uploads", "results": results,
              "dynamic_vs_batch1_throughput": round(results[names[0]]["requests_per_s"]
                                                    / results[names[1]]["requests_per_s"], 2)}
    (ROOT / "benchmarks" / "serve_load.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
