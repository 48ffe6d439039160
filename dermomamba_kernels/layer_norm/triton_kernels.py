"""LayerNorm over the last dimension in Triton, for many short rows (C = 4 ... a few thousand).

PyTorch's kernels give each row its own thread block, which leaves a block of 4-8 elements mostly
idle; here a program owns a tile of rows x all C columns (C padded to a power of two), so every
load is a 2-D coalesced read of whole rows.

forward   ``_forward_kernel``: one tile per program; fp32 statistics (two passes over the tile held
          in registers); writes y with dense rows and one mean and rstd (fp32) per row.
backward  ``_backward_kernel``: each program walks ``tiles_per_program`` consecutive tiles, writes dx
          per row and accumulates the column sums of dy * xhat (d weight) and dy (d bias) in fp32;
          each program stores its sums into its own row of a (2, programs, C) buffer, which is then
          summed over programs in a fixed order. No atomics: the gradients are the same bits every run.

x is read through (row stride, 1) strides; the caller (:func:`rows_view`) supplies such a view.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Elements one program holds per tile: 16 KB of fp32, enough bytes in flight per SM without spills.
FORWARD_TILE_ELEMENTS = 4096
# The backward holds x, dy and two derived tiles at once: half the forward's tile keeps it in registers.
BACKWARD_TILE_ELEMENTS = 2048
WARPS = 4
WIDE_ROW_WARPS = 8
# The backward grid is capped by a constant, not by the GPU's SM count, so the order in which the
# per-program sums of d weight / d bias are added (and so their bits) is the same on every machine.
BACKWARD_PROGRAMS = 2048


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` (..., C) as a (rows, C) view with strides (row stride, 1), or a contiguous copy.

    The kernels address element (r, c) as ``r * row_stride + c``: any tensor whose last dim is
    contiguous and whose leading dims collapse into one stride (a contiguous tensor, a permuted
    channels-last map, a slice of channels like the halves of ``Linear(...).chunk(2, -1)``) is read
    in place. Anything else (e.g. the last dim strided, as in a permuted NCHW map) cannot be
    addressed that way and is copied: the cost of a copy, never a wrong read.
    """
    if t.dim() == 0:
        raise ValueError("x: expected at least one dimension (the normalized one)")
    channels = t.shape[-1]
    if channels == 1 or t.stride(-1) == 1:
        try:
            return t.view(-1, channels)
        except RuntimeError:
            pass  # leading dims do not collapse into one stride
    return t.contiguous().view(-1, channels)


