"""Depthwise 2-D convolution (stride 1) with a dispatch point, and a Triton kernel for its weight gradient.

DermoMamba's depthwise convs (AxialSpatialDW's (1, 7), (7, 1) and 3x3 mixers at dilations 1-3,
SS2D's 3x3, PCAM's 9x9) run on maps of 4-32 channels and up to 48 x 192 x 256 pixels. PyTorch's
CUDA kernel for their weight gradient (conv_depthwise2d_grad_weight) walks a whole channel per
block and costs ~8% of a training step; the forward and the input gradient are fine. The Triton
backend keeps PyTorch's convolution for those two and computes d weight and d bias with its own
kernel (triton_kernels.py), deterministically.

Backends: "reference" (``F.conv2d`` itself, any device), "cpu" (the same, CPU tensors), "triton"
(CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``). "auto" runs the reference until the
Triton weight gradient is measured faster on the GPU (then the lead adds "triton" to AUTO_ORDER);
``DERMOMAMBA_DEPTHWISE_BACKEND=triton`` (or ``backend="triton"``) opts in before that. The
specification is :func:`depthwise_conv2d_ref` (naive.py).
"""

from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _dispatch
from .._dispatch import BackendUnavailableError, OpDispatcher, always, cpu_tensors
from .naive import depthwise_conv2d_grad_weight_ref, depthwise_conv2d_ref, output_size, same_padding

# "auto": PyTorch's convolution everywhere until benchmarks/bench_depthwise_conv.py shows the Triton
# weight gradient faster on the GPU; then "cuda": ("triton", "reference").
AUTO_ORDER = {"cuda": ("reference",), "cpu": ("cpu", "reference")}
depthwise_conv2d_dispatcher = OpDispatcher("depthwise_conv2d", auto_order=AUTO_ORDER)
# Names this op's backend for the process (wins over DERMOMAMBA_BACKEND, which names the scan, CBAM
# and loss kernels: a process that asks for "cuda" there must not lose its depthwise convs).
BACKEND_ENV_VAR = "DERMOMAMBA_DEPTHWISE_BACKEND"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

PaddingArg = Union[str, int, Sequence[int]]
PairArg = Union[int, Sequence[int]]


@torch.compiler.assume_constant_result
def _env_backend() -> str:
    # Read once per trace under torch.compile (a constant of the graph), on every call in eager mode.
    value = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
    if value and value != "auto" and value not in _dispatch.BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR}={value!r} is not a backend; choose one of auto, "
                         f"{', '.join(_dispatch.BACKENDS)}")
    return value


def _pair(value, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif (isinstance(value, (tuple, list, torch.Size)) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return pair


def _padding4(padding: PaddingArg, kernel_size, dilation) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) for F.conv2d's padding argument (stride 1)."""
    if isinstance(padding, str):
        if padding == "same":
            return same_padding(kernel_size, dilation)
        if padding == "valid":
            return (0, 0, 0, 0)
        raise ValueError(f"padding: expected 'same', 'valid', an int or a pair of ints, got {padding!r}")
    rows, cols = _pair(padding, "padding", 0)
    return (rows, rows, cols, cols)


def _check_inputs(x, weight, bias, dilation, padding):
    """Validates the call; returns (dilation pair, padding 4-tuple)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    channels = x.shape[1]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(f"weight: expected shape ({channels}, 1, kh, kw) for a depthwise convolution of x with "
                         f"{channels} channels, got {tuple(weight.shape)}")
    if min(weight.shape[2:]) < 1:
        raise ValueError(f"weight: empty kernel, shape {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (channels,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias: expected shape ({channels},), got {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}")
    dilation = _pair(dilation, "dilation", 1)
    kernel_size = tuple(weight.shape[2:])
    padding4 = _padding4(padding, kernel_size, dilation)
    out_h, out_w = output_size(tuple(x.shape[2:]), kernel_size, dilation, padding4)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"weight: a {kernel_size[0]}x{kernel_size[1]} kernel at dilation {dilation} with padding "
                         f"{padding!r} does not fit x's {x.shape[2]}x{x.shape[3]} map (output {out_h}x{out_w})")
    return dilation, padding4


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype F.conv2d would run in under autocast on x's device (conv2d is on the lower-precision
    list of both CUDA's and the CPU's autocast), or None where autocast is off."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t: Optional[torch.Tensor], dtype: torch.dtype):
    # Autocast casts floating tensors other than fp64 (those it leaves: F.conv2d then sees mixed dtypes).
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     dilation: PairArg = (1, 1), padding: PaddingArg = "same", *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Depthwise convolution, stride 1: ``F.conv2d(x, weight, bias, 1, padding, dilation, groups=C)``.

    Shapes: x (B, C, H, W) (any strides: channels-last, a channel slice from torch.chunk); weight
    (C, 1, kh, kw); bias (C,) or None; dilation int or (dh, dw); padding "same" (odd or even
    kernels, as F.conv2d pads them), "valid", an int or (ph, pw). Output (B, C, H_out, W_out) in x's
    dtype (the autocast dtype under autocast, as F.conv2d). Differentiable in x, weight and bias.
    Only stride 1 exists here (the model's depthwise convs are all stride 1).

    ``backend``: "auto" (default, or ``DERMOMAMBA_DEPTHWISE_BACKEND``, else ``DERMOMAMBA_BACKEND``: for
    now PyTorch's convolution), "reference" (F.conv2d), "cpu" (the same, CPU tensors) or "triton"
    (F.conv2d forward and input gradient, the Triton kernel for d weight and d bias; fp32/fp16/bf16).

    Example:
        >>> x, w, b = torch.randn(2, 4, 12, 16), torch.randn(4, 1, 3, 3), torch.randn(4)
        >>> depthwise_conv2d(x, w, b, dilation=2, padding="same").shape
        torch.Size([2, 4, 12, 16])
    """
    dilation, padding4 = _check_inputs(x, weight, bias, dilation, padding)
    requested = backend if backend is not None else (_env_backend() or _dispatch.default_backend())
    if requested == "auto" and not _auto_takes_triton(x):
        backend = "reference"  # "auto" chooses among kernels that can run the call; a named one must
    elif requested == "auto" and depthwise_conv2d_dispatcher.prefers_while_recording("triton", x.device):
        # Its two launches cost nothing in a recorded graph; eager steps keep PyTorch's kernel.
        backend = "triton"
    else:
        backend = requested
    return depthwise_conv2d_dispatcher(backend, x.device, x, weight, bias, dilation, padding, padding4)


def _auto_takes_triton(x: torch.Tensor) -> bool:
    """Whether "auto" may give this call to the Triton kernel (once AUTO_ORDER lists it)."""
    dtype = _autocast_dtype(x) or x.dtype
    return dtype in TRITON_DTYPES and x.dtype != torch.float64


@depthwise_conv2d_dispatcher.register("cpu", cpu_tensors)
@depthwise_conv2d_dispatcher.register("reference", always)
def _native(x, weight, bias, dilation, padding, padding4):
    return F.conv2d(x, weight, bias, 1, padding, dilation, x.shape[1])


def _check_triton_dtypes(x, weight, bias):
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported by the triton backend "
                        f"({', '.join(map(str, TRITON_DTYPES))}); use backend='reference'")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype} (F.conv2d takes one dtype; "
                            "under autocast all three are cast)")


