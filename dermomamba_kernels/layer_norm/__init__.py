"""LayerNorm with a dispatch point, and a Triton kernel for a small normalized (last) dimension.

DermoMamba normalizes channels-last maps over 4-128 channels with millions of rows, where
PyTorch's kernels (one thread block per row) run far below memory bandwidth; the Triton backend
gives each program a tile of rows instead.

Backends: "reference" (``torch.nn.functional.layer_norm`` itself, PyTorch's native kernels, any
device), "cpu" (the same native kernel, CPU tensors), "triton" (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``). The specification is :func:`layer_norm_ref` (naive.py).

Also :func:`gated_layer_norm` (gated.py): ``LayerNorm(y) * silu(z)``, SS2D's output gate, fused into one
Triton kernel each way (spec: :func:`gated_layer_norm_ref`).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._dispatch import BackendUnavailableError, OpDispatcher, always, cpu_tensors
from .naive import gated_layer_norm_ref, layer_norm_ref

# "auto" on CUDA: the Triton kernel for up to TRITON_AUTO_MAX_CHANNELS channels, PyTorch's native
# kernel otherwise and for what the Triton kernel does not take (see _auto_takes_triton). On the CPU
# PyTorch's kernel. Measured (benchmarks/bench_small_layernorm.py, H100, 2026-11-27 20:17 UTC, the
# rows of DermoMamba's norms at batch 16, fp32 and fp16 x): forward + backward 5.2-5.5x native at
# C = 4, 4.5-4.7x at C = 8, 1.1-1.4x at C = 16, but 0.33-0.48x at C = 32 (PyTorch's kernel, a block
# per row, suits wide rows).
AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
layer_norm_dispatcher = OpDispatcher("layer_norm", auto_order=AUTO_ORDER)
TRITON_AUTO_MAX_CHANNELS = 16

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A row is held whole in one program's registers: 8192 fp32 over 8 warps is 32 values per thread.
TRITON_MAX_COLUMNS = 8192
# Device types whose autocast runs layer_norm in fp32 (inputs cast up, output fp32): CUDA's list
# (AT_FORALL_FP32 in ATen/autocast_mode.h) has layer_norm; the CPU's does not (under CPU autocast
# F.layer_norm returns x's dtype; checked on torch 2.14). The Triton op matches both without a cast
# pass: it reads x as it is and writes fp32 where autocast would.
AUTOCAST_FP32_DEVICE_TYPES = ("cuda",)

ShapeArg = Union[int, Sequence[int], torch.Size]


def _as_shape(normalized_shape: ShapeArg) -> tuple:
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(normalized_shape)


def layer_norm(x: torch.Tensor, normalized_shape: ShapeArg, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *, backend: Optional[str] = None):
    """LayerNorm as ``torch.nn.functional.layer_norm``, with a choice of backend.

    Shapes: x (..., C) (any layout; see below); normalized_shape (C,) (or more trailing dims on
    the reference backends); weight, bias (C,) or None. Output: x's shape, contiguous, in x's dtype
    (fp32 under CUDA autocast, as F.layer_norm). Differentiable in x, weight and bias.

    ``backend``: "auto" (default, or ``DERMOMAMBA_BACKEND``: the Triton kernel for CUDA tensors
    of up to 16 channels where it applies, else PyTorch's native kernel), "reference" (F.layer_norm), "cpu" (the same, CPU tensors) or "triton" (one last
    dim of at most 8192, weight and bias given, fp32/fp16/bf16; reads x in place when its last dim
    is contiguous and its leading dims collapse to one stride, e.g. channels-last maps or a slice of
    channels, else copies it).

    Example:
        >>> x = torch.randn(2, 6, 10, 8)   # (B, H, W, C) channels-last map
        >>> layer_norm(x, (8,), torch.ones(8), torch.zeros(8), 1e-6).shape
        torch.Size([2, 6, 10, 8])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    normalized_shape = _as_shape(normalized_shape)
    requested = _dispatch.default_backend() if backend is None else backend
    if requested == "auto" and not _auto_takes_triton(x, normalized_shape, weight, bias):
        backend = "reference"  # "auto" chooses among kernels that can run the call; a named one must
    return layer_norm_dispatcher(backend, x.device, x, normalized_shape, weight, bias, eps)


def _auto_takes_triton(x, normalized_shape, weight, bias) -> bool:
    """Whether "auto" may run this call on the Triton kernel: a configuration it takes, at a width
    where it was measured faster than PyTorch's (else "auto" runs PyTorch's kernel)."""
    return (len(normalized_shape) == 1 and x.dim() > 0 and 0 < x.shape[-1] <= TRITON_AUTO_MAX_CHANNELS
            and x.dtype in TRITON_DTYPES and weight is not None and bias is not None
            and weight.dtype in TRITON_DTYPES and bias.dtype == weight.dtype)


