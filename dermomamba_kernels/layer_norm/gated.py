"""Gated LayerNorm ``LayerNorm(y) * silu(z)``: the tail of VMamba's SS2D before out_proj, as one op.

Backends: "reference" (the published expression ``F.layer_norm(y, (C,), weight, bias, eps) *
F.silu(z)`` with PyTorch's ops, any device), "cpu" (the same, CPU tensors), "triton" (one fused
kernel each way; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). The specification, with
every rounding spelled out, is :func:`gated_layer_norm_ref` (naive.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._dispatch import BackendUnavailableError, OpDispatcher, always, cpu_tensors

# The Triton kernel is opt-in until it is timed on a GPU (benchmarks/bench_gated_layer_norm.py): "auto" runs
# the reference unless this variable says "triton" (then the Triton kernel on CUDA, for the channel counts
# where the LayerNorm kernel alone is in "auto"). A backend= argument "triton" always runs it.
GATED_BACKEND_ENV_VAR = "DERMOMAMBA_GATED_NORM_BACKEND"
AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
gated_layer_norm_dispatcher = OpDispatcher("gated_layer_norm", auto_order=AUTO_ORDER)


def gated_layer_norm(y: torch.Tensor, z: torch.Tensor, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], eps: float = 1e-5, *, out_dtype: Optional[torch.dtype] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """``F.layer_norm(y, (C,), weight, bias, eps) * F.silu(z)``, optionally cast to ``out_dtype``.

    Shapes: y, z (..., C), the same shape, any layout (the triton backend reads them in place when the
    last dim is contiguous and the leading dims collapse to one stride: channels-last maps, channel
    slices such as the halves of ``in_proj(x).chunk(2, -1)``; else it copies); weight, bias (C,) (None
    on the reference backends only). Output: (..., C), contiguous on the triton backend. Differentiable
    in y, z, weight and bias.

    Result dtype: by default that of the published expression (the promotion of the norm's output
    dtype, fp32 under CUDA autocast and y's dtype otherwise, with z's dtype); ``out_dtype`` casts to
    another one, e.g. the autocast dtype that out_proj would cast to anyway (the same values, one
    copy fewer on the triton backend). Every intermediate is rounded where the published expression
    rounds it, so the backends agree to float rounding.

    ``backend``: "auto" (default, or ``DERMOMAMBA_BACKEND``): the reference, or the Triton kernel on
    CUDA tensors of at most 16 channels when ``DERMOMAMBA_GATED_NORM_BACKEND=triton`` (opt-in until
    measured); "reference"; "cpu" (the reference on CPU tensors); "triton" (fp32/fp16/bf16 y, z and
    out_dtype, C <= 8192, weight and bias given).

    Example:
        >>> y = torch.randn(2, 6, 10, 8)                 # (B, H, W, d_inner), the scan's fp32 sum
        >>> z = torch.randn(2, 6, 10, 8)                 # the gate half of in_proj
        >>> gated_layer_norm(y, z, torch.ones(8), torch.zeros(8)).shape
        torch.Size([2, 6, 10, 8])
    """
    _check_common_inputs(y, z, weight, bias, out_dtype)
    chosen = _preselect(y, z, weight, bias, out_dtype, backend)
    return gated_layer_norm_dispatcher(chosen, y.device, y, z, weight, bias, eps, out_dtype)


def gated_layer_norm_backend(y: torch.Tensor, z: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], *, out_dtype: Optional[torch.dtype] = None,
                             backend: Optional[str] = None) -> str:
    """The backend :func:`gated_layer_norm` would run these arguments on ("triton", "reference", "cpu").

    For callers whose memory policy depends on it: the triton backend keeps only y, z, the parameters
    and two fp32 statistics per row for the backward, the reference autograd's intermediates too.
    Raises as the call itself would when the backend asked for cannot run.
    """
    chosen = _preselect(y, z, weight, bias, out_dtype, backend)
    if torch.compiler.is_compiling():
        return _dispatch._resolve_as_constant(gated_layer_norm_dispatcher.op_name, chosen, y.device)
    return gated_layer_norm_dispatcher.resolve(chosen, y.device)


def _preselect(y, z, weight, bias, out_dtype, backend) -> Optional[str]:
    requested = _dispatch.default_backend() if backend is None else backend
    if requested == "auto" and not _auto_takes_triton(y.device, y, z, weight, bias, out_dtype):
        return "reference"  # "auto" chooses among kernels that can run the call; a named one must
    return requested


@torch.compiler.assume_constant_result
def _env_choice() -> str:
    """``DERMOMAMBA_GATED_NORM_BACKEND``, checked: "triton" (always the Triton kernel), "reference" (never), or
    unset / "auto" (the Triton kernel while a CUDA graph is recorded: its launches cost nothing there; see
    _dispatch.graph_recording). A constant under torch.compile."""
    choice = os.environ.get(GATED_BACKEND_ENV_VAR, "").strip().lower()
    if choice not in ("", "auto", "triton", "reference"):
        raise ValueError(f"{GATED_BACKEND_ENV_VAR}={choice!r}: expected triton, reference or auto")
    return choice


def _auto_takes_triton(device: torch.device, y, z, weight, bias, out_dtype) -> bool:
    """Whether "auto" may run this call on the Triton kernel: opted in, a CUDA device, and a configuration
    the kernel takes at a width where the LayerNorm kernel alone was measured faster than PyTorch's."""
    from . import TRITON_AUTO_MAX_CHANNELS, TRITON_DTYPES

    choice = _env_choice()
    wanted = ((choice == "triton" and device.type == "cuda")
              or (choice in ("", "auto") and gated_layer_norm_dispatcher.prefers_while_recording("triton", device)))
    return (wanted and 0 < y.shape[-1] <= TRITON_AUTO_MAX_CHANNELS
            and y.dtype in TRITON_DTYPES and z.dtype in TRITON_DTYPES
            and (out_dtype is None or out_dtype in TRITON_DTYPES)
            and weight is not None and bias is not None and weight.dtype in TRITON_DTYPES
            and bias.dtype == weight.dtype)


