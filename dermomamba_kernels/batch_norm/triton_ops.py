"""The Triton BatchNorm kernels as PyTorch custom ops (namespace ``dermomamba_batch_norm``).

``forward(x, weight, bias, running_mean, running_var, training, eps) -> (y, mean, invstd, var)``:
x (N, C, *) fp32/fp16/bf16 in any layout, the four per-channel tensors (C,) or None; y in x's dtype
and memory format; mean and invstd (C,) fp32, the statistics that normalised (batch ones in training,
the running ones in eval), saved for the backward; var (C,) fp32 the unbiased batch variance in
training (for the running statistics), an empty (0,) tensor in eval. Functional (PyTorch allows an
autograd formula on functional ops only): the running statistics are read, never written, here.

``update_running_stats(running_mean, running_var, mean, var, momentum, num_batches_tracked)``
moves the running statistics towards the batch ones in place (no autograd: buffers); with
``num_batches_tracked`` given, by the cumulative-average weight 1 / num_batches_tracked read on the device.

``backward(grad_y, x, weight, mean, invstd, training, param_grads) -> (dx, dweight, dbias)``: dx in x's
dtype and memory format; dweight = sum dy * xhat and dbias = sum dy, fp32 (C,) (empty (0,) in eval
without ``param_grads``).

All run wherever Triton does: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels as kernels

NAMESPACE = "dermomamba_batch_norm"
# Tests set this to fill every output and scratch buffer with NaN before the kernels write them.
POISON_OUTPUTS = False


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
def batch_norm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                       running_var: Optional[Tensor], training: bool,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels.forward(x, _contiguous(weight), _contiguous(bias), running_mean, running_var, training, eps,
                           poison=POISON_OUTPUTS)


@batch_norm_forward.register_fake
def _forward_fake(x, weight, bias, running_mean, running_var, training, eps):
    return kernels.forward_buffers(x, training, poison=False)


@torch.library.custom_op(f"{NAMESPACE}::update_running_stats", mutates_args=("running_mean", "running_var"))
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float,
                         num_batches_tracked: Optional[Tensor]) -> None:
    kernels.update_running_stats(running_mean, running_var, mean, var, momentum, num_batches_tracked)


@update_running_stats.register_fake
def _update_running_stats_fake(running_mean, running_var, mean, var, momentum, num_batches_tracked):
    return None


@torch.library.custom_op(f"{NAMESPACE}::backward", mutates_args=())
def batch_norm_backward(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                        training: bool, param_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.backward(grad_y, x, _contiguous(weight), mean, invstd, training, param_grads,
                            poison=POISON_OUTPUTS)


@batch_norm_backward.register_fake
def _backward_fake(grad_y, x, weight, mean, invstd, training, param_grads):
    sums = x.shape[1] if training or param_grads else 0
    return (kernels.empty_like_x(x), x.new_empty(sums, dtype=torch.float32), x.new_empty(sums, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, _ = inputs
    _, mean, invstd, var = output
    ctx.mark_non_differentiable(mean, invstd, var)
    ctx.set_materialize_grads(False)
    ctx.training = training
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, mean, invstd)


def _backward(ctx, grad_y, grad_mean, grad_invstd, grad_var):
    if grad_y is None:
        return None, None, None, None, None, None, None
    x, weight, mean, invstd = ctx.saved_tensors
    _, wants_weight, wants_bias = ctx.needs_input_grad[:3]
    dx, dweight, dbias = backward_op(grad_y, x, weight, mean, invstd, ctx.training, wants_weight or wants_bias)
    dweight = dweight.to(ctx.weight_dtype) if wants_weight else None
    dbias = dbias.to(ctx.bias_dtype) if wants_bias else None
    return dx, dweight, dbias, None, None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(f"{NAMESPACE}::backward is not differentiable (no double backward of BatchNorm on the "
                              "triton backend; use backend='reference')")


batch_norm_forward.register_autograd(_backward, setup_context=_setup_context)
batch_norm_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)

# The registered overloads (torch.compile traces each as one op).
forward_op = torch.ops.dermomamba_batch_norm.forward.default
backward_op = torch.ops.dermomamba_batch_norm.backward.default
update_running_stats_op = torch.ops.dermomamba_batch_norm.update_running_stats.default
