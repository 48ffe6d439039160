"""What the CUDA and Triton CBAM ops share: the pixel-axis layout rules (the fakes must allocate
what the kernels do) and the autograd around a (forward, backward) op pair. No Triton import here,
so the CUDA ops can use it on any install."""

from __future__ import annotations

import torch
from torch import Tensor

# Positional inputs of the forward ops: x, 7 parameters, running_mean, running_var, use_batch_stats, eps.
FORWARD_INPUTS = 12
PARAMETERS = 7


def flattenable(t: Tensor) -> bool:
    """True when H and W of ``t`` (B, C, H, W) can be indexed as one pixel axis (NCHW or NHWC-like).

    With W == 1 the pixel axis is H whatever stride(3) says: torch ignores the stride of a size-1 dim
    (a transposed (B, C, 1, W) tensor counts as contiguous while its stride(3) is W). csrc/cuda/cbam_cuda.cpp
    applies the same rule.
    """
    return t.size(2) == 1 or t.size(3) == 1 or t.stride(2) == t.size(3) * t.stride(3)


def pixel_flat(t: Tensor) -> Tensor:
    return t if flattenable(t) else t.contiguous()


def empty_like_pixels(x: Tensor) -> Tensor:
    """An uninitialised tensor like x (its memory format kept) whose H and W flatten to one axis."""
    out = torch.empty_like(x)
    # empty_like keeps a flattenable x's stride order; checked rather than assumed
    return out if flattenable(out) else torch.empty_like(x, memory_format=torch.contiguous_format)


def backward_fake(x: Tensor, params) -> tuple:
    """Fake outputs of a backward op: dx laid out like the kernels' and one gradient per parameter."""
    return (empty_like_pixels(pixel_flat(x)),) + tuple(torch.empty(p.shape, dtype=p.dtype, device=p.device)
                                                       for p in params)


def setup_context(ctx, inputs, output):
    x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, _, _, use_batch_stats, _ = inputs
    _, cs, chan, pix, stats = output
    ctx.use_batch_stats = use_batch_stats
    # the saved maps and statistics get no gradient: no zero-filled tensors for them
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, cs, chan, pix, stats)


def register_autograd(forward_name: str, backward_name: str, backward_op) -> None:
    """Autograd of ``forward_name`` through ``backward_op``; ``backward_name`` gets no double backward."""

    def backward(ctx, grad_out, *unused_grads):
        # only ``out`` is differentiable: the other outputs are saved maps and statistics
        if grad_out is None:
            return (None,) * FORWARD_INPUTS
        grads = backward_op(grad_out, *ctx.saved_tensors, ctx.use_batch_stats)
        return tuple(grads) + (None,) * (FORWARD_INPUTS - 1 - PARAMETERS)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(f"{backward_name} is not differentiable (no double backward for CBAM)")

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
    torch.library.register_autograd(backward_name, no_double_backward, setup_context=lambda ctx, inputs, output: None)
