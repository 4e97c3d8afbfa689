"""transfer: fine-tune timm backbones on image folders, extract Keras-named features, export verified ONNX.

Importing this package does not import torch: `transfer.preprocess`, `transfer.images` and `transfer.errors`
are used by the torch-free ONNX runtime in `exporters`. The notebook API loads lazily:

    import transfer
    result = transfer.extract("photos/", backbone="vgg16", layers=["block4_pool"])
    result.features["block4_pool"].shape, result.paths
    transfer.finetune("mydata/", transfer.FinetuneConfig(backbone="efficientnet_lite0"))
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "extract": ("transfer.features", "extract"),
    "finetune": ("transfer.train", "finetune"),
    "FinetuneConfig": ("transfer.train", "FinetuneConfig"),
    "export_onnx": ("exporters.export", "export_onnx"),
    "OnnxModel": ("exporters.runtime", "OnnxModel"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'transfer' has no attribute {name!r}")
