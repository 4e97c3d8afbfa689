"""Layer names: Keras alias or raw module path -> module, a Keras-style summary, and a tap for intermediate outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from models.spec import FLATTEN, BackboneSpec, module_of
from transfer.core.errors import OptionError, TransferError, UnknownNameError, first_line
from transfer.core.options import check_int
from transfer.core.preprocess import MAX_INPUT_SIZE


@lru_cache(maxsize=16)
def module_paths(spec_name: str) -> tuple[str, ...]:
    """Every module path of the backbone's architecture (built once with random weights, then cached)."""
    from models.registry import get_backbone
    from models.weights import build_architecture

    return tuple(path for path, _ in build_architecture(get_backbone(spec_name)).named_modules() if path)


@lru_cache(maxsize=16)
def min_input_size(spec_name: str) -> int:
    """The smallest square input the backbone can really use, found from the architecture (not a table):
    the smallest side at which `forward_features` runs and leaves a feature map of at least 1x1, and no smaller
    than the network's total stride (below it the last stages see nothing but padding).

    Shapes are propagated on the meta device, so no memory or compute is spent. vgg16, resnets and
    efficientnet_lite0 give 32 and inception_v3 75, as Keras documents for its own versions.
    """
    from models.registry import get_backbone

    spec = get_backbone(spec_name)
    model = meta_architecture(spec_name)

    def runs(side: int) -> bool:
        return _forward_error(model, side) is None

    feature_info = getattr(model, "feature_info", None)
    stride = int(feature_info[-1]["reduction"]) if feature_info else 1
    step = 1 if spec.curated else stride  # timm models may need whole patches or windows: try multiples of the stride
    low, high = 1, max(1, spec.input_size // step)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if runs(middle * step) else (middle + 1, high)
    return max(low * step, stride)


def _forward_error(model: nn.Module, side: int) -> str | None:
    """Why `model.forward_features` cannot run on one side x side image (shapes only, on the meta device), or None.
    An output map below 1x1 counts as failing."""
    try:
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, side, side, device="meta"))
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:  # timm asserts on sizes (patch grids)
        return first_line(exc)
    outputs = out if isinstance(out, (list, tuple)) else [out]  # CrossViT returns one map per branch
    empty = any(o.ndim >= 4 and min(o.shape[2:]) < 1 for o in outputs if isinstance(o, torch.Tensor))
    return "its feature map would be empty" if empty else None


@lru_cache(maxsize=8)
def meta_architecture(spec_name: str) -> nn.Module:
    """The backbone built on the meta device (shapes without memory), in eval mode: built once for the size checks."""
    from models.registry import get_backbone
    from models.weights import build_architecture

    with torch.device("meta"):
        return build_architecture(get_backbone(spec_name)).eval()


@lru_cache(maxsize=64)
def input_size_error(spec_name: str, side: int) -> str | None:
    """Why the backbone cannot run at `side` pixels (a ViT's side must be a multiple of its patch, a Swin's of its
    window), or None: tried on the meta device, so it costs no memory or compute."""
    return _forward_error(meta_architecture(spec_name), side)


def check_input_size(backbone: str, size: int | None, flag: str = "--input-size") -> int | None:
    """None (the backbone's own size) or a side between the backbone's real minimum and MAX_INPUT_SIZE."""
    if size is None:
        return None
    check_int(size, flag, 1)
    from models.registry import get_backbone

    spec = get_backbone(backbone)
    if spec.fixed_input_size and size != spec.input_size:
        raise OptionError(f"{flag} {size}: {backbone} runs at {spec.input_size} pixels only (its position embeddings "
                          "are fixed and its timm class cannot resize them)")
    smallest = min_input_size(backbone)
    if not smallest <= size <= MAX_INPUT_SIZE:
        raise OptionError(f"{flag} {size}: {backbone} needs {smallest}..{MAX_INPUT_SIZE} pixels (below {smallest} "
                          f"its last stages see only padding)")
    problem = None if spec.curated else input_size_error(backbone, size)
    if problem:
        raise OptionError(f"{flag} {size}: {backbone} cannot run at {size} pixels ({problem[:200]})")
    return size


def resolve_layer(spec: BackboneSpec, name: str, model: nn.Module | None = None,
                  paths: list[str] | None = None) -> str:
    """Keras alias or raw timm module path -> module path; unknown names list the closest valid ones.

    The valid paths are `paths`, else `model`'s modules, else those of the backbone's architecture.
    """
    if paths is None:
        paths = [p for p, _ in model.named_modules() if p] if model is not None else list(module_paths(spec.name))
    if name in spec.aliases and module_of(spec.aliases[name]) in paths:
        return spec.aliases[name]
    if name in paths:
        return name
    valid = [alias for alias, path in spec.aliases.items() if module_of(path) in paths] + paths
    raise UnknownNameError(f"layer for {spec.name}", name, valid)


def group_of(spec: BackboneSpec, path: str) -> str:
    """Name of the unfreeze group a module belongs to ('head' for the classifier, '' if none)."""
    if _under(path, spec.classifier):
        return "head"
    for index, group in enumerate(spec.unfreeze_groups, start=1):
        if any(_under(path, prefix) for prefix in group.modules):
            return f"{index}:{group.name}"
    return ""


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


