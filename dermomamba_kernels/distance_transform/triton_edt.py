"""Exact Euclidean distance transform in Triton: one exact 1-D pass, then exact min-plus passes.

Algorithm (separable, exact for any diagonal metric, i.e. any ``sampling``):

1. Along each row (the last axis), the distance to the nearest zero of that row is the smaller of
   "positions since the last zero" (a running max of zero positions, left to right) and "positions
   to the next zero" (a running min, right to left). Both are prefix scans, chunked along the row
   with a carry, so the pass is O(H * W). Its output is the squared, spacing-scaled distance
   ``g2 = (d * s_w) ** 2``, +inf on rows without a zero.
2. Along each column: ``D2[i] = min_k ((i - k) * s_h) ** 2 + g2[k]`` (the squared distance to the
   nearest zero lies on *some* row k, at the nearest zero of that row). Evaluated directly over every
   k: O(H) per pixel, but it is only an add and a min per candidate, runs on all lanes with no
   divergence, and is exact. (A lower envelope of parabolas is O(1) per pixel but sequential per
   column with data-dependent stacks; at the sizes in scope the direct form is faster on a GPU.)
3. In the whole-array mode the same min-plus pass runs once more along the batch axis.

The last pass takes the square root (correctly rounded, so with unit spacing every distance is the
float32 rounding of scipy's float64 value: squared distances are integers below 2**24 and exact)
and applies scipy's rule for an array without any zero: distances to the point one step before the
origin along the first axis, ``(-1, 0, ..., 0)``. Only such arrays leave +inf after the passes, so
the rule needs no reduction and no synchronisation.

Launches use the current CUDA stream and never synchronise with the host.
"""

from __future__ import annotations

import contextlib
from typing import List, Sequence

import torch
import triton
import triton.language as tl

# Positions are carried as float32, exact for integers below 2**24; int32 offsets bound the size.
MAX_ELEMENTS = 2**31 - 1
MAX_AXIS_LENGTH = 2**24

# Tile shapes: rows of the scan pass x positions per chunk; output positions x lanes of the min-plus
# pass. One program holds a few thousand elements (no spills) and the lane axis, the contiguous one
# in every min-plus pass, is read in 256-byte rows. A sweep of ten shapes on an H200
# (benchmarks/bench_loss.py --sweep) put these among the fastest at 16x192x256 and 2048x2048; the
# 2048x2048 time hardly moved (the min-plus pass is arithmetic-bound).
SCAN_BLOCK_POSITIONS = 128
SCAN_BLOCK_LINES = 16
MINPLUS_BLOCK_POSITIONS = 32
MINPLUS_BLOCK_LANES = 64
SCAN_WARPS = 4
MINPLUS_WARPS = 4


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def _nearest_zero_along_line_kernel(mask_ptr, out_ptr, length, lines, stride_pos, stride_line, spacing,
                                    BLOCK_POS: tl.constexpr, BLOCK_LINES: tl.constexpr):
    """out[line, p] = (spacing * |p - nearest zero of the line|) ** 2, +inf for a line without zero."""
    line = tl.program_id(0) * BLOCK_LINES + tl.arange(0, BLOCK_LINES)
    line_ok = line < lines
    line_base = line * stride_line
    steps = tl.arange(0, BLOCK_POS)

    # Left to right: distance to the last zero at or before each position.
    last_zero = tl.full([BLOCK_LINES], float("-inf"), tl.float32)
    for start in range(0, length, BLOCK_POS):
        pos = start + steps
        ok = (pos[:, None] < length) & line_ok[None, :]
        offsets = pos[:, None] * stride_pos + line_base[None, :]
        # Padding reads as nonzero so it never acts as a zero.
        value = tl.load(mask_ptr + offsets, mask=ok, other=1)
        posf = pos.to(tl.float32)[:, None]
        zero_at = tl.where(value == 0, posf, float("-inf"))
        seen = tl.maximum(tl.associative_scan(zero_at, 0, _maximum), last_zero[None, :])
        last_zero = tl.max(seen, axis=0)
        tl.store(out_ptr + offsets, posf - seen, mask=ok)

    # The right-to-left sweep re-reads what other threads of this program stored above.
    tl.debug_barrier()

    next_zero = tl.full([BLOCK_LINES], float("inf"), tl.float32)
    for start in range(0, length, BLOCK_POS):
        pos = length - 1 - (start + steps)
        ok = (pos[:, None] >= 0) & line_ok[None, :]
        offsets = pos[:, None] * stride_pos + line_base[None, :]
        value = tl.load(mask_ptr + offsets, mask=ok, other=1)
        posf = pos.to(tl.float32)[:, None]
        zero_at = tl.where(value == 0, posf, float("inf"))
        ahead = tl.minimum(tl.associative_scan(zero_at, 0, _minimum), next_zero[None, :])
        next_zero = tl.min(ahead, axis=0)
        behind = tl.load(out_ptr + offsets, mask=ok, other=0.0)
        distance = tl.minimum(behind, ahead - posf) * spacing
        tl.store(out_ptr + offsets, distance * distance, mask=ok)


