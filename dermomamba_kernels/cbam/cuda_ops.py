"""Autograd and fake (meta) implementations of the CUDA CBAM ops ``torch.ops.dermomamba.cbam_*``.

The schemas and kernels are in the compiled extension (csrc/ops.cpp, csrc/cuda/cbam_*); this module
gives torch what it needs around them, mirroring ``triton_ops``:

* ``cbam_fwd`` is functional: it returns the batch statistics instead of writing the running ones
  (PyTorch allows autograd formulas on functional ops only), and ``cbam_update_running_stats``
  applies BatchNorm's momentum update in place. Its extra outputs are the small fp32 maps the
  backward reads (no copy of x): cs (B, C); chan (B, 3, C) avg, max and 1/ties of the max over HW;
  pix (B, 4, HW) max, mean and 1/ties of the max over C of x * cs, and the conv output; stats (4,)
  mean and 1/std that normalised, batch mean, unbiased batch variance.
* ``cbam_bwd`` returns the gradients of x and of the seven parameters (in their dtypes); it has no
  double backward.

Importing it is safe with any build; :func:`unavailable_reason` says whether the kernels can run.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from ._op_common import backward_fake, empty_like_pixels, pixel_flat, register_autograd

NAMESPACE = "dermomamba"
OPS = ("cbam_fwd", "cbam_bwd", "cbam_update_running_stats")
CHAN_ROWS = 3
PIX_ROWS = 4
STATS_LEN = 4


def ops_registered() -> bool:
    """True when the loaded ``_C`` defines the CBAM op schemas (an older build may not)."""
    if not _ext.extension_loaded():
        return False
    namespace = getattr(torch.ops, NAMESPACE)
    return all(hasattr(namespace, name) for name in OPS)


def cuda_kernels_registered() -> bool:
    """True when the CBAM ops have CUDA kernels (the extension was built with nvcc)."""
    return ops_registered() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CUDA") for name in OPS)


def _fp32(x: Tensor, *shape) -> Tensor:
    return torch.empty(shape, dtype=torch.float32, device=x.device)


def _register():
    ops = getattr(torch.ops, NAMESPACE)

    @torch.library.register_fake(f"{NAMESPACE}::cbam_fwd")
    def _cbam_fwd_fake(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
                       use_batch_stats, eps):
        B, C, H, W = x.shape
        out = empty_like_pixels(pixel_flat(x))
        return out, _fp32(x, B, C), _fp32(x, B, CHAN_ROWS, C), _fp32(x, B, PIX_ROWS, H * W), _fp32(x, STATS_LEN)

    @torch.library.register_fake(f"{NAMESPACE}::cbam_bwd")
    def _cbam_bwd_fake(grad_out, x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, cs, chan, pix, stats,
                       use_batch_stats):
        return backward_fake(x, (mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias))

    @torch.library.register_fake(f"{NAMESPACE}::cbam_update_running_stats")
    def _cbam_update_running_stats_fake(running_mean, running_var, stats, momentum):
        return None

    register_autograd(f"{NAMESPACE}::cbam_fwd", f"{NAMESPACE}::cbam_bwd", ops.cbam_bwd)


# An extension built before the CBAM ops leaves them unregistered here; the dispatcher then reports
# the "cuda" backend unavailable (see unavailable_reason) instead of failing at import.
if ops_registered():
    _register()


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why the CUDA CBAM kernels cannot run in this process (None when they can), device aside."""
    if not _ext.extension_loaded():
        return f"dermomamba_kernels._C is not built or failed to load ({_ext.extension_error()})"
    if not ops_registered():
        return "dermomamba_kernels._C was built before the CBAM ops existed: rebuild the extension"
    if not cuda_kernels_registered():
        return "dermomamba_kernels._C was built without CUDA kernels (no nvcc or CPU-only torch at install)"
    return None


def cbam_forward(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
                 use_batch_stats: bool, eps: float):
    """``torch.ops.dermomamba.cbam_fwd`` (differentiable in x and the seven parameters)."""
    return torch.ops.dermomamba.cbam_fwd(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean,
                                         running_var, use_batch_stats, eps)


def update_running_stats(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
    """BatchNorm's running-stat update from ``cbam_fwd``'s stats (batch mean, unbiased variance), in place."""
    torch.ops.dermomamba.cbam_update_running_stats(running_mean, running_var, stats, momentum)