def _tile(rows: int, channels: int, tile_elements: int):
    block_c = triton.next_power_of_2(channels)
    block_rows = max(1, min(tile_elements // block_c, triton.next_power_of_2(max(rows, 1))))
    warps = WARPS if block_c <= tile_elements else WIDE_ROW_WARPS
    return block_rows, block_c, warps


def _backward_grid(rows: int, channels: int, tile_elements: int):
    """Tiles and grid of a backward whose programs each walk consecutive tiles and keep per-program column sums:
    (block_rows, block_c, warps, tiles_per_program, programs), at most BACKWARD_PROGRAMS programs."""
    block_rows, block_c, warps = _tile(rows, channels, tile_elements)
    tiles = triton.cdiv(rows, block_rows)
    tiles_per_program = max(1, triton.cdiv(tiles, BACKWARD_PROGRAMS))
    return block_rows, block_c, warps, tiles_per_program, triton.cdiv(tiles, tiles_per_program)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, rows, x_row_stride, eps,
                    C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr, X_DENSE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.arange(0, BLOCK_C)
    row_ok = row < rows
    col_ok = col < C
    mask = row_ok[:, None] & col_ok[None, :]
    # A constexpr row stride lets the compiler prove the alignment of dense rows (vector loads).
    if X_DENSE:
        x_offsets = row[:, None] * C + col[None, :]
    else:
        x_offsets = row[:, None] * x_row_stride + col[None, :]
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + row[:, None] * C + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=row_ok)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, rows, x_row_stride,
                     dy_row_stride, tiles_per_program, programs,
                     C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr, X_DENSE: tl.constexpr,
                     DY_DENSE: tl.constexpr):
    program = tl.program_id(0)
    col = tl.arange(0, BLOCK_C)
    col_ok = col < C
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    dw_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    first_tile = program.to(tl.int64) * tiles_per_program
    for step in range(0, tiles_per_program):
        row = (first_tile + step) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = row < rows
        mask = row_ok[:, None] & col_ok[None, :]
        if X_DENSE:
            x_offsets = row[:, None] * C + col[None, :]
        else:
            x_offsets = row[:, None] * x_row_stride + col[None, :]
        if DY_DENSE:
            dy_offsets = row[:, None] * C + col[None, :]
        else:
            dy_offsets = row[:, None] * dy_row_stride + col[None, :]
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        # dx = rstd * (w dy - mean_C(w dy) - xhat * mean_C(w dy xhat)); padding is 0 in xhat and wdy.
        mean_wdy_xhat = tl.sum(wdy * xhat, axis=1) / C
        mean_wdy = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * mean_wdy_xhat[:, None] + mean_wdy[:, None])) * rstd[:, None]
        tl.store(dx_ptr + row[:, None] * C + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_sum += tl.sum(dy * xhat, axis=0)
        db_sum += tl.sum(dy, axis=0)
    tl.store(partial_ptr + program * C + col, dw_sum, mask=col_ok)
    tl.store(partial_ptr + (programs + program) * C + col, db_sum, mask=col_ok)


def forward_buffers(rows: int, channels: int, out_dtype: torch.dtype, device, poison: bool = False):
    """The forward's outputs, uninitialised (or NaN with ``poison``): y (rows, C), mean and rstd (rows,)."""
    y = torch.empty((rows, channels), dtype=out_dtype, device=device)
    mean = torch.empty(rows, dtype=torch.float32, device=device)
    rstd = torch.empty(rows, dtype=torch.float32, device=device)
    if poison:
        for t in (y, mean, rstd):
            t.fill_(float("nan"))
    return y, mean, rstd


def forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype,
            poison: bool = False):
    """y, mean, rstd of LayerNorm over the columns of ``x2`` (rows, C) with strides (row stride, 1)."""
    rows, channels = x2.shape
    y, mean, rstd = forward_buffers(rows, channels, out_dtype, x2.device, poison)
    if rows == 0:
        return y, mean, rstd
    block_rows, block_c, warps = _tile(rows, channels, FORWARD_TILE_ELEMENTS)
    grid = (triton.cdiv(rows, block_rows),)
    with _device_guard(x2):
        _forward_kernel[grid](x2, weight, bias, y, mean, rstd, rows, x2.stride(0), float(eps),
                              C=channels, BLOCK_C=block_c, BLOCK_ROWS=block_rows,
                              X_DENSE=x2.stride(0) == channels, num_warps=warps)
    return y, mean, rstd


def backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
             poison: bool = False):
    """dx (rows, C) in x's dtype and d weight, d bias (C,) in fp32 from the forward's mean and rstd."""
    rows, channels = x2.shape
    dx = torch.empty((rows, channels), dtype=x2.dtype, device=x2.device)
    block_rows, block_c, warps, tiles_per_program, programs = _backward_grid(rows, channels, BACKWARD_TILE_ELEMENTS)
    partial = torch.empty((2, programs, channels), dtype=torch.float32, device=x2.device)
    if poison:
        dx.fill_(float("nan"))
        partial.fill_(float("nan"))
    if rows == 0:
        zeros = torch.zeros(channels, dtype=torch.float32, device=x2.device)
        return dx, zeros, zeros.clone()
    with _device_guard(x2):
        _backward_kernel[(programs,)](dy2, x2, weight, mean, rstd, dx, partial, rows, x2.stride(0), dy2.stride(0),
                                      tiles_per_program, programs, C=channels, BLOCK_C=block_c,
                                      BLOCK_ROWS=block_rows, X_DENSE=x2.stride(0) == channels,
                                      DY_DENSE=dy2.stride(0) == channels, num_warps=warps)
    # A reduction over the program axis in torch: a fixed order for a given shape, no atomics.
    # (Two separate tensors: the op's outputs may not alias each other.)
    return dx, partial[0].sum(dim=0), partial[1].sum(dim=0)
