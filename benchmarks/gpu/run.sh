#!/usr/bin/env bash
# The whole GPU session (issues 13, 28, 41), in as few device calls as the 64 MiB carry limit allows (budget: 15
# device minutes, start-up and the gaps between calls included).
#
# Here, once:   bash benchmarks/gpu/run.sh prepare      (onnxruntime-gpu and wheels.txt, one tar split over five
#               git-ignored folders .gpu_carry0..4 of about 57 MB each)
# Device calls, back to back on one warm machine (the device tool's `run`; about 90 s of start-up, then):
#   1-5. carry [".gpu_carryN"], command: bash benchmarks/gpu/run.sh part N        (N = 0..4; seconds each; part 4
#        checks the tar's sha256 and unpacks it)
#   6.   command: bash benchmarks/gpu/run.sh tests, timeout_s 330    (gpu tests: the staged run and its checkpoints,
#        evaluate/extract/predict/bench, fp16 on the CUDA provider, batch-size auto, a ConvNeXt and a ViT, a
#        multi-label run and serve --device cuda, CAM in the ONNX file and predict --cam, explain's Grad-CAM, index
#        and similar, tune; then torchrun with nccl at world size 1 (one card: two nccl processes need two))
#   7.   command: bash benchmarks/gpu/run.sh suite [SECONDS, default 300], timeout_s SECONDS + 30    (the GPU suite:
#        resnet50 first, then vgg16, inception_v3, efficientnet_lite0, convnext_tiny, vit_small_patch16_224 while
#        time lasts; give it what the session's device time has left, less a minute)
# Afterwards, here: copy the returned results_gpu.json, gpu_tests.txt and torchrun_nccl.txt into benchmarks/, then
# `python benchmarks/run.py --markdown-only` adds the GPU table to RESULTS.md.
# Rehearsal without a GPU:  bash benchmarks/gpu/run.sh rehearse   (steps 6 and 7 on CPU, small, inside a stand-in
# for the card's Python image (image_env.py): only its packages plus the carried wheels; about 4 minutes here)
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

use_card() {  # the carried wheels, installed once per warm machine: onnxruntime-gpu in place of the image's CPU
  # build, beside torch's nvidia-* CUDA packages (where `pip install onnxruntime-gpu` puts it, so a torch-free process
  # finds CUDA and cuDNN as a user's would), the others in /tmp/site; then our code on the path
  if ! python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"
  then
    python3 -m pip uninstall -q -y onnxruntime && python3 -m pip install -q --no-index --no-deps --no-compile \
      /tmp/carry/wheels/onnxruntime_gpu-*.whl || exit 1
  fi
  [ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $(ls /tmp/carry/wheels/*.whl | grep -v onnxruntime_gpu) || exit 1
  export PYTHONPATH=/tmp/site:$root
  python=python3 device=cuda rehearse=""
  python3 -c "import onnxruntime as o; from exporters.cuda_libraries import load_cuda_libraries as load; print('onnxruntime', o.__version__, o.get_available_providers(), load() or 'CUDA and cuDNN loaded')"
}

use_cpu() {  # the rehearsal: the same steps on this machine's CPU, with the card's packages only (image_env.py)
  local image=${IMAGE_ENV:-/tmp/transfer-image}
  "$root/.venv/bin/python" benchmarks/gpu/image_env.py "$image" || exit 1
  export PYTHONPATH=$image/carried:$root TRANSFER_GPU_REHEARSAL=1
  python=$image/venv/bin/python device=cpu rehearse="--rehearse"
}

tests() {
  step gpu_tests 270 "$python" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -v -rs
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
  bash ../shared/gpu/ort-gpu-pieces.sh > /tmp/ort-gpu-pieces.log || { cat /tmp/ort-gpu-pieces.log; exit 1; }
  name=$(sed -n 's/^Ready: \([^ ]*\) .*/\1/p' /tmp/ort-gpu-pieces.log)
  staging=$(mktemp -d) && mkdir "$staging/wheels"
  cat .ortgpu?/part? > "$staging/wheels/$name" && rm -rf .ortgpu?
  fetch=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$staging/wheels")
  for pin in $(sed 's/#.*//' benchmarks/gpu/wheels.txt); do
    "${fetch[@]}" "$pin" 2>/dev/null || "$root/.venv/bin/python" -m pip wheel -q --no-deps -w "$staging/wheels" \
      "$pin" || exit 1
  done
  ls "$staging"/wheels/*.whl | grep -v -e 'none-any' -e 'cp312' -e 'abi3' && { echo "a wheel above is not for 3.12"; exit 1; }
  tar -cf "$staging/carry.tar" -C "$staging" wheels
  (cd "$staging" && sha256sum carry.tar > carry.sha256 && split -n 5 -d -a 1 carry.tar part)
  for i in 0 1 2 3 4; do rm -rf ".gpu_carry$i" && mkdir ".gpu_carry$i" && mv "$staging/part$i" ".gpu_carry$i/"; done
  mv "$staging/carry.sha256" .gpu_carry4/ && ls "$staging/wheels" && rm -rf "$staging" && du -sh .gpu_carry?
  ;;
part)
  n=${2:?part N}
  mkdir -p /tmp/carry && cp .gpu_carry"$n"/* /tmp/carry/ && ls -l /tmp/carry
  if [ "$n" = 4 ]; then
    cd /tmp/carry && cat part? > carry.tar && sha256sum -c carry.sha256 && tar -xf carry.tar && ls wheels || exit 1
  fi
  ;;
tests) nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; use_card; tests ;;
suite) use_card; suite "${2:-300}" ;;
rehearse) use_cpu; tests; suite 900 ;;
*) sed -n 2,20p "$0"; exit 2 ;;
esac
ls -l "$OUT"
