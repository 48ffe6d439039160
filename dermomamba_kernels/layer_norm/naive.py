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
