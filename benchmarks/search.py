"""Search at scale: how the cost of an index grows with N (10k, 100k, 1M vectors of 1,280 floats).

    python benchmarks/search.py                  # 10k, 100k and 1M (about 15 minutes, 11 GB of disk at 1M)
    python benchmarks/search.py --sizes 10000    # one size

Vectors are synthetic but shaped like real ones: efficientnet_lite0 avg_pool features (the offline ImageNet weights)
of 256 random crops of scikit-image's photos, and around each of them Gaussian noise scaled per dimension by the real
features' spread, normalised to unit length; written straight to disk (a million rows never sit in memory). Per N,
each step in a fresh process (peak RSS by a sampler thread, memory-mapped pages included): build (the ANN file from
the stored vectors), load (`SearchIndex.load`: index.json, the float32 vector check, the memory-mapped ANN file),
`transfer similar` with one query image (wall time, model loading included), `transfer serve --index` start-up (to its
first 200 on /health), `/similar` with an image (decode, embed, search; p50/p95 of 50 requests after 5 to warm
up) and `/similar/ROW` (an indexed image's neighbours: the search alone, over HTTP), both on one kept-alive
connection as an app holds it, once the server has read its ANN file into memory (it starts on the mapped file),
the search alone (one vector, p50/p95),
recall@10 of the index's search against exact search on 500 held-out vectors, and up to 100k (their builds at 1M take
longer than this machine's session) FAISS HNSW (M=32) and usearch HNSW on the same vectors as reference points, and
the index pushed into milvus-lite and searched through it (`transfer index --milvus`). Writes benchmarks/search.json;
run.py puts it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = str(Path(sys.executable).parent / "transfer")
DIM, BASE_VECTORS, HELD_OUT = 1280, 256, 500


class PeakMemory:
    """Peak RSS of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def real_features(work: Path) -> tuple[np.ndarray, Path, Path]:
    """(lite0 avg_pool features of 256 photo crops, the extractor ONNX file, one query photo)."""
    from PIL import Image
    from skimage import data

    from exporters.export import export_onnx
    from exporters.runtime import OnnxModel

    rng = np.random.default_rng(0)
    crops = work / "crops"
    crops.mkdir()
    names = ("chelsea", "coffee", "astronaut", "rocket", "brick", "grass", "gravel", "camera")
    for index in range(BASE_VECTORS):
        photo = Image.fromarray(getattr(data, names[index % len(names)])()).convert("RGB")
        side = int(min(photo.size) * rng.uniform(0.3, 0.9))
        left, top = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
        photo.crop((left, top, left + side, top + side)).resize((224, 224)).save(crops / f"{index}.jpg")
    extractor = work / "lite0_avg_pool.onnx"
    export_onnx(extractor, backbone="efficientnet_lite0", layers=["avg_pool"])
    model = OnnxModel(extractor, device="cpu")
    features = np.stack([np.asarray(model.session.run(None, {model.input_name: model.preprocess_one(
        crops / f"{i}.jpg")[None]})[0]).ravel() for i in range(BASE_VECTORS)])
    return features.astype(np.float32), extractor, crops / "0.jpg"


def synthetic(base: np.ndarray, count: int, path: Path, seed: int) -> np.ndarray:
    """`count` unit vectors around the real ones (noise scaled per dimension), written to a .npy memmap."""
    rng = np.random.default_rng(seed)
    spread = base.std(axis=0, keepdims=True) * 0.8
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, base.shape[1]))
    for start in range(0, count, 50_000):
        rows = min(50_000, count - start)
        chunk = base[rng.integers(0, len(base), rows)] + spread * rng.standard_normal((rows, base.shape[1]),
                                                                                        dtype=np.float32)
        out[start:start + rows] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    out.flush()
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_child(step: str, *args: str) -> dict:
    """Run one step of this script in a fresh process; its JSON answer."""
    done = subprocess.run([sys.executable, __file__, "--step", step, *args], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_build(folder: str) -> dict:
    from transfer.serving.ann import ANN_FILE, build_ann

    vectors = np.load(Path(folder) / "vectors.npy", mmap_mode="r")
    started = time.perf_counter()
    with PeakMemory() as memory:
        record = build_ann(vectors, Path(folder) / ANN_FILE)
    seconds = time.perf_counter() - started
    index = json.loads((Path(folder) / "index.json").read_text())
    index["ann"] = record
    (Path(folder) / "index.json").write_text(json.dumps(index))
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(memory.peak / 2**30, 2), "ann": record}


