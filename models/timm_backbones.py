"""Any timm architecture or pretrained tag as a backbone, described from timm's own metadata, not from a table.

For a name the registry does not curate (`convnext_tiny`, `convnext_tiny.fb_in22k`, `vit_small_patch16_224`):
- preprocessing from the tag's `pretrained_cfg` (input size, mean, std, crop_pct, interpolation);
- unfreeze groups from the model's `group_matcher(coarse=True)`, in timm's order (stem to top), each group named
  by the modules it holds, so `--unfreeze K` unfreezes K of its blocks from the top;
- feature layers from `feature_info` (module paths, shallow to deep); the deepest is the default for extract;
- pooling by the model's own head (`forward_head(pre_logits=True)`, reached as `model(x)` after
  `reset_classifier(0)`): average pooling for CNNs, the class token or its norm for ViTs, as each family trains;
- input size: a model whose pretrained config fixes it (ViT, DeiT, EVA) runs with `dynamic_img_size=True` when its
  class takes it (position embeddings resampled), else at its own size only.

The architecture is built once on the meta device to read these facts: no memory, no weights, no download.
"""

from __future__ import annotations

import difflib
import fnmatch
from functools import lru_cache

from models.spec import BackboneSpec, UnfreezeGroup
from transfer.core.errors import UnknownNameError


@lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    """Every architecture timm can build."""
    import timm

    return tuple(timm.list_models())


def is_timm_name(name: str) -> bool:
    """An architecture of timm, or an architecture with a pretrained tag timm knows (`arch.tag`)."""
    import timm

    architecture, _, tag = name.partition(".")
    if architecture not in timm_names():
        return False
    return not tag or name in timm.list_pretrained(f"{architecture}.*")


def list_timm(pattern: str | None = None) -> list[dict]:
    """timm's architectures matching `pattern` (fnmatch, e.g. 'convnext*'), each with its pretrained tags; nothing
    is built, so thousands list at once."""
    import timm

    tags: dict[str, list[str]] = {}
    for name in timm.list_pretrained():
        architecture, _, tag = name.partition(".")
        tags.setdefault(architecture, []).append(tag)
    names = [n for n in timm_names() if pattern is None or fnmatch.fnmatch(n, pattern)]
    return [{"name": n, "pretrained_tags": tags.get(n, [])} for n in names]


@lru_cache(maxsize=64)
def timm_backbone(name: str) -> BackboneSpec:
    """The spec of timm's `name` (an architecture or `arch.tag`), read from the model and its pretrained config."""
    import timm
    import torch

    if not is_timm_name(name):
        raise UnknownNameError("backbone", name, timm_names())
    cfg = timm.models.get_pretrained_cfg(name)
    kwargs: dict = {}
    fixed = bool(getattr(cfg, "fixed_input_size", False))
    with torch.device("meta"):
        if fixed:
            try:
                model = timm.create_model(name, pretrained=False, dynamic_img_size=True)
                kwargs, fixed = {"dynamic_img_size": True}, False
            except TypeError:  # the class has no dynamic size: it runs at its own size only
                model = timm.create_model(name, pretrained=False)
        else:
            model = timm.create_model(name, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    feature_layers = tuple(dict.fromkeys(
        found for info in getattr(model, "feature_info", None) or []
        if (found := _module_named(str(info["module"]), modules)) is not None))
    classifier = _classifier_path(getattr(cfg, "classifier", None))
    model.reset_classifier(0)
    has_weights = bool(cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file))
    return BackboneSpec(
        name=name,
        timm_name=name,
        aliases={},
        unfreeze_groups=unfreeze_groups(model),
        weights_source="timm" if has_weights else "none",
        classifier=classifier,
        input_size_default=int(cfg.input_size[-1]) if cfg is not None else 224,
        feature_layer=feature_layers[-1] if feature_layers else "",
        params=params,
        hf_hub_id=cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None,
        description=f"timm {type(model).__name__}" + (f" ({cfg.tag})" if cfg is not None and cfg.tag else ""),
        curated=False,
        pool="model",
        timm_kwargs=tuple(kwargs.items()),
        fixed_input_size=fixed,
        feature_layers=feature_layers,
        not_exportable=_not_exportable(model),
    )


# Modules neither ONNX exporter can trace (found by benchmarks/zoo.py), with the reason a user reads.
UNEXPORTABLE_MODULES = {
    "CondConv2d": "its CondConv layers build a different kernel for every image, which neither ONNX exporter can "
                  "trace (a convolution with a kernel of unknown shape)",
}


