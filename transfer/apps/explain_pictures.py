"""The pictures of `transfer explain`: kernels (as they are and "abstracted", blurred until their pattern shows, as
the tutorial draws them), feature maps (the most active channels of a layer, one row per layer), heatmap panels and
the contact sheet. Each figure has a title naming the image, the layer's Keras name and timm path, and its shape.

The numbers drawn are returned too (`first_conv_kernels`, `layer_maps`), so a test can check them against its own
forward hook.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from models.layers import FeatureTap
from transfer.core.errors import TransferError, UnknownNameError
from transfer.core.preprocess import eval_array

MAX_KERNELS = 64  # kernels drawn in a grid (the first ones, in the layer's order)
MAX_CHANNELS = 16  # feature-map channels drawn per layer (the most active for that image)


def _figure(rows: int, cols: int, tile: float = 1.3, aspect: float = 1.0):
    """A grid of `rows` x `cols` tiles `tile` inches wide and `tile * aspect` high (height / width of the pictures),
    room for the titles included."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(rows, cols, figsize=(max(4.0, cols * tile), rows * (tile * aspect + 0.35) + 0.6),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    return plt, figure, axes


def _save(plt, figure, path: Path, title: str) -> None:
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)


def conv_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def first_conv_kernels(model: nn.Module, path: str | None = None) -> tuple[str, np.ndarray]:
    """(module path, weights out x in x kh x kw) of the convolution at `path` (a module after a convolution, such
    as Keras's `block1_conv1`, which is the ReLU after VGG's first convolution: the last convolution before it), or
    of the model's first one."""
    convolutions = conv_layers(model)
    if not convolutions:
        raise TransferError("this model has no 2-D convolution, so it has no kernels to draw")
    chosen = convolutions[0] if path is None else path
    if chosen not in convolutions:
        order = [name for name, _ in model.named_modules()]
        if chosen not in order:
            raise UnknownNameError("convolution", chosen, convolutions)
        before = [name for name in order[:order.index(chosen)] if name in convolutions]
        if not before:
            raise TransferError(f"no convolution comes before {chosen}; use one of {', '.join(convolutions[:5])}")
        chosen = before[-1]
    weights = dict(model.named_modules())[chosen].weight.detach().float().cpu().numpy()
    return chosen, weights


def _unit(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return np.zeros_like(array) if high - low <= 1e-12 else (array - low) / (high - low)


def abstracted(kernel: np.ndarray, size: int = 32) -> np.ndarray:
    """A kernel (h x w or h x w x 3, in [0, 1]) enlarged smoothly and blurred, so its pattern shows."""
    pixels = Image.fromarray((kernel * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(pixels.filter(ImageFilter.GaussianBlur(size / 12)), dtype=np.float64) / 255


def plot_kernels(weights: np.ndarray, path: Path, title: str) -> None:
    """Two grids of the first kernels: as they are and abstracted. Three input channels are drawn as RGB (all
    kernels on one scale, so their strengths compare); otherwise each kernel's first input channel, in grey."""
    count = min(MAX_KERNELS, weights.shape[0])
    if weights.shape[1] == 3:
        tiles = _unit(weights[:count]).transpose(0, 2, 3, 1)
        note = "RGB, one scale for all"
    else:
        tiles = _unit(weights[:count, 0])
        note = f"input channel 0 of {weights.shape[1]}, grey"
    cols = min(16, count)
    rows = math.ceil(count / cols)
    plt, figure, axes = _figure(2 * rows, cols, tile=0.8)
    for index in range(count):
        for block, picture in ((0, tiles[index]), (rows, abstracted(tiles[index]))):
            axis = axes[block + index // cols, index % cols]
            axis.imshow(picture, cmap=None if picture.ndim == 3 else "gray", interpolation="nearest")
    axes[0, 0].set_title("as they are", fontsize=7, loc="left")
    axes[rows, 0].set_title("abstracted (blurred)", fontsize=7, loc="left")
    _save(plt, figure, path, f"{title}\n{count} of {weights.shape[0]} kernels {weights.shape[2]}x{weights.shape[3]}, "
                             f"{note}")


def layer_maps(model: nn.Module, image: Image.Image, prep, paths: Sequence[str]) -> list[np.ndarray]:
    """Each module's output (C x h x w) for one image, taken by `FeatureTap` (clones before any in-place op)."""
    tap = FeatureTap(model, list(paths), stop_early=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            outputs = tap(torch.from_numpy(eval_array(image, prep))[None].to(device))
    finally:
        tap.close()
    maps = []
    for path, output in zip(paths, outputs, strict=True):
        if output.ndim != 4:
            raise TransferError(f"layer {path}: its output is {tuple(output.shape)}, not a feature map; "
                                "pick a convolution, activation or pooling layer")
        maps.append(output[0].float().cpu().numpy())
    return maps


def top_channels(feature_map: np.ndarray, count: int = MAX_CHANNELS) -> list[int]:
    """The `count` channels with the largest mean activation, most active first."""
    return [int(i) for i in np.argsort(-feature_map.mean(axis=(1, 2)), kind="stable")[:count]]


def plot_layer_maps(maps: Sequence[np.ndarray], labels: Sequence[str], path: Path, title: str) -> list[list[int]]:
    """One row per layer: its most active channels, each titled with its index and value range. Layers with the
    same channel count show the same channels (those most active in the first such layer), as the tutorial's
    convolution -> activation -> pooling rows do. Returns the channels drawn per row."""
    rows = []
    for feature_map in maps:
        same = next((r for m, r in zip(maps, rows, strict=False) if m.shape[0] == feature_map.shape[0]), None)
        rows.append(same if same is not None else top_channels(feature_map))
    cols = max(len(r) for r in rows)
    plt, figure, axes = _figure(len(maps), cols, tile=1.15)
    for row, (feature_map, channels, label) in enumerate(zip(maps, rows, labels, strict=True)):
        for col, channel in enumerate(channels):
            values = feature_map[channel]
            axis = axes[row, col]
            axis.imshow(values, cmap="viridis", interpolation="nearest")
            axis.set_title(f"ch {channel}\n[{values.min():.2g}, {values.max():.2g}]", fontsize=6)
        axes[row, 0].text(-0.15, 0.5, label, transform=axes[row, 0].transAxes, fontsize=6, rotation=90,
                          ha="right", va="center")
    _save(plt, figure, path, title)
    return rows


def _aspect(panels: Sequence[tuple[Image.Image, str]]) -> float:
    """The tallest picture's height / width (at most 2), so landscape photos do not float in white space."""
    return min(2.0, max(picture.height / picture.width for picture, _ in panels))


def heatmap_figure(panels: Sequence[tuple[Image.Image, str]], path: Path, title: str) -> None:
    """One image's overlays side by side, each titled with its class and probability."""
    plt, figure, axes = _figure(1, len(panels), tile=3.2, aspect=_aspect(panels))
    for axis, (picture, label) in zip(axes[0], panels, strict=True):
        axis.imshow(picture)
        axis.set_title(label, fontsize=9)
    _save(plt, figure, path, title)


def contact_sheet(panels: Sequence[tuple[Image.Image, str]], path: Path, title: str, cols: int = 6) -> None:
    """Every image's first overlay in a grid, titled with its class and probability."""
    cols = min(cols, len(panels))
    plt, figure, axes = _figure(math.ceil(len(panels) / cols), cols, tile=2.2, aspect=_aspect(panels))
    for index, (picture, label) in enumerate(panels):
        axis = axes[index // cols, index % cols]
        axis.imshow(picture)
        axis.set_title(label, fontsize=7)
    _save(plt, figure, path, title)
