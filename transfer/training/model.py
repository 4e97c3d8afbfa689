"""The fine-tuning model: a backbone without its classifier, plus a new head; freezing by unfreeze groups."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from models.spec import BackboneSpec, module_of
from transfer.core.errors import TransferError, UnknownNameError

HEADS = ("mlp", "linear")


def make_head(in_features: int, num_classes: int, kind: str = "mlp", dropout: float = 0.2,
              hidden: int = 1024) -> nn.Sequential:
    """Global average pool -> dropout -> Dense(hidden, ReLU) -> Dense(classes) (the InceptionV3 recipe), or linear."""
    if kind not in HEADS:
        raise TransferError(f"unknown head {kind!r}; use one of {', '.join(HEADS)}")
    layers: OrderedDict[str, nn.Module] = OrderedDict(drop=nn.Dropout(dropout))
    if kind == "mlp":
        layers.update(fc1=nn.Linear(in_features, hidden), act=nn.ReLU(), fc2=nn.Linear(hidden, num_classes))
    else:
        layers.update(fc=nn.Linear(in_features, num_classes))
    return nn.Sequential(layers)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes of a 4-D feature map (other inputs pass through): Keras' GlobalAveragePooling2D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x


POOLS = ("avg", "model", "none")


class TransferModel(nn.Module):
    """`backbone.forward_features` -> `global_pool` -> `head`.

    `pool`: "avg" averages `forward_features` (the curated CNNs, Keras' GlobalAveragePooling2D); "model" lets the
    timm model pool as it was trained (`forward_head(pre_logits=True)`, which is `backbone(x)` once its classifier is
    reset: average pooling and a norm for ConvNeXt, the class token for ViT); "none" is for the classic nets, whose
    own dense layers come first. The pooled features are exactly what stage 1's feature cache stores, so the head
    trains on the cache or on images with the same code. In a run, the Keras name `avg_pool` is `global_pool` and
    `predictions` is `head`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, pool: str = "avg"):
        super().__init__()
        if pool not in POOLS:
            raise TransferError(f"unknown pooling {pool!r}; use one of {', '.join(POOLS)}")
        self.backbone, self.head, self.pool = backbone, head, pool
        self.global_pool = GlobalAvgPool() if pool == "avg" else nn.Identity()

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "model":
            return self.global_pool(self.backbone(x))
        return self.global_pool(self.backbone.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled_features(x))


def resolve_run_layer(spec: BackboneSpec, name: str, model: TransferModel) -> str:
    """A layer name of a fine-tuned run -> module path in the `TransferModel`.

    `predictions` (or the backbone's classifier path) is the run's own head, so it gives the run's logits;
    `avg_pool` (or `global_pool`) is the pooled input of that head. Backbone modules that no longer run (the
    ImageNet classifier, timm's own pooling, VGG's fc1/fc2, all dropped with the top) are unknown names.
    """
    from models.layers import resolve_layer

    classifier_names = {"predictions", "head", spec.classifier}
    if name in classifier_names:
        return "head"
    if name in ("avg_pool", "global_pool") and model.pool != "none":
        return "global_pool"
    if name.startswith("head.") and name in dict(model.named_modules()):
        return name
    if spec.constructor is not None and spec.aliases.get(name, "").startswith("classifier."):
        return "head." + spec.aliases[name].removeprefix("classifier.")  # a classic net's own dense layers
    dropped = ((spec.classifier,) if model.pool == "model"  # timm's own head still pools and norms
               else (spec.classifier, "global_pool", "pre_logits", "head", "fc", "classifier"))
    running = {path for path, _ in model.backbone.named_modules() if path
               and not any(path == d or path.startswith(d + ".") for d in dropped)}
    aliases = {alias: path for alias, path in spec.aliases.items() if module_of(path) in running}
    try:
        return "backbone." + resolve_layer(_View(spec, aliases), name, None, sorted(running))
    except UnknownNameError:
        pooled = ["avg_pool"] if model.pool != "none" else []
        valid = ["predictions", *pooled, *aliases, *sorted(running)]
        raise UnknownNameError(f"layer of this run ({spec.name})", name, valid) from None