def step_load(folder: str, queries: str) -> dict:
    from transfer.serving.search import SearchIndex, exact_top_k

    started = time.perf_counter()
    with PeakMemory() as memory:
        search = SearchIndex.load(folder)
    load_seconds = time.perf_counter() - started
    held_out = np.load(queries)
    latencies = []
    singles = 200 if search.ann is not None or len(search.vectors) <= 100_000 else 20  # an exact pass at 1M: ~1 s
    for query in held_out[:singles]:
        began = time.perf_counter()
        search.nearest(query, 10)
        latencies.append(1000 * (time.perf_counter() - began))
    began = time.perf_counter()
    found = search.nearest_many(held_out, 10)
    batch_ms = 1000 * (time.perf_counter() - began) / len(held_out)
    _, truth = exact_top_k(search.vectors, held_out, 10)
    recall = np.mean([len({hit["row"] for hit in hits} & set(expected.tolist())) / 10
                      for hits, expected in zip(found, truth, strict=True)])
    return {"load_seconds": round(load_seconds, 2), "load_peak_rss_gb": round(memory.peak / 2**30, 2),
            "search_p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "search_p95_ms": round(float(np.percentile(latencies, 95)), 2),
            "batched_ms_per_query": round(batch_ms, 3), "recall_at_10": round(float(recall), 4)}


def step_hnsw(folder: str, queries: str) -> dict:
    import faiss

    from transfer.serving.search import exact_top_k

    vectors = np.load(Path(folder) / "vectors.npy", mmap_mode="r")
    started = time.perf_counter()
    with PeakMemory() as memory:
        index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        for start in range(0, len(vectors), 65_536):
            index.add(np.ascontiguousarray(vectors[start:start + 65_536]))
    build = time.perf_counter() - started
    held_out = np.load(queries)
    _, truth = exact_top_k(vectors, held_out, 10)
    index.hnsw.efSearch = 64
    latencies, found = [], []
    for query in held_out:
        began = time.perf_counter()
        _, rows = index.search(query[None], 10)
        latencies.append(1000 * (time.perf_counter() - began))
        found.append(rows[0])
    recall = np.mean([len(set(rows.tolist()) & set(expected.tolist())) / 10
                      for rows, expected in zip(found, truth, strict=True)])
    return {"build_seconds": round(build, 1), "peak_rss_gb": round(memory.peak / 2**30, 2),
            "search_p50_ms": round(float(np.percentile(latencies, 50)), 2), "recall_at_10": round(float(recall), 4),
            "efSearch": 64}


def step_usearch(folder: str, queries: str) -> dict:
    """usearch's HNSW (connectivity 16, its defaults otherwise) on the same vectors, as the second reference."""
    import usearch
    from usearch.index import Index

    from transfer.serving.search import exact_top_k

    vectors = np.load(Path(folder) / "vectors.npy", mmap_mode="r")
    started = time.perf_counter()
    with PeakMemory() as memory:
        index = Index(ndim=vectors.shape[1], metric="ip", dtype="f32", connectivity=16)
        for start in range(0, len(vectors), 65_536):
            chunk = np.ascontiguousarray(vectors[start:start + 65_536])
            index.add(np.arange(start, start + len(chunk)), chunk)
    build = time.perf_counter() - started
    held_out = np.load(queries)
    _, truth = exact_top_k(vectors, held_out, 10)
    latencies, found = [], []
    for query in held_out:
        began = time.perf_counter()
        found.append(index.search(query, 10).keys)
        latencies.append(1000 * (time.perf_counter() - began))
    recall = np.mean([len(set(rows.tolist()) & set(expected.tolist())) / 10
                      for rows, expected in zip(found, truth, strict=True)])
    return {"build_seconds": round(build, 1), "peak_rss_gb": round(memory.peak / 2**30, 2),
            "search_p50_ms": round(float(np.percentile(latencies, 50)), 2), "recall_at_10": round(float(recall), 4),
            "expansion_search": index.expansion_search, "usearch": usearch.__version__}


