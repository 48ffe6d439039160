"""The depthwise convolution as PyTorch custom ops (namespace ``dermomamba_depthwise_conv``).

``forward(x, weight, bias, dilation, padding) -> y``: PyTorch's own convolution (cuDNN or its
depthwise kernel: already fast for the output), x (B, C, H, W), weight (C, 1, kh, kw), bias (C,)
or None, dilation [dh, dw], padding [top, bottom, left, right] (bottom >= top, right >= left, as
F.conv2d's "same" makes them); y (B, C, H_out, W_out) in x's dtype.
Its autograd: d x by PyTorch's convolution backward asked for the input gradient only, d weight and
d bias by ``grad_weight``.

``grad_weight(grad_out, x, kernel_size, dilation, padding) -> (d weight, d bias)``: the Triton
kernels of triton_kernels.py; (C, 1, kh, kw) and (C,) in x's dtype.

Both run wherever Triton does: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_kernels as kernels

NAMESPACE = "dermomamba_depthwise_conv"
# Tests set this to fill every output and scratch buffer of the Triton kernels with NaN first.
POISON_OUTPUTS = False
STRIDE = [1, 1]
NO_OUTPUT_PADDING = [0, 0]


def _pad_after(x: Tensor, padding: List[int]) -> Tensor:
    """x with the rows / columns by which bottom / right exceed top / left appended as zeros: what
    F.conv2d does itself for an even kernel's "same", after which one padding per axis remains."""
    top, bottom, left, right = padding
    if bottom == top and right == left:
        return x
    return F.pad(x, (0, right - left, 0, bottom - top))


def convolution(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: List[int], padding: List[int]) -> Tensor:
    """PyTorch's depthwise convolution with (top, bottom, left, right) padding (bottom >= top, right >= left)."""
    return F.conv2d(_pad_after(x, padding), weight, bias, STRIDE, (padding[0], padding[2]), dilation, x.shape[1])


def grad_input(grad_out: Tensor, x: Tensor, weight: Tensor, dilation: List[int], padding: List[int]) -> Tensor:
    """d x by PyTorch's convolution backward, asked for the input gradient alone."""
    padded = _pad_after(x, padding)  # only its shape is read (a copy only for even kernels' "same")
    grad = torch.ops.aten.convolution_backward.default(
        grad_out, padded, weight, None, STRIDE, [padding[0], padding[2]], list(dilation), False, NO_OUTPUT_PADDING,
        x.shape[1], [True, False, False])[0]
    if padded is not x:
        grad = grad[:, :, :x.shape[2], :x.shape[3]]
    return grad


@torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
def depthwise_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], dilation: List[int],
                      padding: List[int]) -> Tensor:
    return convolution(x, weight, bias, dilation, padding)


@depthwise_forward.register_fake
def _forward_fake(x, weight, bias, dilation, padding):
    # PyTorch's own shape and memory-format logic, run on the fake tensors: the same strides as the real call.
    return convolution(x, weight, bias, dilation, padding)


@torch.library.custom_op(f"{NAMESPACE}::grad_weight", mutates_args=())
def depthwise_grad_weight(grad_out: Tensor, x: Tensor, kernel_size: List[int], dilation: List[int],
                          padding: List[int]) -> tuple[Tensor, Tensor]:
    return kernels.grad_weight(grad_out, x, kernel_size, dilation, padding, x.dtype, poison=POISON_OUTPUTS)


@depthwise_grad_weight.register_fake
def _grad_weight_fake(grad_out, x, kernel_size, dilation, padding):
    channels = x.shape[1]
    return (torch.empty((channels, 1, kernel_size[0], kernel_size[1]), dtype=x.dtype, device=x.device),
            torch.empty((channels,), dtype=x.dtype, device=x.device))


def _setup_context(ctx, inputs, output):
    x, weight, bias, dilation, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation, ctx.padding, ctx.has_bias = list(dilation), list(padding), bias is not None


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_x = grad_weight = grad_bias = None
    if needs_x:
        grad_x = grad_input(grad_out, x, weight, ctx.dilation, ctx.padding)
    if needs_weight or (needs_bias and ctx.has_bias):
        grad_weight, grad_bias = grad_weight_op(grad_out, x, list(weight.shape[-2:]), ctx.dilation, ctx.padding)
    return (grad_x, grad_weight if needs_weight else None, grad_bias if needs_bias and ctx.has_bias else None,
            None, None)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(f"{NAMESPACE}::grad_weight is not differentiable (no double backward of the depthwise "
                              "convolution on the triton backend; use backend='reference')")


depthwise_forward.register_autograd(_backward, setup_context=_setup_context)
depthwise_grad_weight.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

# The registered overloads, for callers that import them by name (torch.compile traces them as one op each).
forward_op = torch.ops.dermomamba_depthwise_conv.forward.default
grad_weight_op = torch.ops.dermomamba_depthwise_conv.grad_weight.default
