"""Gated LayerNorm, ``LayerNorm(y) * silu(z)`` over the last dimension, in one Triton kernel each way.

The published SS2D tail computes the norm, the SiLU, the product (and autocast's cast for out_proj)
as separate kernels, each reading and writing a whole (positions x channels) map, and autograd keeps
the norm's output, silu(z) and the product for the backward. Here the forward reads y and z once and
writes the gated map plus one mean and rstd per row; the backward reads y, z, the incoming gradient
and the statistics and writes dy and dz, recomputing the normalized rows and silu(z) in registers.

Roundings: the kernels replicate where the published expression rounds, so that the result equals
it to float rounding (not just to fp32 accuracy). Each intermediate is held in fp32 and rounded to
the dtype PyTorch would store it in (``*_ROUNDING``: ROUND_NONE for fp32, ROUND_FP16, ROUND_BF16):
  forward   n = LayerNorm(y) -> norm dtype; s = silu(z) -> z's dtype; p = n * s -> product dtype
            (promotion of the two); out = p -> the output dtype (the caller's cast, e.g. autocast's
            for out_proj).
  backward  dp = dout -> product dtype (the backward of the cast); ds = dp * n -> product dtype ->
            z's dtype; dz = silu'(z) * ds -> z's dtype; dn = dp * s -> product dtype -> norm dtype;
            then LayerNorm's backward of dn: dy (y's dtype), and the column sums of dn * xhat
            (d weight) and dn (d bias) per program, summed over programs in a fixed order afterwards
            (no atomics: the same bits every run), as the LayerNorm kernels of triton_kernels do.

bf16 rounding is done with integer arithmetic (round to nearest even), not by a conversion: the
Triton interpreter converts fp32 -> bf16 by truncation, the GPU to nearest, and the kernels must
give the same numbers on both.

Tiles, grid and strides as in :mod:`.triton_kernels` (whose ``rows_view`` supplies the (rows, C)
views with strides (row stride, 1) these kernels read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import BACKWARD_TILE_ELEMENTS, FORWARD_TILE_ELEMENTS, _backward_grid, _device_guard, _tile

# Each holds about twice the live tiles of the LayerNorm kernels (z and the gate's terms besides y and
# its derivatives): half their tiles keeps them in registers (4 warps: 16 fp32 values per thread per tile
# in the forward, 8 in the backward). Untuned: the GPU benchmark decides.
GATED_FORWARD_TILE_ELEMENTS = FORWARD_TILE_ELEMENTS // 2
GATED_BACKWARD_TILE_ELEMENTS = BACKWARD_TILE_ELEMENTS // 2

ROUND_NONE = tl.constexpr(0)
ROUND_FP16 = tl.constexpr(1)
ROUND_BF16 = tl.constexpr(2)
ROUNDING_OF_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# bf16 keeps the upper 16 bits of an fp32; adding this (plus the kept part's lowest bit) rounds to nearest even.
BF16_HALF_ULP_MINUS_ONE = tl.constexpr(0x7FFF)
BF16_DROPPED_BITS = tl.constexpr(16)


@triton.jit
def _round(x, ROUNDING: tl.constexpr):
    """x (fp32) rounded to nearest even in the dtype named by ROUNDING, returned as fp32."""
    if ROUNDING == ROUND_FP16:
        return x.to(tl.float16).to(tl.float32)
    elif ROUNDING == ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        lowest_kept = (bits >> BF16_DROPPED_BITS) & 1
        rounded = ((bits + BF16_HALF_ULP_MINUS_ONE + lowest_kept) >> BF16_DROPPED_BITS) << BF16_DROPPED_BITS
        # NaN stays NaN (the carry could turn a NaN's payload into an infinity or a sign flip)
        return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    else:
        return x


@triton.jit
def _silu_parts(z):
    """sigmoid(z) and silu(z) = z / (1 + exp(-z)) in fp32, divided with IEEE rounding as PyTorch's kernel."""
    denominator = 1.0 + tl.exp(-z)
    return tl.div_rn(1.0, denominator), tl.div_rn(z, denominator)


