"""`transfer explain`: where the model looked (class-activation heatmaps), its kernels and its feature maps.

Heatmaps come from pytorch-grad-cam (the `grad-cam` package), not hand-written hooks; the method and the layer are
chosen per family and said in the output: CNNs (a 4-D feature map, NCHW) and Swin (NHWC, permuted) take Grad-CAM
on the backbone's last feature map, ViTs (tokens) take Grad-CAM on the last block's first norm with the prefix
tokens dropped and the patch tokens laid back on their grid (pytorch-grad-cam's own advice for ViT). `--method`
picks another of the library's methods. Each heatmap becomes an overlay on the user's image with its peak and box in
the image's own pixels (`transfer.core.heatmaps`, shared with the ONNX CAM output of `predict --cam`).
Kernels and feature maps are drawn by `transfer.apps.explain_pictures`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.imagenet import classifier_labels
from models.layers import check_input_size, resolve_layer
from models.registry import BackboneSpec, get_backbone
from models.weights import create_backbone
from transfer.core.errors import OptionError, TransferError
from transfer.core.heatmaps import crop_box, overlay, peak_and_box
from transfer.core.images import BadImageError, open_image
from transfer.core.interpret import sigmoid, softmax
from transfer.core.io import write_json
from transfer.core.preprocess import Preprocessing, eval_array
from transfer.core.progress import SILENT, Progress
from transfer.data.scan import Skipped
from transfer.training.model import TransferModel, resolve_run_layer

METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")


@dataclass
class ExplainSource:
    """The model to look into: logits out, its preprocessing, classes, and how its layer names resolve."""

    model: nn.Module
    spec: BackboneSpec
    prep: Preprocessing
    classes: list[str]
    thresholds: list[float] | None  # a multi-label run: each label's threshold (heatmaps for those over it)
    resolve: Callable[[str], str]  # Keras name or timm path -> module path in `model`
    description: str


def load_source(run: str | os.PathLike | None = None, backbone: str | None = None,
                weights: str | os.PathLike | None = None, pretrained: bool | None = None,
                input_size: int | None = None) -> ExplainSource:
    """A fine-tuned run (its classes, thresholds and layer names) or a registry backbone with its own classifier."""
    if (run is None) == (backbone is None):
        raise OptionError("explain needs exactly one model: --run RUN_DIR, -b NAME or --onnx FILE")
    if run is not None:
        from transfer.training.runs import load_run

        model, config = load_run(run)
        spec = get_backbone(config["backbone"])
        prep = Preprocessing.from_dict(config["preprocessing"])
        return ExplainSource(model, spec, prep, list(config["classes"]), config.get("thresholds"),
                             lambda name: resolve_run_layer(spec, name, model), f"run {run}")
    spec = get_backbone(backbone)
    model, source = create_backbone(spec, pretrained, weights)
    model.eval()
    prep = spec.preprocessing
    if input_size is not None:
        prep = replace(prep, input_size=check_input_size(spec.name, input_size))
    classes = classifier_labels(spec.has_pretrained, getattr(model, "num_classes", 1000))
    return ExplainSource(model, spec, prep, classes, None, lambda name: resolve_layer(spec, name, model),
                         f"{spec.name} ({source})")


class _Features(nn.Module):
    """The backbone's last feature map (`forward_features`) as a module, so Grad-CAM can hook it."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


class _Split(nn.Module):
    """The same logits as the model, computed as `features` then the rest (pooling and head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.features = _Features(getattr(model, "backbone", model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        if not isinstance(self.model, TransferModel):  # a timm classifier
            return self.model.forward_head(features)
        if self.model.pool == "model":
            return self.model.head(self.model.backbone.forward_head(features))
        return self.model.head(self.model.global_pool(features))


@dataclass
class CamPlan:
    """What Grad-CAM hooks for one model: the model it runs, the layer, a reshape to NCHW, the family."""

    model: nn.Module
    layer: nn.Module
    layer_name: str
    reshape: Callable[[torch.Tensor], torch.Tensor] | None
    family: str


def cam_plan(model: nn.Module, input_size: int) -> CamPlan:
    """The layer and reshape for this model's family, found from the shape of its last feature map."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:  # the in-place trap: hooked outputs must not change later
            module.inplace = False
    backbone = getattr(model, "backbone", model)
    with torch.no_grad():
        probe = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
        features = backbone.forward_features(probe)
    channels = getattr(backbone, "num_features", None)
    if features.ndim == 3:
        blocks = getattr(backbone, "blocks", None)
        if blocks is None or not hasattr(blocks[-1], "norm1"):
            raise TransferError(f"{type(backbone).__name__}: tokens without ViT blocks; no heatmap layer is known")
        prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        side = int(round(math.sqrt(features.shape[1] - prefix)))
        if side * side != features.shape[1] - prefix:
            raise TransferError(f"{type(backbone).__name__}: {features.shape[1] - prefix} patch tokens are not a "
                                "square grid; no heatmap reshape is known")

        def tokens_to_grid(tensor: torch.Tensor) -> torch.Tensor:
            grid = tensor[:, prefix:, :].reshape(tensor.shape[0], side, side, tensor.shape[2])
            return grid.permute(0, 3, 1, 2)

        path = f"blocks.{len(blocks) - 1}.norm1"
        return CamPlan(model, blocks[-1].norm1, path, tokens_to_grid, "ViT")
    if features.ndim != 4:
        raise TransferError(f"{type(backbone).__name__}: its features are {tuple(features.shape)}, not a map; "
                            "no heatmap layer is known")
    split = _Split(model).eval()
    if channels is not None and features.shape[-1] == channels and features.shape[1] != channels:
        return CamPlan(split, split.features, "forward_features (NHWC)", lambda t: t.permute(0, 3, 1, 2), "Swin")
    return CamPlan(split, split.features, "forward_features", None, "CNN")