def _not_exportable(model) -> str:
    """The reason this architecture cannot become an ONNX file, or "" when nothing known stops it."""
    for module in model.modules():
        reason = UNEXPORTABLE_MODULES.get(type(module).__name__)
        if reason:
            return reason
    return ""


def _module_named(name: str, modules: dict) -> str | None:
    """A feature_info module name as a module that runs: itself, or the one path it misspells (Twins' feature_info
    says `block.3` for `blocks.3`); a ModuleList, which never runs as a whole, by its last member. None when there
    is no such module."""
    paths = [path for path in modules if path]
    if name not in modules:
        close = difflib.get_close_matches(name, paths, n=2, cutoff=0.9)
        if not close or (len(close) > 1 and close[0].count(".") != name.count(".")):
            return None
        name = close[0]
    module = modules[name]
    if type(module).__name__ == "ModuleList" and len(module):
        return f"{name}.{len(module) - 1}"
    return name


def _classifier_path(classifier) -> str:
    """timm's `classifier` as one module path: a model with several heads (CrossViT, distilled DeiT) names a tuple;
    their common parent is the classifier that `reset_classifier(0)` empties."""
    if not classifier:
        return ""
    if isinstance(classifier, str):
        return classifier
    parts = [name.split(".") for name in classifier]
    common = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common) or str(classifier[0])


def unfreeze_groups(model) -> tuple[UnfreezeGroup, ...]:
    """timm's coarse parameter groups (stem, each stage or block, the final norm) as unfreeze groups, from the top
    down; each group is the smallest set of module paths that holds exactly its parameters (a parameter of the root,
    such as a ViT's cls_token, stands for itself). A final group of norms alone joins the block below it, so
    `--unfreeze 1` always trains a block."""
    from timm.models import group_parameters

    if hasattr(model, "group_matcher"):
        groups = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    else:
        groups = _groups_by_feature_layers(model)
    owners = _parameters_by_module(model)
    modules = dict(model.named_modules())
    covers = [_smallest_cover(set(names), owners) for names in groups if names]
    if len(covers) > 1 and all("Norm" in type(modules[p]).__name__ for p in covers[-1] if p in modules):
        covers[-2:] = [covers[-1] + covers[-2]]  # a final norm alone (ConvNeXt's head.norm) joins the top block
    return tuple(UnfreezeGroup(_group_name(paths), tuple(paths)) for paths in reversed(covers))


def _groups_by_feature_layers(model) -> list[list[str]]:
    """For a model without `group_matcher` (MetaFormer): one group per feature_info module, in order; parameters
    of top-level modules before the first of them form the stem, the rest (a head norm) join the top group."""
    names = [name for name, _ in model.named_parameters()]
    layers = [str(info["module"]) for info in getattr(model, "feature_info", None) or []]
    if not layers:
        return [names]
    grouped = [[n for n in names if n.startswith(layer + ".")] for layer in layers]
    placed = {n for group in grouped for n in group}
    order = [name for name, _ in model.named_children()]
    first = order.index(layers[0].split(".")[0]) if layers[0].split(".")[0] in order else 0
    stem = [n for n in names if n not in placed and n.split(".")[0] in order[:first]]
    grouped[-1] += [n for n in names if n not in placed and n not in stem]
    return [stem, *grouped]


def _parameters_by_module(model) -> dict[str, set[str]]:
    """Module path -> the names of every parameter under it."""
    return {path: {f"{path}.{n}" for n, _ in module.named_parameters()}
            for path, module in model.named_modules() if path}


def _smallest_cover(names: set[str], owners: dict[str, set[str]]) -> list[str]:
    """The shallowest module paths whose parameters all belong to `names` and that together hold all of them."""
    chosen: list[str] = []
    covered: set[str] = set()
    for path in sorted(owners, key=lambda p: (p.count("."), p)):
        held = owners[path]
        if held and held <= names and not held <= covered and not any(path.startswith(c + ".") for c in chosen):
            chosen.append(path)
            covered |= held
    chosen += sorted(names - covered)  # parameters of the root module itself
    return chosen


def _group_name(paths: list[str]) -> str:
    """`stages.3`, or `blocks.11+norm`, or `stem (3 modules)`."""
    if len(paths) <= 2:
        return "+".join(paths)
    return f"{paths[0]} (+{len(paths) - 1})"
