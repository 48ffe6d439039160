"""Fused CBAM in Triton: kernels and their launchers (forward and backward).

Pass structure (x is (B, C, HW) through its strides; NCHW and channels-last both run in place):

forward
  1. ``_pool_hw_partials``   read x      per-(b, c, pixel tile) sum, max and count of the max
  2. ``_channel_gate``       small       pools combined, shared MLP, sigmoid -> channel scale cs (B, C)
  3. ``_spatial_pool``       read x      per pixel: max, mean and tie count over C of x * cs
  4. ``_spatial_conv``       small       7x7 conv of the two maps -> z, per-tile (count, sum, M2) of z
  5. ``_bn_stats``           tiny        batch mean / variance (Chan's merge) or the running stats
  6. ``_apply``              read x, write out = x * cs * sigmoid(bn(z))
backward
  7. ``_bwd_spatial``        read g, x   per pixel d(spatial logit), per (b, c, tile) sum g*x*ss
  8. ``_bn_bwd_stats``       tiny        BatchNorm's backward reductions -> coefficients, d bn weight/bias
  9. ``_spatial_conv_bwd``   small       d maps (scaled for the max/mean backward), per-tile d conv weight
 10. ``_bwd_channel``        read x      adds the max/mean-map paths to the per-(b, c, tile) d cs partials
 11. ``_channel_gate_bwd``   small       d cs -> MLP backward per batch row -> per-(b, c) pool gradients
 12. ``_channel_gate_wgrad`` small       MLP weight gradients, summed over the batch
 13. ``_bwd_apply``          read g, x, write dx

Only per-channel (B, C) and per-pixel (B, k, HW) fp32 maps are saved; nothing of x's size.
Reductions go through per-program partial buffers (no float atomics): results are deterministic.
Max pools split their gradient evenly among tied maxima, like ``torch.amax``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._op_common import empty_like_pixels
from ..triton_rounding import round_to as _round_to

# Elements one program loads per step of its loop: 16 KB of fp32, enough bytes in flight per SM.
TILE_ELEMENTS = 4096
# Pixel tiles: as long as 128 (512 B rows in NCHW); as short as 32 (one 128 B line of fp32) when
# the grid would otherwise leave most of the GPU idle.
MAX_BLOCK_P = 128
MIN_BLOCK_P = 32
# Programs wanted per SM before pixel tiles stop shrinking.
PROGRAMS_PER_SM = 2
# Pixel-major tiles (NCHW): 16-byte loads, 32 threads a warp, up to 4 warps, 32 values of a tensor per thread.
VECTOR_BYTES = 16
THREADS_PER_WARP = 32
MAX_WARPS_PIXEL_MAJOR = 4
VALUES_PER_THREAD = 32
# 7x7 conv (forward and backward): pixels per program, pixels per step (one per thread and warp
# lane: 2 per thread with 4 warps), warps.
CONV_BLOCK = 1024
CONV_SUB = 256
CONV_WARPS = 4
REDUCE_BLOCK = 1024
# Per-pixel map rows: forward (max, mean, 1/ties of the max, conv output z), backward (d spatial
# logit, d max-map / ties, d mean-map / C).
# (Triton kernels may read module globals only when they are constexpr.)
PIX_MAX, PIX_MEAN, PIX_INV_TIES, PIX_Z, PIX_ROWS = (tl.constexpr(i) for i in range(5))
BPIX_DS, BPIX_DMAX, BPIX_DMEAN, BPIX_ROWS = (tl.constexpr(i) for i in range(4))
# Per-channel rows: average, max over HW, 1/ties of that max.
CHAN_AVG, CHAN_MAX, CHAN_INV_TIES, CHAN_ROWS = (tl.constexpr(i) for i in range(4))
# stats: mean and 1/std used to normalise, then batch mean and unbiased batch variance.
STATS_LEN = 4


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _merge_max(acc_m, acc_n, tile_m, tile_n):
    """Running (max, count of the max) merged with a tile's (max, count)."""
    new_m = tl.maximum(acc_m, tile_m)
    new_n = tl.where(acc_m == new_m, acc_n, 0.0) + tl.where(tile_m == new_m, tile_n, 0.0)
    return new_m, new_n


