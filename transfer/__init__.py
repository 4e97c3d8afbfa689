"""transfer: fine-tune timm backbones on image folders, extract Keras-named features, export verified ONNX.

Importing this package does not import torch: `transfer.preprocess`, `transfer.images` and `transfer.errors`
are used by the torch-free ONNX runtime in `exporters`.
"""

__version__ = "0.1.0"
