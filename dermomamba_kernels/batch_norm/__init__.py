"""BatchNorm with a dispatch point, and Triton kernels that split each channel's positions over many programs.

DermoMamba's BatchNorm2d layers normalise 16-512 channels over maps of up to 16 x 192 x 256
positions; PyTorch's CUDA kernels (cuDNN's among them) parallelise mostly over channels and leave
the GPU idle when there are few. The Triton backend reduces every channel over many programs
(split reductions with a fixed-order combine), then normalises (or forms dx) elementwise.

Backends: "reference" (``torch.nn.functional.batch_norm`` itself, PyTorch's native kernels, any
device), "cpu" (the same, CPU tensors), "triton" (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``). The specification is :func:`batch_norm_ref` (naive.py).

"auto" runs PyTorch's kernels until the Triton ones are measured faster on a GPU; setting the
environment variable ``DERMOMAMBA_BATCHNORM_BACKEND=triton`` makes "auto" take the Triton kernels for
the CUDA calls they accept (what they do not take stays on PyTorch's).
"""

from __future__ import annotations

import numbers
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._dispatch import BackendUnavailableError, OpDispatcher, always, cpu_tensors
from .naive import batch_norm_ref, cumulative_factor

# "auto" is PyTorch's native kernel on every device until benchmarks/bench_batch_norm.py has shown the
# Triton kernels faster on a GPU; AUTO_ENV_VAR=triton opts "auto" into them on CUDA meanwhile.
AUTO_ORDER = {"cuda": ("reference",), "cpu": ("cpu", "reference")}
AUTO_ENV_VAR = "DERMOMAMBA_BATCHNORM_BACKEND"
AUTO_ENV_CHOICES = ("native", "triton")
batch_norm_dispatcher = OpDispatcher("batch_norm", auto_order=AUTO_ORDER)

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
               momentum: Optional[float] = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """BatchNorm as ``torch.nn.functional.batch_norm``, with a choice of backend.

    Shapes: x (N, C, *) (BatchNorm2d: (N, C, H, W), NCHW, channels-last or any strides); running_mean,
    running_var, weight, bias (C,) or None. Output: x's shape, dtype and (on the triton backend)
    memory format. Differentiable in x, weight and bias.

    ``training``: batch statistics normalise (biased variance) and the running statistics, when given,
    are updated in place towards the batch mean and unbiased variance by ``momentum``; ``momentum=None``
    takes the cumulative average ``1 / num_batches_tracked`` (pass the module's counter, already
    incremented, as nn.BatchNorm does: the native backends read it on the host, a sync that also keeps
    torch.compile(fullgraph=True) from tracing it, exactly as nn.BatchNorm2d; the triton backend reads it
    on the device). Otherwise the running statistics normalise.

    ``backend``: "auto" (default, or ``DERMOMAMBA_BACKEND``: PyTorch's native kernel, or the Triton
    kernels for the CUDA calls they take when ``DERMOMAMBA_BATCHNORM_BACKEND=triton``), "reference"
    (F.batch_norm), "cpu" (the same, CPU tensors) or "triton" (fp32/fp16/bf16 x; parameters and
    running statistics in x's dtype or fp32).

    Example:
        >>> x = torch.randn(4, 16, 12, 10)
        >>> rm, rv = torch.zeros(16), torch.ones(16)
        >>> batch_norm(x, rm, rv, torch.ones(16), torch.zeros(16), training=True).shape
        torch.Size([4, 16, 12, 10])
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    requested = _dispatch.default_backend() if backend is None else backend.strip().lower()
    if requested == "auto":
        take_triton = _auto_prefers_triton(x.device) and _triton_takes(x, running_mean, running_var, weight, bias)
        backend = "triton" if take_triton else "auto"
    return batch_norm_dispatcher(backend, x.device, x, running_mean, running_var, weight, bias, training, momentum,
                                 eps, num_batches_tracked)


@torch.compiler.assume_constant_result
def _auto_prefers_triton(device: torch.device) -> bool:
    """Whether "auto" is opted into the Triton kernels (AUTO_ENV_VAR) and they can run on ``device``.
    (A constant under torch.compile: read once, when the graph is traced.)"""
    choice = os.environ.get(AUTO_ENV_VAR, "").strip().lower()
    if choice and choice not in AUTO_ENV_CHOICES:
        raise ValueError(f"{AUTO_ENV_VAR}={choice!r}: expected one of {', '.join(AUTO_ENV_CHOICES)}")
    # Unset: the Triton kernels while a CUDA graph is recorded (their launches are free there), PyTorch's
    # in eager steps (see _dispatch.graph_recording).
    if choice == "triton":
        return device.type == "cuda" and batch_norm_dispatcher.unavailable_reason("triton", device) is None
    return not choice and batch_norm_dispatcher.prefers_while_recording("triton", device)


def _triton_takes(x, running_mean, running_var, weight, bias) -> bool:
    """Whether the Triton backend accepts these arguments (what it does not take, "auto" leaves native)."""
    if x.dim() < 2 or x.dtype not in TRITON_DTYPES:
        return False
    allowed = (x.dtype, torch.float32)
    return all(t is None or (t.dtype in allowed and t.dim() == 1 and t.is_contiguous())
               for t in (running_mean, running_var, weight, bias))


@batch_norm_dispatcher.register("cpu", cpu_tensors)
@batch_norm_dispatcher.register("reference", always)
def _native(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
    if momentum is None:
        if training and running_mean is not None:
            _check_counter(num_batches_tracked, x)
        # PyTorch's own cumulative average: the factor read on the host, as nn.BatchNorm does
        momentum = cumulative_factor(num_batches_tracked) if training and running_mean is not None else 0.0
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__


def _check_counter(num_batches_tracked, x):
    if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.numel() != 1:
        raise ValueError("num_batches_tracked: momentum=None (a cumulative average) needs the batch counter, a "
                         f"one-element tensor; got {_describe(num_batches_tracked)}")
    if num_batches_tracked.device != x.device:
        raise ValueError(f"num_batches_tracked: on {num_batches_tracked.device}, but x is on {x.device}")


def _check_triton_inputs(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor of shape (N, C, *), got {x.dim()}-d of shape {tuple(x.shape)}")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported by the triton backend "
                        f"({', '.join(map(str, TRITON_DTYPES))}); use backend='reference'")
    channels = x.shape[1]
    allowed = (x.dtype,) if x.dtype == torch.float32 else (x.dtype, torch.float32)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (channels,):
            raise ValueError(f"{name}: expected shape ({channels},) for x with {channels} channels, got {_describe(t)}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
        if t.dtype not in allowed:
            raise TypeError(f"{name}: dtype {t.dtype} does not go with x's {x.dtype} on the triton backend "
                            f"(expected one of {', '.join(map(str, allowed))})")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: give both or neither")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous (it is updated in place), got strides {t.stride()}")
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: required when training=False (they normalise)")
    if training and x.numel() > 0 and x.numel() // channels == 1:
        raise ValueError(f"x: expected more than 1 value per channel when training, got shape {tuple(x.shape)}")
    if not isinstance(eps, numbers.Real) or eps < 0:
        raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
    if training and running_mean is not None:
        if momentum is None:
            _check_counter(num_batches_tracked, x)
        elif not isinstance(momentum, numbers.Real):
            raise TypeError(f"momentum: expected a number or None, got {type(momentum).__name__}")


@batch_norm_dispatcher.register("triton", _dispatch.triton_kernels(__name__ + ".triton_kernels"))
def _triton(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked):
    _check_triton_inputs(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked)
    from .triton_ops import forward_op, update_running_stats_op  # imported here: the module defines Triton kernels

    y, mean, _, var = forward_op(x, weight, bias, running_mean, running_var, bool(training), float(eps))
    if training and running_mean is not None and x.numel() > 0:  # an empty batch moves nothing (as PyTorch)
        counter = num_batches_tracked if momentum is None else None
        update_running_stats_op(running_mean, running_var, mean, var, 0.0 if momentum is None else float(momentum),
                                counter)
    return y


__all__ = ["batch_norm", "batch_norm_ref", "batch_norm_dispatcher", "BackendUnavailableError"]
