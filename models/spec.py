"""What the project knows about one backbone (`BackboneSpec`) and its unfreeze groups: torch-free data.

Curated entries are written in `models.registry`; any other timm model gets its spec from `models.timm_backbones`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transfer.core.preprocess import Preprocessing


@dataclass(frozen=True)
class UnfreezeGroup:
    """A named set of module paths that is unfrozen together in stage 2 of fine-tuning."""

    name: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class BackboneSpec:
    """What the project knows about one backbone; the architecture itself comes from timm or `constructor`."""

    name: str
    timm_name: str | None
    aliases: dict[str, str]
    unfreeze_groups: tuple[UnfreezeGroup, ...]  # from the head backwards
    weights_source: str  # "timm" | "package" | "none"
    classifier: str  # module path of the ImageNet (or own) classifier, replaced by the new head
    input_size_default: int  # the pretrained weights' input side, known without timm (a test checks it)
    feature_layer: str  # the documented default of `transfer extract` (an intermediate, transferable block)
    params: int  # parameter count with the ImageNet (or own) classifier; a test checks it against the model
    hf_hub_id: str | None = None  # timm's default pretrained weights on the hub (a test checks it)
    constructor: Callable | None = None  # classic nets built here, trained from scratch
    preprocessing_override: Preprocessing | None = None
    description: str = ""
    curated: bool = True  # False: described from timm's metadata alone (no Keras names)
    pool: str = "avg"  # how a TransferModel pools it: "avg" over forward_features, or "model" (timm's own head)
    timm_kwargs: tuple[tuple[str, object], ...] = ()  # passed to timm.create_model (dynamic_img_size=True)
    fixed_input_size: bool = False  # runs at input_size only
    feature_layers: tuple[str, ...] = ()  # timm's feature_info modules, shallow to deep
    not_exportable: str = ""  # why no ONNX exporter can trace it (said before any export work), or ""

    @property
    def has_pretrained(self) -> bool:
        return self.weights_source != "none"

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing of the pretrained weights (timm's `pretrained_cfg`), or the override."""
        if self.preprocessing_override is not None:
            return self.preprocessing_override
        import timm

        cfg = timm.models.get_pretrained_cfg(self.timm_name)
        return Preprocessing(
            input_size=int(cfg.input_size[-1]),
            crop_pct=float(cfg.crop_pct),
            interpolation=str(cfg.interpolation),
            mean=tuple(float(v) for v in cfg.mean),
            std=tuple(float(v) for v in cfg.std),
        )

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size


FLATTEN = "#flatten"  # an alias target ending so is that module's output flattened as Keras' Flatten does


def module_of(target: str) -> str:
    """The module path of an alias target (`pre_logits.act1#flatten` -> `pre_logits.act1`)."""
    return target.split("#", 1)[0]