class _View:
    """A registry spec restricted to the aliases that still exist in a run's backbone."""

    def __init__(self, spec: BackboneSpec, aliases: dict[str, str]):
        self.name, self.aliases = spec.name, aliases


def strip_classifier(spec: BackboneSpec, backbone: nn.Module) -> nn.Module:
    """Drop the ImageNet classifier (and VGG's fc1/fc2, which Keras' include_top=False drops too)."""
    if hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(0)
    if spec.pool == "model":  # timm's reset_classifier is the whole job (CrossViT's heads are a ModuleList)
        return backbone
    for path in (spec.classifier, *(("pre_logits",) if spec.name == "vgg16" else ())):
        parent_path, _, name = path.rpartition(".")
        parent = backbone.get_submodule(parent_path) if parent_path else backbone
        if isinstance(getattr(parent, name, None), nn.Module):
            setattr(parent, name, nn.Identity())
    return backbone


def feature_channels(backbone: nn.Module, input_size: int, pool: str = "avg") -> int:
    """Channels of the pooled features, from a forward pass (so any backbone works)."""
    was_training = backbone.training
    backbone.eval()
    forward = backbone if pool == "model" else backbone.forward_features
    with torch.no_grad():
        channels = forward(torch.zeros(1, 3, input_size, input_size)).shape[1]
    backbone.train(was_training)
    return int(channels)


def build_transfer_model(spec: BackboneSpec, backbone: nn.Module, num_classes: int, input_size: int,
                         head: str = "mlp", dropout: float = 0.2) -> TransferModel:
    """Backbone + new head. The classic nets keep their own dense layers and get a new last layer instead."""
    if spec.constructor is not None:
        classifier, last = backbone.classifier, spec.classifier.rsplit(".", 1)[-1]
        setattr(classifier, last, nn.Linear(getattr(classifier, last).in_features, num_classes))
        backbone.classifier = nn.Identity()
        return TransferModel(backbone, classifier, pool="none")
    backbone = strip_classifier(spec, backbone)
    channels = feature_channels(backbone, input_size, spec.pool)
    return TransferModel(backbone, make_head(channels, num_classes, head, dropout), pool=spec.pool)


def group_prefixes(spec: BackboneSpec, unfreeze: int | str) -> list[str]:
    """Backbone module prefixes trainable with `--unfreeze K` (the top K groups) or `all`."""
    groups = spec.unfreeze_groups
    if unfreeze == "all":
        return [""]
    count = int(unfreeze)
    if not 0 <= count <= len(groups):
        names = ", ".join(g.name for g in groups)
        raise TransferError(f"--unfreeze {count}: {spec.name} has {len(groups)} groups ({names}); use 0..{len(groups)} "
                            "or all")
    return [prefix for group in groups[:count] for prefix in group.modules]


def _in_prefixes(path: str, prefixes: list[str]) -> bool:
    return any(p == "" or path == p or path.startswith(p + ".") for p in prefixes)


def set_trainable(model: TransferModel, prefixes: list[str]) -> list[str]:
    """Freeze the backbone except modules under `prefixes`; the head always trains. Returns trainable names."""
    trainable = []
    for name, param in model.named_parameters():
        if name.startswith("head."):
            param.requires_grad_(True)
        else:
            param.requires_grad_(_in_prefixes(name.removeprefix("backbone."), prefixes))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def train_mode(model: TransferModel, prefixes: list[str], batchnorm_stats: bool = False) -> None:
    """model.train(), but every frozen backbone module (BatchNorm included) stays in eval mode.

    Frozen BatchNorm layers keep their running statistics untouched, as the Keras guide requires. Unless
    `batchnorm_stats`, the unfrozen ones stay in inference mode too (their scale and shift still train): the
    current Keras fine-tuning guide's advice, since batch statistics of a small new dataset would wreck the
    features the head was trained on.
    """
    model.train()
    for path, module in model.backbone.named_modules():
        if path and not _in_prefixes(path, prefixes) and not any(
            _in_prefixes(child, prefixes) for child, _ in module.named_modules(prefix=path)
        ):
            module.eval()
    if not prefixes:
        model.backbone.eval()
    if not batchnorm_stats:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
