"""BatchNorm over the channels of (N, C, S) maps in Triton: kernels and their launchers.

DermoMamba normalises 16-64 channels over 10^5-10^6 positions each; a kernel that gives each
channel (or a few) one thread block leaves most of the GPU idle. Here every pass splits the
positions of each channel block over many programs.

forward (training)
  1. ``_stats_partials``   read x       per (program, channel): count, mean and M2 of the program's
                                        tiles (a two-pass mean / squared deviations per tile, tiles
                                        merged by Chan's formula: no E[x^2] - E[x]^2 cancellation),
                                        all of x shifted by the channel's first value
  2. ``_stats_combine``    tiny         per channel, the partials merged in a fixed order -> mean,
                                        invstd, unbiased variance (for the running statistics)
  3. ``_normalize``        read x, write y = (x - mean) * invstd * weight + bias
forward (eval): ``_normalize`` alone, reading the running statistics (its first programs also write
the mean / invstd the backward needs).
  4. ``_update_running``   tiny         running = (1 - factor) running + factor batch, in place
backward
  5. ``_backward_partials`` read dy, x  per (program, channel): sum dy, sum dy (x - mean)
  6. ``_backward_combine``  tiny        per channel, fixed-order sums -> d bias, d weight (= sum dy xhat)
  7. ``_backward_dx``       read dy, x, write dx
(5-6 are skipped in eval when no parameter gradient is wanted.)

Addressing: every tensor is a (N, C, S) view read through its own strides (images, channels,
positions), so NCHW, channels-last and sliced maps run in place; when the images and positions of
every tensor of a pass collapse into one axis (channels-last, S == 1) the pass sees one image of
N * S positions. Tiles are BLOCK_C channels x BLOCK_P positions, oriented along x's contiguous axis.
Partial sums live in per-program rows of scratch buffers and are combined in a fixed order: no
atomics, so results are the same bits on every run (and, as the grid depends on the shape only, on
every GPU). Only per-channel fp32 statistics are kept for the backward, never a copy of x.
"""

from __future__ import annotations

import contextlib
import math
from typing import List, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..triton_rounding import round_to as _round_to

# Elements a program loads per tensor and tile: 16 KB of fp32 in flight per program.
TILE_ELEMENTS = 4096
# Pixel-major tiles (positions contiguous, NCHW): rows of up to 1024 positions (2 KB of fp16), so
# a tile still spans 4 channels; channel-major tiles (channels-last): up to 64 channels a row.
MAX_BLOCK_P_PIXEL_MAJOR = 1024
MAX_BLOCK_C_CHANNEL_MAJOR = 64
# Pixel-major rows shrink (down to 32 positions, 64 B of fp16) while more than 1/8 of their lanes would
# fall past the end of a map: e.g. 12x16 = 192 positions run as 3 rows of 64, not one of 256.
MIN_BLOCK_P_PIXEL_MAJOR = 32
MAX_PADDING_FRACTION = 0.125
WARPS = 4
# Programs a reduction pass aims for, over all channel blocks. A constant, not the SM count: the
# partial sums (and so the bits of the statistics) depend on the shape only, on every GPU.
TARGET_PROGRAMS = 1024
# The combine kernels hold (channels x partials) tiles of up to COMBINE_TILE_ELEMENTS, the partials of a
# channel (at most about TARGET_PROGRAMS) in one tile where they fit: one round of loads, not a serial loop.
COMBINE_TILE_ELEMENTS = 4096
MAX_COMBINE_BLOCK_PARTS = 1024
COMBINE_WARPS = 4
# Channels per program of the running-statistics update.
UPDATE_BLOCK_C = 128
# Rows of the forward partials buffer: count, mean, M2; of the backward's: sum dy, sum dy (x - mean).
FWD_PART_ROWS = 3
BWD_PART_ROWS = 2
INT32_MAX = 2 ** 31 - 1


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# layout: (N, C, S) views and the walk over them
# ------------------------------------------------------------------------------------------------

def _shape3(t: torch.Tensor):
    return t.shape[0], t.shape[1], math.prod(t.shape[2:])


