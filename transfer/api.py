"""Library entry points behind the small commands (`backbones`, `layers`): one call per command."""

from __future__ import annotations

from models.layers import LayerInfo, describe_layers, resolve_layer
from models.registry import get_backbone, list_backbones
from models.weights import build_architecture, weights_status


def backbone_table() -> list[dict]:
    """One dict per registered backbone: name, timm model, input size, parameter count, weights source/availability."""
    rows = []
    for spec in list_backbones():
        status = weights_status(spec)
        model = build_architecture(spec)
        rows.append({
            "name": spec.name,
            "timm_model": spec.timm_name or f"{spec.name} (built here)",
            "input_size": spec.input_size,
            "params": sum(p.numel() for p in model.parameters()),
            "weights_source": status.source,
            "available": status.available,
        })
    return rows


def layer_summary(
    backbone: str, input_size: int | None = None, only: list[str] | None = None
) -> tuple[list[LayerInfo], int]:
    """The Keras-style summary of `backbone` at `input_size` (default: its native size), from a forward pass.

    `only` keeps the rows of those layers (aliases or module paths, resolved with the usual suggestions).
    """
    spec = get_backbone(backbone)
    size = input_size or spec.input_size
    model = build_architecture(spec)
    wanted = {resolve_layer(spec, name, model) for name in only or []}
    rows = describe_layers(spec, model, size)
    return [row for row in rows if not wanted or row.path in wanted], size
