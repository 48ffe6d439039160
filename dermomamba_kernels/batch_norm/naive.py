"""Specification of BatchNorm over the channels of (N, C, *) maps: F.batch_norm's arithmetic, spelled out.

Training: per channel, the mean and the biased variance over N and the spatial dims normalise;
the running statistics (when given) move towards the batch mean and the *unbiased* variance,
``running = (1 - factor) * running + factor * batch``, with ``factor = momentum``, or
``1 / num_batches_tracked`` (a cumulative average) when momentum is None. Eval: the running
statistics normalise. ``invstd = 1 / sqrt(var + eps)``; ``y = (x - mean) * invstd * weight + bias``.
Statistics in fp32 (fp64 for fp64 input), y in x's dtype. Differentiable through autograd, so it is
also the oracle of the gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def cumulative_factor(num_batches_tracked: Tensor) -> float:
    """The running-average weight of the newest batch when momentum is None (as nn.BatchNorm: 1 / count)."""
    return 1.0 / float(num_batches_tracked)


def batch_norm_ref(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: Optional[float] = 0.1, eps: float = 1e-5,
                   num_batches_tracked: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """BatchNorm of x over all dims but dim 1, with fp32 (or fp64) statistics.

    Shapes: x (N, C, *); running_mean, running_var, weight, bias (C,) or None. Returns y (x's shape and
    dtype), and the mean and invstd (C,) that normalised (fp32, or fp64 for fp64 x). In training the
    running statistics (if given) are updated in place; ``momentum=None`` takes the cumulative average
    weight ``1 / num_batches_tracked`` (the count already including this batch, as nn.BatchNorm passes it).

    Example:
        >>> rm, rv = torch.zeros(3), torch.ones(3)
        >>> y, mean, invstd = batch_norm_ref(torch.randn(4, 3, 5, 6), rm, rv, training=True)
        >>> y.shape, mean.shape, invstd.dtype
        (torch.Size([4, 3, 5, 6]), torch.Size([3]), torch.float32)
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if training:
        var, mean = torch.var_mean(xc, dim=dims, correction=0)
        if running_mean is not None:
            count = xc.numel() // xc.shape[1]
            factor = cumulative_factor(num_batches_tracked) if momentum is None else momentum
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1))
                running_mean.copy_(((1 - factor) * running_mean.to(compute) + factor * mean.detach())
                                   .to(running_mean.dtype))
                running_var.copy_(((1 - factor) * running_var.to(compute) + factor * unbiased).to(running_var.dtype))
    else:
        mean, var = running_mean.to(compute), running_var.to(compute)
    invstd = 1.0 / torch.sqrt(var + eps)
    y = (xc - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(compute).view(shape)
    if bias is not None:
        y = y + bias.to(compute).view(shape)
    return y.to(x.dtype), mean, invstd
