"""Nothing leaves the machine: the switches that keep third-party libraries from phoning home or writing ids.

onnxruntime (1.2x and later) writes a device id and an event database under `~/.cache/Microsoft/DeveloperTools` at
import and sends usage events to Microsoft unless `ORT_DISABLE_TELEMETRY` is set before it loads; MLflow 3 and
huggingface_hub send usage events unless told not to. These are their documented opt-outs, set (without
overriding a value the user chose) when `transfer`, `exporters` or `models` is imported, and inherited by every
process `transfer` starts (torchrun workers, servers). NNCF's telemetry is switched off at its import
(`exporters.int8_nncf.import_nncf`). README: "What transfer sends and writes".
"""

from __future__ import annotations

import os

OPT_OUTS = {
    "ORT_DISABLE_TELEMETRY": "1",  # onnxruntime: no device id file, no event database, no upload
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3's usage events
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub (timm's hub downloads)
    "DO_NOT_TRACK": "true",  # the common convention several libraries also honour
}


def opt_out_of_telemetry() -> None:
    """Set every opt-out the user has not set; must run before onnxruntime is imported (it decides at load)."""
    for name, value in OPT_OUTS.items():
        os.environ.setdefault(name, value)
