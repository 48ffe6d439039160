"""The gated LayerNorm Triton kernels as PyTorch custom ops (namespace ``dermomamba_layer_norm``).

``gated_forward(y, z, weight, bias, eps, norm_dtype, out_dtype) -> (out, mean, rstd)``: y, z (..., C)
of the same shape, fp32/fp16/bf16, last dim contiguous (other layouts are copied); weight, bias (C,);
out = LayerNorm(y) * silu(z) contiguous (..., C) in ``out_dtype``; mean and rstd (...) fp32 (saved for
the backward; not differentiable). ``norm_dtype`` is the dtype of the published norm's output (fp32
under CUDA autocast, else y's): it fixes where the kernel rounds (see gated_triton_kernels).

``gated_backward(grad_out, y, z, weight, bias, mean, rstd, norm_dtype) -> (dy, dz, dweight, dbias)``:
dy in y's dtype, dz in z's dtype, dweight and dbias in weight's dtype, all contiguous.

For the backward autograd keeps y, z, weight, bias, mean and rstd: never the normalized map, silu(z)
or the product (bias is a parameter, kept anyway; the backward needs it to recompute n for dz).
Both ops run wherever Triton does: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import gated_triton_kernels as kernels
from .triton_kernels import rows_view
from .triton_ops import NAMESPACE

# Tests set this to fill every output and scratch buffer with NaN before the kernels write them.
POISON_OUTPUTS = False


@torch.library.custom_op(f"{NAMESPACE}::gated_forward", mutates_args=())
def gated_layer_norm_forward(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float,
                             norm_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    out, mean, rstd = kernels.gated_forward(rows_view(y), rows_view(z), weight, bias, eps, norm_dtype, out_dtype,
                                            poison=POISON_OUTPUTS)
    return out.view(y.shape), mean.view(y.shape[:-1]), rstd.view(y.shape[:-1])


@gated_layer_norm_forward.register_fake
def _forward_fake(y, z, weight, bias, eps, norm_dtype, out_dtype):
    stats_shape = y.shape[:-1]
    return (torch.empty(y.shape, dtype=out_dtype, device=y.device),
            torch.empty(stats_shape, dtype=torch.float32, device=y.device),
            torch.empty(stats_shape, dtype=torch.float32, device=y.device))


@torch.library.custom_op(f"{NAMESPACE}::gated_backward", mutates_args=())
def gated_layer_norm_backward(grad_out: Tensor, y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                              rstd: Tensor, norm_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dy, dz, dweight, dbias = kernels.gated_backward(rows_view(grad_out), rows_view(y), rows_view(z), weight, bias,
                                                    mean.reshape(-1), rstd.reshape(-1), norm_dtype,
                                                    poison=POISON_OUTPUTS)
    return dy.view(y.shape), dz.view(z.shape), dweight.to(weight.dtype), dbias.to(weight.dtype)


@gated_layer_norm_backward.register_fake
def _backward_fake(grad_out, y, z, weight, bias, mean, rstd, norm_dtype):
    return (torch.empty(y.shape, dtype=y.dtype, device=y.device),
            torch.empty(z.shape, dtype=z.dtype, device=z.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))


def _setup_context(ctx, inputs, output):
    y, z, weight, bias, _, norm_dtype, _ = inputs
    _, mean, rstd = output
    # mean and rstd are saved statistics: outputs without a gradient (they never require grad)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.norm_dtype = norm_dtype
    ctx.save_for_backward(y, z, weight, bias, mean, rstd)


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    if grad_out is None:
        return None, None, None, None, None, None, None
    y, z, weight, bias, mean, rstd = ctx.saved_tensors
    dy, dz, dweight, dbias = gated_backward_op(grad_out, y, z, weight, bias, mean, rstd, ctx.norm_dtype)
    return dy, dz, dweight, dbias, None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(f"{NAMESPACE}::gated_backward is not differentiable (no double backward of the "
                              "gated LayerNorm on the triton backend; use backend='reference')")


gated_layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)
gated_layer_norm_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

# The registered overloads, for callers that import them by name (torch.compile traces them as one op each).
gated_forward_op = torch.ops.dermomamba_layer_norm.gated_forward.default
gated_backward_op = torch.ops.dermomamba_layer_norm.gated_backward.default
