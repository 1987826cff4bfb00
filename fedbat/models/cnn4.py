"""CNN4 of the FedBAT paper: 4 x [conv3x3 (no bias), BN, ReLU, maxpool2], linear head."""

from __future__ import annotations

import torch
from torch import nn

from fedbat.models import paper_init, register


class CNN4(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial: tuple[int, int],
        widths: tuple[int, ...] = (32, 64, 128, 256),
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
        h, w = spatial
        for _ in widths:
            h, w = h // 2, w // 2
        # flattened like the paper: 256 features for 28x28 inputs, 1024 for 32x32
        self.classifier = nn.Linear(c * h * w, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register("cnn4")
def cnn4(input_shape: tuple[int, ...], num_classes: int, init_std: float = 0.01) -> nn.Module:
    """Any input of at least 16x16 pixels."""
    return paper_init(CNN4(input_shape[0], num_classes, (input_shape[1], input_shape[2])), init_std)
