"""The Triton LayerNorm kernels as PyTorch custom ops (namespace ``dermomamba_layer_norm``).

``forward(x, weight, bias, eps, out_dtype) -> (y, mean, rstd)``: x (..., C) fp32/fp16/bf16, weight
and bias (C,); y contiguous (..., C) in ``out_dtype``, mean and rstd (...) fp32 (saved for the
backward; not differentiable). ``backward(grad_y, x, weight, mean, rstd) -> (dx, dweight, dbias)``:
dx contiguous in x's dtype, dweight and dbias in weight's dtype.

Both run wherever Triton does: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton_kernels as kernels

NAMESPACE = "dermomamba_layer_norm"
# Tests set this to fill every output and scratch buffer with NaN before the kernels write them.
POISON_OUTPUTS = False


@torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
def layer_norm_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                       out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, rstd = kernels.forward(kernels.rows_view(x), weight, bias, eps, out_dtype, poison=POISON_OUTPUTS)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@layer_norm_forward.register_fake
def _forward_fake(x, weight, bias, eps, out_dtype):
    stats_shape = x.shape[:-1]
    return (torch.empty(x.shape, dtype=out_dtype, device=x.device),
            torch.empty(stats_shape, dtype=torch.float32, device=x.device),
            torch.empty(stats_shape, dtype=torch.float32, device=x.device))


@torch.library.custom_op(f"{NAMESPACE}::backward", mutates_args=())
def layer_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                        rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = kernels.backward(kernels.rows_view(grad_y), kernels.rows_view(x), weight,
                                          mean.reshape(-1), rstd.reshape(-1), poison=POISON_OUTPUTS)
    return dx.view(x.shape), dweight.to(weight.dtype), dbias.to(weight.dtype)


@layer_norm_backward.register_fake
def _backward_fake(grad_y, x, weight, mean, rstd):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))


def _setup_context(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, mean, rstd = output
    # mean and rstd are saved statistics: outputs without a gradient (they never require grad)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    if grad_y is None:
        return None, None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.dermomamba_layer_norm.backward.default(grad_y, x, weight, mean, rstd)
    return dx, dweight, dbias, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(f"{NAMESPACE}::backward is not differentiable (no double backward of LayerNorm "
                              "on the triton backend; use backend='reference')")


layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)
layer_norm_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

# The registered overloads, for callers that import them by name (torch.compile traces them as one op each).
forward_op = torch.ops.dermomamba_layer_norm.forward.default
backward_op = torch.ops.dermomamba_layer_norm.backward.default
