"""Selective scans: mamba_ssm's 1-D scan and the fused multiaxial (SS2D) scan.

Public entry points (one dispatch point each):
  * :func:`selective_scan_fn`: drop-in for ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.
  * :func:`multiaxial_selective_scan`: VMamba SS2D's four-direction core, summed, fp32 out.
Their specifications are :func:`selective_scan_ref` and :func:`multiaxial_selective_scan_ref`.
"""

from __future__ import annotations

from .._dispatch import OpDispatcher, always, cpu_extension, cuda_extension, triton_kernels
from .naive import multiaxial_selective_scan_ref, selective_scan_ref

selective_scan_dispatcher = OpDispatcher("selective_scan")
multiaxial_dispatcher = OpDispatcher("multiaxial_selective_scan")


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, backend=None, deterministic=False):
    """Selective scan with mamba_ssm's signature, defaults and outputs; differentiable.

    Shapes: u, delta, z (batch, dim, L); A (dim, N) real; B, C constant (dim, N) or variable
    (batch, N, L) / (batch, groups, N, L); D, delta_bias (dim,). fp32/fp16/bf16 inputs, fp32 state,
    output in u's dtype; with ``return_last_state`` also the final state (batch, dim, N) in fp32
    (not differentiable, as in mamba_ssm).

    ``backend``: "auto" (default, or the ``DERMOMAMBA_BACKEND`` environment variable), "cuda",
    "triton", "cpu" or "reference". ``deterministic``: no order-dependent float atomics in the
    backward (bit-identical gradients across runs).

    Example:
        >>> u = torch.randn(2, 64, 300); delta = torch.rand(2, 64, 300)
        >>> A = -torch.rand(64, 16); B = torch.randn(2, 16, 300); C = torch.randn(2, 16, 300)
        >>> selective_scan_fn(u, delta, A, B, C, D=torch.ones(64), delta_softplus=True).shape
        torch.Size([2, 64, 300])
    """
    from .checks import check_selective_scan_inputs

    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return selective_scan_dispatcher(backend, u.device, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     return_last_state, deterministic=deterministic)


def multiaxial_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, *, backend=None,
                              deterministic=False):
    """SS2D's four-direction selective scan of x (batch, D, H, W), summed, as fp32 (batch, D, H, W).

    Shapes: x_proj_weight (4, R + 2N, D); dt_projs_weight (4, D, R); dt_projs_bias (4, D);
    A_logs (4 * D, N); Ds (4 * D,). x may be any strided view (a permuted tensor scans other axis
    orders); fp16/bf16 x gives an fp32 result. Differentiable in every tensor argument.

    Example:
        >>> D, N, R = 8, 16, 1
        >>> y = multiaxial_selective_scan(torch.randn(2, D, 6, 10), torch.randn(4, R + 2 * N, D),
        ...     torch.randn(4, D, R), torch.randn(4, D), torch.rand(4 * D, N), torch.ones(4 * D))
        >>> y.shape, y.dtype
        (torch.Size([2, 8, 6, 10]), torch.float32)
    """
    from .checks import check_multiaxial_inputs

    check_multiaxial_inputs(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    return multiaxial_dispatcher(backend, x.device, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
                                 deterministic=deterministic)


@selective_scan_dispatcher.register("reference", always)
def _selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                              deterministic=False):
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


@multiaxial_dispatcher.register("reference", always)
def _multiaxial_reference(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, deterministic=False):
    return multiaxial_selective_scan_ref(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)


def _extension_selective_scan(*args, **kwargs):
    from .extension import selective_scan_extension

    return selective_scan_extension(*args, **kwargs)


def _extension_multiaxial(*args, **kwargs):
    from .extension import multiaxial_extension

    return multiaxial_extension(*args, **kwargs)


def _triton_selective_scan(*args, **kwargs):
    from .triton import selective_scan_triton

    return selective_scan_triton(*args, **kwargs)


def _triton_multiaxial(*args, **kwargs):
    from .triton import multiaxial_triton

    return multiaxial_triton(*args, **kwargs)


_triton_available = triton_kernels(__name__ + ".triton")
selective_scan_dispatcher.register("triton", _triton_available)(_triton_selective_scan)
multiaxial_dispatcher.register("triton", _triton_available)(_triton_multiaxial)

for _backend, _check in (("cpu", cpu_extension), ("cuda", cuda_extension)):
    selective_scan_dispatcher.register(_backend, _check)(_extension_selective_scan)
    multiaxial_dispatcher.register(_backend, _check)(_extension_multiaxial)

# With the extension loaded, register the fakes and autograd of torch.ops.dermomamba.* now, so that
# direct users of the ops (torch.compile, opcheck) see them without a public call first.
from .. import _ext as _extension_state  # noqa: E402

if _extension_state.extension_loaded():
    from . import extension  # noqa: E402,F401

__all__ = [
    "selective_scan_fn",
    "selective_scan_ref",
    "multiaxial_selective_scan",
    "multiaxial_selective_scan_ref",
    "selective_scan_dispatcher",
    "multiaxial_dispatcher",
]
