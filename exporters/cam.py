"""The class activation map as a second output of a classifier's ONNX file (`transfer export --cam`).

CAM (Zhou et al. 2016): when the head is global average pooling then one linear layer, a class's logit is the
spatial mean of the last feature map weighted by that class's row of the layer, plus its bias; that weighted map
(before the mean) is where the logit came from, exactly, with no gradients. `CamModel` returns the logits and that
map upsampled (bilinear) to the input size: for the top class of each image ("top", shape batch x 1 x H x W), or
for every class ("all", batch x classes x H x W: a multi-label run's default, whose labels over their thresholds
each get one). Exactness is checked, not assumed: the map's spatial mean must give the model's own logits on a test
input, so any other head (an MLP, a ViT's class token, attention pooling) is refused in one line naming
`transfer explain`, which uses Grad-CAM instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transfer.core.errors import ExportError
from transfer.training.model import TransferModel

CAM_MODES = ("top", "all")
EXACTNESS = 1e-4  # relative: the map's spatial mean against the model's logits


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Linear, str]:
    """(backbone with forward_features, the linear layer, what the head is) of a run's model or a timm classifier."""
    if isinstance(model, TransferModel):  # a fine-tuned run
        linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
        other = [m for m in model.head.modules() if not isinstance(m, (nn.Linear, nn.Dropout, nn.Sequential))]
        described = f"a {len(linears)}-layer head" + (f" with {type(other[0]).__name__}" if other else "")
        if model.pool != "avg" or len(linears) != 1 or other:
            raise ExportError(f"--cam needs a head that is global average pooling then one linear layer; this run "
                              f"has {described} (pooling {model.pool!r}): use `transfer explain --run RUN` "
                              "(Grad-CAM), or fine-tune with --head linear")
        return model.backbone, linears[0], "run head"
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear) or not hasattr(model, "forward_features"):
        raise ExportError(f"--cam needs a classifier that is global average pooling then one linear layer; "
                          f"{type(model).__name__}'s is {type(classifier).__name__}: use `transfer explain` "
                          "(Grad-CAM)")
    return model, classifier, "classifier"


class CamModel(nn.Module):
    """(logits, cam): the model's logits and its class activation map at the input size."""

    def __init__(self, model: nn.Module, mode: str = "top"):
        super().__init__()
        if mode not in CAM_MODES:
            raise ExportError(f"--cam-classes {mode!r}: use one of {', '.join(CAM_MODES)}")
        self.model, self.mode = model, mode
        self.backbone, self.linear, _ = _parts(model)

    def maps(self, features: torch.Tensor) -> torch.Tensor:
        """Every class's map at the feature map's resolution: W[k] . f(x, y) + b[k]."""
        weighted = torch.einsum("kc,bchw->bkhw", self.linear.weight, features)
        return weighted if self.linear.bias is None else weighted + self.linear.bias[None, :, None, None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(x)
        maps = self.maps(features)
        logits = maps.mean(dim=(2, 3))  # exactly the head's logits (checked by `check_exact`)
        if self.mode == "top":
            top = logits.argmax(dim=1)
            maps = torch.gather(maps, 1, top[:, None, None, None].expand(-1, 1, maps.shape[2], maps.shape[3]))
        cam = F.interpolate(maps, size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
        return logits, cam


def check_exact(cam_model: CamModel, input_size: int) -> float:
    """The largest relative difference between the map's spatial mean and the model's own logits on a test input;
    over `EXACTNESS` the head is not pooling-then-linear after all, and the export is refused."""
    cam_model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, input_size, input_size, generator=generator)
    with torch.no_grad():
        channels = cam_model.backbone.forward_features(x).shape[1]
        if channels != cam_model.linear.in_features:
            raise ExportError(f"--cam: the last linear layer reads {cam_model.linear.in_features} values, the last "
                              f"feature map has {channels} channels (layers lie between them), so CAM would not be "
                              "exact: use `transfer explain` (Grad-CAM)")
        ours, _ = cam_model(x)
        reference = cam_model.model(x)
    difference = float((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
    if difference > EXACTNESS:
        raise ExportError(f"--cam: this model's logits are not the spatial mean of a linear map of its last features "
                          f"(relative difference {difference:.2g}); CAM would not be exact: use `transfer explain` "
                          "(Grad-CAM)")
    return difference
