"""Backbones: `registry` (curated entries with Keras names, one decorator each; timm owns the architectures),
`weights` (pretrained weights, offline-first), `layers` (Keras layer names, summaries, feature taps, input sizes),
`classic` (the tutorials' AlexNet, LeNet-5, CIFAR ConvNet), `imagenet` (class names), `availability`.

May import `transfer.core` only (errors, preprocess, options): nothing above it.
"""

from transfer.core.privacy import opt_out_of_telemetry

opt_out_of_telemetry()  # before onnxruntime loads: no device id, no usage events (transfer.core.privacy)
