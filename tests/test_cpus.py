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
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 1.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "nothing") is None


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
