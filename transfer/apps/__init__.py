"""The apps that may need torch: `extract` (features by Keras layer name; `feature_parts`, its streamed and
resumable parts, torch-free), `evaluate`, `bench` (PyTorch eager next
to onnxruntime), `index` (builds a search index through `extract`), `explain` (Grad-CAM heatmaps, kernels and feature
maps; `explain_pictures` draws them) and `catalog` (the backbone and layer tables).

May import everything below them: `transfer.serving`, `transfer.training`, `transfer.data`, `models`,
`exporters.runtime` and `transfer.core`; not `exporters.export`, and nothing imports `apps` but `cli.py` and the
lazy names of `transfer`. Empty on purpose: `extract` imports torch, `catalog` does not.
"""
