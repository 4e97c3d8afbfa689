"""ONNX files: made, checked and run.

Holds: `export` (PyTorch -> ONNX), `verify` (checker, declared shapes, onnxruntime against PyTorch within a stated
tolerance), `cam` (the class activation map as a second output, checked exact) and `run_data` (a run's thresholds
and validation images), the torch modules; and the torch-free `runtime` (OnnxModel, what embedders import), `int8`
(static quantisation by CPU, judged on held-out images), `int8_nncf` (NNCF, its default method) and
`graph_preprocessing` (the evaluation transform as ONNX nodes) and `cuda_libraries` (pip-installed CUDA and cuDNN
loaded for the CUDA provider without torch).

May import: the torch-free modules only `transfer.core` (plus onnx, onnxruntime, numpy, pillow); `export`, `verify`,
`cam` and `run_data` also `transfer.training`, `transfer.data` and `models`. Holds only the telemetry opt-out, so
`exporters.runtime` stays light.
"""

from transfer.core.privacy import opt_out_of_telemetry

opt_out_of_telemetry()  # before onnxruntime loads: no device id, no usage events (transfer.core.privacy)
