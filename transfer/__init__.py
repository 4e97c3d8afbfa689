"""transfer: fine-tune timm backbones on image folders, extract Keras-named features, export verified ONNX.

Importing this package does not import torch. The notebook API below loads lazily, on first use:

    import transfer
    result = transfer.extract("photos/", backbone="vgg16", layers=["block4_pool"])
    result.features["block4_pool"].shape, result.paths
    transfer.finetune("mydata/", transfer.FinetuneConfig(backbone="efficientnet_lite0"))

The packages, bottom to top (README, "How the code is laid out"; the rules are import-linter contracts in
pyproject.toml): `core` (torch-free base), `data`, `training`, `serving` (torch-free apps on an ONNX file),
`apps` (the apps that may need torch). `models/` and `exporters/` sit beside this package.
"""

from __future__ import annotations

from transfer.core.cpus import size_thread_pools
from transfer.core.privacy import opt_out_of_telemetry

opt_out_of_telemetry()  # before anything can import onnxruntime (transfer.core.privacy)
size_thread_pools()  # before torch, FAISS or OpenBLAS size their pools from the host's cores (transfer.core.cpus)

__version__ = "0.1.0"

_LAZY = {
    "extract": ("transfer.apps.extract", "extract"),
    "finetune": ("transfer.training.finetune", "finetune"),
    "FinetuneConfig": ("transfer.training.config", "FinetuneConfig"),
    "export_onnx": ("exporters.export", "export_onnx"),
    "OnnxModel": ("exporters.runtime", "OnnxModel"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