# (_dispatch.triton_kernels is called by its module: a bare name would shadow the submodule triton_kernels)
@depthwise_conv2d_dispatcher.register("triton", _dispatch.triton_kernels(__name__ + ".triton_kernels"))
def _triton(x, weight, bias, dilation, padding, padding4):
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None:
        # A custom op is not autocast-aware: cast as autocast would cast F.conv2d's arguments, so that the
        # output and the gradients (through the casts, back to fp32 master weights) are F.conv2d's.
        x, weight, bias = (_autocast_cast(t, autocast_dtype) for t in (x, weight, bias))
    _check_triton_dtypes(x, weight, bias)
    from .triton_ops import forward_op  # imported here: the module defines Triton kernels

    return forward_op(x, weight, bias, list(dilation), list(padding4))


def _check_depthwise_module(conv: nn.Conv2d):
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
    if not (conv.groups == conv.in_channels == conv.out_channels):
        raise ValueError(f"conv: not depthwise (in_channels={conv.in_channels}, out_channels={conv.out_channels}, "
                         f"groups={conv.groups}; expected all equal)")
    if tuple(conv.stride) != (1, 1):
        raise ValueError(f"conv: stride {tuple(conv.stride)} is not supported (stride 1 only)")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv: padding_mode {conv.padding_mode!r} is not supported (zero padding only)")


def depthwise_conv2d_module_forward(conv: nn.Conv2d, x: torch.Tensor, *, backend: Optional[str] = None):
    """``conv(x)`` for a depthwise ``nn.Conv2d`` (groups = in = out channels, stride 1, zero padding),
    through :func:`depthwise_conv2d`: a model keeps its modules, parameter names and state_dict.

    ``backend``: as in :func:`depthwise_conv2d`, but the default is ``DERMOMAMBA_DEPTHWISE_BACKEND``
    or else "auto" (never ``DERMOMAMBA_BACKEND``, which names the scan kernels).

    Shapes: x (B, C, H, W) -> (B, C, H_out, W_out).

    Example:
        >>> conv = nn.Conv2d(4, 4, (1, 7), padding="same", groups=4, dilation=2)
        >>> depthwise_conv2d_module_forward(conv, torch.randn(1, 4, 6, 9)).shape
        torch.Size([1, 4, 6, 9])
    """
    _check_depthwise_module(conv)
    if backend is None:
        backend = _env_backend() or "auto"
    return depthwise_conv2d(x, conv.weight, conv.bias, conv.dilation, conv.padding, backend=backend)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (stride 1) whose forward is :func:`depthwise_conv2d`: same parameters
    and state_dict as ``nn.Conv2d(channels, channels, kernel_size, groups=channels, ...)``.

    Shapes: (B, C, H, W) -> (B, C, H_out, W_out).

    Example:
        >>> DepthwiseConv2d(8, 3, padding="same", dilation=2)(torch.randn(2, 8, 10, 12)).shape
        torch.Size([2, 8, 10, 12])
    """

    def __init__(self, channels: int, kernel_size: PairArg, padding: PaddingArg = "same", dilation: PairArg = 1,
                 bias: bool = True, *, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__(channels, channels, kernel_size, stride=1, padding=padding, dilation=dilation,
                         groups=channels, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x):
        return depthwise_conv2d_module_forward(self, x, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend or 'auto'!r}"


__all__ = ["DepthwiseConv2d", "depthwise_conv2d", "depthwise_conv2d_dispatcher", "depthwise_conv2d_grad_weight_ref",
           "depthwise_conv2d_module_forward", "depthwise_conv2d_ref", "same_padding", "BackendUnavailableError"]