def _describe_shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_common_inputs(y, z, weight, bias, out_dtype):
    """What every backend needs: the errors name the argument (PyTorch's own would name none)."""
    for name, t in (("y", y), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if y.dim() == 0:
        raise ValueError("y: expected a tensor of shape (..., C), got a 0-d tensor")
    if z.shape != y.shape:
        raise ValueError(f"z: shape {tuple(z.shape)} does not match y's {tuple(y.shape)}")
    if z.device != y.device:
        raise ValueError(f"z: on {z.device}, but y is on {y.device}")
    channels = y.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor) or tuple(param.shape) != (channels,):
            raise ValueError(f"{name}: expected shape ({channels},), got {_describe_shape(param)}")
        if param.device != y.device:
            raise ValueError(f"{name}: on {param.device}, but y is on {y.device}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype: expected a floating-point torch.dtype or None, got {out_dtype!r}")


@gated_layer_norm_dispatcher.register("cpu", cpu_tensors)
@gated_layer_norm_dispatcher.register("reference", always)
def _reference(y, z, weight, bias, eps, out_dtype):
    out = F.layer_norm(y, (y.shape[-1],), weight, bias, eps) * F.silu(z)
    return out if out_dtype is None else out.to(out_dtype)


def _check_triton_inputs(y, z, weight, bias, eps, out_dtype, autocast_fp32):
    from . import TRITON_DTYPES, check_triton_parameters, check_triton_row_width

    if weight is None or bias is None:
        raise BackendUnavailableError("gated_layer_norm: the triton backend needs both weight and bias; "
                                      "use backend='reference'")
    supported = ", ".join(map(str, TRITON_DTYPES))
    for name, dtype in (("y", y.dtype), ("z", z.dtype), ("out_dtype", out_dtype)):
        if dtype is not None and dtype not in TRITON_DTYPES:
            what = dtype if name == "out_dtype" else f"dtype {dtype}"
            raise TypeError(f"{name}: {what} is not supported by the triton backend ({supported}); "
                            "use backend='reference'")
    check_triton_row_width("y", y)
    check_triton_parameters("y", y, weight, bias, eps, autocast_fp32)


# (_dispatch.triton_kernels is called by its module path: the kernels are importable once written)
@gated_layer_norm_dispatcher.register("triton", _dispatch.triton_kernels(__package__ + ".gated_triton_kernels"))
def _triton(y, z, weight, bias, eps, out_dtype):
    from . import autocast_runs_fp32

    autocast_fp32 = autocast_runs_fp32(y)
    _check_triton_inputs(y, z, weight, bias, eps, out_dtype, autocast_fp32)
    # The published norm's output dtype: fp32 where autocast runs layer_norm in fp32, else y's (as
    # F.layer_norm; CPU autocast leaves it alone). It fixes the kernel's roundings and the default result.
    norm_dtype = torch.float32 if autocast_fp32 else y.dtype
    result_dtype = torch.promote_types(norm_dtype, z.dtype) if out_dtype is None else out_dtype
    from .gated_triton_ops import gated_forward_op  # imported here: the module defines Triton kernels

    out, _, _ = gated_forward_op(y, z, weight, bias, float(eps), norm_dtype, result_dtype)
    return out


__all__ = ["gated_layer_norm", "gated_layer_norm_backend", "gated_layer_norm_dispatcher", "GATED_BACKEND_ENV_VAR"]