def step_milvus(folder: str, queries: str) -> dict:
    """The index pushed into milvus-lite (`transfer index -o DIR --milvus FILE.db`) and searched through it, as
    `similar` and `serve` do: the push's time, one query's latency, recall@10 against exact."""
    from transfer.serving.search import SearchIndex, exact_top_k
    from transfer.serving.vectordb import push

    search = SearchIndex.load(folder, exact=True)
    started = time.perf_counter()
    with PeakMemory() as memory:
        search.record["database"] = push(search.record, search.vectors, str(Path(folder).parent / "milvus.db"),
                                         "bench")
    push_seconds = time.perf_counter() - started
    (Path(folder) / "index.json").write_text(json.dumps(search.record))
    started = time.perf_counter()
    remote = SearchIndex.load(folder)
    load_seconds = time.perf_counter() - started
    held_out = np.load(queries)[:100]
    latencies, found = [], []
    for query in held_out:
        began = time.perf_counter()
        found.append(remote.nearest(query, 10))
        latencies.append(1000 * (time.perf_counter() - began))
    _, truth = exact_top_k(search.vectors, held_out, 10)
    recall = np.mean([len({hit["row"] for hit in hits} & set(expected.tolist())) / 10
                      for hits, expected in zip(found, truth, strict=True)])
    search.record["database"] = None
    (Path(folder) / "index.json").write_text(json.dumps(search.record))
    shutil.rmtree(Path(folder).parent / "milvus.db", ignore_errors=True)
    Path(folder).parent.joinpath("milvus.db").unlink(missing_ok=True)
    return {"push_seconds": round(push_seconds, 1), "push_peak_rss_gb": round(memory.peak / 2**30, 2),
            "load_seconds": round(load_seconds, 2), "search_p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "recall_at_10": round(float(recall), 4)}


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stdout[-500:]}{done.stderr[-500:]}")
    return round(time.perf_counter() - started, 2)


