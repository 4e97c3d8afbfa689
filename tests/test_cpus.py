"""Thread pools sized from the CPUs a process may really use (affinity mask, cgroup quota), not the host's count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from transfer.core.cpus import cgroup_cpu_quota

ROOT = Path(__file__).resolve().parents[1]


def test_the_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    """The process's own cgroup (from /proc/self/cgroup) and its parents: the tightest limit wins."""
    membership = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    membership.write_text("0::/job/step\n")
    (v2 / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2, membership) is None
    (v2 / "job" / "cpu.max").write_text("150000 100000\n")  # the parent's limit binds the child
    assert cgroup_cpu_quota(v2, membership) == 1.5
    (v2 / "job" / "step" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_quota(v2, membership) == 0.5
    v1 = tmp_path / "v1"
    (v1 / "cpu" / "docker" / "abc").mkdir(parents=True)
    membership.write_text("4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/\n")
    for folder, quota in ((v1 / "cpu" / "docker" / "abc", "100000"), (v1 / "cpu", "-1")):
        (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1, membership) == 1.0
    (v1 / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1, membership) is None
    assert cgroup_cpu_quota(tmp_path / "nothing", membership) is None


PROBE = """
import json, os
import transfer
from exporters.runtime import OnnxModel
import torch
from transfer.data.datasets import default_workers
model = OnnxModel({model!r}, device="cpu")
print(json.dumps({{"omp": os.environ.get("OMP_NUM_THREADS"), "wait": os.environ.get("OMP_WAIT_POLICY"),
                  "torch": torch.get_num_threads(),
                  "onnxruntime": model.session.get_session_options().intra_op_num_threads,
                  "decode": model.decode_workers, "loader": default_workers()}}))
"""


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2, reason="needs taskset, 2 CPUs")
def test_a_process_allowed_one_cpu_sizes_every_pool_to_one(imagenet_lite0_onnx):
    """Pinned to one CPU (as a cpuset or `docker --cpus 1` leaves a process), PyTorch, onnxruntime, the decode
    threads and the loader workers use 1, where they used the host's count, and OpenMP threads sleep when idle;
    a user's OMP_NUM_THREADS and OMP_WAIT_POLICY win."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    code = PROBE.format(model=str(imagenet_lite0_onnx[0]))
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout.strip().splitlines()[-1]) == {"omp": "1", "wait": "PASSIVE", "torch": 1,
                                                                   "onnxruntime": 1, "decode": 1, "loader": 1}
    chosen = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}, cwd=ROOT, timeout=300)
    assert chosen.returncode == 0, chosen.stderr
    record = json.loads(chosen.stdout.strip().splitlines()[-1])
    # ours are left alone (PyTorch itself may still cap its pool at the affinity mask: 1 or 2, both seen)
    assert record["omp"] == "2" and record["onnxruntime"] == 2 and record["wait"] == "ACTIVE"
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert free.returncode == 0 and json.loads(free.stdout.strip().splitlines()[-1])["omp"] is None


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")


@pytest.mark.skipif(not os.access(CPU_CGROUPS, os.W_OK) or (os.cpu_count() or 1) < 2,
                    reason="needs a writable cgroup v1 cpu hierarchy (root) and 2 CPUs")
def test_a_cgroup_quota_of_one_cpu_sizes_every_pool_to_one(imagenet_lite0_onnx):
    """A real cgroup with a quota of one CPU's time (what `docker --cpus 1` makes), every CPU still in the affinity
    mask: the pools use 1."""
    group = CPU_CGROUPS / f"transfer-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        code = PROBE.format(model=str(imagenet_lite0_onnx[0]))
        limited = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"', sys.executable,
                                  code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert limited.returncode == 0, limited.stderr
        assert json.loads(limited.stdout.strip().splitlines()[-1]) == {"omp": "1", "wait": "PASSIVE", "torch": 1,
                                                                        "onnxruntime": 1, "decode": 1, "loader": 1}
    finally:
        group.rmdir()  # its process has exited, so the group is empty
