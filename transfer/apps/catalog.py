"""Library entry points behind the small commands (`backbones`, `layers`): one call per command."""

from __future__ import annotations

from models.registry import get_backbone, list_backbones


def backbone_table() -> list[dict]:
    """One dict per registered backbone, from the registry alone (no torch, no model built: it answers at once)."""
    from models.availability import weights_status

    rows = []
    for spec in list_backbones():
        status = weights_status(spec)
        rows.append({
            "name": spec.name,
            "timm_model": spec.timm_name or f"{spec.name} (built here)",
            "input_size": spec.input_size_default,
            "params": spec.params,
            "feature_layer": spec.feature_layer,
            "weights_source": status.source,
            "available": status.available,
        })
    return rows


def timm_table(pattern: str | None = None) -> list[dict]:
    """timm's architectures matching `pattern`, each with its pretrained tags; no model is built."""
    from models.timm_backbones import list_timm

    return list_timm(pattern)


def layer_summary(backbone: str, input_size: int | None = None, only: list[str] | None = None):
    """The Keras-style summary of `backbone` at `input_size` (default: its native size), from a forward pass.

    `only` keeps the rows of those layers (aliases or module paths, resolved with the usual suggestions).
    """
    from models.layers import check_input_size, describe_layers, resolve_layer
    from models.weights import build_architecture

    spec = get_backbone(backbone)
    size = check_input_size(spec.name, input_size) or spec.input_size
    model = build_architecture(spec)
    wanted = {resolve_layer(spec, name, model) for name in only or []}
    rows = describe_layers(spec, model, size)
    if not spec.curated:  # no Keras names: timm's feature layers (feature_info) come first, then every module
        rows.sort(key=lambda row: row.path not in spec.feature_layers)
    return [row for row in rows if not wanted or row.path in wanted or spec.aliases.get(row.alias) in wanted], size
