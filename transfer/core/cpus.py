"""How many CPUs this process may really use, for sizing every thread pool (PyTorch, onnxruntime, decoding).

`os.cpu_count()` is the host's count. A process pinned with taskset or a Kubernetes cpuset sees fewer in its
affinity mask, and a container or CI runner with a CPU quota (`docker --cpus 1`) gets only that many CPUs' worth of
time, whatever the host has: pools sized from the host's count then run more threads than there is CPU time, and
each waits for the others (hundreds of times slower under load, measured in issue 40). The smaller of the mask and
the quota (rounded up) is what a pool should use. `size_thread_pools` (run when `transfer` is imported, before torch,
FAISS or OpenBLAS start their pools) sets OMP_NUM_THREADS to it when it is below the host's count, and onnxruntime
sessions read the same number (`session_threads`); a value the user set wins everywhere. Reads /sys only; no torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # where the kernel mounts the cgroup file systems (v2, or v1's cpu/)


def usable_cpus() -> int:
    """min(the affinity mask, the cgroup CPU quota rounded up), at least 1."""
    try:
        mask = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        mask = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(mask, math.ceil(quota)) if quota else mask)


def cgroup_cpu_quota(root: Path | None = None, membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup allows, the tightest of its own and its parents' limits (cgroup v2
    `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), or None when unlimited or unknown. The cgroup comes from
    `membership` (/proc/self/cgroup); inside a container that is the container's own, mounted at the root."""
    root = root or CGROUP_ROOT
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = ["0::/", "1:cpu:/"]
    limits = []
    for line in lines:
        _, controllers, own = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2 (unified hierarchy)
            limits += [_v2_quota(folder) for folder in _up(root, own)]
        elif "cpu" in controllers.split(","):
            for mount in (root / "cpu", root / "cpu,cpuacct"):
                limits += [_v1_quota(folder) for folder in _up(mount, own)]
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


def _up(base: Path, own: str) -> list[Path]:
    """`base`/`own` and each of its parents up to `base` (a parent's limit binds its children too)."""
    folder = base / own.strip("/")
    return [folder, *(parent for parent in folder.parents if parent == base or base in parent.parents)]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        period_us = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def size_thread_pools() -> None:
    """OMP_NUM_THREADS (read by PyTorch, FAISS and OpenBLAS when they start, and inherited by every process transfer
    starts) set to `usable_cpus()` when that is below the host's count, and OMP_WAIT_POLICY to PASSIVE: OpenMP
    threads that finish a parallel region sleep instead of spinning for the next one. A spinning thread holds a core
    that another process (or our own decoding, search or onnxruntime) needs; with two CPU-bound processes competing
    on 2 cores, stage 1 on cached features took 8.8x its idle time per epoch spinning and 2.8x sleeping, the tour's
    finetune 3.2x and 1.7x (benchmarks/busy.py). Values the user set are kept."""
    usable = usable_cpus()
    if usable < (os.cpu_count() or usable):
        os.environ.setdefault("OMP_NUM_THREADS", str(usable))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def session_threads() -> int:
    """An onnxruntime session's intra-op threads: OMP_NUM_THREADS when set (by the user or `size_thread_pools`),
    else 0 (onnxruntime's own choice, the physical cores)."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0
