"""The torch-free apps that run an exported ONNX file: `predict` (batched predictions, shards, onnxruntime timing),
`serve` (the HTTP server and its page), `search` (a similar-image index: load, validate, query, contact sheet) and
`ann` (its approximate search, FAISS IVF-SQ8 with exact re-ranking and a measured recall) and `cam` (heatmaps from
a file's class activation map output: `predict --cam`, `explain --onnx`, serve's `/predict?cam=1`).

May import: `transfer.core`, the torch-free `exporters` (runtime, int8, graph_preprocessing) and the torch-free
`transfer.data` modules; never torch, timm, torchvision, `transfer.training` or `transfer.apps` (checked by
import-linter). So an app that embeds them needs onnxruntime, numpy and pillow only (and faiss for `ann`).
"""