def flat3(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` (N, C, *) as an (N, C, S) view, or None when its spatial dims do not collapse into one stride."""
    try:
        return t.view(_shape3(t))
    except RuntimeError:
        return None


def as_flat3(t: torch.Tensor) -> torch.Tensor:
    """An (N, C, S) view of ``t``, of a contiguous copy when the view is impossible (a copy, never a wrong read)."""
    view = flat3(t)
    return view if view is not None else t.contiguous().view(_shape3(t))


def empty_like_x(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor in x's memory format (the fakes call this too, so strides agree)."""
    out = torch.empty_like(x)
    # empty_like keeps the strides of a dense x; anything else comes back contiguous. Checked, not assumed.
    return out if flat3(out) is not None else torch.empty_like(x, memory_format=torch.contiguous_format)


class Walk(NamedTuple):
    """How a pass covers the (N, C, S) tensors: ``images`` x ``positions`` per channel, in tiles."""
    images: int
    positions: int
    block_c: int
    block_p: int
    n_ptiles: int
    n_cblocks: int
    collapsed: bool
    index64: bool


def _stride_triple(t3: torch.Tensor, collapsed: bool):
    """(image, channel, position) strides of an (N, C, S) view under the walk's collapse."""
    sn, sc, ss = t3.stride()
    if not collapsed:
        return sn, sc, ss
    # one image: positions run over (n, s) with the position stride (S == 1: over n alone)
    return 0, sc, (sn if t3.shape[2] == 1 else ss)


def _collapses(t3: torch.Tensor) -> bool:
    n, _, s = t3.shape
    return n == 1 or s == 1 or t3.stride(0) == s * t3.stride(2)


def _span(t3: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t3.shape, t3.stride())) + 1


def _padding(positions: int, block_p: int) -> float:
    """The fraction of a map's row tiles that falls past its end."""
    return (triton.cdiv(positions, block_p) * block_p - positions) / (triton.cdiv(positions, block_p) * block_p)


def plan(tensors: List[torch.Tensor]) -> Walk:
    """The tiling of a pass over (N, C, S) views of equal shape; the first one (x) orients the tiles."""
    x3 = tensors[0]
    n, channels, s = x3.shape
    collapsed = all(_collapses(t) for t in tensors)
    images, positions = (1, n * s) if collapsed else (n, s)
    _, sc, sp = _stride_triple(x3, collapsed)
    pow2_c = triton.next_power_of_2(channels)
    pow2_p = triton.next_power_of_2(max(positions, 1))
    if sp == 1 or positions == 1 or (sc != 1 and channels > 1):
        block_p = min(pow2_p, MAX_BLOCK_P_PIXEL_MAJOR, TILE_ELEMENTS)
        while block_p > MIN_BLOCK_P_PIXEL_MAJOR and _padding(positions, block_p) > MAX_PADDING_FRACTION:
            block_p //= 2
        block_c = max(1, min(pow2_c, TILE_ELEMENTS // block_p))
    else:
        block_c = min(pow2_c, MAX_BLOCK_C_CHANNEL_MAJOR)
        block_p = max(1, min(pow2_p, TILE_ELEMENTS // block_c))
    index64 = max(_span(t) for t in tensors) > INT32_MAX
    return Walk(images, positions, block_c, block_p, triton.cdiv(positions, block_p), triton.cdiv(channels, block_c),
                collapsed, index64)


def reduction_grid(walk: Walk):
    """(tiles each program of a reduction pass walks, programs per channel block)."""
    tiles = walk.images * walk.n_ptiles
    tiles_per_program = max(1, triton.cdiv(tiles * walk.n_cblocks, TARGET_PROGRAMS))
    return tiles_per_program, triton.cdiv(tiles, tiles_per_program)


def combine_tile(channels: int, parts: int):
    """(channels, partials) of a combine program's tile: all of a channel's partials when they fit."""
    block_parts = min(triton.next_power_of_2(parts), MAX_COMBINE_BLOCK_PARTS)
    block_c = max(1, min(triton.next_power_of_2(channels), COMBINE_TILE_ELEMENTS // block_parts))
    return block_c, block_parts


@triton.jit
def _tile(tile, cb, n_ptiles, positions, C, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INDEX64: tl.constexpr):
    """Image, channels, positions and mask of tile number ``tile`` of channel block ``cb``."""
    n = (tile // n_ptiles).to(tl.int64)
    p = (tile % n_ptiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX64:
        p = p.to(tl.int64)
        c = c.to(tl.int64)
    c_ok = c < C
    p_ok = p < positions
    return n, c, p, c_ok, p_ok


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _stats_partials_kernel(x_ptr, part_ptr, C, positions, n_ptiles, tiles, tiles_per_program, parts, sxn, sxc, sxp,
                           BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INDEX64: tl.constexpr):
    group = tl.program_id(0)
    cb = tl.program_id(1)
    channel = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    shift = tl.load(x_ptr + channel * sxc, mask=channel_ok, other=0.0).to(tl.float32)
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for step in range(0, tiles_per_program):
        tile = group * tiles_per_program + step
        n, c, p, c_ok, p_ok = _tile(tile, cb, n_ptiles, positions, C, BLOCK_C, BLOCK_P, INDEX64)
        p_ok = p_ok & (tile < tiles)
        mask = c_ok[:, None] & p_ok[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
        # shifted by a value of the channel (its first): the partial means stay of the order of the spread,
        # so their rounding (which the merges' squared mean differences carry into M2) does too
        x = tl.where(mask, x - shift[:, None], 0.0)
        tile_count = tl.sum(p_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=1) / tl.maximum(tile_count, 1.0)
        deviation = tl.where(mask, x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=1)
        # Chan et al.'s merge of (count, mean, M2) summaries; an empty tile leaves the summary as it is
        total = count + tile_count
        weight = tile_count / tl.maximum(total, 1.0)
        delta = tile_mean - mean
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * count * weight
        count = total
    # (3, C, parts): a channel's partials contiguous for the combine
    slot = channel * parts + group
    tl.store(part_ptr + slot, tl.zeros([BLOCK_C], dtype=tl.float32) + count, mask=channel_ok)
    tl.store(part_ptr + C * parts + slot, mean, mask=channel_ok)
    tl.store(part_ptr + 2 * C * parts + slot, m2, mask=channel_ok)


@triton.jit
def _stats_combine_kernel(part_ptr, x_ptr, sxc, parts, C, count, eps, mean_ptr, invstd_ptr, var_ptr,
                          BLOCK_C: tl.constexpr, BLOCK_PARTS: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    # mean over all partials first, then every partial's M2 about it: the merge of many summaries in
    # two fixed-order sums, each partial's mean shifted by the total mean (no large-offset cancellation)
    total = tl.zeros([BLOCK_C, BLOCK_PARTS], dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_PARTS):
        p = p0 + tl.arange(0, BLOCK_PARTS)
        mask = c_ok[:, None] & (p < parts)[None, :]
        slots = c[:, None] * parts + p[None, :]
        part_count = tl.load(part_ptr + slots, mask=mask, other=0.0)
        part_mean = tl.load(part_ptr + C * parts + slots, mask=mask, other=0.0)
        total += part_count * part_mean
    mean = tl.sum(total, axis=1) / count
    total = tl.zeros([BLOCK_C, BLOCK_PARTS], dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_PARTS):
        p = p0 + tl.arange(0, BLOCK_PARTS)
        mask = c_ok[:, None] & (p < parts)[None, :]
        slots = c[:, None] * parts + p[None, :]
        part_count = tl.load(part_ptr + slots, mask=mask, other=0.0)
        shift = tl.load(part_ptr + C * parts + slots, mask=mask, other=0.0) - mean[:, None]
        part_m2 = tl.load(part_ptr + 2 * C * parts + slots, mask=mask, other=0.0)
        total += tl.where(mask, part_m2 + part_count * shift * shift, 0.0)
    m2 = tl.sum(total, axis=1)
    # the partials' shift (the channel's first value) added back once, at the end
    mean = mean + tl.load(x_ptr + c * sxc, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(invstd_ptr + c, tl.div_rn(1.0, tl.sqrt_rn(m2 / count + eps)), mask=c_ok)
    tl.store(var_ptr + c, m2 / (count - 1.0), mask=c_ok)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, eps, C, positions, n_ptiles,
                      sxn, sxc, sxp, syn, syc, syp, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      USE_RUNNING: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                      INDEX64: tl.constexpr):
    tile = tl.program_id(0)
    cb = tl.program_id(1)
    n, c, p, c_ok, p_ok = _tile(tile, cb, n_ptiles, positions, C, BLOCK_C, BLOCK_P, INDEX64)
    if USE_RUNNING:
        mean = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        invstd = tl.div_rn(1.0, tl.sqrt_rn(tl.load(rv_ptr + c, mask=c_ok, other=1.0).to(tl.float32) + eps))
        if tile == 0:  # the statistics the backward reads, written once per channel block
            tl.store(mean_ptr + c, mean, mask=c_ok)
            tl.store(invstd_ptr + c, invstd, mask=c_ok)
    else:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    mask = c_ok[:, None] & p_ok[None, :]
    x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * scale[:, None]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + n * syn + c[:, None] * syc + p[None, :] * syp, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_running_kernel(rm_ptr, rv_ptr, mean_ptr, var_ptr, nbt_ptr, momentum, C, CUMULATIVE: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if CUMULATIVE:
        # momentum=None: nn.BatchNorm's cumulative average, 1 / (batches so far), read on the device
        # (no host sync, so it can be captured in a CUDA graph)
        factor = 1.0 / tl.load(nbt_ptr).to(tl.float32)
    else:
        factor = momentum
    # fp32 arithmetic and one rounding to the buffers' dtype, as PyTorch's update
    rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    new_rm = (1.0 - factor) * rm + factor * tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    new_rv = (1.0 - factor) * rv + factor * tl.load(var_ptr + c, mask=c_ok, other=0.0)
    tl.store(rm_ptr + c, _round_to(new_rm, rm_ptr.dtype.element_ty), mask=c_ok)
    tl.store(rv_ptr + c, _round_to(new_rv, rv_ptr.dtype.element_ty), mask=c_ok)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _backward_partials_kernel(dy_ptr, x_ptr, mean_ptr, part_ptr, C, positions, n_ptiles, tiles, tiles_per_program,
                              parts, sgn, sgc, sgp, sxn, sxc, sxp,
                              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, INDEX64: tl.constexpr):
    group = tl.program_id(0)
    cb = tl.program_id(1)
    channel = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + channel, mask=channel < C, other=0.0)
    # elementwise fp32 accumulators, reduced once at the end: each lane sums tiles_per_program values
    sum_dy = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    sum_dy_xc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for step in range(0, tiles_per_program):
        tile = group * tiles_per_program + step
        n, c, p, c_ok, p_ok = _tile(tile, cb, n_ptiles, positions, C, BLOCK_C, BLOCK_P, INDEX64)
        mask = c_ok[:, None] & (p_ok & (tile < tiles))[None, :]
        dy = tl.load(dy_ptr + n * sgn + c[:, None] * sgc + p[None, :] * sgp, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
        sum_dy += dy
        sum_dy_xc += dy * (x - mean[:, None])  # dy is 0 off the mask
    slot = channel * parts + group  # (2, C, parts)
    tl.store(part_ptr + slot, tl.sum(sum_dy, axis=1), mask=channel < C)
    tl.store(part_ptr + C * parts + slot, tl.sum(sum_dy_xc, axis=1), mask=channel < C)


@triton.jit
def _backward_combine_kernel(part_ptr, parts, C, invstd_ptr, dweight_ptr, dbias_ptr,
                             BLOCK_C: tl.constexpr, BLOCK_PARTS: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sum_dy = tl.zeros([BLOCK_C, BLOCK_PARTS], dtype=tl.float32)
    sum_dy_xc = tl.zeros([BLOCK_C, BLOCK_PARTS], dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_PARTS):
        p = p0 + tl.arange(0, BLOCK_PARTS)
        mask = c_ok[:, None] & (p < parts)[None, :]
        slots = c[:, None] * parts + p[None, :]
        sum_dy += tl.load(part_ptr + slots, mask=mask, other=0.0)
        sum_dy_xc += tl.load(part_ptr + C * parts + slots, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    # d weight = sum dy * xhat, d bias = sum dy (fp32; the dx pass reads them back)
    tl.store(dweight_ptr + c, tl.sum(sum_dy_xc, axis=1) * invstd, mask=c_ok)
    tl.store(dbias_ptr + c, tl.sum(sum_dy, axis=1), mask=c_ok)


@triton.jit
def _backward_dx_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, dweight_ptr, dbias_ptr, count, C,
                        positions, n_ptiles, sgn, sgc, sgp, sxn, sxc, sxp, sdn, sdc, sdp,
                        HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_P: tl.constexpr, INDEX64: tl.constexpr):
    tile = tl.program_id(0)
    cb = tl.program_id(1)
    n, c, p, c_ok, p_ok = _tile(tile, cb, n_ptiles, positions, C, BLOCK_C, BLOCK_P, INDEX64)
    mask = c_ok[:, None] & p_ok[None, :]
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    grad_scale = invstd
    if HAS_WEIGHT:
        grad_scale = grad_scale * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + n * sgn + c[:, None] * sgc + p[None, :] * sgp, mask=mask, other=0.0).to(tl.float32)
    if TRAINING:
        # dx = w invstd (dy - mean(dy) - xhat mean(dy xhat)), with xhat mean(dy xhat) = (x - mean) proj
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        mean_dy = tl.load(dbias_ptr + c, mask=c_ok, other=0.0) / count
        proj = tl.load(dweight_ptr + c, mask=c_ok, other=0.0) / count * invstd
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
        dx = (dy - mean_dy[:, None] - (x - mean[:, None]) * proj[:, None]) * grad_scale[:, None]
    else:
        # the running statistics do not depend on x: the backward is the affine map's
        dx = dy * grad_scale[:, None]
    tl.store(dx_ptr + n * sdn + c[:, None] * sdc + p[None, :] * sdp, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------

def _new(shape, device, poison, dtype=torch.float32):
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if poison else t


def forward_buffers(x: torch.Tensor, training: bool, poison: bool = False):
    """The forward's outputs: y in x's memory format and dtype; mean, invstd (C,) fp32; the unbiased
    batch variance (C,) fp32 in training, an empty (0,) tensor in eval."""
    channels = x.shape[1]
    y = empty_like_x(x)
    if poison:
        y.fill_(float("nan"))
    return (y, _new(channels, x.device, poison), _new(channels, x.device, poison),
            _new(channels if training else 0, x.device, poison))


def forward(x: torch.Tensor, weight, bias, running_mean, running_var, training: bool, eps: float,
            poison: bool = False):
    """y, mean, invstd, unbiased batch variance (training; else empty) of BatchNorm of x (N, C, *)."""
    y, mean, invstd, var = forward_buffers(x, training, poison)
    x3 = as_flat3(x)
    y3 = y.view(x3.shape)
    n, channels, s = x3.shape
    if x3.numel() == 0:
        return y, mean, invstd, var
    walk = plan([x3, y3])
    sx = _stride_triple(x3, walk.collapsed)
    sy = _stride_triple(y3, walk.collapsed)
    tiles = walk.images * walk.n_ptiles
    with _device_guard(x):
        if training:
            tiles_per_program, parts = reduction_grid(walk)
            partials = _new((FWD_PART_ROWS, channels, parts), x.device, poison)
            _stats_partials_kernel[(parts, walk.n_cblocks)](
                x3, partials, channels, walk.positions, walk.n_ptiles, tiles, tiles_per_program, parts, *sx,
                BLOCK_C=walk.block_c, BLOCK_P=walk.block_p, INDEX64=walk.index64, num_warps=WARPS)
            block_c, block_parts = combine_tile(channels, parts)
            _stats_combine_kernel[(triton.cdiv(channels, block_c),)](
                partials, x3, sx[1], parts, channels, float(n * s), float(eps), mean, invstd, var,
                BLOCK_C=block_c, BLOCK_PARTS=block_parts, num_warps=COMBINE_WARPS)
        # (unused pointer arguments get a tensor that is there: mean)
        _normalize_kernel[(tiles, walk.n_cblocks)](
            x3, y3, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
            running_mean if not training else mean, running_var if not training else mean, float(eps), channels,
            walk.positions, walk.n_ptiles, *sx, *sy, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            USE_RUNNING=not training, BLOCK_C=walk.block_c, BLOCK_P=walk.block_p, INDEX64=walk.index64,
            num_warps=WARPS)
    return y, mean, invstd, var


def update_running_stats(running_mean, running_var, mean, var, momentum: float, num_batches_tracked=None):
    """running = (1 - factor) running + factor batch in place; factor = momentum, or 1 / num_batches_tracked."""
    channels = running_mean.shape[0]
    if channels == 0:
        return
    cumulative = num_batches_tracked is not None
    with _device_guard(running_mean):
        _update_running_kernel[(triton.cdiv(channels, UPDATE_BLOCK_C),)](
            running_mean, running_var, mean, var, num_batches_tracked if cumulative else mean,
            0.0 if cumulative else float(momentum), channels, CUMULATIVE=cumulative, BLOCK_C=UPDATE_BLOCK_C,
            num_warps=1)


def like_x_layout(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dy in x's memory format when the two are oriented differently (one of them would be read across its
    lines), else dy itself."""
    dy3, x3 = flat3(dy), flat3(x)
    if dy3 is None or x3 is None:
        return dy
    channel_major = (lambda t: t.stride(1) == 1 and t.stride(2) != 1 and t.shape[1] > 1 and t.shape[2] > 1)
    if channel_major(dy3) == channel_major(x3):
        return dy
    out = empty_like_x(x)
    return out.copy_(dy)


def backward(dy: torch.Tensor, x: torch.Tensor, weight, mean, invstd, training: bool, param_grads: bool,
             poison: bool = False):
    """dx (x's dtype and memory format) and the fp32 d weight, d bias (C,) (empty (0,) when not computed:
    eval without ``param_grads``)."""
    channels = x.shape[1]
    dx = empty_like_x(x)
    reduce = training or param_grads
    dweight = _new(channels if reduce else 0, x.device, poison)
    dbias = _new(channels if reduce else 0, x.device, poison)
    if poison:
        dx.fill_(float("nan"))
    x3 = as_flat3(x)
    dy3 = as_flat3(like_x_layout(dy, x))
    dx3 = dx.view(x3.shape)
    n, _, s = x3.shape
    if x3.numel() == 0:
        if reduce:
            dweight.zero_()
            dbias.zero_()
        return dx, dweight, dbias
    walk = plan([x3, dy3, dx3])
    sx = _stride_triple(x3, walk.collapsed)
    sg = _stride_triple(dy3, walk.collapsed)
    sd = _stride_triple(dx3, walk.collapsed)
    tiles = walk.images * walk.n_ptiles
    with _device_guard(x):
        if reduce:
            tiles_per_program, parts = reduction_grid(walk)
            partials = _new((BWD_PART_ROWS, channels, parts), x.device, poison)
            _backward_partials_kernel[(parts, walk.n_cblocks)](
                dy3, x3, mean, partials, channels, walk.positions, walk.n_ptiles, tiles, tiles_per_program, parts,
                *sg, *sx, BLOCK_C=walk.block_c, BLOCK_P=walk.block_p, INDEX64=walk.index64, num_warps=WARPS)
            block_c, block_parts = combine_tile(channels, parts)
            _backward_combine_kernel[(triton.cdiv(channels, block_c),)](
                partials, parts, channels, invstd, dweight, dbias, BLOCK_C=block_c, BLOCK_PARTS=block_parts,
                num_warps=COMBINE_WARPS)
        _backward_dx_kernel[(tiles, walk.n_cblocks)](
            dy3, x3, dx3, mean, invstd, weight if weight is not None else mean, dweight if reduce else mean,
            dbias if reduce else mean, float(n * s), channels, walk.positions, walk.n_ptiles, *sg, *sx, *sd,
            HAS_WEIGHT=weight is not None, TRAINING=training, BLOCK_C=walk.block_c, BLOCK_P=walk.block_p,
            INDEX64=walk.index64, num_warps=WARPS)
    return dx, dweight, dbias