@triton.jit
def _spatial_scale(pix_base, stats_ptr, bnw_ptr, bnb_ptr, offs_p, mask_p, HW):
    z = tl.load(pix_base + PIX_Z * HW + offs_p, mask=mask_p, other=0.0)
    mean = tl.load(stats_ptr)
    invstd = tl.load(stats_ptr + 1)
    gamma = tl.load(bnw_ptr).to(tl.float32)
    beta = tl.load(bnb_ptr).to(tl.float32)
    zn = (z - mean) * invstd
    return zn, _sigmoid(zn * gamma + beta)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _pool_hw_partials_kernel(x_ptr, part_ptr, part_stride, C, HW, sxb, sxc, sxp, n_ptiles,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    x_base = x_ptr + b * sxb
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        v = tl.load(x_base + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
        vm = tl.where(mask, v, float("-inf"))
        m = tl.max(vm, axis=1)
        n = tl.sum(tl.where(mask & (vm == m[:, None]), 1.0, 0.0), axis=1)
        dst = (b * C + offs_c) * n_ptiles + t
        tl.store(part_ptr + dst, tl.sum(v, axis=1), mask=mask_c)
        tl.store(part_ptr + part_stride + dst, m, mask=mask_c)
        tl.store(part_ptr + 2 * part_stride + dst, n, mask=mask_c)


@triton.jit
def _channel_gate_kernel(part_ptr, part_stride, n_ptiles, w1_ptr, b1_ptr, w2_ptr, b2_ptr, cs_ptr, chan_ptr,
                         C, HIDDEN, HW, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HIDDEN
    pre_avg = tl.zeros([BLOCK_H], tl.float32)
    pre_max = tl.zeros([BLOCK_H], tl.float32)
    chan_base = chan_ptr + b * CHAN_ROWS * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc_s = tl.zeros([BLOCK_C], tl.float32)
        acc_m = tl.full([BLOCK_C], float("-inf"), tl.float32)
        acc_n = tl.zeros([BLOCK_C], tl.float32)
        row = (b * C + offs_c) * n_ptiles
        for t0 in range(0, n_ptiles, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = mask_c[:, None] & (offs_t < n_ptiles)[None, :]
            idx = row[:, None] + offs_t[None, :]
            ps = tl.load(part_ptr + idx, mask=mask, other=0.0)
            pm = tl.load(part_ptr + part_stride + idx, mask=mask, other=float("-inf"))
            pn = tl.load(part_ptr + 2 * part_stride + idx, mask=mask, other=0.0)
            tile_m = tl.max(pm, axis=1)
            tile_n = tl.sum(tl.where(pm == tile_m[:, None], pn, 0.0), axis=1)
            acc_m, acc_n = _merge_max(acc_m, acc_n, tile_m, tile_n)
            acc_s += tl.sum(ps, axis=1)
        avg = acc_s / HW
        mx = tl.where(mask_c, acc_m, 0.0)
        tl.store(chan_base + CHAN_AVG * C + offs_c, avg, mask=mask_c)
        tl.store(chan_base + CHAN_MAX * C + offs_c, mx, mask=mask_c)
        tl.store(chan_base + CHAN_INV_TIES * C + offs_c, 1.0 / tl.maximum(acc_n, 1.0), mask=mask_c)
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :],
                     other=0.0).to(tl.float32)
        pre_avg += tl.sum(w1 * avg[None, :], axis=1)
        pre_max += tl.sum(w1 * mx[None, :], axis=1)
    b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    # mlp(avg) + mlp(max) = W2 (relu(pre_avg) + relu(pre_max)) + 2 b2: one product for both pools
    hidden = tl.maximum(pre_avg + b1, 0.0) + tl.maximum(pre_max + b1, 0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w2 = tl.load(w2_ptr + offs_c[:, None] * HIDDEN + offs_h[None, :], mask=mask_c[:, None] & mask_h[None, :],
                     other=0.0).to(tl.float32)
        b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        logits = tl.sum(w2 * hidden[None, :], axis=1) + 2.0 * b2
        tl.store(cs_ptr + b * C + offs_c, _sigmoid(logits), mask=mask_c)


@triton.jit
def _spatial_pool_kernel(x_ptr, cs_ptr, pix_ptr, C, HW, sxb, sxc, sxp, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    x_base = x_ptr + b * sxb
    acc_m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    acc_n = tl.zeros([BLOCK_P], tl.float32)
    acc_s = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        v = tl.load(x_base + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
        cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        y = v * cs[:, None]
        ym = tl.where(mask, y, float("-inf"))
        tile_m = tl.max(ym, axis=0)
        tile_n = tl.sum(tl.where(mask & (ym == tile_m[None, :]), 1.0, 0.0), axis=0)
        acc_m, acc_n = _merge_max(acc_m, acc_n, tile_m, tile_n)
        acc_s += tl.sum(y, axis=0)
    pix_base = pix_ptr + b * PIX_ROWS * HW
    tl.store(pix_base + PIX_MAX * HW + offs_p, acc_m, mask=mask_p)
    tl.store(pix_base + PIX_MEAN * HW + offs_p, acc_s / C, mask=mask_p)
    tl.store(pix_base + PIX_INV_TIES * HW + offs_p, 1.0 / tl.maximum(acc_n, 1.0), mask=mask_p)


@triton.jit
def _conv_columns(KSIZE: tl.constexpr, KPAD: tl.constexpr):
    """Column index of a kernel row padded to KPAD lanes, its offset and validity."""
    kx = tl.arange(0, KPAD)
    return kx, kx - KSIZE // 2, kx < KSIZE


@triton.jit
def _spatial_conv_kernel(pix_ptr, w_ptr, part_ptr, n_ctiles, H, W, HW, KSIZE: tl.constexpr, KPAD: tl.constexpr,
                         BLOCK: tl.constexpr, SUB: tl.constexpr):
    # kernel rows unrolled; the KPAD columns of a row are one (columns x pixels) tile whose column
    # axis stays inside each thread, so the sum over a row needs no shuffles
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = pix_ptr + b * PIX_ROWS * HW
    kx, col_dx, col_ok = _conv_columns(KSIZE, KPAD)
    # running (count, sum, squared deviations about the running mean) of this program's outputs
    n_acc = 0.0
    s_acc = 0.0
    m2_acc = 0.0
    stop = tl.minimum(t * BLOCK + BLOCK, HW)
    for p0 in range(t * BLOCK, stop, SUB):
        offs = p0 + tl.arange(0, SUB)
        mask = offs < stop
        h = offs // W
        w = offs % W
        ww = w[None, :] + col_dx[:, None]
        cols_in = col_ok[:, None] & mask[None, :] & (ww >= 0) & (ww < W)
        acc = tl.zeros([SUB], tl.float32)
        for ky in tl.static_range(KSIZE):
            hh = h + (ky - KSIZE // 2)
            ok = cols_in & ((hh >= 0) & (hh < H))[None, :]
            # offs + shift rather than hh * W + ww: the pixel axis then reads as contiguous, and lanes run along it
            src = offs[None, :] + ((ky - KSIZE // 2) * W + col_dx)[:, None]
            w_max = tl.load(w_ptr + ky * KSIZE + kx, mask=col_ok, other=0.0).to(tl.float32)
            w_mean = tl.load(w_ptr + KSIZE * KSIZE + ky * KSIZE + kx, mask=col_ok, other=0.0).to(tl.float32)
            acc += tl.sum(tl.load(base + PIX_MAX * HW + src, mask=ok, other=0.0) * w_max[:, None]
                          + tl.load(base + PIX_MEAN * HW + src, mask=ok, other=0.0) * w_mean[:, None], axis=0)
        tl.store(base + PIX_Z * HW + offs, acc, mask=mask)
        n_i = tl.sum(tl.where(mask, 1.0, 0.0))
        s_i = tl.sum(tl.where(mask, acc, 0.0))
        dev = tl.where(mask, acc - s_i / n_i, 0.0)
        m2_i = tl.sum(dev * dev)
        # Chan et al.'s merge of two (count, mean, M2) summaries
        delta = s_i / n_i - s_acc / tl.maximum(n_acc, 1.0)
        m2_acc = m2_acc + m2_i + delta * delta * n_acc * n_i / (n_acc + n_i)
        n_acc = n_acc + n_i
        s_acc = s_acc + s_i
    part = (b * n_ctiles + t) * 3
    tl.store(part_ptr + part, n_acc)
    tl.store(part_ptr + part + 1, s_acc)
    tl.store(part_ptr + part + 2, m2_acc)


@triton.jit
def _bn_stats_kernel(part_ptr, n_parts, rm_ptr, rv_ptr, stats_ptr, N, eps, USE_BATCH: tl.constexpr,
                     BLOCK: tl.constexpr):
    if USE_BATCH:
        acc = tl.zeros([BLOCK], tl.float32)
        for p0 in range(0, n_parts, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            acc += tl.load(part_ptr + offs * 3 + 1, mask=offs < n_parts, other=0.0)
        mean = tl.sum(acc) / N
        acc = tl.zeros([BLOCK], tl.float32)
        for p0 in range(0, n_parts, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            m = offs < n_parts
            count = tl.load(part_ptr + offs * 3, mask=m, other=1.0)
            total = tl.load(part_ptr + offs * 3 + 1, mask=m, other=0.0)
            m2 = tl.load(part_ptr + offs * 3 + 2, mask=m, other=0.0)
            shift = total / count - mean
            acc += tl.where(m, m2 + count * shift * shift, 0.0)
        m2_total = tl.sum(acc)
        tl.store(stats_ptr, mean)
        tl.store(stats_ptr + 1, 1.0 / tl.sqrt(m2_total / N + eps))
        tl.store(stats_ptr + 2, mean)
        tl.store(stats_ptr + 3, m2_total / (N - 1.0))
    else:
        rm = tl.load(rm_ptr).to(tl.float32)
        rv = tl.load(rv_ptr).to(tl.float32)
        tl.store(stats_ptr, rm)
        tl.store(stats_ptr + 1, 1.0 / tl.sqrt(rv + eps))
        tl.store(stats_ptr + 2, rm)
        tl.store(stats_ptr + 3, rv)


@triton.jit
def _apply_kernel(x_ptr, out_ptr, cs_ptr, pix_ptr, stats_ptr, bnw_ptr, bnb_ptr, C, HW, sxb, sxc, sxp, sob, soc, sop,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_p[None, :]
    _, ss = _spatial_scale(pix_ptr + b * PIX_ROWS * HW, stats_ptr, bnw_ptr, bnb_ptr, offs_p, mask_p, HW)
    cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    v = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0)
    out = (v.to(tl.float32) * cs[:, None]) * ss[None, :]
    tl.store(out_ptr + b * sob + offs_c[:, None] * soc + offs_p[None, :] * sop, out.to(out_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_spatial_kernel(g_ptr, x_ptr, cs_ptr, pix_ptr, stats_ptr, bnw_ptr, bnb_ptr, bpix_ptr, pdcs_ptr, pbn_ptr,
                        C, HW, sgb, sgc, sgp, sxb, sxc, sxp, n_ptiles, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    zn, ss = _spatial_scale(pix_ptr + b * PIX_ROWS * HW, stats_ptr, bnw_ptr, bnb_ptr, offs_p, mask_p, HW)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        g = tl.load(g_ptr + b * sgb + offs_c[:, None] * sgc + offs_p[None, :] * sgp, mask=mask,
                    other=0.0).to(tl.float32)
        v = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask,
                    other=0.0).to(tl.float32)
        cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        gx = g * v
        # d out / d ss = x * cs; the gated-x path of d cs is sum_p g * ss * x
        acc += tl.sum(gx * cs[:, None], axis=0)
        tl.store(pdcs_ptr + (b * C + offs_c) * n_ptiles + t, tl.sum(gx * ss[None, :], axis=1), mask=mask_c)
    ds = tl.where(mask_p, acc * ss * (1.0 - ss), 0.0)
    tl.store(bpix_ptr + b * BPIX_ROWS * HW + BPIX_DS * HW + offs_p, ds, mask=mask_p)
    part = (b * n_ptiles + t) * 2
    tl.store(pbn_ptr + part, tl.sum(ds))
    tl.store(pbn_ptr + part + 1, tl.sum(ds * zn))


@triton.jit
def _bn_bwd_stats_kernel(pbn_ptr, n_parts, stats_ptr, bnw_ptr, coef_ptr, dbnw_ptr, dbnb_ptr, N,
                         USE_BATCH: tl.constexpr, BLOCK: tl.constexpr):
    acc_ds = tl.zeros([BLOCK], tl.float32)
    acc_dszn = tl.zeros([BLOCK], tl.float32)
    for p0 in range(0, n_parts, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        m = offs < n_parts
        acc_ds += tl.load(pbn_ptr + offs * 2, mask=m, other=0.0)
        acc_dszn += tl.load(pbn_ptr + offs * 2 + 1, mask=m, other=0.0)
    sum_ds = tl.sum(acc_ds)
    sum_dszn = tl.sum(acc_dszn)
    invstd = tl.load(stats_ptr + 1)
    gamma = tl.load(bnw_ptr).to(tl.float32)
    # dz = gamma * invstd * (ds - mean(ds) - zn * mean(ds * zn)) with batch statistics;
    # the two means vanish when the running statistics normalise (they do not depend on z)
    tl.store(coef_ptr, gamma * invstd)
    if USE_BATCH:
        tl.store(coef_ptr + 1, sum_ds / N)
        tl.store(coef_ptr + 2, sum_dszn / N)
    else:
        tl.store(coef_ptr + 1, 0.0)
        tl.store(coef_ptr + 2, 0.0)
    tl.store(dbnw_ptr, sum_dszn.to(dbnw_ptr.dtype.element_ty))
    tl.store(dbnb_ptr, sum_ds.to(dbnb_ptr.dtype.element_ty))


@triton.jit
def _dz_at(ds_base, z_base, src, ok, mean, invstd, coef_a, coef_b, coef_c):
    ds = tl.load(ds_base + src, mask=ok, other=0.0)
    z = tl.load(z_base + src, mask=ok, other=0.0)
    return tl.where(ok, coef_a * (ds - coef_b - (z - mean) * invstd * coef_c), 0.0)


@triton.jit
def _spatial_conv_bwd_kernel(pix_ptr, bpix_ptr, stats_ptr, coef_ptr, w_ptr, pdw_ptr, C, H, W, HW, n_ctiles,
                             KSIZE: tl.constexpr, KPAD: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    base = pix_ptr + b * PIX_ROWS * HW
    bbase = bpix_ptr + b * BPIX_ROWS * HW
    mean = tl.load(stats_ptr)
    invstd = tl.load(stats_ptr + 1)
    coef_a = tl.load(coef_ptr)
    coef_b = tl.load(coef_ptr + 1)
    coef_c = tl.load(coef_ptr + 2)
    kx, col_dx, col_ok = _conv_columns(KSIZE, KPAD)
    start = t * BLOCK
    stop = tl.minimum(start + BLOCK, HW)
    # input gradient: each pixel gathers dz of the output pixels that read it, row by kernel row
    for p0 in range(start, stop, SUB):
        offs = p0 + tl.arange(0, SUB)
        mask = offs < stop
        h = offs // W
        w = offs % W
        w_out = w[None, :] - col_dx[:, None]
        cols_in = col_ok[:, None] & mask[None, :] & (w_out >= 0) & (w_out < W)
        d_max = tl.zeros([SUB], tl.float32)
        d_mean = tl.zeros([SUB], tl.float32)
        for ky in tl.static_range(KSIZE):
            h_out = h - (ky - KSIZE // 2)
            ok = cols_in & ((h_out >= 0) & (h_out < H))[None, :]
            src = offs[None, :] - ((ky - KSIZE // 2) * W + col_dx)[:, None]
            dz_n = _dz_at(bbase + BPIX_DS * HW, base + PIX_Z * HW, src, ok, mean, invstd, coef_a, coef_b, coef_c)
            w_max = tl.load(w_ptr + ky * KSIZE + kx, mask=col_ok, other=0.0).to(tl.float32)
            w_mean = tl.load(w_ptr + KSIZE * KSIZE + ky * KSIZE + kx, mask=col_ok, other=0.0).to(tl.float32)
            d_max += tl.sum(dz_n * w_max[:, None], axis=0)
            d_mean += tl.sum(dz_n * w_mean[:, None], axis=0)
        inv_ties = tl.load(base + PIX_INV_TIES * HW + offs, mask=mask, other=0.0)
        tl.store(bbase + BPIX_DMAX * HW + offs, d_max * inv_ties, mask=mask)
        tl.store(bbase + BPIX_DMEAN * HW + offs, d_mean / C, mask=mask)
    # weight gradient: per kernel row, (columns x pixels) products accumulate over the program's
    # pixels and are reduced once; (weights x programs) layout so the final sum reads rows
    part = pdw_ptr + (b * n_ctiles + t)
    n_parts = n_ctiles * tl.num_programs(1)
    for ky in tl.static_range(KSIZE):
        acc_max = tl.zeros([KPAD, SUB], tl.float32)
        acc_mean = tl.zeros([KPAD, SUB], tl.float32)
        for p0 in range(start, stop, SUB):
            offs = p0 + tl.arange(0, SUB)
            mask = offs < stop
            h = offs // W
            w = offs % W
            dz_own = _dz_at(bbase + BPIX_DS * HW, base + PIX_Z * HW, offs, mask, mean, invstd, coef_a, coef_b,
                            coef_c)
            h_in = h + (ky - KSIZE // 2)
            w_in = w[None, :] + col_dx[:, None]
            ok = col_ok[:, None] & (mask & (h_in >= 0) & (h_in < H))[None, :] & (w_in >= 0) & (w_in < W)
            src = offs[None, :] + ((ky - KSIZE // 2) * W + col_dx)[:, None]
            acc_max += dz_own[None, :] * tl.load(base + PIX_MAX * HW + src, mask=ok, other=0.0)
            acc_mean += dz_own[None, :] * tl.load(base + PIX_MEAN * HW + src, mask=ok, other=0.0)
        tl.store(part + (ky * KSIZE + kx) * n_parts, tl.sum(acc_max, axis=1), mask=col_ok)
        tl.store(part + (KSIZE * KSIZE + ky * KSIZE + kx) * n_parts, tl.sum(acc_mean, axis=1), mask=col_ok)


@triton.jit
def _bwd_channel_kernel(x_ptr, cs_ptr, pix_ptr, bpix_ptr, pdcs_ptr, C, HW, sxb, sxc, sxp, n_ptiles,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    y_max = tl.load(pix_ptr + b * PIX_ROWS * HW + PIX_MAX * HW + offs_p, mask=mask_p, other=0.0)
    d_max = tl.load(bpix_ptr + b * BPIX_ROWS * HW + BPIX_DMAX * HW + offs_p, mask=mask_p, other=0.0)
    d_mean = tl.load(bpix_ptr + b * BPIX_ROWS * HW + BPIX_DMEAN * HW + offs_p, mask=mask_p, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_p[None, :]
        v = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask,
                    other=0.0).to(tl.float32)
        cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        y = v * cs[:, None]
        d_gated = d_mean[None, :] + tl.where(y == y_max[None, :], d_max[None, :], 0.0)
        idx = pdcs_ptr + (b * C + offs_c) * n_ptiles + t
        tl.store(idx, tl.load(idx, mask=mask_c, other=0.0) + tl.sum(d_gated * v, axis=1), mask=mask_c)


@triton.jit
def _channel_gate_bwd_kernel(pdcs_ptr, n_ptiles, cs_ptr, chan_ptr, w1_ptr, b1_ptr, w2_ptr, da_ptr, hid_ptr, dchan_ptr,
                             C, HIDDEN, HW, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HIDDEN
    chan_base = chan_ptr + b * CHAN_ROWS * C
    # the hidden activations are recomputed: a (HIDDEN,) product is cheaper than saving them
    pre_avg = tl.zeros([BLOCK_H], tl.float32)
    pre_max = tl.zeros([BLOCK_H], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :],
                     other=0.0).to(tl.float32)
        avg = tl.load(chan_base + CHAN_AVG * C + offs_c, mask=mask_c, other=0.0)
        mx = tl.load(chan_base + CHAN_MAX * C + offs_c, mask=mask_c, other=0.0)
        pre_avg += tl.sum(w1 * avg[None, :], axis=1)
        pre_max += tl.sum(w1 * mx[None, :], axis=1)
    b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    pre_avg += b1
    pre_max += b1
    d_hidden = tl.zeros([BLOCK_H], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_C, BLOCK_T], tl.float32)
        row = (b * C + offs_c) * n_ptiles
        for t0 in range(0, n_ptiles, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            acc += tl.load(pdcs_ptr + row[:, None] + offs_t[None, :],
                           mask=mask_c[:, None] & (offs_t < n_ptiles)[None, :], other=0.0)
        cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        d_logit = tl.where(mask_c, tl.sum(acc, axis=1) * cs * (1.0 - cs), 0.0)
        tl.store(da_ptr + b * C + offs_c, d_logit, mask=mask_c)
        w2 = tl.load(w2_ptr + offs_c[:, None] * HIDDEN + offs_h[None, :], mask=mask_c[:, None] & mask_h[None, :],
                     other=0.0).to(tl.float32)
        d_hidden += tl.sum(w2 * d_logit[:, None], axis=0)
    d_pre_avg = tl.where(pre_avg > 0.0, d_hidden, 0.0)
    d_pre_max = tl.where(pre_max > 0.0, d_hidden, 0.0)
    hid_base = hid_ptr + b * 3 * HIDDEN
    tl.store(hid_base + offs_h, tl.maximum(pre_avg, 0.0) + tl.maximum(pre_max, 0.0), mask=mask_h)
    tl.store(hid_base + HIDDEN + offs_h, d_pre_avg, mask=mask_h)
    tl.store(hid_base + 2 * HIDDEN + offs_h, d_pre_max, mask=mask_h)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :],
                     other=0.0).to(tl.float32)
        d_avg = tl.sum(w1 * d_pre_avg[:, None], axis=0)
        d_mx = tl.sum(w1 * d_pre_max[:, None], axis=0)
        inv_ties = tl.load(chan_base + CHAN_INV_TIES * C + offs_c, mask=mask_c, other=0.0)
        # per-element gradient of x from the pools: d_avg / HW everywhere, d_max / ties at the maxima
        tl.store(dchan_ptr + b * 2 * C + offs_c, d_avg / HW, mask=mask_c)
        tl.store(dchan_ptr + b * 2 * C + C + offs_c, d_mx * inv_ties, mask=mask_c)


@triton.jit
def _channel_gate_wgrad_kernel(da_ptr, hid_ptr, chan_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, B, C, HIDDEN,
                               BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < HIDDEN
    dw2 = tl.zeros([BLOCK_C, BLOCK_H], tl.float32)
    dw1 = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    db2 = tl.zeros([BLOCK_C], tl.float32)
    db1 = tl.zeros([BLOCK_H], tl.float32)
    for b in range(0, B):
        d_logit = tl.load(da_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        hidden = tl.load(hid_ptr + b * 3 * HIDDEN + offs_h, mask=mask_h, other=0.0)
        d_pre_avg = tl.load(hid_ptr + b * 3 * HIDDEN + HIDDEN + offs_h, mask=mask_h, other=0.0)
        d_pre_max = tl.load(hid_ptr + b * 3 * HIDDEN + 2 * HIDDEN + offs_h, mask=mask_h, other=0.0)
        avg = tl.load(chan_ptr + b * CHAN_ROWS * C + CHAN_AVG * C + offs_c, mask=mask_c, other=0.0)
        mx = tl.load(chan_ptr + b * CHAN_ROWS * C + CHAN_MAX * C + offs_c, mask=mask_c, other=0.0)
        dw2 += d_logit[:, None] * hidden[None, :]
        db2 += d_logit
        dw1 += d_pre_avg[:, None] * avg[None, :] + d_pre_max[:, None] * mx[None, :]
        db1 += d_pre_avg + d_pre_max
    tl.store(dw2_ptr + offs_c[:, None] * HIDDEN + offs_h[None, :], dw2, mask=mask_c[:, None] & mask_h[None, :])
    # b2 enters both pools' MLP outputs
    tl.store(db2_ptr + offs_c, 2.0 * db2, mask=mask_c)
    tl.store(dw1_ptr + offs_h[:, None] * C + offs_c[None, :], dw1, mask=mask_h[:, None] & mask_c[None, :])
    if pid == 0:
        tl.store(db1_ptr + offs_h, db1, mask=mask_h)


@triton.jit
def _bwd_apply_kernel(g_ptr, x_ptr, dx_ptr, cs_ptr, chan_ptr, dchan_ptr, pix_ptr, bpix_ptr, stats_ptr, bnw_ptr,
                      bnb_ptr, C, HW, sgb, sgc, sgp, sxb, sxc, sxp, sdb, sdc, sdp,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_p[None, :]
    pix_base = pix_ptr + b * PIX_ROWS * HW
    _, ss = _spatial_scale(pix_base, stats_ptr, bnw_ptr, bnb_ptr, offs_p, mask_p, HW)
    y_max = tl.load(pix_base + PIX_MAX * HW + offs_p, mask=mask_p, other=0.0)
    d_max = tl.load(bpix_ptr + b * BPIX_ROWS * HW + BPIX_DMAX * HW + offs_p, mask=mask_p, other=0.0)
    d_mean = tl.load(bpix_ptr + b * BPIX_ROWS * HW + BPIX_DMEAN * HW + offs_p, mask=mask_p, other=0.0)
    cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    x_max = tl.load(chan_ptr + b * CHAN_ROWS * C + CHAN_MAX * C + offs_c, mask=mask_c, other=0.0)
    d_avg = tl.load(dchan_ptr + b * 2 * C + offs_c, mask=mask_c, other=0.0)
    d_xmax = tl.load(dchan_ptr + b * 2 * C + C + offs_c, mask=mask_c, other=0.0)
    g = tl.load(g_ptr + b * sgb + offs_c[:, None] * sgc + offs_p[None, :] * sgp, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_p[None, :] * sxp, mask=mask, other=0.0).to(tl.float32)
    y = v * cs[:, None]
    d_gated = g * ss[None, :] + d_mean[None, :] + tl.where(y == y_max[None, :], d_max[None, :], 0.0)
    dx = d_gated * cs[:, None] + d_avg[:, None] + tl.where(v == x_max[:, None], d_xmax[:, None], 0.0)
    tl.store(dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_p[None, :] * sdp, dx.to(dx_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _running_stats_kernel(rm_ptr, rv_ptr, stats_ptr, momentum):
    # fp32 arithmetic and one rounding to the buffers' dtype, as BatchNorm does
    rm = tl.load(rm_ptr).to(tl.float32)
    rv = tl.load(rv_ptr).to(tl.float32)
    tl.store(rm_ptr, _round_to((1.0 - momentum) * rm + momentum * tl.load(stats_ptr + 2), rm_ptr.dtype.element_ty))
    tl.store(rv_ptr, _round_to((1.0 - momentum) * rv + momentum * tl.load(stats_ptr + 3), rv_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device):
    # Under the CPU interpreter few, large programs run fastest.
    if device.type != "cuda":
        return 1
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _pow2(n):
    return triton.next_power_of_2(max(int(n), 1))


class _Tiling:
    """Block sizes for the (channel block x pixel block) tiles of the passes over x.

    Pixels contiguous (NCHW): each warp spans 32 x VEC pixels of a tile and every thread holds all
    BLOCK_C channels of its pixels, so the per-pixel reductions over C stay in registers (no shared
    memory, no barriers); 16-byte loads. Otherwise (channels-last): tiles of up to TILE_ELEMENTS
    with the pixel block shrunk until the grid fills the GPU.
    """

    def __init__(self, B, C, HW, device, element_size, pixels_contiguous):
        wanted = _programs_wanted(device)
        if pixels_contiguous:
            vec = VECTOR_BYTES // element_size
            warps = MAX_WARPS_PIXEL_MAJOR
            while warps > 1 and B * triton.cdiv(HW, THREADS_PER_WARP * vec * warps) < wanted:
                warps //= 2
            if B * triton.cdiv(HW, THREADS_PER_WARP * vec * warps) >= wanted // 2:
                self.block_p = THREADS_PER_WARP * vec * warps
                self.block_c = min(_pow2(C), max(1, VALUES_PER_THREAD // vec))
                self.num_warps = warps
                self._finish(C, HW)
                return
        block_p = min(_pow2(HW), MAX_BLOCK_P)
        while block_p > MIN_BLOCK_P and B * triton.cdiv(HW, block_p) < wanted:
            block_p //= 2
        self.block_p = block_p
        self.block_c = min(_pow2(C), max(1, TILE_ELEMENTS // block_p))
        self.num_warps = 8 if self.block_c * block_p >= TILE_ELEMENTS else 4
        self._finish(C, HW)

    def _finish(self, C, HW):
        self.n_ptiles = triton.cdiv(HW, self.block_p)
        self.n_ctiles = triton.cdiv(C, self.block_c)


def _gate_blocks(C, hidden):
    block_h = _pow2(hidden)
    block_c = min(_pow2(C), max(16, TILE_ELEMENTS // block_h))
    return block_c, block_h


def _pixel_strides(t):
    """(batch, channel, pixel) strides of a (B, C, H, W) tensor whose H and W flatten to one axis.

    With W == 1 the pixels run along H: stride(3) of a size-1 dim is arbitrary (torch ignores it, so
    e.g. a transposed (B, C, 1, W) view counts as contiguous while stride(3) is W).
    """
    return t.stride(0), t.stride(1), (t.stride(2) if t.size(3) == 1 else t.stride(3))


def forward_buffers(x, hidden, poison):
    """Allocates the op's outputs (also used by the fake implementation, so strides agree)."""
    B, C, H, W = x.shape
    HW = H * W
    new = (lambda *s: torch.full(s, float("nan"), device=x.device, dtype=torch.float32)) if poison else \
        (lambda *s: torch.empty(s, device=x.device, dtype=torch.float32))
    out = empty_like_pixels(x)
    if poison:
        out.fill_(float("nan"))
    return out, new(B, C), new(B, CHAN_ROWS.value, C), new(B, PIX_ROWS.value, HW), new(STATS_LEN)


def forward(x, w1, b1, w2, b2, conv_w, bn_w, bn_b, running_mean, running_var, use_batch_stats, eps, poison=False):
    B, C, H, W = x.shape
    HW = H * W
    hidden = w1.shape[0]
    ksize = conv_w.shape[-1]
    w1, b1, w2, b2, conv_w = (t.contiguous() for t in (w1, b1, w2, b2, conv_w))
    out, cs, chan, pix, stats = forward_buffers(x, hidden, poison)
    tiling = _Tiling(B, C, HW, x.device, x.element_size(), _pixel_strides(x)[2] == 1 and x.stride(1) != 1)
    bp, bc, npt, warps = tiling.block_p, tiling.block_c, tiling.n_ptiles, tiling.num_warps
    sxb, sxc, sxp = _pixel_strides(x)
    sob, soc, sop = _pixel_strides(out)
    new = (lambda *s: torch.full(s, float("nan"), device=x.device)) if poison else \
        (lambda *s: torch.empty(s, device=x.device))

    part_stride = B * C * npt
    pools = new(3 * part_stride)
    _pool_hw_partials_kernel[(npt, B)](x, pools, part_stride, C, HW, sxb, sxc, sxp, npt, BLOCK_C=bc, BLOCK_P=bp,
                                       num_warps=warps)
    gate_c, gate_h = _gate_blocks(C, hidden)
    _channel_gate_kernel[(B,)](pools, part_stride, npt, w1, b1, w2, b2, cs, chan, C, hidden, HW, BLOCK_C=gate_c,
                               BLOCK_T=min(_pow2(npt), max(1, TILE_ELEMENTS // gate_c)), BLOCK_H=gate_h,
                               num_warps=4)
    _spatial_pool_kernel[(npt, B)](x, cs, pix, C, HW, sxb, sxc, sxp, BLOCK_C=bc, BLOCK_P=bp, num_warps=warps)
    n_conv = triton.cdiv(HW, CONV_BLOCK)
    conv_parts = new(B * n_conv * 3)
    _spatial_conv_kernel[(n_conv, B)](pix, conv_w, conv_parts, n_conv, H, W, HW, KSIZE=ksize, KPAD=_pow2(ksize),
                                      BLOCK=CONV_BLOCK, SUB=CONV_SUB, num_warps=CONV_WARPS)
    rm = running_mean if running_mean is not None else stats
    rv = running_var if running_var is not None else stats
    _bn_stats_kernel[(1,)](conv_parts, B * n_conv, rm, rv, stats, B * HW, eps, USE_BATCH=use_batch_stats,
                           BLOCK=min(_pow2(B * n_conv), REDUCE_BLOCK), num_warps=4)
    _apply_kernel[(npt, B, tiling.n_ctiles)](x, out, cs, pix, stats, bn_w, bn_b, C, HW, sxb, sxc, sxp, sob, soc, sop,
                                             BLOCK_C=bc, BLOCK_P=bp, num_warps=warps)
    return out, cs, chan, pix, stats


def backward(grad_out, x, w1, b1, w2, conv_w, bn_w, bn_b, cs, chan, pix, stats, use_batch_stats, poison=False):
    B, C, H, W = x.shape
    HW = H * W
    hidden = w1.shape[0]
    ksize = conv_w.shape[-1]
    w1, b1, w2, conv_w = (t.contiguous() for t in (w1, b1, w2, conv_w))
    tiling = _Tiling(B, C, HW, x.device, x.element_size(), _pixel_strides(x)[2] == 1 and x.stride(1) != 1)
    bp, bc, npt, warps = tiling.block_p, tiling.block_c, tiling.n_ptiles, tiling.num_warps
    sxb, sxc, sxp = _pixel_strides(x)
    sgb, sgc, sgp = _pixel_strides(grad_out)
    new = (lambda *s: torch.full(s, float("nan"), device=x.device)) if poison else \
        (lambda *s: torch.empty(s, device=x.device))
    dx = empty_like_pixels(x)
    if poison:
        dx.fill_(float("nan"))
    sdb, sdc, sdp = _pixel_strides(dx)

    bpix = new(B, BPIX_ROWS.value, HW)
    pdcs = new(B * C * npt)
    pbn = new(B * npt * 2)
    _bwd_spatial_kernel[(npt, B)](grad_out, x, cs, pix, stats, bn_w, bn_b, bpix, pdcs, pbn, C, HW, sgb, sgc, sgp,
                                  sxb, sxc, sxp, npt, BLOCK_C=bc, BLOCK_P=bp, num_warps=warps)
    coef = new(3)
    dbn_w = new(1)
    dbn_b = new(1)
    _bn_bwd_stats_kernel[(1,)](pbn, B * npt, stats, bn_w, coef, dbn_w, dbn_b, B * HW, USE_BATCH=use_batch_stats,
                               BLOCK=min(_pow2(B * npt), REDUCE_BLOCK), num_warps=4)
    n_conv = triton.cdiv(HW, CONV_BLOCK)
    pdw = new(2 * ksize * ksize, B * n_conv)
    _spatial_conv_bwd_kernel[(n_conv, B)](pix, bpix, stats, coef, conv_w, pdw, C, H, W, HW, n_conv, KSIZE=ksize,
                                          KPAD=_pow2(ksize), BLOCK=CONV_BLOCK, SUB=CONV_SUB, num_warps=CONV_WARPS)
    _bwd_channel_kernel[(npt, B)](x, cs, pix, bpix, pdcs, C, HW, sxb, sxc, sxp, npt, BLOCK_C=bc, BLOCK_P=bp,
                                  num_warps=warps)
    gate_c, gate_h = _gate_blocks(C, hidden)
    d_logit = new(B, C)
    hid = new(B, 3, hidden)
    dchan = new(B, 2, C)
    _channel_gate_bwd_kernel[(B,)](pdcs, npt, cs, chan, w1, b1, w2, d_logit, hid, dchan, C, hidden, HW,
                                   BLOCK_C=gate_c, BLOCK_T=min(_pow2(npt), max(1, TILE_ELEMENTS // gate_c)),
                                   BLOCK_H=gate_h, num_warps=4)
    dw1 = new(hidden, C)
    db1 = new(hidden)
    dw2 = new(C, hidden)
    db2 = new(C)
    wgrad_c = min(_pow2(C), max(1, TILE_ELEMENTS // (2 * gate_h)))
    _channel_gate_wgrad_kernel[(triton.cdiv(C, wgrad_c),)](d_logit, hid, chan, dw1, db1, dw2, db2, B, C, hidden,
                                                            BLOCK_C=wgrad_c, BLOCK_H=gate_h, num_warps=4)
    _bwd_apply_kernel[(npt, B, tiling.n_ctiles)](grad_out, x, dx, cs, chan, dchan, pix, bpix, stats, bn_w, bn_b, C, HW,
                                                 sgb, sgc, sgp, sxb, sxc, sxp, sdb, sdc, sdp, BLOCK_C=bc, BLOCK_P=bp,
                                                 num_warps=warps)
    dconv = pdw.sum(1).view(1, 2, ksize, ksize)
    return dx, dw1, db1, dw2, db2, dconv, dbn_w, dbn_b


def update_running_stats(running_mean, running_var, stats, momentum):
    _running_stats_kernel[(1,)](running_mean, running_var, stats, float(momentum), num_warps=1)
