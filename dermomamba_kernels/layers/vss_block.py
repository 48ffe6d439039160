"""VSSBlock: VMamba v0's residual block around :class:`SS2D` (pre-norm, drop path)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn

from .layer_norm import LayerNorm
from .ss2d import SS2D


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``drop_prob``.

    Survivors are scaled by 1 / (1 - drop_prob) so the expected output is unchanged.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (identity in eval mode or with ``drop_prob=0``)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class VSSBlock(nn.Module):
    """x + drop_path(SS2D(LayerNorm(x))) on channels-last maps, as VMamba v0 builds it.

    Args:
        hidden_dim: channels C. drop_path: stochastic-depth rate of the residual branch.
        norm_layer: the pre-norm's constructor (LayerNorm with eps 1e-6 by default).
        attn_drop_rate: SS2D's output dropout. d_state: SS2D's state size.
        backend: scan backend for SS2D (see :class:`SS2D`). Further keyword arguments go to SS2D.

    Parameters: ``ln_1.{weight,bias}`` (C,) and ``self_attention.*`` (those of SS2D(C)).

    Shapes: (B, H, W, C) -> (B, H, W, C).

    Example:
        >>> block = VSSBlock(hidden_dim=4)
        >>> block(torch.randn(1, 6, 8, 4)).shape
        torch.Size([1, 6, 8, 4])
    """

    def __init__(self, hidden_dim: int, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = partial(LayerNorm, eps=1e-6),
                 attn_drop_rate: float = 0.0, d_state: int = 16, backend: Optional[str] = None, **ss2d_kwargs):
        super().__init__()
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = SS2D(d_model=hidden_dim, d_state=d_state, dropout=attn_drop_rate, backend=backend,
                                   **ss2d_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))
