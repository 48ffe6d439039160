"""Specification of the LayerNorm op over the last dimension: F.layer_norm's arithmetic, spelled out.

Statistics in fp32 (fp64 for fp64 input), biased variance, ``rstd = 1 / sqrt(var + eps)``; the
per-row mean and rstd are returned too (the kernels save them for the backward). Differentiable
through autograd, so it is also the oracle of the gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def layer_norm_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of x over its last dim, with fp32 (or fp64) statistics.

    Shapes: x (..., C); weight, bias (C,) or None. Returns y (..., C) in ``out_dtype`` (default
    x's dtype), mean and rstd (...) in the arithmetic's dtype (fp32, or fp64 for fp64 x).

    Example:
        >>> y, mean, rstd = layer_norm_ref(torch.randn(5, 3, 8), torch.ones(8), torch.zeros(8))
        >>> y.shape, mean.shape, rstd.dtype
        (torch.Size([5, 3, 8]), torch.Size([5, 3]), torch.float32)
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    var, mean = torch.var_mean(xc, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    y = (xc - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype or x.dtype), mean, rstd


def gated_layer_norm_ref(y: Tensor, z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
                         norm_dtype: Optional[torch.dtype] = None,
                         out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gated LayerNorm ``LayerNorm(y) * silu(z)`` over the last dim, rounded where PyTorch's ops round.

    The published SS2D tail ``F.layer_norm(y, (C,), weight, bias, eps) * F.silu(z)``, spelled out:
    n = the norm of y with fp32 statistics, stored in ``norm_dtype`` (default y's dtype; fp32 under
    CUDA autocast, whose fp32 list holds layer_norm); s = silu(z) computed in fp32 (fp64 for fp64 z)
    and stored in z's dtype; the product in the promotion of the two dtypes (computed in fp32, as
    PyTorch's elementwise kernels do for half types); then cast to ``out_dtype`` if given (the cast
    out_proj would make under autocast). Differentiable through autograd, whose backward rounds as the
    published expression's does (ds in the product's then z's dtype, dn in the norm's dtype).

    Shapes: y, z (..., C); weight, bias (C,) or None. Returns out (..., C), mean and rstd (...).

    Example:
        >>> y, z = torch.randn(2, 5, 7, 8), torch.randn(2, 5, 7, 8).half()
        >>> out, mean, rstd = gated_layer_norm_ref(y, z, torch.ones(8), torch.zeros(8))
        >>> out.dtype, mean.shape
        (torch.float32, torch.Size([2, 5, 7]))
    """
    normed, mean, rstd = layer_norm_ref(y, weight, bias, eps, out_dtype=norm_dtype)
    gate_compute = torch.promote_types(z.dtype, torch.float32)
    gate = torch.nn.functional.silu(z.to(gate_compute)).to(z.dtype)
    out = normed * gate
    return (out if out_dtype is None else out.to(out_dtype)), mean, rstd