def _cam_class(method: str):
    import pytorch_grad_cam as library

    names = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
             "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}
    if method not in names:
        raise OptionError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    return getattr(library, names[method])


def chosen_classes(probabilities: np.ndarray, classes: Sequence[str], top_k: int, class_names: Sequence[str],
                   thresholds: Sequence[float] | None) -> list[int]:
    """The classes to explain for one image: those named, else a multi-label run's labels over their thresholds
    (the most probable one when none is), else the top k."""
    if class_names:
        return [classes.index(name) for name in class_names]
    if thresholds is not None:
        over = [i for i in np.argsort(-probabilities) if probabilities[i] >= thresholds[i]]
        return over or [int(probabilities.argmax())]
    return [int(i) for i in np.argsort(-probabilities)[:top_k]]


def check_class_names(names: Sequence[str], classes: Sequence[str]) -> None:
    unknown = [name for name in names if name not in classes]
    if unknown:
        from transfer.core.errors import UnknownNameError

        raise UnknownNameError("class", unknown[0], list(classes))


@dataclass
class ExplainResult:
    records: list[dict]  # per image: path, and per class: name, probability, peak, box
    skipped: list[Skipped]
    method: str
    layer: str
    family: str
    files: list[Path]


def heatmaps(source: ExplainSource, paths: Sequence[Path], output: Path, top_k: int = 1,
             class_names: Sequence[str] = (), method: str | None = None, progress: Progress = SILENT,
             device: str = "cpu") -> ExplainResult:
    """Grad-CAM (or `method`) heatmaps for each image's chosen classes: a PNG per image under `output`, a contact
    sheet, and the records (peak and box in the image's pixels) for --json."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from transfer.apps.explain_pictures import contact_sheet, heatmap_figure

    check_class_names(class_names, source.classes)
    plan = cam_plan(source.model.to(device), source.prep.input_size)
    method = method or "gradcam"
    cam = _cam_class(method)(model=plan.model, target_layers=[plan.layer], reshape_transform=plan.reshape)
    records, skipped, files, sheet = [], [], [], []
    output.mkdir(parents=True, exist_ok=True)
    with progress.task("explaining", total=len(paths), unit="images") as advance:
        for path in paths:
            try:
                image = open_image(path)
            except BadImageError as exc:
                skipped.append(Skipped(str(path), exc.reason))
                advance(1)
                continue
            batch = torch.from_numpy(eval_array(image, source.prep))[None].to(device)
            with torch.no_grad():
                logits = plan.model(batch).float().cpu().numpy()[0]
            probabilities = (sigmoid(logits[None]) if source.thresholds is not None else softmax(logits[None]))[0]
            chosen = chosen_classes(probabilities, source.classes, top_k, class_names, source.thresholds)
            box = crop_box(image.width, image.height, source.prep)
            panels, found_all = [], []
            for index in chosen:
                heat = cam(input_tensor=batch, targets=[ClassifierOutputTarget(index)])[0]
                found = peak_and_box(heat, box)
                found_all.append({"class": source.classes[index], "probability": round(float(probabilities[index]), 4),
                                  **found})
                panels.append((overlay(image, heat, box, found),
                               f"{source.classes[index]} ({probabilities[index]:.2f})"))
            name = f"{len(records):04d}_{Path(path).stem}.png"
            heatmap_figure(panels, output / name, f"{Path(path).name}: {method} on {plan.layer_name} ({plan.family})")
            files.append(output / name)
            sheet.append(panels[0])
            records.append({"path": str(path), "classes": found_all})
            advance(1)
    if sheet:
        contact_sheet(sheet, output / "contact_sheet.png", f"{source.description}: {method} ({plan.family})")
        files.append(output / "contact_sheet.png")
    return ExplainResult(records, skipped, method, plan.layer_name, plan.family, files)


def write_records(result: ExplainResult, path: str | os.PathLike) -> None:
    """The --json record: the method, layer and family, each image's classes with peak and box, skipped files."""
    write_json(Path(path), {"method": result.method, "layer": result.layer, "family": result.family,
                            "coordinates": "the image's own pixels, x right and y down from its top-left corner",
                            "images": result.records,
                            "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped]})


@dataclass
class InsideResult:
    """What `explain` drew: kernels (module path and weights), feature maps per image, heatmaps."""

    kernels: tuple[str, np.ndarray] | None = None
    maps: list[dict] | None = None  # per image: path, file, layers (name, module path, shape, channels drawn)
    heat: ExplainResult | None = None
    files: list[Path] | None = None


def explain(images: Sequence[str | os.PathLike], output: str | os.PathLike, run: str | os.PathLike | None = None,
            backbone: str | None = None, weights: str | os.PathLike | None = None, pretrained: bool | None = None,
            input_size: int | None = None, kernels: bool = False, kernel_layer: str | None = None,
            layers: Sequence[str] = (), heatmaps_wanted: bool | None = None, top_k: int = 1,
            class_names: Sequence[str] = (), method: str | None = None, json_path: str | os.PathLike | None = None,
            progress: Progress = SILENT, device: str = "cpu") -> InsideResult:
    """Kernels (`kernels` or `kernel_layer`), feature maps (`layers`) and heatmaps (the default, or when
    `heatmaps_wanted`) of a run or a backbone, drawn under `output`; the model runs on `device` (auto, cpu,
    cuda: never a silent fallback)."""
    from transfer.apps.explain_pictures import first_conv_kernels, layer_maps, plot_kernels, plot_layer_maps
    from transfer.apps.extract import collect_samples

    if top_k < 1:
        raise OptionError(f"--top-k {top_k}: must be at least 1")
    if method is not None and method not in METHODS:
        raise OptionError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    from transfer.training.device import resolve_device

    source = load_source(run, backbone, weights, pretrained, input_size)
    device = str(resolve_device(device))
    output = Path(output)
    kernels = kernels or kernel_layer is not None
    heatmaps_wanted = (not kernels and not layers) if heatmaps_wanted is None else heatmaps_wanted
    layer_paths = [source.resolve(name) for name in layers]  # unknown names fail before any image is read
    kernel_path = None if kernel_layer is None else source.resolve(kernel_layer)
    class_names = list(class_names)
    check_class_names(class_names, source.classes)
    result, files = InsideResult(), []
    if kernels:
        chosen, values = first_conv_kernels(source.model, kernel_path)
        plot_kernels(values, output / "kernels.png", f"{source.description}: kernels of {chosen}")
        result.kernels = (chosen, values)
        files.append(output / "kernels.png")
    if not layers and not heatmaps_wanted:
        result.files = files
        return result
    if not images:
        raise OptionError("feature maps and heatmaps need images: give files, folders or globs")
    samples, _, skipped = collect_samples(images, progress)
    paths = [sample.path for sample in samples]
    if layers:
        result.maps = []
        labels = [f"{name} ({path})" for name, path in zip(layers, layer_paths, strict=True)]
        for index, path in enumerate(paths):
            try:
                image = open_image(path)
            except BadImageError as exc:
                skipped.append(Skipped(str(path), exc.reason))
                continue
            maps = layer_maps(source.model.to(device), image, source.prep, layer_paths)
            target = output / "feature_maps" / f"{index:04d}_{Path(path).stem}.png"
            shapes = ", ".join(f"{name} {'x'.join(map(str, m.shape))}" for name, m in zip(layers, maps, strict=True))
            drawn = plot_layer_maps(maps, [f"{label}\n{'x'.join(map(str, m.shape))}"
                                           for label, m in zip(labels, maps, strict=True)],
                                    target, f"{Path(path).name}: most active channels ({shapes})")
            result.maps.append({"path": str(path), "file": str(target), "arrays": maps,
                                "layers": [{"name": name, "module": module, "shape": list(m.shape), "channels": c}
                                           for name, module, m, c in zip(layers, layer_paths, maps, drawn,
                                                                         strict=True)]})
            files.append(target)
    if heatmaps_wanted:
        result.heat = heatmaps(source, paths, output / "heatmaps", top_k, class_names, method, progress, device)
        result.heat.skipped = sorted({s.path: s for s in [*skipped, *result.heat.skipped]}.values(),
                                     key=lambda s: s.path)
        files += result.heat.files
        if json_path is not None:
            write_records(result.heat, json_path)
    result.files = files
    return result
