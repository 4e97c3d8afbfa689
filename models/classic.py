"""The seed texts' classic nets, trained from scratch: single-tower AlexNet, LeNet-5 and the CIFAR-10 ConvNet.

Both expose timm's small interface (`forward_features`, `forward_head`, `num_features`, `num_classes`) so the
same training loop, extraction and export code handle them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class _ClassicNet(nn.Module):
    features: nn.Sequential
    classifier: nn.Sequential

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class AlexNet(_ClassicNet):
    """Conv 96 11x11/4 -> pool -> Conv 256 5x5 -> pool -> Conv 384, 384, 256 3x3 -> pool -> FC 4096 x2 -> classes.

    BatchNorm stands where the original had local response normalisation (obsolete, as the seed texts note).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 256
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 96, 11, stride=4, padding=2)), ("bn1", nn.BatchNorm2d(96)),
            ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(3, 2)),
            ("conv2", nn.Conv2d(96, 256, 5, padding=2)), ("bn2", nn.BatchNorm2d(256)),
            ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(3, 2)),
            ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(384, 384, 3, padding=1)), ("relu4", nn.ReLU()),
            ("conv5", nn.Conv2d(384, 256, 3, padding=1)), ("relu5", nn.ReLU()),
            ("pool5", nn.MaxPool2d(3, 2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d((6, 6))), ("flatten", nn.Flatten()),
            ("drop1", nn.Dropout(dropout)), ("fc1", nn.Linear(256 * 6 * 6, 4096)), ("relu1", nn.ReLU()),
            ("drop2", nn.Dropout(dropout)), ("fc2", nn.Linear(4096, 4096)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(4096, num_classes)),
        ]))


class LeNet5(_ClassicNet):
    """Classic LeNet-5 at 32x32: Conv 6 5x5 -> pool -> Conv 16 5x5 -> pool -> FC 120 -> 84 -> classes (ReLU)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 16
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 6, 5)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2, 2)),
            ("conv2", nn.Conv2d(6, 16, 5)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2, 2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d((5, 5))), ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(16 * 5 * 5, 120)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(120, 84)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(84, num_classes)),
        ]))


class CifarConvNet(_ClassicNet):
    """Keras's cifar10_cnn example, layer for layer: Conv 32 (same) -> Conv 32 (valid) -> pool -> dropout 0.25 ->
    Conv 64 (same) -> Conv 64 (valid) -> pool -> dropout 0.25 -> Flatten (6x6x64 at 32 px) -> Dense 512 ->
    dropout 0.5 -> Dense classes. 1,250,858 parameters for 10 classes, as Keras counts them."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 64
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 32, 3, padding=1)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 32, 3)), ("relu2", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2, 2)), ("drop1", nn.Dropout(0.25)),
            ("conv3", nn.Conv2d(32, 64, 3, padding=1)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3)), ("relu4", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2, 2)), ("drop2", nn.Dropout(0.25)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("pool", nn.AdaptiveAvgPool2d((6, 6))), ("flatten", nn.Flatten()),  # the identity at 32 px
            ("fc1", nn.Linear(64 * 6 * 6, 512)), ("relu1", nn.ReLU()), ("drop", nn.Dropout(0.5)),
            ("fc2", nn.Linear(512, num_classes)),
        ]))
