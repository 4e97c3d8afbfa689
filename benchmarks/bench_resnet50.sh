#!/usr/bin/env bash
# onnxruntime vs PyTorch eager, resnet50 fp32 (random weights: speed does not depend on them), and int8.
# Run from the repository root: bash benchmarks/bench_resnet50.sh   (writes benchmarks/bench_resnet50*.json)
set -euo pipefail
BIN=.venv/bin
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$BIN/transfer export --backbone resnet50 --no-pretrained -o "$TMP/resnet50.onnx"
$BIN/transfer bench "$TMP/resnet50.onnx" --batch-sizes 1,16 --seconds 10 --against-torch resnet50 \
    --json benchmarks/bench_resnet50.json
