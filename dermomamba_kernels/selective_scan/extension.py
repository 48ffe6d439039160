"""The "cpu" and "cuda" backends of the selective scans: torch.ops.dermomamba custom ops from ``_C``.

Both backends call the same four ops (schemas in csrc/ops.cpp); the device of the tensors picks the
C++ CPU or the CUDA kernel. This module gives the ops what torch needs around them:

* fake (meta) implementations, so shapes propagate under ``torch.compile(fullgraph=True)``;
* autograd: the two ``*_fwd`` ops are differentiable, their backward calls the ``*_bwd`` ops;
  ``last_state`` and ``chunk_states`` are not differentiable (mamba_ssm does not differentiate the
  last state either);
* the input normalisation the kernels rely on (views only, never a copy of a sequence tensor unless
  its last stride is not 1).

Precision contract (same as the references): the multiaxial projections run in x's dtype; the scan
and everything after it are fp32; ``multiaxial_extension`` returns fp32 and ``selective_scan_extension``
returns u's dtype.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch

from .. import _ext  # noqa: F401  (loads _C, which defines the op schemas)
from .checks import check_kernel_dtypes

# Positions per chunk: chunk_states keeps the state entering every chunk, and the backward recomputes
# one chunk at a time from there. One entry per device type; the CUDA kernel owner tunes "cuda".
CHUNK_SIZE_BY_DEVICE = {
    # CPU: the backward's per-chunk buffers (states, decays, dB, dC rows: 6 * chunk * N fp32) stay
    # in L2 at N = 16, and the chunk_states overhead (N floats per chunk) is under 1%.
    "cpu": 256,
    # CUDA: a chunk is one warp's register tile (at most 256 positions, 8 per lane). 128 keeps the
    # backward kernel at about 120 registers (two blocks of 8 warps per SM); chunk_states costs
    # N / 128 floats per position and channel, under 1% of the scan's traffic at N = 16.
    "cuda": 128,
}


# Overrides the multiaxial scan's chunk size on CUDA for a process (tuning, benchmarks of kernel variants).
MULTIAXIAL_CHUNK_VARIABLE = "DERMOMAMBA_MULTIAXIAL_CHUNK_SIZE"


def chunk_size_for(device: torch.device) -> int:
    """Chunk size of the scan kernels on ``device`` (see CHUNK_SIZE_BY_DEVICE)."""
    try:
        return CHUNK_SIZE_BY_DEVICE[torch.device(device).type]
    except KeyError:
        raise ValueError(f"the scan kernels have no chunk size for device type {torch.device(device).type!r}") from None


def multiaxial_chunk_size_for(device: torch.device) -> int:
    """Chunk size of the multiaxial scan on ``device``: chunk_size_for, or on CUDA the value of
    DERMOMAMBA_MULTIAXIAL_CHUNK_SIZE when set (a positive integer)."""
    value = os.environ.get(MULTIAXIAL_CHUNK_VARIABLE)
    if value is None or torch.device(device).type != "cuda":
        return chunk_size_for(device)
    try:
        chunk = int(value)
    except ValueError:
        chunk = 0
    if chunk < 1:
        raise ValueError(f"{MULTIAXIAL_CHUNK_VARIABLE} must be a positive integer, got {value!r}")
    return chunk


_ops = torch.ops.dermomamba
NUM_DIRECTIONS = 4


def _num_chunks(length, chunk_size):
    return (length + chunk_size - 1) // chunk_size


# --- fake implementations (shapes and dtypes exactly as the kernels return them) ------------------

@torch.library.register_fake("dermomamba::selective_scan_fwd")
def _selective_scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size):
    batch, dim, length = u.shape
    dstate = A.shape[1]
    out = u.new_empty(batch, dim, length)
    last_state = u.new_empty(batch, dim, dstate, dtype=torch.float32)
    chunk_states = u.new_empty(batch, dim, _num_chunks(length, chunk_size), dstate, dtype=torch.float32)
    return out, last_state, chunk_states


@torch.library.register_fake("dermomamba::selective_scan_bwd")
def _selective_scan_bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, chunk_size,
                             deterministic):
    # Gradients of absent optional inputs are empty: fp32 for D / delta_bias, u's dtype for z.
    return (
        u.new_empty(u.shape),
        delta.new_empty(delta.shape),
        A.new_empty(A.shape, dtype=torch.float32),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        u.new_empty(D.shape if D is not None else (0,), dtype=torch.float32),
        z.new_empty(z.shape) if z is not None else u.new_empty(0),
        u.new_empty(delta_bias.shape if delta_bias is not None else (0,), dtype=torch.float32),
    )


@torch.library.register_fake("dermomamba::multiaxial_scan_fwd")
def _multiaxial_scan_fwd_fake(x, delta, A, B, C, D, delta_bias, delta_softplus, chunk_size):
    batch, dim, height, width = x.shape
    dstate = A.shape[1]
    y = x.new_empty(batch, dim, height, width, dtype=torch.float32)
    chunk_states = x.new_empty(batch, NUM_DIRECTIONS, dim, _num_chunks(height * width, chunk_size), dstate,
                               dtype=torch.float32)
    return y, chunk_states


@torch.library.register_fake("dermomamba::multiaxial_scan_bwd")
def _multiaxial_scan_bwd_fake(dy, x, delta, A, B, C, D, delta_bias, delta_softplus, chunk_states, chunk_size,
                              deterministic):
    return (
        x.new_empty(x.shape),
        delta.new_empty(delta.shape),
        A.new_empty(A.shape, dtype=torch.float32),
        B.new_empty(B.shape),
        C.new_empty(C.shape),
        D.new_empty(D.shape, dtype=torch.float32),
        delta_bias.new_empty(delta_bias.shape, dtype=torch.float32),
    )


# --- autograd ---------------------------------------------------------------------------------------
# The fwd schemas have no `deterministic` argument, so the wrappers below hand it to setup_context
# through a thread-local; torch.use_deterministic_algorithms(True) also turns it on.

_deterministic_request = threading.local()


def _take_deterministic_request():
    requested = getattr(_deterministic_request, "value", False)
    _deterministic_request.value = False
    return bool(requested) or torch.are_deterministic_algorithms_enabled()


def _selective_scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size = inputs
    _, _, chunk_states = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states)
    ctx.delta_softplus = delta_softplus
    ctx.chunk_size = chunk_size
    ctx.deterministic = _take_deterministic_request()
    ctx.has_optional = (D is not None, z is not None, delta_bias is not None)


def _selective_scan_backward(ctx, dout, dlast_state, dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    # Gradients of last_state are not propagated (as in mamba_ssm); chunk_states is bookkeeping.
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = _ops.selective_scan_bwd(
        dout.contiguous(), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, ctx.chunk_size,
        ctx.deterministic)
    has_D, has_z, has_bias = ctx.has_optional
    return (du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, ddelta_bias if has_bias else None,
            None, None)


def _multiaxial_setup_context(ctx, inputs, output):
    x, delta, A, B, C, D, delta_bias, delta_softplus, chunk_size = inputs
    _, chunk_states = output
    ctx.save_for_backward(x, delta, A, B, C, D, delta_bias, chunk_states)
    ctx.delta_softplus = delta_softplus
    ctx.chunk_size = chunk_size
    ctx.deterministic = _take_deterministic_request()


def _multiaxial_backward(ctx, dy, dchunk_states):
    x, delta, A, B, C, D, delta_bias, chunk_states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dx, ddelta, dA, dB, dC, dD, ddelta_bias = _ops.multiaxial_scan_bwd(
        dy.contiguous(), x, delta, A, B, C, D, delta_bias, ctx.delta_softplus, chunk_states, ctx.chunk_size,
        ctx.deterministic)
    return dx, ddelta, dA, dB, dC, dD, ddelta_bias, None, None


def _mark_nondifferentiable_outputs(setup_context, num_ignored):
    def wrapped(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[-num_ignored:])

    return wrapped


torch.library.register_autograd("dermomamba::selective_scan_fwd", _selective_scan_backward,
                                setup_context=_mark_nondifferentiable_outputs(_selective_scan_setup_context, 2))
torch.library.register_autograd("dermomamba::multiaxial_scan_fwd", _multiaxial_backward,
                                setup_context=_mark_nondifferentiable_outputs(_multiaxial_setup_context, 1))


def _set_deterministic_request(value):
    """Hands ``deterministic`` to the setup_context of the op called next on this thread (eager mode).

    Under torch.compile the flag cannot travel this way (torch.use_deterministic_algorithms(True)
    does); the callers clear it after the op, so a call under no_grad leaves nothing behind.
    """
    _deterministic_request.value = value


# --- public entry points of the two backends -----------------------------------------------------

def _sequence_layout(t):
    """u, delta and z need a unit stride along L; any other strides are taken as they are."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _scan_operand(M, u):
    """B or C as the kernel's (batch, groups, N, L) view, in u's dtype or fp32 (views, no copies)."""
    batch, dim, length = u.shape
    if M.dtype != u.dtype and M.dtype != torch.float32:
        M = M.float()
    if M.dim() == 2:
        # Constant (dim, N): one group per channel, broadcast along batch and L with stride 0. The
        # kernel returns a full-size gradient for the view; autograd sums it back through expand.
        return M[None, :, :, None].expand(batch, dim, M.shape[1], length)
    if M.dim() == 3:
        return M.unsqueeze(1)
    return M


