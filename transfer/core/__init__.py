"""The torch-free base everything else stands on: what `exporters.runtime`, serving and search need, and no more.

Holds: `errors` (the one error hierarchy), `io` (atomic writes, locks, output checks), `progress`, `images`
(decoding: EXIF, modes, size limits), `preprocess` (the evaluation transform and its ONNX metadata),
`model_metadata` (the metadata checks every reader of an exported file shares; standard library only, so an app
copies it), `privacy` (third-party telemetry opt-outs), `cpus` (thread pools sized from the usable CPUs), `metrics`
and `interpret` (reports, plots, softmax; `multilabel_errors` for several labels per image), `heatmaps` (a heatmap's
peak, box and overlay in the image's own pixels), `options` (flag
checks), `rundir` (a run directory's files, lock and fingerprint), `world` (torchrun's ranks and the split of work,
without torch).

May import: the standard library, numpy, pillow, rich; matplotlib and scikit-learn inside functions. Nothing of
this project, and never torch, timm or torchvision (import-linter contracts in pyproject.toml).
Import the modules themselves (`from transfer.core.errors import DataError`); nothing is re-exported here, so that
importing one module stays cheap.
"""
