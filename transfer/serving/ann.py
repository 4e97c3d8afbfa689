"""Approximate nearest-neighbour search over an index's stored vectors, with FAISS (as autofaiss and clip-retrieval
use it): an inverted file of 8-bit codes (IVF-SQ8, inner product on unit vectors = cosine) whose candidates are
re-scored exactly with the stored float32 vectors.

Why this kind: it is built from the stored vectors in minutes (k-means on a sample, then one assignment pass), its
file is a quarter of the vectors' size (1.3 GB at a million 1280-d vectors) and read memory-mapped (a server starts
without reading it), a query scans a quarter of the bytes IVF-Flat scans (3.1 vs 5.0 ms at 1M, nprobe 16, 2 cores),
and the exact re-ranking of a few dozen candidates makes the returned scores exact cosines and gives back the
recall the 8-bit codes lose (0.957 -> 0.981 at 1M, the same as IVF-Flat). One knob, `nprobe` (how many of the
`nlist` clusters a query visits), trades speed for recall. The build chooses `nprobe` as autofaiss does, by
measurement: the smallest that reaches TARGET_RECALL recall@10 against exact search on held-out queries (each a
stored vector whose own row is left out of both answers), and records the measured recall in index.json.
Collections under ANN_MIN_ROWS keep exact search, which is already fast there. Files written as IVF-Flat by an
earlier version load and search the same way. Imports numpy and faiss only (torch-free).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from transfer.core.progress import SILENT, Progress

ANN_FILE = "ann.faiss"
ANN_MIN_ROWS = 20_000  # below this an exact pass over the vectors takes milliseconds
TARGET_RECALL = 0.96  # recall@10 the chosen nprobe must reach on the tuning queries: 0.95 promised, 0.01 of margin
# for the sampling noise of 1,000 queries
EVAL_QUERIES = 1_000  # held-out queries that measure it
TRAIN_PER_CLUSTER = 40  # k-means sample: FAISS warns below 39 points per centroid
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # steps of 1.5x: the cost
# of a query grows with nprobe, so the first that reaches the target should not overshoot it by 2x
RERANK_MIN = 40  # candidates re-scored exactly per query: max(RERANK_MIN, 4 k); 30 already gave IVF-Flat's recall
ADD_ROWS = 65_536  # vectors handed to FAISS at a time
FEW_ROWS = 256  # up to this many scattered rows are read through the mapping (see `read_rows`)
TRUTH_ROWS = 8_192  # stored rows scored against the held-out queries at a time (1,000 x 8,192 scores: 32 MB)


def faiss_module():
    """FAISS, imported on first use (index building and ANN search only)."""
    import faiss

    return faiss


def cluster_count(rows: int) -> int:
    """nlist: about the square root of the collection (1,000 clusters for a million vectors), 16..65,536."""
    return int(min(65_536, max(16, round(math.sqrt(rows)))))


def build_ann(vectors: np.ndarray, path: Path, seed: int = 0, progress: Progress = SILENT) -> dict:
    """Train, fill and tune an IVF-SQ8 index over `vectors` (unit rows, typically memory-mapped) and write it to
    `path`; returns the record index.json keeps under "ann" (kind, parameters, measured recall@10). Memory: the
    index's codes (a quarter of the vectors), plus a chunk at a time; a memory-mapped file is read through
    `chunks`, which reads with plain file reads (page cache, not this process's memory)."""
    faiss = faiss_module()
    rows, dim = vectors.shape
    nlist = cluster_count(rows)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rows, size=min(rows, nlist * TRAIN_PER_CLUSTER), replace=False))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    with progress.task(f"training {nlist} clusters and the 8-bit codes on {len(sample):,} vectors (FAISS)"):
        index.train(read_rows(vectors, sample))
    with progress.task("sizing the inverted lists", total=rows, unit="vectors") as advance:
        reserve_lists(index, vectors, advance)
    with progress.task("filling the inverted lists", total=rows, unit="vectors") as advance:
        for _, chunk in chunks(vectors, ADD_ROWS):
            index.add(chunk)
            advance(len(chunk))
    queries = np.sort(rng.choice(rows, size=min(rows, EVAL_QUERIES), replace=False))
    with progress.task(f"choosing nprobe: recall@10 against exact search on {len(queries)} held-out queries"):
        _, truth = exact_top_k(vectors, read_rows(vectors, queries), 10, exclude=queries, rows_at_a_time=TRUTH_ROWS)
        nprobe, recall, tried = tune_nprobe(index, vectors, queries, truth)
    faiss.write_index(index, os.fspath(path))
    return {"kind": "faiss IVF-SQ8 (inner product), exact re-ranking", "nlist": nlist, "nprobe": nprobe,
            "rerank": f"max({RERANK_MIN}, 4k) candidates", "recall_at_10": recall,
            "recall_queries": len(queries), "target_recall": TARGET_RECALL, "tried": tried,
            "trained_on": len(sample), "faiss": faiss.__version__, "file": ANN_FILE}