@triton.jit
def _min_plus_kernel(src_ptr, dst_ptr, length, lanes, stride_outer, stride_pos, stride_lane, spacing,
                     group_size, dim1, dim2, fallback0, fallback1, fallback2,
                     FINAL: tl.constexpr, BLOCK_POS: tl.constexpr, BLOCK_LANES: tl.constexpr):
    """dst[o, i, n] = min_k ((i - k) * spacing) ** 2 + src[o, k, n]; with FINAL, its square root.

    FINAL also replaces +inf (a transformed array without any zero) by scipy's distance to the point
    (-1, 0, 0) of the array: the element's coordinates (c0, c1, c2) come from its linear index within
    its array of ``group_size`` elements, laid out (dim0, dim1, dim2), with spacings fallback0..2.
    """
    lane = tl.program_id(0) * BLOCK_LANES + tl.arange(0, BLOCK_LANES)
    pos = tl.program_id(1) * BLOCK_POS + tl.arange(0, BLOCK_POS)
    outer = tl.program_id(2)
    lane_ok = lane < lanes
    base = outer * stride_outer
    posf = pos.to(tl.float32)

    best = tl.full([BLOCK_POS, BLOCK_LANES], float("inf"), tl.float32)
    for k in range(0, length):
        candidate = tl.load(src_ptr + base + k * stride_pos + lane * stride_lane, mask=lane_ok,
                            other=float("inf"))
        step = (posf - k) * spacing
        best = tl.minimum(best, (step * step)[:, None] + candidate[None, :])

    offsets = base + pos[:, None] * stride_pos + lane[None, :] * stride_lane
    ok = (pos[:, None] < length) & lane_ok[None, :]
    if FINAL:
        index = offsets % group_size
        c0 = (index // (dim1 * dim2)).to(tl.float32) + 1.0
        c1 = ((index // dim2) % dim1).to(tl.float32)
        c2 = (index % dim2).to(tl.float32)
        outside = (c0 * fallback0) * (c0 * fallback0) + (c1 * fallback1) * (c1 * fallback1) \
            + (c2 * fallback2) * (c2 * fallback2)
        best = tl.sqrt_rn(tl.where(best == float("inf"), outside, best))
    tl.store(dst_ptr + offsets, best, mask=ok)


def _launch_min_plus(src, dst, outer, length, lanes, strides, spacing, final, fallback):
    grid = (triton.cdiv(lanes, MINPLUS_BLOCK_LANES), triton.cdiv(length, MINPLUS_BLOCK_POSITIONS), outer)
    _min_plus_kernel[grid](src, dst, length, lanes, *strides, spacing, *fallback, FINAL=final,
                           BLOCK_POS=MINPLUS_BLOCK_POSITIONS, BLOCK_LANES=MINPLUS_BLOCK_LANES,
                           num_warps=MINPLUS_WARPS)


def _new_buffer(shape, device):
    # One place for the allocation, so tests can hand the kernels NaN-poisoned buffers.
    return torch.empty(shape, dtype=torch.float32, device=device)


def edt_triton(images: torch.Tensor, sampling: Sequence[float], per_image: bool) -> torch.Tensor:
    """Distance transform of a contiguous (B, H, W) mask (uint8/int/float, nonzero = foreground).

    ``per_image``: each (H, W) image alone, ``sampling`` = (row, column). Otherwise the whole
    (B, H, W) array in three dimensions, ``sampling`` = (batch, row, column). float32 (B, H, W) out.
    """
    batch, height, width = images.shape
    squared = _new_buffer(images.shape, images.device)
    result = _new_buffer(images.shape, images.device)
    if images.numel() == 0:
        return result
    if per_image:
        spacing_h, spacing_w = sampling
    else:
        spacing_b, spacing_h, spacing_w = sampling
    image_size = height * width

    with torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext():
        lines = batch * height
        grid = (triton.cdiv(lines, SCAN_BLOCK_LINES),)
        _nearest_zero_along_line_kernel[grid](images, squared, width, lines, 1, width, float(spacing_w),
                                              BLOCK_POS=SCAN_BLOCK_POSITIONS, BLOCK_LINES=SCAN_BLOCK_LINES,
                                              num_warps=SCAN_WARPS)
        if per_image:
            # Each image is its own array, laid out (H, W, 1) for the fallback's coordinates.
            fallback = (image_size, width, 1, float(spacing_h), float(spacing_w), 0.0)
            _launch_min_plus(squared, result, batch, height, width, (image_size, width, 1), float(spacing_h),
                             True, fallback)
            return result
        # Whole array: columns into `result` (squared, not final), then the batch axis back into `squared`.
        _launch_min_plus(squared, result, batch, height, width, (image_size, width, 1), float(spacing_h),
                         False, (1, 1, 1, 0.0, 0.0, 0.0))
        fallback = (batch * image_size, height, width, float(spacing_b), float(spacing_h), float(spacing_w))
        _launch_min_plus(result, squared, 1, batch, image_size, (0, image_size, 1), float(spacing_b),
                         True, fallback)
        return squared


# --- registration as a custom op: one schema, a fake implementation and an autograd rule ----------

@torch.library.custom_op("dermomamba::distance_transform_edt_triton", mutates_args=())
def distance_transform_edt_triton_op(images: torch.Tensor, sampling: List[float], per_image: bool) -> torch.Tensor:
    """Custom-op form of :func:`edt_triton` (opaque to torch.compile, shape known from the fake)."""
    return edt_triton(images, sampling, per_image)


@distance_transform_edt_triton_op.register_fake
def _(images, sampling, per_image):
    return torch.empty(images.shape, dtype=torch.float32, device=images.device)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    # The transform depends on the mask only through (mask != 0): piecewise constant, so its
    # derivative is zero wherever it exists. None is that zero, without materialising it.
    return None, None, None


distance_transform_edt_triton_op.register_autograd(_backward, setup_context=_setup_context)
