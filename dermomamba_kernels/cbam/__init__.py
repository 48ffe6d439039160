"""CBAM (channel gate then spatial gate) as one op with a dispatch point, fused in CUDA C++ and Triton.

Public entry points:
  * :func:`cbam`: the whole block, differentiable, BatchNorm-correct in training and eval.
  * :func:`cbam_ref`: its specification in plain PyTorch ops (the published module's arithmetic).
The layer ``dermomamba_kernels.layers.CBAM`` calls :func:`cbam`.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .._dispatch import OpDispatcher, always, cpu_tensors
from . import cuda_ops  # registers autograd and fakes of torch.ops.dermomamba.cbam_* (when _C has them)
from .reference import cbam_ref

cbam_dispatcher = OpDispatcher("cbam")

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_DTYPES = TRITON_DTYPES
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)


def _check_inputs(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
                  training):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a (B, C, H, W) tensor, got {_describe(x)}")
    if x.dtype not in REFERENCE_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not a floating type CBAM takes "
                        f"({', '.join(map(str, REFERENCE_DTYPES))})")
    B, C, H, W = x.shape
    if B == 0 or C == 0 or H == 0 or W == 0:
        raise ValueError(f"x: every dimension must be non-empty, got shape {tuple(x.shape)}")
    if not isinstance(mlp1_w, torch.Tensor) or mlp1_w.dim() != 2 or mlp1_w.shape[1] != C:
        raise ValueError(f"mlp1_w: expected (hidden, {C}) for C={C} channels, got {_describe(mlp1_w)}")
    hidden = mlp1_w.shape[0]
    ksize = conv_w.shape[-1] if isinstance(conv_w, torch.Tensor) and conv_w.dim() == 4 else None
    expected = {"mlp1_b": (mlp1_b, (hidden,)), "mlp2_w": (mlp2_w, (C, hidden)), "mlp2_b": (mlp2_b, (C,)),
                "conv_w": (conv_w, (1, 2, ksize, ksize)), "bn_weight": (bn_weight, (1,)), "bn_bias": (bn_bias, (1,)),
                "running_mean": (running_mean, (1,)), "running_var": (running_var, (1,))}
    for name, (tensor, shape) in expected.items():
        if tensor is None and name in ("running_mean", "running_var"):
            continue
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or ksize is None:
            raise ValueError(f"{name}: expected shape {shape}, got {_describe(tensor)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got dtype {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"{name}: on {tensor.device}, but x is on {x.device}")
    if hidden == 0:
        raise ValueError("mlp1_w: the hidden width is 0")
    if ksize % 2 == 0:
        raise ValueError(f"conv_w: the kernel size must be odd (padding k // 2 keeps H x W), got {ksize}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var: give both or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False (they normalise)")
    if training and B * H * W == 1:
        raise ValueError(f"x: BatchNorm of the spatial gate needs more than one value per channel when training, "
                         f"got shape {tuple(x.shape)}")


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def cbam(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean=None, running_var=None,
         training=True, momentum=0.01, eps=1e-5, *, backend=None):
    """CBAM: ``x * channel_scale * spatial_scale``, pools avg and max, spatial 7x7 conv + BatchNorm.

    channel_scale = sigmoid(mlp(avg_HW x) + mlp(max_HW x)) with mlp = Linear(mlp1) -> ReLU -> Linear(mlp2);
    spatial_scale = sigmoid(bn(conv(cat[max_C, mean_C](x * channel_scale)))).
    ``training`` behaves as in ``F.batch_norm``: batch statistics normalise, and the running stats
    (when given) are updated in place with ``momentum`` (unbiased variance); otherwise the running
    stats normalise. Differentiable in x and the seven parameters.

    Shapes: x (B, C, H, W), NCHW or channels-last, fp32/fp16/bf16 (fp64 on the reference backend);
    mlp1_w (C // r, C); mlp1_b (C // r,); mlp2_w (C, C // r); mlp2_b (C,); conv_w (1, 2, k, k), k odd;
    bn_weight, bn_bias, running_mean, running_var (1,). Output: x's shape, dtype and memory format.

    ``backend``: "auto" (default, or ``DERMOMAMBA_BACKEND``), "cuda" (the extension's CUDA C++
    kernels), "triton", "cpu" (the reference's vectorised arithmetic on CPU tensors) or "reference".
    "auto" takes "cuda", then "triton", on CUDA tensors. The "cuda" backend has two kernel sets, picked by the
    environment variable ``DERMOMAMBA_CBAM_CUDA_PATH`` at each call: "passes" (default: a pass structure for
    any shape), "small" (one cooperative kernel per direction for small images, H x W up to 24576, an error
    where it cannot run) or "auto" ("small" when H x W <= 1024 and it can run, else "passes"); both give the
    same results up to fp32 summation order (benchmarks/notes/cbam.md).

    Example:
        >>> x = torch.randn(2, 32, 6, 10)
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> out = cbam(x, torch.randn(2, 32), torch.randn(2), torch.randn(32, 2), torch.randn(32),
        ...            torch.randn(1, 2, 7, 7), torch.ones(1), torch.zeros(1), rm, rv, training=True)
        >>> out.shape
        torch.Size([2, 32, 6, 10])
    """
    _check_inputs(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var, training)
    args = (x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var, training,
            momentum, eps)
    return cbam_dispatcher(backend, x.device, *args)


# On the CPU the reference's vectorised PyTorch arithmetic is the fast path: a few passes over x,
# each a single ATen kernel.
@cbam_dispatcher.register("cpu", cpu_tensors)
@cbam_dispatcher.register("reference", always)
def _cbam_reference(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
                    training, momentum, eps):
    return cbam_ref(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
                    training, momentum, eps)


@cbam_dispatcher.register("triton", _dispatch.triton_kernels(__name__ + ".triton_kernels"))
def _cbam_triton(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
                 training, momentum, eps):
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported by the triton backend "
                        f"({', '.join(map(str, TRITON_DTYPES))}); use backend='reference'")
    from . import triton_ops  # noqa: F401  (registers torch.ops.dermomamba_cbam)

    out, _, _, _, stats = torch.ops.dermomamba_cbam.cbam_forward(
        x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var, training, eps)
    if training and running_mean is not None:
        torch.ops.dermomamba_cbam.update_running_stats(running_mean, running_var, stats, momentum)
    return out


def _cuda_kernels(device):
    reason = _dispatch.cuda_extension(device)
    if reason is not None:
        return reason
    return cuda_ops.unavailable_reason()


@cbam_dispatcher.register("cuda", _cuda_kernels)
def _cbam_cuda(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
               training, momentum, eps):
    if x.dtype not in CUDA_DTYPES:
        raise TypeError(f"x: dtype {x.dtype} is not supported by the cuda backend "
                        f"({', '.join(map(str, CUDA_DTYPES))}); use backend='reference'")
    out, _, _, _, stats = cuda_ops.cbam_forward(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias,
                                                running_mean, running_var, training, eps)
    if training and running_mean is not None:
        cuda_ops.update_running_stats(running_mean, running_var, stats, momentum)
    return out


__all__ = ["cbam", "cbam_ref", "cbam_dispatcher"]