def reserve_lists(index, vectors: np.ndarray, advance) -> None:
    """Give each inverted list the room its vectors will take before they are added (one assignment pass): lists
    that grow by doubling would otherwise hold up to twice the vectors' size at the peak. A list resized up and
    back to empty keeps its capacity."""
    faiss = faiss_module()
    counts = np.zeros(index.nlist, np.int64)
    for _, chunk in chunks(vectors, ADD_ROWS):
        _, assigned = index.quantizer.search(chunk, 1)
        counts += np.bincount(assigned.ravel(), minlength=index.nlist)
        advance(len(chunk))
    lists = faiss.downcast_InvertedLists(index.invlists)
    for list_no, count in enumerate(counts.tolist()):
        lists.resize(list_no, count)
        lists.resize(list_no, 0)


def read_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The given rows as float32, read from a memory-mapped .npy with file reads (see `chunks`): touching many
    scattered rows through the mapping would map their neighbours too (the kernel reads around each fault). A few
    rows (a query's candidates) are read through the mapping: 20x faster than a file read each."""
    if not _mapped_file(vectors) or len(rows) <= FEW_ROWS:
        return np.ascontiguousarray(vectors[rows], dtype=np.float32)
    row_bytes = vectors.shape[1] * vectors.itemsize
    out = np.empty((len(rows), vectors.shape[1]), np.float32)
    with open(vectors.filename, "rb") as handle:
        for at, row in enumerate(np.asarray(rows).tolist()):
            handle.seek(vectors.offset + row * row_bytes)
            out[at] = np.frombuffer(handle.read(row_bytes), dtype=vectors.dtype)
    return out


def _mapped_file(vectors: np.ndarray) -> bool:
    return isinstance(vectors, np.memmap) and getattr(vectors, "filename", None) is not None


def chunks(vectors: np.ndarray, size: int, file_reads: bool = True):
    """(first row, float32 rows) `size` rows at a time. A memory-mapped .npy is read with file reads instead of
    through its mapping (unless `file_reads` is off), so the pages read count as the kernel's cache, not as this
    process's resident memory: what a build over a million rows needs; a search, which reads the same rows again
    and again, reads them through the mapping instead of copying them every time."""
    if not file_reads or not _mapped_file(vectors):
        for start in range(0, len(vectors), size):
            yield start, np.ascontiguousarray(vectors[start:start + size], dtype=np.float32)
        return
    row_bytes = vectors.shape[1] * vectors.itemsize
    with open(vectors.filename, "rb") as handle:
        for start in range(0, len(vectors), size):
            count = min(size, len(vectors) - start)
            handle.seek(vectors.offset + start * row_bytes)
            block = np.frombuffer(handle.read(count * row_bytes), dtype=vectors.dtype).reshape(count, -1)
            yield start, np.ascontiguousarray(block, dtype=np.float32)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
                rows_at_a_time: int = ADD_ROWS, file_reads: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), best first, of every query's k largest inner products with the rows of `vectors`, read
    `rows_at_a_time` rows at a time (`chunks`: a million-row file needs one chunk in memory). `exclude`: for each
    query, a row of `vectors` left out of its answer (the query's own row, when queries are stored rows)."""
    best_scores = np.empty((len(queries), 0), np.float32)
    best_rows = np.empty((len(queries), 0), np.int64)
    for start, block in chunks(vectors, rows_at_a_time, file_reads):
        scores = queries @ block.T
        if exclude is not None:
            inside = (exclude >= start) & (exclude < start + len(block))
            scores[np.flatnonzero(inside), exclude[inside] - start] = -np.inf
        keep = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, keep, axis=1)], axis=1)
        best_rows = np.concatenate([best_rows, keep + start], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, order, axis=1)
        best_rows = np.take_along_axis(best_rows, order, axis=1)
    return best_scores, best_rows


