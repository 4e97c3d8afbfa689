"""CUDA and cuDNN for onnxruntime-gpu in a process that never imports torch.

onnxruntime's CUDA provider needs the CUDA and cuDNN shared libraries. A process that imported torch has them
loaded already; a torch-free one (`transfer predict`, `serve`, an app embedding `OnnxModel`) must find them itself,
and pip-installed CUDA (the nvidia-* packages that torch and `onnxruntime-gpu[cuda,cudnn]` bring) is not on the
loader's search path. onnxruntime's own `preload_dlls` loads them from those packages beside it, else by the default
search path (LD_LIBRARY_PATH, the system's CUDA), as onnxruntime's install guide says to. What it could not load is
kept, so the error when the CUDA provider still does not start can name the library instead of guessing.
"""

from __future__ import annotations

import contextlib
import functools
import io

import onnxruntime as ort


@functools.cache
def load_cuda_libraries() -> str:
    """Load CUDA and cuDNN for onnxruntime once per process; returns onnxruntime's report of what failed ('' when
    everything loaded, or when this onnxruntime has no CUDA build to load them for)."""
    if not hasattr(ort, "preload_dlls"):  # onnxruntime before 1.21
        return ""
    report = io.StringIO()
    with contextlib.redirect_stdout(report):  # it prints failures; the caller decides whether they matter
        ort.preload_dlls()
    return report.getvalue().strip()


def missing_libraries() -> str:
    """The first library onnxruntime could not load, as a clause for an error message ('' when none failed)."""
    failures = [line for line in load_cuda_libraries().splitlines() if line.startswith("Failed to load")]
    return f"; {failures[0]}" if failures else ""
