"""CNN4 of the FedBAT paper: 4 x [conv3x3 (no bias), BN, ReLU, maxpool2], linear head."""

from __future__ import annotations

import torch
from torch import nn

from fedbat.models import paper_init, register


class CNN4(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register("cnn4")
def cnn4(input_shape: tuple[int, ...], num_classes: int, init_std: float = 0.01) -> nn.Module:
    """Works on any input size >= 16x16 (spatial output is pooled to 1x1)."""
    return paper_init(CNN4(input_shape[0], num_classes), init_std)