def _per_channel_groups(M, dim):
    """(batch, groups, N, L) -> (batch, dim, N, L): a view for one group, a copy otherwise."""
    batch, groups, dstate, length = M.shape
    if groups == dim:
        return M
    if groups == 1:
        return M.expand(batch, dim, dstate, length)
    return M.repeat_interleave(dim // groups, dim=1)


def selective_scan_extension(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False, deterministic=False):
    """mamba_ssm's ``selective_scan_fn`` on the C++/CUDA kernels (inputs already checked).

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (dim, N), (batch, N, L) or
    (batch, groups, N, L); D, delta_bias (dim,). Returns out (batch, dim, L) in u's dtype, and with
    ``return_last_state`` also the fp32 state after the last position (batch, dim, N).

    Example:
        >>> out = selective_scan_extension(u, delta, A, B, C, D=D, delta_softplus=True)
    """
    check_kernel_dtypes(u.device.type, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    u = _sequence_layout(u)
    delta = _sequence_layout(delta.to(u.dtype))
    z = None if z is None else _sequence_layout(z.to(u.dtype))
    A = A.float()
    B = _scan_operand(B, u)
    C = _scan_operand(C, u)
    if B.shape[1] != C.shape[1]:
        # One constant (a group per channel), one variable: the kernels index both by one group map.
        B, C = _per_channel_groups(B, u.shape[1]), _per_channel_groups(C, u.shape[1])
    D = None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    request = bool(deterministic) and not torch.compiler.is_compiling()
    if request:
        _set_deterministic_request(True)
    try:
        out, last_state, _ = _ops.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                                     chunk_size_for(u.device))
    finally:
        if request:
            _set_deterministic_request(False)
    return (out, last_state) if return_last_state else out


# The x projection's rows per direction are padded to a multiple of this many: a (positions, 4 x rows) fp16
# result whose row length is a multiple of 8 elements lets cuBLAS use its tensor-core kernels (measured on an
# H200, batch 48 x 8 x 192 x 256: 0.94 ms for 33 rows per direction, 0.44 ms for 40; benchmarks/RESULTS.md).
PROJECTION_ROW_MULTIPLE = 8


def _padded_rows(rows):
    return -(-rows // PROJECTION_ROW_MULTIPLE) * PROJECTION_ROW_MULTIPLE


class _ProjectionWeights(NamedTuple):
    """The projections' weights as the products use them, in the projections' dtype: w_x (4, padded rows, D) is
    x_proj_weight with its rows reordered to [B, C, dt] and zero rows appended up to a multiple of
    PROJECTION_ROW_MULTIPLE (B and C then start at aligned offsets of each position's row); w_dt (4, D, R)."""
    w_x: torch.Tensor
    w_dt: torch.Tensor
    dt_rank: int
    dstate: int


def _projection_weights(x_proj_weight, dt_projs_weight, dtype) -> _ProjectionWeights:
    dt_rank = dt_projs_weight.shape[2]
    rows = x_proj_weight.shape[1]
    w = x_proj_weight.to(dtype)
    parts = [w[:, dt_rank:], w[:, :dt_rank]]
    if _padded_rows(rows) > rows:
        parts.append(w.new_zeros(w.shape[0], _padded_rows(rows) - rows, w.shape[2]))
    return _ProjectionWeights(torch.cat(parts, dim=1), dt_projs_weight.to(dtype), dt_rank, (rows - dt_rank) // 2)


def _dt_projection(dts, dt_projs_weight):
    """delta (batch, 4, D, H, W) = sum over r of dts (batch, H, W, 4, R) x dt_projs_weight (4, D, R). With R = 1
    (DermoMamba's large stages) a broadcast product: einsum would run it as a matmul of inner size 1 (0.64 ms
    against a few tenths for the product at batch 48 x 8 x 192 x 256)."""
    if dts.shape[-1] == 1:
        # dts is one column of x_dbl (a stride of 4 x rows between positions): gathered once into a small
        # (batch, 4, H, W) copy, the product reads it along contiguous rows (the broadcast product straight from
        # the strided column took 0.67 ms at batch 48 x 8 x 192 x 256 on an H100).
        dts = dts[..., 0].permute(0, 3, 1, 2).contiguous()
        return dts.unsqueeze(2) * dt_projs_weight[:, :, 0][None, :, :, None, None]
    return torch.einsum("bhwkr,kdr->bkdhw", dts, dt_projs_weight)


def _dt_projection_grads(ddelta, dts, w_dt):
    """Gradients of delta = dts x w_dt (see _dt_projection) with respect to dts (batch, H, W, 4, R) and w_dt
    (4, D, R), from ddelta (batch, 4, D, H, W). With R = 1 as products and sums in fp32 (einsum ran them as
    strided matrix-vector products: 1.1 ms each at the first stage)."""
    if dts.shape[-1] == 1:
        ddelta32 = ddelta.float()
        ddts = (ddelta32 * w_dt[:, :, 0].float()[None, :, :, None, None]).sum(2)  # (batch, 4, H, W)
        dw_dt = (ddelta32 * dts[..., 0].permute(0, 3, 1, 2).float().unsqueeze(2)).sum((0, 3, 4))
        return ddts.permute(0, 2, 3, 1).unsqueeze(-1).to(dts.dtype), dw_dt.unsqueeze(-1).to(w_dt.dtype)
    return (torch.einsum("bkdhw,kdr->bhwkr", ddelta, w_dt), torch.einsum("bkdhw,bhwkr->kdr", ddelta, dts))


def _projection_dtype(x):
    """Under autocast the projections run in the autocast dtype (fp16 / bf16), else in x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _projections(x, weights: _ProjectionWeights):
    """delta (batch, 4, D, H, W) and B, C ((batch, 4, N, H, W) views of one channel-last projection), in the
    weights' dtype, plus that projection x_dbl (batch, H, W, 4, rows): per direction B (N), C (N), dt (R), zeros."""
    dstate, dt_rank = weights.dstate, weights.dt_rank
    # Position-major, channel-last result: each position's B and C rows are contiguous, which is what the
    # kernels read per step.
    x_dbl = torch.einsum("bdhw,kcd->bhwkc", x.to(weights.w_x.dtype), weights.w_x)
    B, C, dts = x_dbl[..., :dstate], x_dbl[..., dstate:2 * dstate], x_dbl[..., 2 * dstate:2 * dstate + dt_rank]
    delta = _dt_projection(dts, weights.w_dt)
    return x_dbl, delta, B.permute(0, 3, 4, 1, 2), C.permute(0, 3, 4, 1, 2)


class _ProjectedScan(torch.autograd.Function):
    """Projections + multiaxial scan whose backward recomputes the projections instead of keeping them.

    Why: x_dbl (batch, H, W, 4, R + 2N) and delta (batch, 4, D, H, W) are 16x and 4x the size of x at N = 16
    (R + 2N = 33 values per direction and position against D channels); kept for the backward they were about
    a quarter of DermoMamba's training memory. Recomputing them costs two small matmuls (K = D and K = R).
    The backward runs the same casts and products as the forward (bitwise the same x_dbl and delta, whatever
    autocast state the backward runs under), then their gradients written out in the same dtype, as autograd
    would run them.
    """

    @staticmethod
    def forward(ctx, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, deterministic, chunk_size):
        dtype = _projection_dtype(x)
        _, delta, B, C = _projections(x, _projection_weights(x_proj_weight, dt_projs_weight, dtype))
        A = -torch.exp(A_logs.float())
        y, chunk_states = _ops.multiaxial_scan_fwd(x, delta, A, B, C, Ds.float(), dt_projs_bias.float().reshape(-1),
                                                   True, chunk_size)
        ctx.save_for_backward(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, chunk_states)
        ctx.dtype, ctx.deterministic, ctx.chunk_size = dtype, deterministic, chunk_size
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, chunk_states = ctx.saved_tensors
        A = -torch.exp(A_logs.float())
        # Prepared once for all slices.
        weights = _projection_weights(x_proj_weight, dt_projs_weight, ctx.dtype)
        scan_params = (A, Ds.float(), dt_projs_bias.float().reshape(-1))
        images_per_slice = _backward_images_per_slice(x, x_proj_weight)
        dx_parts, param_grads = [], None
        for start in range(0, x.shape[0], images_per_slice):
            batch = slice(start, start + images_per_slice)
            dx, *grads = _projected_scan_backward(ctx, dy[batch], x[batch], chunk_states[batch], weights, scan_params)
            dx_parts.append(dx)
            # Fixed order over the slices: the deterministic mode stays bit-reproducible.
            param_grads = grads if param_grads is None else [acc + g for acc, g in zip(param_grads, grads)]
        dx = dx_parts[0] if len(dx_parts) == 1 else torch.cat(dx_parts)
        dw_x, dw_dt, dbias, dA, dD = param_grads
        # A = -exp(A_logs): dA_logs = dA * A.
        return (dx, dw_x.to(x_proj_weight.dtype), dw_dt.to(dt_projs_weight.dtype),
                dbias.reshape(dt_projs_bias.shape).to(dt_projs_bias.dtype), (dA * A).to(A_logs.dtype),
                dD.to(Ds.dtype), None, None)


# The backward's transient memory per (position, direction) is the recomputed projection x_dbl, its
# gradient and the kernel's fp32 dB / dC: ~R + 2N values each, ~12x x's bytes. At DermoMamba's first stage
# (48 x 49,152 positions, the three branches batched) that is ~3 GB at once, the training step's memory peak.
# Slices of at most this many x_dbl elements (16 such images at 192x256) bound it; each slice still gives the
# kernel thousands of sequences, so the GPU stays full.
BACKWARD_SLICE_PROJECTION_ELEMENTS = 1 << 27


def _backward_images_per_slice(x, x_proj_weight):
    """Images per slice of _ProjectedScan's backward: x (batch, D, H, W), x_proj_weight (4, R + 2N, D)."""
    directions, rows = x_proj_weight.shape[0], x_proj_weight.shape[1]
    per_image = x.shape[2] * x.shape[3] * directions * _padded_rows(rows)
    return max(1, BACKWARD_SLICE_PROJECTION_ELEMENTS // max(1, per_image))


def _projected_scan_backward(ctx, dy, x, chunk_states, weights: _ProjectionWeights, scan_params):
    """_ProjectedScan's backward on a slice of the batch: dx (in x's dtype) and the parameters' gradients
    (x_proj_weight, dt_projs_weight, delta bias, A, D) as sums over the slice, fp32 where the kernel's are.
    scan_params: the kernel's A, D and delta bias, in fp32."""
    dtype = weights.w_x.dtype
    A, D, delta_bias = scan_params
    x_dbl, delta, B, C = _projections(x, weights)
    dx_scan, ddelta, dA, dB, dC, dD, dbias = _ops.multiaxial_scan_bwd(
        dy.contiguous(), x, delta, A, B, C, D, delta_bias, True, chunk_states, ctx.chunk_size, ctx.deterministic)
    del delta, B, C
    dt_rank, dstate, w_x = weights.dt_rank, weights.dstate, weights.w_x
    dts = x_dbl[..., 2 * dstate:2 * dstate + dt_rank]
    ddelta = ddelta.to(dtype)
    ddts, dw_dt = _dt_projection_grads(ddelta, dts, weights.w_dt)
    del ddelta, dts, x_dbl
    # x_dbl = x against the padded weight: the gradient of x_dbl is (dB, dC, ddts, 0) in its layout.
    pad = w_x.shape[1] - 2 * dstate - dt_rank
    parts = [dB.to(dtype).permute(0, 3, 4, 1, 2), dC.to(dtype).permute(0, 3, 4, 1, 2), ddts]
    del dB, dC
    if pad:
        parts.append(ddts.new_zeros(*ddts.shape[:-1], pad))
    dx_dbl = torch.cat(parts, dim=-1)
    del parts, ddts
    # Both as one matmul over all positions (einsum batched them per image: 4 ms at the first stage).
    batch, height, width, directions, rows = dx_dbl.shape
    dx_rows = dx_dbl.reshape(-1, directions * rows)
    dx_proj = (dx_rows @ w_x.reshape(directions * rows, -1)).view(batch, height, width, -1).permute(0, 3, 1, 2)
    x_rows = x.to(dtype).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    dw_padded = (dx_rows.t() @ x_rows).view(directions, rows, -1)
    # Back to x_proj_weight's row order [dt, B, C].
    dw_x = torch.cat([dw_padded[:, 2 * dstate:2 * dstate + dt_rank], dw_padded[:, :2 * dstate]], dim=1)
    dx = dx_scan + dx_proj.to(x.dtype)
    return dx, dw_x.float(), dw_dt.float(), dbias, dA, dD


# Whether the multiaxial extension path keeps its projections for the backward (faster) or recomputes them
# there (less memory: see _ProjectedScan). Default: recompute; DERMOMAMBA_RECOMPUTE_PROJECTIONS=0 keeps them.
RECOMPUTE_PROJECTIONS_VARIABLE = "DERMOMAMBA_RECOMPUTE_PROJECTIONS"


def recompute_projections_default() -> bool:
    value = os.environ.get(RECOMPUTE_PROJECTIONS_VARIABLE, "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"{RECOMPUTE_PROJECTIONS_VARIABLE} must be 1 or 0, got {value!r}")
    return value in ("1", "true", "yes", "on")


def multiaxial_extension(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, deterministic=False,
                         recompute_projections=None):
    """SS2D's four-direction scan of x (batch, D, H, W), summed, fp32 (batch, D, H, W).

    The projections run in the native (h, w) layout in x's dtype (the autocast dtype under autocast); x
    itself reaches the kernel as the caller's view (a permuted, non-contiguous x is read through its strides),
    so no (batch, 4, D, H*W) copy of x is ever made. ``recompute_projections`` (default: the environment
    variable DERMOMAMBA_RECOMPUTE_PROJECTIONS, else True): keep only x, the weights and the scan's chunk_states
    for the backward and recompute the projections there (see _ProjectedScan), or keep them (faster, more
    memory).

    Shapes: x_proj_weight (4, R + 2N, D); dt_projs_weight (4, D, R); dt_projs_bias (4, D);
    A_logs (4 * D, N); Ds (4 * D,).

    Example:
        >>> y = multiaxial_extension(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
        >>> y.shape == x.shape and y.dtype == torch.float32
        True
    """
    check_kernel_dtypes(x.device.type, x=x, x_proj_weight=x_proj_weight, dt_projs_weight=dt_projs_weight,
                        dt_projs_bias=dt_projs_bias, A_logs=A_logs, Ds=Ds)
    if recompute_projections is None:
        recompute_projections = recompute_projections_default()
    chunk_size = multiaxial_chunk_size_for(x.device)
    if recompute_projections:
        deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
        return _ProjectedScan.apply(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, deterministic,
                                    chunk_size)
    _, delta, B, C = _projections(x, _projection_weights(x_proj_weight, dt_projs_weight, _projection_dtype(x)))
    A = -torch.exp(A_logs.float())
    request = bool(deterministic) and not torch.compiler.is_compiling()
    if request:
        _set_deterministic_request(True)
    try:
        y, _ = _ops.multiaxial_scan_fwd(x, delta, A, B, C, Ds.float(), dt_projs_bias.float().reshape(-1), True,
                                        chunk_size)
    finally:
        if request:
            _set_deterministic_request(False)
    return y
