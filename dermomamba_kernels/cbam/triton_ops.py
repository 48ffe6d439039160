"""The Triton CBAM kernels as PyTorch custom ops (namespace ``dermomamba_cbam``).

``cbam_forward`` is functional (PyTorch allows autograd formulas on functional ops only): it
returns the batch statistics instead of writing the running ones, and :func:`cbam` updates them.
Its extra outputs are the small maps the backward reads (no copy of x):
  cs (B, C) channel scale; chan (B, 3, C) avg, max and 1/ties of the max over HW;
  pix (B, 4, HW) max, mean and 1/ties of the max over C of x * cs, and the conv output;
  stats (4,) mean and 1/std that normalised, batch mean, unbiased batch variance (fp32).
``cbam_backward`` returns the gradients of x and of the seven parameters; ``update_running_stats``
applies BatchNorm's momentum update to the running buffers in place (no autograd: buffers).

Both run wherever Triton does: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels as kernels
from ._op_common import backward_fake, pixel_flat as _pixel_flat, register_autograd

NAMESPACE = "dermomamba_cbam"
# Tests set this to fill every output and scratch buffer with NaN before the kernels write them.
POISON_OUTPUTS = False


@torch.library.custom_op(f"{NAMESPACE}::cbam_forward", mutates_args=())
def cbam_forward(x: Tensor, mlp1_w: Tensor, mlp1_b: Tensor, mlp2_w: Tensor, mlp2_b: Tensor, conv_w: Tensor,
                 bn_weight: Tensor, bn_bias: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 use_batch_stats: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels.forward(_pixel_flat(x), mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean,
                           running_var, use_batch_stats, eps, poison=POISON_OUTPUTS)


@cbam_forward.register_fake
def _cbam_forward_fake(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
                       use_batch_stats, eps):
    return kernels.forward_buffers(_pixel_flat(x), mlp1_w.shape[0], poison=False)


@torch.library.custom_op(f"{NAMESPACE}::cbam_backward", mutates_args=())
def cbam_backward(grad_out: Tensor, x: Tensor, mlp1_w: Tensor, mlp1_b: Tensor, mlp2_w: Tensor, mlp2_b: Tensor,
                  conv_w: Tensor, bn_weight: Tensor, bn_bias: Tensor, cs: Tensor, chan: Tensor, pix: Tensor,
                  stats: Tensor, use_batch_stats: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, *param_grads = kernels.backward(_pixel_flat(grad_out), _pixel_flat(x), mlp1_w, mlp1_b, mlp2_w, conv_w,
                                        bn_weight, bn_bias, cs, chan, pix, stats, use_batch_stats,
                                        poison=POISON_OUTPUTS)
    params = (mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias)
    return (dx,) + tuple(g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(param_grads, params))


@cbam_backward.register_fake
def _cbam_backward_fake(grad_out, x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, cs, chan, pix,
                        stats, use_batch_stats):
    return backward_fake(x, (mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias))


@torch.library.custom_op(f"{NAMESPACE}::update_running_stats", mutates_args=("running_mean", "running_var"))
def update_running_stats(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
    """BatchNorm's running-stat update from ``cbam_forward``'s stats (batch mean, unbiased variance)."""
    kernels.update_running_stats(running_mean, running_var, stats, momentum)


@update_running_stats.register_fake
def _update_running_stats_fake(running_mean, running_var, stats, momentum):
    return None


register_autograd(f"{NAMESPACE}::cbam_forward", f"{NAMESPACE}::cbam_backward",
                  torch.ops.dermomamba_cbam.cbam_backward)
