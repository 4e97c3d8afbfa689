#!/usr/bin/env bash
# Issue 13's whole GPU session, in as few device calls as the 64 MiB carry limit allows (budget: 15 device minutes).
#
# Here, once:   bash benchmarks/gpu/run.sh prepare      (onnxruntime-gpu split into .ortgpu0..4, git-ignored)
# Device calls, back to back on one warm machine (the device tool's `run`; about 90 s of start-up, then):
#   1-5. carry [".ortgpuN"], command: bash benchmarks/gpu/run.sh part N          (N = 0..4; seconds each)
#   6.   command: bash benchmarks/gpu/run.sh tests, timeout_s 300    (gpu tests: the staged run, evaluate/extract/
#        predict/bench, fp16 on the CUDA provider, batch-size auto, a ConvNeXt and a ViT, a multi-label run and serve
#        --device cuda; then torchrun with nccl at world size 1 (one card: two nccl processes need two); ~3.5 min)
#   7.   command: bash benchmarks/gpu/run.sh suite, timeout_s 450    (the GPU suite: resnet50 first, then vgg16,
#        inception_v3, efficientnet_lite0, convnext_tiny, vit_small_patch16_224 while time lasts; about 7 min)
# Afterwards, here: copy the returned results_gpu.json, gpu_tests.txt and torchrun_nccl.txt into benchmarks/, then
# `python benchmarks/run.py --markdown-only` adds the GPU table to RESULTS.md.
# Rehearsal without a GPU:  bash benchmarks/gpu/run.sh rehearse   (steps 6 and 7 on CPU, small; about 8 minutes)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
OUT=${OUT:-$root/.gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
phase=${1:-}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, go on whatever happens
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - started))s" | tee -a "$OUT/$name.txt"
  tail -n 25 "$OUT/$name.txt"
}

use_card() {  # onnxruntime-gpu from the carried pieces (installed once per warm machine), our code on the path
  [ -d /tmp/site/onnxruntime ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site \
    "/tmp/ort/$(cat /tmp/ort/wheel_name)" || exit 1
  export PYTHONPATH=/tmp/site:$root
  python=python3 device=cuda rehearse=""
  python3 -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
}

use_cpu() {  # the rehearsal: the same steps on this machine's CPU
  export PYTHONPATH=$root TRANSFER_GPU_REHEARSAL=1
  python=${PYTHON:-$root/.venv/bin/python} device=cpu rehearse="--rehearse"
}

tests() {
  step gpu_tests 210 "$python" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -rs
  local work
  work=$(mktemp -d)
  "$python" - "$work" <<'PY'
import sys
from pathlib import Path

from tests.test_finetune import random_weights_file
from transfer.data.samples import write_digits_folder

work = Path(sys.argv[1])
write_digits_folder(work / "digits", per_class=20, size=64, classes=4, margin=0.0)
random_weights_file(work, "efficientnet_lite0", size=64)
PY
  step torchrun_nccl 60 "$python" -m torch.distributed.run --standalone --nproc-per-node 1 cli.py finetune \
    "$work/digits" -b efficientnet_lite0 --weights "$work/efficientnet_lite0.pth" --input-size 64 \
    -o "$work/run" --device "$device" --epochs-head 1 --epochs-finetune 1 --batch-size auto --workers 2
}

suite() {  # resnet50 first: a run cut short still has the acceptance row
  step suite "$1" "$python" benchmarks/run.py --suite gpu --out "$OUT" $rehearse
}

case "$phase" in
prepare)
  bash ../shared/gpu/ort-gpu-pieces.sh | tee /tmp/ort-gpu-pieces.log
  sed -n 's/^Ready: \([^ ]*\) .*/\1/p' /tmp/ort-gpu-pieces.log > .ortgpu4/wheel_name
  echo "wheel name for the device: $(cat .ortgpu4/wheel_name)"
  ;;
part)
  n=${2:?part N}
  mkdir -p /tmp/ort && cp .ortgpu"$n"/* /tmp/ort/ && ls -l /tmp/ort
  if [ "$n" = 4 ]; then
    cat /tmp/ort/part? > "/tmp/ort/$(cat /tmp/ort/wheel_name)" && sha256sum "/tmp/ort/$(cat /tmp/ort/wheel_name)"
  fi
  ;;
tests) nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; use_card; tests ;;
suite) use_card; suite 420 ;;
rehearse) use_cpu; tests; suite 900 ;;
*) sed -n 2,13p "$0"; exit 2 ;;
esac
ls -l "$OUT"
