"""Sample models for the README, the demo and the tests (torch.nn only)."""

from __future__ import annotations

import torch
from torch import nn


class SeedNet(nn.Module):
    """A small CNN with one of each norm the seed discusses: BN, tracked IN, GN and LN.

    The last conv has 48 channels, which 32 groups do not divide (exercises --groups-policy).
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.in2 = nn.InstanceNorm2d(2 * width, affine=True, track_running_stats=True)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.gn3 = nn.GroupNorm(4, 2 * width)
        self.conv4 = nn.Conv2d(2 * width, 48, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(48)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.ln = nn.LayerNorm(48)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.in2(self.conv2(x)))
        x = torch.relu(self.gn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        x = self.pool(x).flatten(1)
        return self.fc(self.ln(x))


def seednet(num_classes: int = 10, width: int = 16) -> SeedNet:
    return SeedNet(num_classes=num_classes, width=width)


class BNNet(nn.Module):
    """conv-BN-ReLU blocks, a residual add and a BN after a linear layer (fold-bn, bn-to-gn)."""

    def __init__(self, width: int = 24, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(width, 40)
        self.bn_fc = nn.BatchNorm1d(40)
        self.head = nn.Linear(40, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.pool(x).flatten(1)
        return self.head(torch.relu(self.bn_fc(self.fc1(x))))


def bnnet(width: int = 24, num_classes: int = 5) -> BNNet:
    return BNNet(width=width, num_classes=num_classes)


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters (default stats hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.25)
                    m.num_batches_tracked.fill_(7)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                              nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model
