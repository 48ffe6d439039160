"""CBAM (Woo et al., 2018) as the published DermoMamba code builds it: same constructor arguments,
same parameter and buffer names (``ChannelGate.mlp.{1,3}``, ``SpatialGate.spatial.{conv,bn}``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

POOL_TYPES = ("avg", "max")


class ChannelGate(nn.Module):
    """x * sigmoid(mlp(avg_HW x) + mlp(max_HW x)), one MLP shared by the pools."""

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=POOL_TYPES):
        super().__init__()
        for pool in pool_types:
            if pool not in POOL_TYPES:
                raise ValueError(f"pool_types: {pool!r} is not one of {POOL_TYPES}")
        self.pool_types = tuple(pool_types)
        hidden = gate_channels // reduction_ratio
        if hidden < 1:
            raise ValueError(f"gate_channels={gate_channels} is smaller than reduction_ratio={reduction_ratio}")
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(gate_channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, gate_channels))

    def channel_logits(self, x):
        pooled = {"avg": lambda: x.mean(dim=(2, 3)), "max": lambda: x.amax(dim=(2, 3))}
        return sum(self.mlp(pooled[pool]()) for pool in self.pool_types)

    def forward(self, x):
        return x * torch.sigmoid(self.channel_logits(x))[:, :, None, None]


class SpatialConv(nn.Module):
    """7x7 conv 2 -> 1 without bias, then BatchNorm2d(1, eps=1e-5, momentum=0.01); no activation."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x):
        return self.bn(self.conv(x))


class SpatialGate(nn.Module):
    """x * sigmoid(bn(conv7x7([max over C, mean over C])))."""

    def __init__(self, kernel_size=7):
        super().__init__()
        self.spatial = SpatialConv(kernel_size)

    def forward(self, x):
        compressed = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(compressed))


class CBAM(nn.Module):
    """Channel gate then spatial gate; (B, C, H, W) in and out.

    Example:
        >>> cbam = CBAM(32)
        >>> cbam(torch.randn(2, 32, 12, 16)).shape
        torch.Size([2, 32, 12, 16])
    """

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=POOL_TYPES, no_spatial=False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x):
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)