@dataclass(frozen=True)
class LayerInfo:
    """One row of `transfer layers`: a module in forward (completion) order with its output for one image."""

    alias: str
    path: str
    kind: str
    shape: tuple[int, ...] | None
    params: int
    group: str

    @property
    def shape_text(self) -> str:
        return "x".join(str(d) for d in self.shape) if self.shape else "-"


def describe_layers(spec: BackboneSpec, model: nn.Module, input_size: int) -> list[LayerInfo]:
    """Run one image of `input_size` through `model` and list every module that ran, as Keras' summary does."""
    alias_of: dict[str, str] = {}
    flattened = set()
    for alias, path in spec.aliases.items():
        if module_of(path) not in alias_of:
            alias_of[module_of(path)] = alias
            if path.endswith(FLATTEN):
                flattened.add(module_of(path))
    order: list[tuple[str, nn.Module, tuple[int, ...] | None]] = []
    seen: set[str] = set()

    def hook_for(path: str):
        def hook(module: nn.Module, _inputs, output) -> None:
            if path not in seen:
                seen.add(path)
                shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
                order.append((path, module, shape))
        return hook

    handles = [m.register_forward_hook(hook_for(p)) for p, m in model.named_modules() if p]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for handle in handles:
            handle.remove()
    counts = keras_param_counts(model, [(path, alias_of.get(path, "")) for path, _, _ in order])
    rows = []
    for path, module, shape in order:
        rows.append(LayerInfo(alias_of.get(path, ""), path, type(module).__name__,
                              (math.prod(shape),) if shape and path in flattened else shape, counts[path],
                              group_of(spec, path)))
        for alias, target in spec.aliases.items():  # Keras' Flatten of a module that has its own name (VGG16)
            if target == path + FLATTEN and alias_of.get(path) != alias:
                rows.append(LayerInfo(alias, target, "Flatten", (math.prod(shape),) if shape else None, 0,
                                      group_of(spec, path)))
    return rows


def keras_param_counts(model: nn.Module, rows: list[tuple[str, str]]) -> dict[str, int]:
    """Parameters per row, as Keras' summary counts them on its named layers: every parameter belongs to one
    named row. A Keras name that timm runs as several modules (VGG16's `block1_conv1` is the ReLU after a Conv2d,
    `fc1` the activation after a 1x1 conv; Lite0's `stem_bn` sits inside a BatchNormAct2d) takes the parameters of
    the modules it stands for: first its own, else its parent's direct ones (the BatchNorm around `.drop`), else the
    unnamed modules run since the previous named row (the conv before a ReLU). Rows without a Keras name show
    their module's own total, as PyTorch counts it. Counts are parameters only (Keras also counts BatchNorm's
    moving mean and variance)."""
    modules = dict(model.named_modules())
    claimed: set[int] = set()
    counts: dict[str, int] = {}
    unnamed_since: list[str] = []

    def take(parameters) -> int:
        fresh = [p for p in parameters if id(p) not in claimed]
        claimed.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    for path, alias in rows:
        module = modules[path]
        if not alias:
            counts[path] = sum(p.numel() for p in module.parameters())
            unnamed_since.append(path)
            continue
        count = take(module.parameters())
        parent = modules.get(path.rpartition(".")[0]) if "." in path else None
        if count == 0 and parent is not None:
            count = take(parent.parameters(recurse=False))
        if count == 0:
            count = take(p for unnamed in unnamed_since for p in modules[unnamed].parameters())
        counts[path], unnamed_since = count, []
    return counts


def keras_flatten(output: torch.Tensor) -> torch.Tensor:
    """N x C x H x W -> N x (H*W*C) in Keras' channels-last order (its Flatten layer); 2-D outputs pass."""
    return output.permute(0, 2, 3, 1).flatten(1) if output.ndim == 4 else output


class _StopForward(Exception):
    """Raised by a tap once every requested layer has been captured: nothing deeper is computed."""


class FeatureTap(nn.Module):
    """Wraps a model and returns the outputs of the named modules, in the order asked.

    Guards against the in-place trap: each captured output is cloned the moment its module returns, and the
    model's in-place activations are switched off, so later in-place ops cannot overwrite a tapped tensor.
    With `stop_early` (eager use) the forward pass ends as soon as the deepest requested module has run; for
    ONNX export it is off and the exporter drops the unused tail of the graph.
    """

    def __init__(self, model: nn.Module, paths: list[str], stop_early: bool = True):
        super().__init__()
        self.model, self.paths, self.stop_early = model, list(paths), stop_early
        self.modules_tapped = list(dict.fromkeys(module_of(p) for p in self.paths))
        modules = dict(model.named_modules())
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [modules[p].register_forward_hook(self._hook_for(p)) for p in self.modules_tapped]

    def _hook_for(self, path: str):
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            if isinstance(output, (tuple, list)):  # a module returning several tensors (PiT's stages) gives its first
                output = output[0]
            if path not in self._captured:
                self._captured[path] = output.clone()
            if self.stop_early and len(self._captured) == len(self.modules_tapped):
                raise _StopForward
        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._captured = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        captured, self._captured = self._captured, {}
        silent = [p for p in self.modules_tapped if p not in captured]
        if silent:
            raise TransferError(f"layer {silent[0]} does not run in this model's forward pass, so it has no output")
        return tuple(keras_flatten(captured[module_of(p)]) if p.endswith(FLATTEN) else captured[p]
                     for p in self.paths)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