def serve_figures(folder: Path, extractor: Path, query: Path, size: int) -> dict:
    import httpx

    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([TRANSFER, "serve", "--onnx", str(extractor), "--index", str(folder), "--port",
                               str(port), "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, startup = time.monotonic() + 900, None
        while time.monotonic() < deadline and startup is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    startup = time.perf_counter() - started
            except httpx.HTTPError:
                time.sleep(0.1)
        body, client = query.read_bytes(), httpx.Client(timeout=60)  # one kept-alive connection, as an app keeps
        in_memory = None  # the server reads its ANN file whole in the background: measure once it has
        while time.monotonic() < deadline and in_memory is None:
            if client.get(f"http://127.0.0.1:{port}/metadata").json()["index"]["search"] != \
                    "approximate, memory-mapped":
                in_memory = time.perf_counter() - started
            else:
                time.sleep(0.2)
        for _ in range(5):  # a new server's first requests warm onnxruntime's memory arena and the page cache
            client.post(f"http://127.0.0.1:{port}/similar", files=[("files", ("q.jpg", body))])
        latencies = []
        for _ in range(50):
            began = time.perf_counter()
            answer = client.post(f"http://127.0.0.1:{port}/similar", files=[("files", ("q.jpg", body))])
            latencies.append(1000 * (time.perf_counter() - began))
            assert answer.status_code == 200, answer.text
        by_row = []
        for row in (i * 9_973 % size for i in range(50)):  # "more like this": the search alone, over HTTP
            began = time.perf_counter()
            answer = client.get(f"http://127.0.0.1:{port}/similar/{row}?k=10")
            by_row.append(1000 * (time.perf_counter() - began))
            assert answer.status_code == 200, answer.text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return {"serve_startup_seconds": round(startup, 2), "ann_in_memory_after_seconds": round(in_memory, 1),
            "similar_http_p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "similar_http_p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "similar_row_http_p50_ms": round(float(np.percentile(by_row, 50)), 1),
            "similar_row_http_p95_ms": round(float(np.percentile(by_row, 95)), 1)}


def measure(size: int, base: np.ndarray, extractor: Path, query: Path, work: Path) -> dict:
    from transfer.core.io import file_sha256
    from transfer.serving.search import INDEX_FORMAT, MARKER_FILE

    folder = work / f"n{size}.idx"
    folder.mkdir()
    started = time.perf_counter()
    synthetic(base, size, folder / "vectors.npy", seed=size)
    made = time.perf_counter() - started
    held_out = synthetic(base, HELD_OUT, work / f"queries{size}.npy", seed=size + 1)
    model = {"backbone": None, "run": None, "onnx": str(extractor), "onnx_sha256": file_sha256(extractor),
             "layer": "avg_pool", "input_size": None, "weights": f"onnx {extractor}"}
    paths = [f"/nowhere/{i}.jpg" for i in range(size)]
    (folder / "index.json").write_text(json.dumps({"format": INDEX_FORMAT, "count": size, "dim": base.shape[1],
                                                   "model": model, "paths": paths, "labels": None, "classes": [],
                                                   "ann": None}))
    (folder / MARKER_FILE).write_text(json.dumps({"format": INDEX_FORMAT, "written_by": "transfer index"}))
    row = {"n": size, "vectors_gb": round(size * base.shape[1] * 4 / 2**30, 2), "made_seconds": round(made, 1)}
    row["exact"] = in_child("load", str(folder), str(work / f"queries{size}.npy"))
    row["build"] = in_child("build", str(folder))
    row["ann"] = in_child("load", str(folder), str(work / f"queries{size}.npy"))
    row["similar_one_query_seconds"] = wall([TRANSFER, "similar", str(query), "--index", str(folder), "-o",
                                             str(work / "sheet.png"), "--device", "cpu", "-q"])
    row.update(serve_figures(folder, extractor, query, size))
    if size <= 100_000:
        row["faiss_hnsw"] = in_child("hnsw", str(folder), str(work / f"queries{size}.npy"))
        row["usearch_hnsw"] = in_child("usearch", str(folder), str(work / f"queries{size}.npy"))
        row["milvus_lite"] = in_child("milvus", str(folder), str(work / f"queries{size}.npy"))
    del held_out
    shutil.rmtree(folder)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--step")
    parser.add_argument("args", nargs="*")
    args = parser.parse_args()
    if args.step:
        print(json.dumps({"build": step_build, "load": step_load, "hnsw": step_hnsw, "usearch": step_usearch,
                          "milvus": step_milvus}[args.step](*args.args)))
        return
    from transfer.serving.predict import machine_name

    with tempfile.TemporaryDirectory(dir=os.environ.get("SEARCH_BENCH_DIR")) as name:
        work = Path(name)
        base, extractor, query = real_features(work)
        rows = [measure(int(size), base, extractor, query, work) for size in args.sizes.split(",")]
    measured = {row["n"] for row in rows}
    saved = ROOT / "benchmarks" / "search.json"
    kept = [row for row in (json.loads(saved.read_text())["rows"] if saved.exists() else [])
            if row["n"] not in measured]  # sizes not measured this time keep their last figures
    record = {"machine": machine_name(), "date": time.strftime("%Y-%m-%d"), "dim": DIM,
              "vectors": "synthetic around 256 real efficientnet_lite0 avg_pool vectors of photo crops",
              "rows": sorted(kept + rows, key=lambda row: row["n"])}
    (ROOT / "benchmarks" / "search.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