@triton.jit
def _gated_forward_kernel(y_ptr, z_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, rows, y_row_stride,
                          z_row_stride, eps, C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                          Y_DENSE: tl.constexpr, Z_DENSE: tl.constexpr, NORM_ROUNDING: tl.constexpr,
                          GATE_ROUNDING: tl.constexpr, PRODUCT_ROUNDING: tl.constexpr,
                          OUT_ROUNDING: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_C)
    row_ok = row < rows
    col_ok = col < C
    mask = row_ok[:, None] & col_ok[None, :]
    # A constexpr row stride lets the compiler prove the alignment of dense rows (vector loads).
    if Y_DENSE:
        y_offsets = row[:, None] * C + col[None, :]
    else:
        y_offsets = row[:, None] * y_row_stride + col[None, :]
    if Z_DENSE:
        z_offsets = row[:, None] * C + col[None, :]
    else:
        z_offsets = row[:, None] * z_row_stride + col[None, :]
    y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + z_offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(y, axis=1) / C
    centred = tl.where(mask, y - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    normed = _round(centred * rstd[:, None] * w[None, :] + b[None, :], NORM_ROUNDING)
    _, silu = _silu_parts(z)
    gate = _round(silu, GATE_ROUNDING)
    product = _round(normed * gate, PRODUCT_ROUNDING)
    out = _round(product, OUT_ROUNDING)
    tl.store(out_ptr + row[:, None] * C + col[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=row_ok)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def _gated_backward_kernel(dout_ptr, y_ptr, z_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dy_ptr, dz_ptr, partial_ptr,
                           rows, dout_row_stride, y_row_stride, z_row_stride, tiles_per_program, programs,
                           C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                           DOUT_DENSE: tl.constexpr, Y_DENSE: tl.constexpr, Z_DENSE: tl.constexpr,
                           NORM_ROUNDING: tl.constexpr, GATE_ROUNDING: tl.constexpr,
                           PRODUCT_ROUNDING: tl.constexpr, DY_ROUNDING: tl.constexpr):
    program = tl.program_id(0)
    col = tl.arange(0, BLOCK_C)
    col_ok = col < C
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    dw_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    first_tile = program.to(tl.int64) * tiles_per_program
    for step in range(0, tiles_per_program):
        row = (first_tile + step) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = row < rows
        mask = row_ok[:, None] & col_ok[None, :]
        dense_offsets = row[:, None] * C + col[None, :]
        if DOUT_DENSE:
            dout_offsets = dense_offsets
        else:
            dout_offsets = row[:, None] * dout_row_stride + col[None, :]
        if Y_DENSE:
            y_offsets = dense_offsets
        else:
            y_offsets = row[:, None] * y_row_stride + col[None, :]
        if Z_DENSE:
            z_offsets = dense_offsets
        else:
            z_offsets = row[:, None] * z_row_stride + col[None, :]
        y = tl.load(y_ptr + y_offsets, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + z_offsets, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + dout_offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        # (y - mean) * rstd * w + b in the forward's order of operations: the same n, bit for bit
        xhat = tl.where(mask, (y - mean[:, None]) * rstd[:, None], 0.0)
        normed = _round(xhat * w[None, :] + b[None, :], NORM_ROUNDING)
        sigmoid, silu = _silu_parts(z)
        gate = _round(silu, GATE_ROUNDING)
        dproduct = _round(dout, PRODUCT_ROUNDING)
        dgate = _round(_round(dproduct * normed, PRODUCT_ROUNDING), GATE_ROUNDING)
        dz = _round(dgate * sigmoid * (1.0 + z * (1.0 - sigmoid)), GATE_ROUNDING)
        tl.store(dz_ptr + dense_offsets, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        # padding: dout is 0 there, so dn is too (and xhat, w are 0)
        dnormed = _round(_round(dproduct * gate, PRODUCT_ROUNDING), NORM_ROUNDING)
        wdn = w[None, :] * dnormed
        # dy = rstd * (w dn - mean_C(w dn) - xhat * mean_C(w dn xhat))
        mean_wdn_xhat = tl.sum(wdn * xhat, axis=1) / C
        mean_wdn = tl.sum(wdn, axis=1) / C
        dy = _round((wdn - (xhat * mean_wdn_xhat[:, None] + mean_wdn[:, None])) * rstd[:, None], DY_ROUNDING)
        tl.store(dy_ptr + dense_offsets, dy.to(dy_ptr.dtype.element_ty), mask=mask)
        dw_sum += tl.sum(dnormed * xhat, axis=0)
        db_sum += tl.sum(dnormed, axis=0)
    tl.store(partial_ptr + program * C + col, dw_sum, mask=col_ok)
    tl.store(partial_ptr + (programs + program) * C + col, db_sum, mask=col_ok)


def _rounding(dtype: torch.dtype) -> int:
    return ROUNDING_OF_DTYPE[dtype]


def gated_forward(y2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  norm_dtype: torch.dtype, out_dtype: torch.dtype, poison: bool = False):
    """out (rows, C) in ``out_dtype``, mean and rstd (rows,) fp32 of ``LayerNorm(y2) * silu(z2)``.

    y2, z2: (rows, C) with strides (row stride, 1); ``norm_dtype`` is the dtype the published norm's
    output has (fp32 under CUDA autocast, else y's), which fixes the roundings (module docstring).
    """
    rows, channels = y2.shape
    out = torch.empty((rows, channels), dtype=out_dtype, device=y2.device)
    mean = torch.empty(rows, dtype=torch.float32, device=y2.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=y2.device)
    if poison:
        for t in (out, mean, rstd):
            t.fill_(float("nan"))
    if rows == 0:
        return out, mean, rstd
    product_dtype = torch.promote_types(norm_dtype, z2.dtype)
    block_rows, block_c, warps = _tile(rows, channels, GATED_FORWARD_TILE_ELEMENTS)
    grid = (triton.cdiv(rows, block_rows),)
    with _device_guard(y2):
        _gated_forward_kernel[grid](
            y2, z2, weight, bias, out, mean, rstd, rows, y2.stride(0), z2.stride(0), float(eps),
            C=channels, BLOCK_C=block_c, BLOCK_ROWS=block_rows, Y_DENSE=y2.stride(0) == channels,
            Z_DENSE=z2.stride(0) == channels, NORM_ROUNDING=_rounding(norm_dtype),
            GATE_ROUNDING=_rounding(z2.dtype), PRODUCT_ROUNDING=_rounding(product_dtype),
            OUT_ROUNDING=_rounding(out_dtype), num_warps=warps)
    return out, mean, rstd


def gated_backward(dout2: torch.Tensor, y2: torch.Tensor, z2: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, norm_dtype: torch.dtype,
                   poison: bool = False):
    """dy (rows, C) in y's dtype, dz (rows, C) in z's dtype, d weight and d bias (C,) in fp32."""
    rows, channels = y2.shape
    dy = torch.empty((rows, channels), dtype=y2.dtype, device=y2.device)
    dz = torch.empty((rows, channels), dtype=z2.dtype, device=y2.device)
    block_rows, block_c, warps, tiles_per_program, programs = _backward_grid(rows, channels,
                                                                             GATED_BACKWARD_TILE_ELEMENTS)
    partial = torch.empty((2, programs, channels), dtype=torch.float32, device=y2.device)
    if poison:
        for t in (dy, dz, partial):
            t.fill_(float("nan"))
    if rows == 0:
        zeros = torch.zeros(channels, dtype=torch.float32, device=y2.device)
        return dy, dz, zeros, zeros.clone()
    product_dtype = torch.promote_types(norm_dtype, z2.dtype)
    with _device_guard(y2):
        _gated_backward_kernel[(programs,)](
            dout2, y2, z2, weight, bias, mean, rstd, dy, dz, partial, rows, dout2.stride(0), y2.stride(0),
            z2.stride(0), tiles_per_program, programs, C=channels, BLOCK_C=block_c, BLOCK_ROWS=block_rows,
            DOUT_DENSE=dout2.stride(0) == channels, Y_DENSE=y2.stride(0) == channels,
            Z_DENSE=z2.stride(0) == channels, NORM_ROUNDING=_rounding(norm_dtype),
            GATE_ROUNDING=_rounding(z2.dtype), PRODUCT_ROUNDING=_rounding(product_dtype),
            DY_ROUNDING=_rounding(y2.dtype), num_warps=warps)
    # A reduction over the program axis in torch: a fixed order for a given shape, no atomics.
    # (Two separate tensors: the op's outputs may not alias each other.)
    return dy, dz, partial[0].sum(dim=0), partial[1].sum(dim=0)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, ROUNDING: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    tl.store(out_ptr + offsets, _round(tl.load(x_ptr + offsets, mask=ok), ROUNDING), mask=ok)


ROUND_BLOCK = 1024


def round_as_kernels(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` rounded to ``dtype`` (fp32 / fp16 / bf16) by the kernels' own rounding, returned as fp32:
    lets tests hold it against PyTorch's conversion on the device (or interpreter) that runs the kernels."""
    x = x.float().contiguous()
    out = torch.full_like(x, float("nan"))
    if x.numel():
        with _device_guard(x):
            _round_kernel[(triton.cdiv(x.numel(), ROUND_BLOCK),)](x, out, x.numel(), ROUNDING=_rounding(dtype),
                                                                  BLOCK=ROUND_BLOCK)
    return out
