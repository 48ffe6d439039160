"""Triton backend of the selective scans (``backend="triton"``).

Runs on CUDA tensors, or on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1`` set
before this package is imported), which is how CI tests it. The ops are ``torch.library`` custom ops
in the ``dermomamba_triton`` namespace (see :mod:`.ops`), so they trace under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from ..checks import check_kernel_dtypes
from . import ops
from .ops import multiaxial_scan_bwd, multiaxial_scan_fwd, selective_scan_bwd, selective_scan_fwd

__all__ = ["ops", "selective_scan_triton", "multiaxial_triton", "multiaxial_projections", "selective_scan_fwd",
           "selective_scan_bwd", "multiaxial_scan_fwd", "multiaxial_scan_bwd"]


def _interpreter_safe(t):
    # The interpreter computes bf16 arithmetic wrongly (numpy has no bf16): hand it fp32 copies.
    if t is not None and t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return t.float()
    return t


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, deterministic=False):
    """mamba_ssm's ``selective_scan_fn`` on the Triton kernels; differentiable in every tensor.

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (dim, N) constant or (batch, N, L) /
    (batch, groups, N, L) variable; D, delta_bias (dim,). Output (batch, dim, L) in u's dtype, plus
    the fp32 last state (batch, dim, N) with ``return_last_state``. The backward never uses float
    atomics, so it is deterministic whatever ``deterministic`` says.

    Example:
        >>> u = torch.randn(2, 64, 300, device="cuda"); delta = torch.rand_like(u)
        >>> A = -torch.rand(64, 16, device="cuda"); B = torch.randn(2, 16, 300, device="cuda")
        >>> selective_scan_triton(u, delta, A, B, B.clone(), delta_softplus=True).shape
        torch.Size([2, 64, 300])
    """
    check_kernel_dtypes("triton", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    dtype = u.dtype
    args = [_interpreter_safe(t) for t in (u, delta, A, B, C, D, z, delta_bias)]
    out, last_state, _ = torch.ops.dermomamba_triton.selective_scan_fwd(*args, bool(delta_softplus),
                                                                        bool(deterministic))
    out = out.to(dtype)
    return (out, last_state) if return_last_state else out


def multiaxial_projections(x, x_proj_weight, dt_projs_weight):
    """SS2D's projections in the native (h, w) layout: no per-direction copy of x is made.

    Shapes: x (batch, D, H, W) any strides; x_proj_weight (4, R + 2N, D); dt_projs_weight (4, D, R).
    Returns delta (batch, 4, D, H, W) and BC (batch, 4, 2N, H, W) (B's N rows, then C's), in x's
    dtype. The projections act per pixel, so direction k's values at (h, w) are those its scan order
    visits there. The dt rows and the B, C rows are two products rather than slices of one, so their
    gradients need no full-size zero-filled slice buffers.

    Example:
        >>> delta, BC = multiaxial_projections(torch.randn(2, 8, 6, 10), torch.randn(4, 33, 8),
        ...                                    torch.randn(4, 8, 1))
        >>> delta.shape, BC.shape
        (torch.Size([2, 4, 8, 6, 10]), torch.Size([2, 4, 32, 6, 10]))
    """
    batch, dim, height, width = x.shape
    num_dirs, proj_rows, _ = x_proj_weight.shape
    dt_rank = dt_projs_weight.shape[2]
    pixels = x.reshape(batch, dim, height * width)
    dts = torch.matmul(x_proj_weight[:, :dt_rank].reshape(num_dirs * dt_rank, dim), pixels)
    delta = torch.matmul(dt_projs_weight, dts.view(batch, num_dirs, dt_rank, height * width))
    BC = torch.matmul(x_proj_weight[:, dt_rank:].reshape(num_dirs * (proj_rows - dt_rank), dim), pixels)
    return (delta.view(batch, num_dirs, dim, height, width),
            BC.view(batch, num_dirs, proj_rows - dt_rank, height, width))


def multiaxial_triton(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, deterministic=False):
    """SS2D's four-direction scan of x (batch, D, H, W), summed, fp32 (batch, D, H, W); differentiable.

    Same contract as :func:`dermomamba_kernels.selective_scan.multiaxial_selective_scan_ref`.

    Example:
        >>> D, N, R = 8, 16, 1
        >>> y = multiaxial_triton(torch.randn(2, D, 6, 10, device="cuda"),
        ...     torch.randn(4, R + 2 * N, D, device="cuda"), torch.randn(4, D, R, device="cuda"),
        ...     torch.randn(4, D, device="cuda"), torch.rand(4 * D, N, device="cuda"),
        ...     torch.ones(4 * D, device="cuda"))
        >>> y.shape, y.dtype
        (torch.Size([2, 8, 6, 10]), torch.float32)
    """
    check_kernel_dtypes("triton", x=x, x_proj_weight=x_proj_weight, dt_projs_weight=dt_projs_weight,
                        dt_projs_bias=dt_projs_bias, A_logs=A_logs, Ds=Ds)
    x, x_proj_weight, dt_projs_weight = (_interpreter_safe(t) for t in (x, x_proj_weight, dt_projs_weight))
    delta, BC = multiaxial_projections(x, x_proj_weight, dt_projs_weight)
    A = -torch.exp(A_logs.float())
    y, _, _ = torch.ops.dermomamba_triton.multiaxial_scan_fwd(
        x, delta, A, BC, Ds.float(), dt_projs_bias.float().reshape(-1), True, bool(deterministic))
    return y