@layer_norm_dispatcher.register("cpu", cpu_tensors)
@layer_norm_dispatcher.register("reference", always)
def _native(x, normalized_shape, weight, bias, eps):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def autocast_runs_fp32(x: torch.Tensor) -> bool:
    """True where F.layer_norm on x would run in fp32 under autocast (all inputs cast up, fp32 output)."""
    return x.device.type in AUTOCAST_FP32_DEVICE_TYPES and torch.is_autocast_enabled(x.device.type)


def _check_triton_inputs(x, normalized_shape, weight, bias, eps, autocast_fp32):
    if x.dim() == 0:
        raise ValueError("x: expected a tensor of shape (..., C), got a 0-d tensor")
    channels = x.shape[-1]
    if len(normalized_shape) != 1:
        raise BackendUnavailableError(
            f"layer_norm: the triton backend normalizes over the last dim only, got normalized_shape="
            f"{normalized_shape}; use backend='reference'")
    if normalized_shape[0] != channels:
        raise ValueError(f"normalized_shape: {normalized_shape} does not match x's last dim "
                         f"(x has shape {tuple(x.shape)})")
    if weight is None or bias is None:
        raise BackendUnavailableError(
            "layer_norm: the triton backend needs both weight and bias (elementwise_affine=True, bias=True); "
            "use backend='reference'")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported by the triton backend "
                        f"({', '.join(map(str, TRITON_DTYPES))}); use backend='reference'")
    check_triton_row_width("x", x)
    for name, param in (("weight", weight), ("bias", bias)):
        if not isinstance(param, torch.Tensor) or tuple(param.shape) != (channels,):
            shape = tuple(param.shape) if isinstance(param, torch.Tensor) else type(param).__name__
            raise ValueError(f"{name}: expected shape ({channels},), got {shape}")
        if param.device != x.device:
            raise ValueError(f"{name}: on {param.device}, but x is on {x.device}")
    check_triton_parameters("x", x, weight, bias, eps, autocast_fp32)


def check_triton_row_width(name: str, x: torch.Tensor):
    """The normalized (last) dim of ``x`` fits the Triton kernels, which hold a row in one program's registers."""
    channels = x.shape[-1]
    if channels == 0:
        raise ValueError(f"{name}: the normalized dimension is empty (shape {tuple(x.shape)})")
    if channels > TRITON_MAX_COLUMNS:
        raise ValueError(f"{name}: a last dim of {channels} exceeds the triton backend's {TRITON_MAX_COLUMNS} (a row "
                         "is held in one program's registers); use backend='reference'")


def check_triton_parameters(name: str, x: torch.Tensor, weight, bias, eps, autocast_fp32: bool):
    """weight, bias and eps as F.layer_norm takes them with the input ``x`` (called ``name`` in the errors)."""
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias: dtype {bias.dtype} differs from weight's {weight.dtype}")
    # PyTorch's kernels take parameters in x's dtype, or fp32 ones with a half/bf16 x; autocast casts
    # them all to fp32 first (the kernels read any of these dtypes as fp32).
    if autocast_fp32:
        allowed = TRITON_DTYPES
    else:
        allowed = (x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32)
    if weight.dtype not in allowed:
        raise TypeError(f"weight: dtype {weight.dtype} does not go with {name}'s {x.dtype} on the triton backend "
                        f"(expected one of {', '.join(map(str, allowed))})")
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps!r}")


# (_dispatch.triton_kernels is called by its module: a bare name would shadow the submodule triton_kernels)
@layer_norm_dispatcher.register("triton", _dispatch.triton_kernels(__name__ + ".triton_kernels"))
def _triton(x, normalized_shape, weight, bias, eps):
    autocast_fp32 = autocast_runs_fp32(x)
    _check_triton_inputs(x, normalized_shape, weight, bias, eps, autocast_fp32)
    out_dtype = torch.float32 if autocast_fp32 else x.dtype
    from .triton_ops import forward_op  # imported here: the module defines Triton kernels

    y, _, _ = forward_op(x, weight, bias, float(eps), out_dtype)
    return y


# After the constants above: gated.py reads them from this module.
from .gated import (GATED_BACKEND_ENV_VAR, gated_layer_norm, gated_layer_norm_backend,  # noqa: E402
                    gated_layer_norm_dispatcher)

__all__ = ["layer_norm", "layer_norm_ref", "layer_norm_dispatcher", "gated_layer_norm", "gated_layer_norm_ref",
           "gated_layer_norm_backend", "gated_layer_norm_dispatcher", "GATED_BACKEND_ENV_VAR"]
