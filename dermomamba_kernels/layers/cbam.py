"""CBAM (Woo et al., 2018) as the published DermoMamba code builds it: same constructor arguments,
same parameter and buffer names (``ChannelGate.mlp.{1,3}``, ``SpatialGate.spatial.{conv,bn}``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dispatch import BackendUnavailableError, default_backend
from ..cbam import cbam

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

    The published configuration (pools avg and max, spatial gate on) runs as one fused op,
    :func:`dermomamba_kernels.cbam.cbam`, on ``backend`` ("auto" by default, or the
    ``DERMOMAMBA_BACKEND`` environment variable; "reference" is the arithmetic of the submodules).
    Other configurations run the submodules' arithmetic, which only the reference backend offers.
    The spatial BatchNorm behaves like ``nn.BatchNorm2d`` (``num_batches_tracked``, ``momentum=None``
    for a cumulative average, ``track_running_stats``, train and eval).

    Example:
        >>> cbam = CBAM(32)
        >>> cbam(torch.randn(2, 32, 12, 16)).shape
        torch.Size([2, 32, 12, 16])
    """

    def __init__(self, gate_channels, reduction_ratio=16, pool_types=POOL_TYPES, no_spatial=False, *, backend=None):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()
        self.backend = backend

    def _fusable(self):
        return not self.no_spatial and sorted(self.ChannelGate.pool_types) == sorted(POOL_TYPES)

    def forward(self, x):
        if not self._fusable():
            return self._forward_unfused(x)
        mlp1, mlp2 = self.ChannelGate.mlp[1], self.ChannelGate.mlp[3]
        bn = self.SpatialGate.spatial.bn
        factor = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        use_batch_stats = self.training or (bn.running_mean is None and bn.running_var is None)
        track = not self.training or bn.track_running_stats
        weight = bn.weight if bn.affine else torch.ones(1, device=x.device, dtype=x.dtype)
        bias = bn.bias if bn.affine else torch.zeros(1, device=x.device, dtype=x.dtype)
        return cbam(x, mlp1.weight, mlp1.bias, mlp2.weight, mlp2.bias, self.SpatialGate.spatial.conv.weight, weight,
                    bias, bn.running_mean if track else None, bn.running_var if track else None,
                    training=use_batch_stats, momentum=factor, eps=bn.eps, backend=self.backend)

    def _forward_unfused(self, x):
        backend = default_backend() if self.backend is None else self.backend
        if backend not in ("auto", "reference"):
            raise BackendUnavailableError(
                f"CBAM: backend={backend!r} fuses only pools ('avg', 'max') with the spatial gate; this layer has "
                f"pool_types={self.ChannelGate.pool_types}, no_spatial={self.no_spatial} (use 'reference')")
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)
