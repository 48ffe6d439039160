"""The weight and bias gradients of a stride-1 depthwise 2-D convolution in Triton.

    d weight[c, i, j] = sum_{b, h, w} dy[b, c, h, w] * x[b, c, h + i dh - top, w + j dw - left]
    d bias[c]         = sum_{b, h, w} dy[b, c, h, w]

(x read as zero outside its H x W: the padding.) PyTorch's CUDA kernel for this
(conv_depthwise2d_grad_weight) gives each (channel, tap) one block that walks the whole batch and
map: with 4-32 channels and 9 taps that is a few dozen blocks for ~10^7 elements, far below
bandwidth. Here the work is split along the data instead.

``_grad_weight_kernel``: a program owns one channel, a block of ``BLOCK_B`` samples (several
when the maps are small, one when they are large) and a band of output rows; it walks the band in
(BLOCK_B, BLOCK_H, BLOCK_W) tiles, loads the tile of dy once and, for each of the kh * kw taps,
the tile of x shifted by that tap (masked: zero outside x = the padding; the shifted tiles overlap,
so all but the first come from L1/L2), and accumulates dy * x_shifted for that tap in fp32 (one
more slot accumulates dy for the bias): per element and tap in registers (``TAP_TILES``, few taps)
or reduced across the tile per tap (many taps). Its kh * kw + 1 sums go to its own column of a
(C, taps + 1, slots) fp32 buffer. ``_sum_partials_kernel`` then adds each channel's slots in a
fixed order and writes d weight and d bias in the output dtype: no atomics, the same bits every
run, and the grid depends only on the shapes (never on the GPU), so also the same bits on every
machine.

Floor (bytes that must move): read dy and x once, B * C * (H_out W_out + H W) elements (at 192x256,
batch 16, 4 channels, fp16: 12.6 MB, 4.2 us at ~3 TB/s; batch 48, 8 channels: 75 MB, 25 us), plus
the partials (C * (taps + 1) * slots fp32, written and read: < 5% of that at the model's shapes).
The instruction floor is near it: per element and tap one shifted load (from L1), a convert and
an FMA, so kernels of many taps on low-channel maps are bound by the load units, not DRAM.

x and dy are read through their four strides (any layout: NCHW, a channel slice of a wider
tensor, channels-last; NCHW-like layouts, contiguous along W, are the fast ones).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Two ways to add up a tap's products, chosen per call (``launch_config``):
#  tap tiles  each thread keeps one fp32 accumulator per tap (and the bias) for each element it holds,
#             and the cross-thread reduction runs once per program: one FMA per element and tap. Used
#             while (taps + 1, padded to a power of two) x elements per thread fits ACC_REGISTERS.
#  per tap    each tap's products are reduced across the tile at once (shuffles and a barrier per tap
#             and tile): for many taps (PCAM's 9x9: 82 slots), whose accumulators would not fit.
ACC_REGISTERS = 64
# Tap tiles with fewer elements per thread than this give way to the per-tap reduction.
MIN_TAP_TILE_ELEMENTS_PER_THREAD = 2
# Per-tap reduction: elements of one tile (4 per thread over 4 warps; 8 spill at 9x9: the compiler
# hoists the 81 shifted loads).
REDUCE_TILE_ELEMENTS = 512
# A cap on any tile (tests shrink it so that programs loop over many tiles).
MAX_TILE_ELEMENTS = 1 << 16
# A tile spans at most this many columns: wider maps are walked in column blocks.
MAX_BLOCK_W = 256
WARPS = 4
# No software pipelining: it would stage every one of the kh * kw shifted loads of the loop body in
# shared memory; latency is hidden by the independent tap loads in flight and the resident programs.
STAGES = 1
# Row bands are sized so that about this many programs run: enough to fill an H100 (132 SMs x
# several resident programs) and hide load latency. A constant, not the SM count: the grid (and so
# the order of the partial sums) must not depend on the machine.
TARGET_PROGRAMS = 2048
# A band holds at least this many times the rows of its halo (dilation * (kh - 1) rows of x that
# the neighbouring band reads too): re-read halos cost at most ~1/HALO_RATIO more x traffic, mostly
# from L2 (the model's maps fit in it); more would leave too few programs to fill the GPU.
HALO_RATIO = 1
# Elements of the (taps, slots) block the reduction kernel adds per step.
SUM_TILE_ELEMENTS = 2048
INT32_LIMIT = 2 ** 31


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _grad_weight_kernel(dy_ptr, x_ptr, partial_ptr, batch, out_h, out_w, in_h, in_w,
                        dy_sb, dy_sc, dy_sh, dy_sw, x_sb, x_sc, x_sh, x_sw,
                        pad_top, pad_left, dil_h, dil_w, rows_per_program, slots,
                        KH: tl.constexpr, KW: tl.constexpr, TAPS_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, INT64: tl.constexpr,
                        TAP_TILES: tl.constexpr):
    group = tl.program_id(0)  # channel * batch_blocks + batch block
    band = tl.program_id(1)
    batch_blocks = tl.cdiv(batch, BLOCK_B)
    channel = group // batch_blocks
    batch_block = group % batch_blocks
    sample = batch_block * BLOCK_B + tl.arange(0, BLOCK_B)
    sample_ok = sample < batch
    if INT64:
        sample = sample.to(tl.int64)
        channel = channel.to(tl.int64)
    dy_plane = dy_ptr + channel * dy_sc
    x_plane = x_ptr + channel * x_sc
    dy_sample = sample * dy_sb
    x_sample = sample * x_sb

    taps = tl.arange(0, TAPS_PAD)
    if TAP_TILES:
        # One accumulator tile per tap, the tap axis held inside each thread: selecting tap t is a
        # constant per register, so an update is one FMA per element and the cross-thread reduction
        # runs once per program.
        tap_ids = tl.reshape(taps, (TAPS_PAD, 1, 1, 1))
        acc4 = tl.zeros([TAPS_PAD, BLOCK_B, BLOCK_H, BLOCK_W], dtype=tl.float32)
    else:
        acc = tl.zeros([TAPS_PAD], dtype=tl.float32)
    row_begin = band * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, out_h)
    for row0 in range(row_begin, row_end, BLOCK_H):
        oh = row0 + tl.arange(0, BLOCK_H)
        oh_ok = oh < row_end
        for col0 in range(0, out_w, BLOCK_W):
            ow = col0 + tl.arange(0, BLOCK_W)
            ow_ok = ow < out_w
            dy_offsets = (dy_sample[:, None, None] + (oh * dy_sh)[None, :, None]) + (ow * dy_sw)[None, None, :]
            dy_mask = (sample_ok[:, None] & oh_ok[None, :])[:, :, None] & ow_ok[None, None, :]
            dy = tl.load(dy_plane + dy_offsets, mask=dy_mask, other=0.0).to(tl.float32)
            if TAP_TILES:
                acc4 = tl.where(tap_ids == KH * KW, acc4 + dy[None, :, :, :], acc4)
            else:
                acc = tl.where(taps == KH * KW, acc + tl.sum(dy), acc)
            for i in tl.static_range(KH):
                ih = oh + (i * dil_h - pad_top)
                # dy is zero outside the output, so the x mask only keeps the reads inside x (which
                # also makes them the zero padding).
                row_ok = sample_ok[:, None] & ((ih >= 0) & (ih < in_h))[None, :]
                row_offsets = x_sample[:, None] + (ih * x_sh)[None, :]
                for j in tl.static_range(KW):
                    iw = ow + (j * dil_w - pad_left)
                    col_ok = (iw >= 0) & (iw < in_w)
                    x = tl.load(x_plane + (row_offsets[:, :, None] + (iw * x_sw)[None, None, :]),
                                mask=row_ok[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)
                    if TAP_TILES:
                        acc4 = tl.where(tap_ids == i * KW + j, acc4 + (x * dy)[None, :, :, :], acc4)
                    else:
                        acc = tl.where(taps == i * KW + j, acc + tl.sum(x * dy), acc)
    if TAP_TILES:
        acc = tl.sum(tl.reshape(acc4, (TAPS_PAD, BLOCK_B * BLOCK_H * BLOCK_W)), axis=1)
    slot = batch_block * tl.num_programs(1) + band
    tl.store(partial_ptr + (channel * (KH * KW + 1) + taps) * slots + slot, acc, mask=taps <= KH * KW)


@triton.jit
def _sum_partials_kernel(partial_ptr, grad_weight_ptr, grad_bias_ptr, slots,
                         TAPS: tl.constexpr, TAPS_PAD: tl.constexpr, BLOCK_SLOTS: tl.constexpr):
    channel = tl.program_id(0).to(tl.int64)
    taps = tl.arange(0, TAPS_PAD)
    taps_ok = taps <= TAPS  # the weight's taps and the bias slot
    rows = partial_ptr + (channel * (TAPS + 1) + taps) * slots
    acc = tl.zeros([TAPS_PAD, BLOCK_SLOTS], dtype=tl.float32)
    for slot0 in range(0, slots, BLOCK_SLOTS):
        slot = slot0 + tl.arange(0, BLOCK_SLOTS)
        acc += tl.load(rows[:, None] + slot[None, :], mask=taps_ok[:, None] & (slot < slots)[None, :], other=0.0)
    total = tl.sum(acc, axis=1)
    tl.store(grad_weight_ptr + channel * TAPS + taps, total.to(grad_weight_ptr.dtype.element_ty), mask=taps < TAPS)
    tl.store(grad_bias_ptr + channel + taps * 0, total.to(grad_bias_ptr.dtype.element_ty), mask=taps == TAPS)


def launch_config(batch: int, channels: int, out_h: int, out_w: int, kernel_size, dilation_h: int):
    """Accumulation mode, tile (BLOCK_B, BLOCK_H, BLOCK_W), rows per program and the grid for the given
    shape (a pure function of the shapes and the module's constants: the same on every machine)."""
    taps_pad = triton.next_power_of_2(kernel_size[0] * kernel_size[1] + 1)
    threads = 32 * WARPS
    per_thread = ACC_REGISTERS // taps_pad
    tap_tiles = per_thread >= MIN_TAP_TILE_ELEMENTS_PER_THREAD
    tile = per_thread * threads if tap_tiles else REDUCE_TILE_ELEMENTS
    tile = max(1, min(tile, MAX_TILE_ELEMENTS))
    block_w = min(triton.next_power_of_2(out_w), MAX_BLOCK_W, tile)
    block_h = min(triton.next_power_of_2(out_h), max(1, tile // block_w))
    block_b = min(triton.next_power_of_2(batch), max(1, tile // (block_h * block_w)))
    batch_blocks = triton.cdiv(batch, block_b)
    row_tiles = triton.cdiv(out_h, block_h)
    bands_wanted = max(1, triton.cdiv(TARGET_PROGRAMS, channels * batch_blocks))
    halo_rows = dilation_h * (kernel_size[0] - 1)
    tiles_per_band = max(triton.cdiv(row_tiles, bands_wanted), triton.cdiv(HALO_RATIO * halo_rows, block_h), 1)
    tiles_per_band = min(tiles_per_band, row_tiles)
    bands = triton.cdiv(row_tiles, tiles_per_band)
    return {"tap_tiles": tap_tiles, "taps_pad": taps_pad, "block_b": block_b, "block_h": block_h,
            "block_w": block_w, "rows_per_program": tiles_per_band * block_h,
            "grid": (channels * batch_blocks, bands), "slots": batch_blocks * bands}


def _needs_int64(t: torch.Tensor) -> bool:
    reach = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return reach >= INT32_LIMIT


def grad_weight(dy: torch.Tensor, x: torch.Tensor, kernel_size, dilation, padding, out_dtype: torch.dtype,
                poison: bool = False):
    """d weight (C, 1, kh, kw) and d bias (C,) in ``out_dtype`` from dy (B, C, H_out, W_out) and x (B, C, H, W).

    ``padding``: (top, bottom, left, right); only top and left enter (the output size is dy's).
    ``poison`` fills the outputs and the partial buffer with NaN first (tests).
    """
    batch, channels, in_h, in_w = x.shape
    out_h, out_w = dy.shape[-2:]
    kernel_h, kernel_w = kernel_size
    taps = kernel_h * kernel_w
    grad_w = torch.empty((channels, 1, kernel_h, kernel_w), dtype=out_dtype, device=x.device)
    grad_b = torch.empty((channels,), dtype=out_dtype, device=x.device)
    if poison:
        grad_w.fill_(float("nan"))
        grad_b.fill_(float("nan"))
    if channels == 0:
        return grad_w, grad_b
    if batch == 0 or out_h == 0 or out_w == 0:
        return grad_w.zero_(), grad_b.zero_()
    config = launch_config(batch, channels, out_h, out_w, (kernel_h, kernel_w), dilation[0])
    slots = config["slots"]
    partial = torch.empty((channels, taps + 1, slots), dtype=torch.float32, device=x.device)
    if poison:
        partial.fill_(float("nan"))
    taps_pad = config["taps_pad"]
    with _device_guard(x):
        _grad_weight_kernel[config["grid"]](
            dy, x, partial, batch, out_h, out_w, in_h, in_w, *dy.stride(), *x.stride(),
            padding[0], padding[2], dilation[0], dilation[1], config["rows_per_program"], slots,
            KH=kernel_h, KW=kernel_w, TAPS_PAD=taps_pad, BLOCK_B=config["block_b"], BLOCK_H=config["block_h"],
            BLOCK_W=config["block_w"], INT64=_needs_int64(x) or _needs_int64(dy), TAP_TILES=config["tap_tiles"],
            num_warps=WARPS, num_stages=STAGES)
        _sum_partials_kernel[(channels,)](partial, grad_w, grad_b, slots, TAPS=taps, TAPS_PAD=taps_pad,
                                          BLOCK_SLOTS=max(1, SUM_TILE_ELEMENTS // taps_pad), num_warps=WARPS)
    return grad_w, grad_b