def tune_nprobe(index, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray) -> tuple[int, float, dict]:
    """The smallest nprobe whose recall@10 (own row left out) reaches TARGET_RECALL, with every recall tried."""
    queries = read_rows(vectors, rows)
    tried: dict[str, float] = {}
    for nprobe in (n for n in NPROBES if n <= index.nlist):
        index.nprobe = nprobe
        _, found = search_ann(index, vectors, queries, 11)
        hits = [len(set(row[row != own][:10].tolist()) & set(expected.tolist()))
                for row, own, expected in zip(found, rows, truth, strict=True)]
        recall = round(sum(hits) / (10 * len(rows)), 4)
        tried[str(nprobe)] = recall
        if recall >= TARGET_RECALL:
            return nprobe, recall, tried
    widest = max(int(n) for n in tried)  # the target was not reached: the widest search tried, its recall recorded
    return widest, tried[str(widest)], tried


def load_ann(path: Path, nprobe: int, in_memory: bool = False):
    """The index file set to its tuned nprobe: memory-mapped and read-only (opening it reads no vectors), or with
    `in_memory` read whole, which a server that answers many queries wants: FAISS scans in-memory lists about twice
    as fast as mapped ones (2.1 vs 4.4 ms a query at 300k, measured), for the file's size in memory and about a
    second per 1.5 GB at start."""
    faiss = faiss_module()
    flags = 0 if in_memory else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(os.fspath(path), flags)
    index.nprobe = nprobe
    return index


def search_ann(index, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of each query's k best: `rerank_count(k)` candidates through the IVF file, re-scored exactly
    with their stored `vectors` (rows -1 and scores -inf where fewer exist). FAISS spreads a batch's queries over
    the threads, which leaves one query on one thread; a lone query (a server's usual request) is spread over the
    lists it visits instead (parallel_mode 1: 1.7x faster on 2 cores, measured)."""
    index.parallel_mode = 1 if len(queries) == 1 else 0
    _, found = index.search(queries, min(rerank_count(k), index.ntotal))
    return rerank(vectors, queries, found, k)


def rerank_count(k: int) -> int:
    """Candidates the IVF file returns for an answer of k: enough that the 8-bit codes' ordering errors are
    repaired by the exact scores."""
    return max(RERANK_MIN, 4 * k)


def rerank(vectors: np.ndarray, queries: np.ndarray, found: np.ndarray, k: int,
           queries_at_a_time: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's `found` rows (-1: none) by their exact inner product with the stored vectors,
    read once per distinct row (file reads from a memory-mapped file, see `read_rows`)."""
    distinct = np.unique(found[found >= 0])
    scores = np.full(found.shape, -np.inf, np.float32)
    stored = read_rows(vectors, distinct) if len(distinct) else None
    for start in range(0, len(found) if len(distinct) else 0, queries_at_a_time):
        block = found[start:start + queries_at_a_time]
        valid = block >= 0
        gathered = stored[np.searchsorted(distinct, np.where(valid, block, distinct[0]))]
        exact = np.einsum("qcd,qd->qc", gathered, queries[start:start + queries_at_a_time])
        scores[start:start + queries_at_a_time] = np.where(valid, exact, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best_scores, best_rows = np.take_along_axis(scores, order, axis=1), np.take_along_axis(found, order, axis=1)
    return best_scores, np.where(np.isfinite(best_scores), best_rows, -1)
