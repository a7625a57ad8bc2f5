"""ResNet v1.5 with bottleneck blocks (He et al. 2016, "Deep Residual Learning", table 1),
the variant whose downsampling block strides on its 3x3 convolution rather than its first
1x1 one (more accurate for the same parameters and a little more compute).

Convolutions get He (fan-out) initialization; with ``zero_init_residual`` the γ of each
block's last BatchNorm starts at zero (Goyal et al. 2017, "Accurate, Large Minibatch SGD",
section 5.1), so every block starts as the identity, which large-batch training needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXPANSION = 4
RESNET50_LAYERS = (3, 4, 6, 3)
RESNET101_LAYERS = (3, 4, 23, 3)


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand by 4), each followed by BatchNorm; a
    projection shortcut (1x1 conv + BN, same stride) where the shape changes."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A 7x7/2 stem conv, 3x3/2 max pooling, four stages of bottleneck blocks (``layers``
    blocks each; widths ``base``, 2·``base``, 4·``base``, 8·``base``; the last three halve
    the resolution), global average pooling and a linear classifier."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        base: int = 64,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        stages: list[nn.Module] = []
        in_channels = base
        for stage, blocks in enumerate(layers):
            width = base * 2**stage
            stage_blocks: list[nn.Module] = []
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stage_blocks.append(Bottleneck(in_channels, width, stride))
                in_channels = width * EXPANSION
            stages.append(nn.Sequential(*stage_blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.max_pool2d(h, 3, stride=2, padding=1)
        h = self.stages(h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def resnet50(num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """ResNet-50 v1.5: 25,557,032 parameters at 1000 classes."""
    return ResNet(RESNET50_LAYERS, num_classes, zero_init_residual=zero_init_residual)


def resnet101(num_classes: int = 1000, zero_init_residual: bool = True) -> ResNet:
    """ResNet-101 v1.5: 44,549,160 parameters at 1000 classes."""
    return ResNet(RESNET101_LAYERS, num_classes, zero_init_residual=zero_init_residual)
