"""Launchers and ``torch.library`` custom ops (namespace ``dermomamba_triton``) for the Triton scans.

Ops (fresh outputs, fake implementations, autograd through the matching ``*_bwd`` op):
  selective_scan_fwd / selective_scan_bwd    mamba's 1-D scan
  multiaxial_scan_fwd / multiaxial_scan_bwd  SS2D's four-direction scan over the native (h, w) layout

The kernels' geometry (see kernels.py) is chosen here: for the multiaxial scan the two row-major
directions (k = 0 forward, k = 2 reversed) run in one launch and the two column-major ones (k = 1, 3) in
a second one that adds into the first one's output, so y and dx are each written without atomics.
Every reduction over batch and chunks goes through per-program partial buffers summed by torch, so
forward and backward are deterministic; ``deterministic`` is accepted for the common interface.

Tuning knobs (environment, read at import; module attributes, read per call): GPU_TILE
(DERMOMAMBA_TRITON_TILE), COLUMN_LINES, GPU_WARPS, GPU_BWD_WARPS, SPLIT_BACKWARD
(DERMOMAMBA_TRITON_BWD_SPLIT). benchmarks/bench_triton_scan.py times them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import kernels

# Positions per program tile on a GPU (lines x segment); the backward reuses the forward's tiles, since
# its chunk states were cut that way. The interpreter gets tiny tiles so that the small test shapes
# still span several chunks, line blocks and partial segments.
GPU_TILE = int(os.environ.get("DERMOMAMBA_TRITON_TILE", "128"))
INTERPRETER_TILE = 16
# Column-major orders read neighbouring columns together: 8 fp32 columns fill a 32-byte sector.
COLUMN_LINES = int(os.environ.get("DERMOMAMBA_TRITON_COLUMN_LINES", "8"))
# Enough programs to keep every SM of a large GPU busy before channels get split across programs.
TARGET_PROGRAMS = 2048
# Chunk summaries scanned per step of the carry pass, and states per carry program.
CARRY_BLOCK = 256
CARRY_STATES = 4
GPU_WARPS = int(os.environ.get("DERMOMAMBA_TRITON_WARPS", "4"))
GPU_BWD_WARPS = int(os.environ.get("DERMOMAMBA_TRITON_BWD_WARPS", "8"))
NUM_DIRECTIONS = 4
# Backward with one direction per program (kernels.bwd_grads_split_kernel) instead of both directions
# of a pair per program: a tuning alternative, timed by benchmarks/bench_triton_scan.py --alt-backward.
SPLIT_BACKWARD = os.environ.get("DERMOMAMBA_TRITON_BWD_SPLIT", "0") == "1"
POISON_ENV_VAR = "DERMOMAMBA_POISON_OUTPUTS"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu"


# Read once: the tests set it before importing this package.
POISON_OUTPUTS = os.environ.get(POISON_ENV_VAR, "0") == "1"


def _alloc(shape, dtype, device) -> Tensor:
    """Output buffers; NaN-filled when DERMOMAMBA_POISON_OUTPUTS=1 so tests catch unwritten elements."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class Geometry:
    """How one scan orientation is cut into program tiles and chunks (see kernels.py)."""

    nlines: int
    length: int
    lines: int
    seg_len: int

    @property
    def nseg(self) -> int:
        return -(-self.length // self.seg_len)

    @property
    def nchunks(self) -> int:
        return self.nlines * self.nseg

    @property
    def ntiles(self) -> int:
        return -(-self.nlines // self.lines) * self.nseg


def make_geometry(nlines: int, length: int, tile: int, lines_contiguous: bool) -> Geometry:
    """Tiles of ``tile`` positions; several lines side by side when the line axis is the contiguous one."""
    line_cap = _next_pow2(nlines)
    min_lines = min(COLUMN_LINES, line_cap) if lines_contiguous else 1
    seg_len = max(1, min(_next_pow2(length), tile // min_lines))
    lines = max(1, min(tile // seg_len, line_cap))
    return Geometry(nlines, length, lines, seg_len)


def _tile_for(device: torch.device) -> int:
    return INTERPRETER_TILE if _interpreting(device) else GPU_TILE


def _launch_opts(device: torch.device, backward: bool) -> dict:
    if _interpreting(device):
        return {}
    return {"num_warps": GPU_BWD_WARPS if backward else GPU_WARPS}


def _channels_per_program(channels_per_group: int, programs_per_channel_block: int) -> int:
    """Largest divisor of the group size that still leaves TARGET_PROGRAMS programs."""
    divisors = [k for k in range(channels_per_group, 0, -1) if channels_per_group % k == 0]
    for k in divisors:
        if programs_per_channel_block * (channels_per_group // k) >= TARGET_PROGRAMS:
            return k
    return 1


def _padded_rows(M: Tensor, rows: int, nstate_padded: int) -> Tensor:
    """(rows, N) float32 contiguous, zero-padded to N_padded: padded states decay by exp(0) and stay 0."""
    out = torch.zeros(rows, nstate_padded, dtype=torch.float32, device=M.device)
    out[:, :M.shape[-1]] = M.reshape(rows, -1).float()
    return out


def _carry_block(nchunks: int) -> int:
    return max(2, min(CARRY_BLOCK, _next_pow2(nchunks)))


def _state_group(npad: int) -> int:
    return min(npad, CARRY_STATES)


def _carry(buffers, batch: int, dim: int, nchunks: int, npad: int, ndir: int, flip: bool, write_final: bool,
           opts: dict) -> None:
    """Pass 2: (dsum, loc, A_pad, enter, final) -> the carry entering every chunk (see chunk_carry_kernel)."""
    group = _state_group(npad)
    kernels.chunk_carry_kernel[(batch * dim, npad // group)](
        *buffers, dim, nchunks, NP=npad, NG=group, CB=_carry_block(nchunks), NDIR=ndir, FLIP=flip,
        WRITE_FINAL=write_final, **opts)


# ----------------------------------------------------------------------------------------------
# 1-D selective scan
# ----------------------------------------------------------------------------------------------

def _state_operand(M: Tensor, batch: int, dim: int):
    """B or C as (tensor, is_constant, channels_per_group, strides b, r, g, n, line, pos)."""
    if M.dim() == 2:  # constant (dim, N): one row per channel
        return M, True, 1, (0, 0, M.stride(0), M.stride(1), 0, 0)
    if M.dim() == 3:
        M = M.unsqueeze(1)
    groups = M.shape[1]
    s_b, s_g, s_n, s_l = M.stride()
    return M, False, dim // groups, (s_b, 0, s_g, s_n, 0, s_l)


def _ss_geometry(length: int, device: torch.device) -> Geometry:
    return make_geometry(1, length, _tile_for(device), lines_contiguous=False)


def _ss_channel_blocks(geo: Geometry, batch: int, dim: int, B: Tensor, C: Tensor) -> Tuple[int, int, int]:
    dpg_b = 1 if B.dim() == 2 else dim // (1 if B.dim() == 3 else B.shape[1])
    dpg_c = 1 if C.dim() == 2 else dim // (1 if C.dim() == 3 else C.shape[1])
    # A program's channels lie inside one group of B and one of C (a constant operand has no groups).
    group = math.gcd(dpg_b if B.dim() != 2 else dim, dpg_c if C.dim() != 2 else dim)
    dpb = _channels_per_program(group, geo.ntiles * batch)
    return dpb, max(dpg_b, dpb), max(dpg_c, dpb)


def _ss_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    batch, dim, length = u.shape
    nstate = A.shape[1]
    npad = max(2, _next_pow2(nstate))
    device = u.device
    geo = _ss_geometry(length, device)
    A_pad = _padded_rows(A, dim, npad)
    B_t, b_const, _, sB = _state_operand(B, batch, dim)
    C_t, c_const, _, sC = _state_operand(C, batch, dim)
    dpb, dpg_b, dpg_c = _ss_channel_blocks(geo, batch, dim, B, C)
    grid = (geo.ntiles, batch, dim // dpb)
    f32 = torch.float32
    dsum = _alloc((batch, 1, dim, geo.nchunks), f32, device)
    loc = _alloc((batch, 1, dim, geo.nchunks, npad), f32, device)
    enter = _alloc((batch, 1, dim, geo.nchunks, npad), f32, device)
    final = _alloc((batch, 1, dim, npad), f32, device)
    out = _alloc((batch, dim, length), u.dtype, device)
    su = (u.stride(0), 0, u.stride(1), 0, u.stride(2))
    sdt = (delta.stride(0), 0, delta.stride(1), 0, delta.stride(2))
    bias = delta_bias.float().contiguous() if delta_bias is not None else A_pad
    Dv = D.float().contiguous() if D is not None else A_pad
    zz = z if z is not None else u
    sz = (zz.stride(0), zz.stride(1), 0, zz.stride(2))
    opts = _launch_opts(device, backward=False)
    kernels.fwd_chunk_summary_kernel[grid](
        u, delta, A_pad, B_t, bias, dsum, loc, dim, dpb, dpg_b, nstate, 1, length, geo.nseg, geo.nchunks,
        *su, *sdt, *sB, NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=1, B_CONST=b_const,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, **opts)
    _carry((dsum, loc, A_pad, enter, final), batch, dim, geo.nchunks, npad, ndir=1, flip=False,
           write_final=True, opts=opts)
    kernels.fwd_output_kernel[grid](
        u, delta, A_pad, B_t, C_t, Dv, bias, zz, enter, out, dim, dpb, dpg_b, dpg_c, nstate, 1, length, geo.nseg,
        geo.nchunks, *su, *sdt, *sB, *sC, *sz, out.stride(0), out.stride(1), 0, out.stride(2),
        NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=1, B_CONST=b_const, C_CONST=c_const, HAS_D=D is not None,
        HAS_BIAS=delta_bias is not None, HAS_Z=z is not None, SOFTPLUS=delta_softplus, ACCUMULATE=False, **opts)
    return out, final[:, 0, :, :nstate].contiguous(), enter


def _reduce_state_grad(part: Tensor, M: Tensor, constant: bool, nstate: int) -> Tensor:
    if constant:
        return part.sum(0)[:, :nstate].to(M.dtype)
    total = part[0] if part.shape[0] == 1 else part.sum(0)
    return total.reshape(M.shape).to(M.dtype)


def _ss_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states):
    batch, dim, length = u.shape
    nstate = A.shape[1]
    npad = max(2, _next_pow2(nstate))
    device = u.device
    geo = _ss_geometry(length, device)  # chunk_states were cut with the forward's geometry
    A_pad = _padded_rows(A, dim, npad)
    B_t, b_const, _, sB = _state_operand(B, batch, dim)
    C_t, c_const, _, sC = _state_operand(C, batch, dim)
    dpb, dpg_b, dpg_c = _ss_channel_blocks(geo, batch, dim, B, C)
    grid = (geo.ntiles, batch, dim // dpb)
    f32 = torch.float32
    nparts = batch * geo.ntiles
    gdsum = _alloc((batch, 1, dim, geo.nchunks), f32, device)
    gloc = _alloc((batch, 1, dim, geo.nchunks, npad), f32, device)
    genter = _alloc((batch, 1, dim, geo.nchunks, npad), f32, device)
    su = (u.stride(0), 0, u.stride(1), 0, u.stride(2))
    sdt = (delta.stride(0), 0, delta.stride(1), 0, delta.stride(2))
    so = (dout.stride(0), dout.stride(1), 0, dout.stride(2))
    bias = delta_bias.float().contiguous() if delta_bias is not None else A_pad
    Dv = D.float().contiguous() if D is not None else A_pad
    zz = z.contiguous() if z is not None else u
    sz = (zz.stride(0), zz.stride(1), 0, zz.stride(2))
    has_bias = delta_bias is not None
    opts = _launch_opts(device, backward=True)
    kernels.bwd_chunk_summary_kernel[grid](
        delta, A_pad, C_t, bias, zz, dout, gdsum, gloc, dim, dpb, dpg_c, nstate, 1, length, geo.nseg, geo.nchunks,
        *sdt, *sC, *sz, *so, NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=1, C_CONST=c_const,
        HAS_BIAS=has_bias, HAS_Z=z is not None, SOFTPLUS=delta_softplus, **opts)
    _carry((gdsum, gloc, A_pad, genter, genter), batch, dim, geo.nchunks, npad, ndir=1, flip=True,
           write_final=False, opts=opts)
    du = _alloc((batch, dim, length), u.dtype, device)
    ddelta = _alloc((batch, dim, length), delta.dtype, device)
    dz = _alloc(zz.shape, zz.dtype, device) if z is not None else du
    if b_const:
        dB_buf = _alloc((nparts, dim, npad), f32, device)
        sdB = (0,) * 7
    else:
        dB_buf = _alloc((dpg_b // dpb,) + tuple(B_t.shape), f32, device)
        p, b_, g, n, l = dB_buf.stride()
        sdB = (p, b_, 0, g, n, 0, l)
    if c_const:
        dC_buf = _alloc((nparts, dim, npad), f32, device)
        sdC = (0,) * 7
    else:
        dC_buf = _alloc((dpg_c // dpb,) + tuple(C_t.shape), f32, device)
        p, b_, g, n, l = dC_buf.stride()
        sdC = (p, b_, 0, g, n, 0, l)
    dA_part = _alloc((nparts, dim, npad), f32, device)
    dD_part = _alloc((nparts, dim), f32, device) if D is not None else dA_part
    dbias_part = _alloc((nparts, dim), f32, device) if has_bias else dA_part
    common = (u, delta, A_pad, B_t, C_t, Dv, bias, zz, dout, chunk_states, genter,
              du, ddelta, dB_buf, dC_buf, dz, dA_part, dB_buf, dC_buf, dD_part, dbias_part,
              dim, dpb, dpg_b, dpg_c, nstate, 1, length, geo.nseg, geo.nchunks, geo.ntiles)
    flags = dict(NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=1, B_CONST=b_const, C_CONST=c_const,
                 HAS_D=D is not None, HAS_BIAS=has_bias, HAS_Z=z is not None, SOFTPLUS=delta_softplus, **opts)
    sddt = (ddelta.stride(0), 0, ddelta.stride(1), 0, ddelta.stride(2))
    if SPLIT_BACKWARD:
        kernels.bwd_grads_split_kernel[grid](
            *common, su[0], su[2], su[3], su[4], *sdt, *sB, *sC, *sz, *so,
            du.stride(0), 0, du.stride(1), 0, du.stride(2), *sddt, *sdB, *sdC, **flags)
    else:
        kernels.bwd_grads_kernel[grid](
            *common, *su, *sdt, *sB, *sC, *sz, *so, du.stride(0), du.stride(1), 0, du.stride(2), *sddt, *sdB, *sdC,
            ACCUMULATE=False, **flags)
    dA = dA_part.sum(0)[:, :nstate].to(A.dtype)
    dB = _reduce_state_grad(dB_buf, B, b_const, nstate)
    dC = _reduce_state_grad(dC_buf, C, c_const, nstate)
    # Absent optional inputs get empty gradients, each its own tensor (custom op outputs never alias).
    dD = dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if has_bias else u.new_empty(0)
    return du, ddelta, dA, dB, dC, dD, dz if z is not None else u.new_empty(0), dbias


# ----------------------------------------------------------------------------------------------
# Multiaxial (SS2D) scan
# ----------------------------------------------------------------------------------------------

def _orientations(height: int, width: int, device: torch.device) -> List[Geometry]:
    """Row-major (lines = rows, positions along w) and column-major (lines = columns) geometries.

    delta, B and C come from the projections with w contiguous, so the column orders put several
    columns side by side in a tile.
    """
    tile = _tile_for(device)
    return [make_geometry(height, width, tile, lines_contiguous=False),
            make_geometry(width, height, tile, lines_contiguous=True)]


def _oriented(t: Tensor, axis: int, orientation: int) -> Tensor:
    """Directions (orientation, orientation + 2) of t along ``axis``, with (h, w) swapped for columns."""
    t = t[(slice(None),) * axis + (slice(orientation, None, 2),)]
    return t.transpose(-1, -2) if orientation == 1 else t


def _plane(t: Tensor, orientation: int) -> Tensor:
    return t.transpose(-1, -2) if orientation == 1 else t


def _multiaxial_channel_blocks(geo: Geometry, batch: int, dim: int) -> int:
    return _channels_per_program(dim, geo.ntiles * batch)


def _multiaxial_forward(x, delta, A, BC, D, delta_bias, delta_softplus):
    batch, dim, height, width = x.shape
    nstate = A.shape[1]
    B, C = BC[:, :, :nstate], BC[:, :, nstate:]
    npad = max(2, _next_pow2(nstate))
    device = x.device
    f32 = torch.float32
    y = _alloc((batch, dim, height, width), f32, device)
    A4 = A.reshape(NUM_DIRECTIONS, dim, nstate)
    D4 = D.reshape(NUM_DIRECTIONS, dim)
    bias4 = delta_bias.reshape(NUM_DIRECTIONS, dim)
    opts = _launch_opts(device, backward=False)
    states = []
    for o, geo in enumerate(_orientations(height, width, device)):
        dpb = _multiaxial_channel_blocks(geo, batch, dim)
        grid = (geo.ntiles, batch, dim // dpb)
        A_pad = _padded_rows(A4[o::2], 2 * dim, npad)
        Dv = D4[o::2].float().contiguous()
        bias = bias4[o::2].float().contiguous()
        xo = _plane(x, o)
        su = (xo.stride(0), 0, xo.stride(1), xo.stride(2), xo.stride(3))
        dto = _oriented(delta, 1, o)
        Bo = _oriented(B, 1, o)
        Co = _oriented(C, 1, o)
        sB = (Bo.stride(0), Bo.stride(1), 0, Bo.stride(2), Bo.stride(3), Bo.stride(4))
        sC = (Co.stride(0), Co.stride(1), 0, Co.stride(2), Co.stride(3), Co.stride(4))
        yo = _plane(y, o)
        dsum = _alloc((batch, 2, dim, geo.nchunks), f32, device)
        loc = _alloc((batch, 2, dim, geo.nchunks, npad), f32, device)
        enter = _alloc((batch, 2, dim, geo.nchunks, npad), f32, device)
        kernels.fwd_chunk_summary_kernel[grid](
            xo, dto, A_pad, Bo, bias, dsum, loc, dim, dpb, dim, nstate, geo.nlines, geo.length, geo.nseg,
            geo.nchunks, *su, *dto.stride(), *sB, NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=2,
            B_CONST=False, HAS_BIAS=True, SOFTPLUS=delta_softplus, **opts)
        _carry((dsum, loc, A_pad, enter, enter), batch, dim, geo.nchunks, npad, ndir=2, flip=False,
               write_final=False, opts=opts)
        kernels.fwd_output_kernel[grid](
            xo, dto, A_pad, Bo, Co, Dv, bias, xo, enter, yo, dim, dpb, dim, dim, nstate, geo.nlines, geo.length,
            geo.nseg, geo.nchunks, *su, *dto.stride(), *sB, *sC, 0, 0, 0, 0, *yo.stride(),
            NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=2, B_CONST=False, C_CONST=False, HAS_D=True,
            HAS_BIAS=True, HAS_Z=False, SOFTPLUS=delta_softplus, ACCUMULATE=o == 1, **opts)
        states.append(enter)
    return y, states[0], states[1]


def _multiaxial_backward(dy, x, delta, A, BC, D, delta_bias, delta_softplus, states_rows, states_cols):
    batch, dim, height, width = x.shape
    nstate = A.shape[1]
    B, C = BC[:, :, :nstate], BC[:, :, nstate:]
    npad = max(2, _next_pow2(nstate))
    device = x.device
    f32 = torch.float32
    A4 = A.reshape(NUM_DIRECTIONS, dim, nstate)
    D4 = D.reshape(NUM_DIRECTIONS, dim)
    bias4 = delta_bias.reshape(NUM_DIRECTIONS, dim)
    if not SPLIT_BACKWARD:  # the pair kernels add the column orders' dx to the row orders'
        dx_pair = _alloc((batch, dim, height, width), f32, device)
    else:  # one slice per direction (programs of one direction never share them); summed below
        dx_dirs = _alloc((batch, NUM_DIRECTIONS, dim, height, width), f32, device)
    ddelta = _alloc(tuple(delta.shape), delta.dtype, device)
    # Filled direction pair by direction pair below (from the partials); poisoned like the rest.
    dA = _alloc((NUM_DIRECTIONS, dim, nstate), f32, device)
    dD = _alloc((NUM_DIRECTIONS, dim), f32, device)
    dbias = _alloc((NUM_DIRECTIONS, dim), f32, device)
    opts = _launch_opts(device, backward=True)
    geos = _orientations(height, width, device)
    dpbs = [_multiaxial_channel_blocks(g, batch, dim) for g in geos]
    nblocks = max(dim // k for k in dpbs)
    # dB and dC land in one buffer shaped like BC, so the projection's gradient needs no concatenation.
    dBC_buf = _alloc((nblocks,) + tuple(BC.shape), f32, device)
    if any(dim // k != nblocks for k in dpbs):  # slices one orientation leaves unwritten must add nothing
        dBC_buf.zero_()
    dB_buf, dC_buf = dBC_buf[:, :, :, :nstate], dBC_buf[:, :, :, nstate:]
    for o, (geo, enter) in enumerate(zip(geos, (states_rows, states_cols))):
        dpb = dpbs[o]
        grid = (geo.ntiles, batch, dim // dpb)
        nparts = batch * geo.ntiles
        A_pad = _padded_rows(A4[o::2], 2 * dim, npad)
        Dv = D4[o::2].float().contiguous()
        bias = bias4[o::2].float().contiguous()
        xo = _plane(x, o)
        su = (xo.stride(0), 0, xo.stride(1), xo.stride(2), xo.stride(3))
        dto = _oriented(delta, 1, o)
        Bo = _oriented(B, 1, o)
        Co = _oriented(C, 1, o)
        sB = (Bo.stride(0), Bo.stride(1), 0, Bo.stride(2), Bo.stride(3), Bo.stride(4))
        sC = (Co.stride(0), Co.stride(1), 0, Co.stride(2), Co.stride(3), Co.stride(4))
        dyo = _plane(dy, o)
        so = tuple(dyo.stride())
        ddto = _oriented(ddelta, 1, o)
        dBo = _oriented(dB_buf, 2, o)
        dCo = _oriented(dC_buf, 2, o)
        sdB = (dBo.stride(0), dBo.stride(1), dBo.stride(2), 0) + tuple(dBo.stride()[3:])
        sdC = (dCo.stride(0), dCo.stride(1), dCo.stride(2), 0) + tuple(dCo.stride()[3:])
        gdsum = _alloc((batch, 2, dim, geo.nchunks), f32, device)
        gloc = _alloc((batch, 2, dim, geo.nchunks, npad), f32, device)
        genter = _alloc((batch, 2, dim, geo.nchunks, npad), f32, device)
        kernels.bwd_chunk_summary_kernel[grid](
            dto, A_pad, Co, bias, xo, dyo, gdsum, gloc, dim, dpb, dim, nstate, geo.nlines, geo.length, geo.nseg,
            geo.nchunks, *dto.stride(), *sC, 0, 0, 0, 0, *so, NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=2,
            C_CONST=False, HAS_BIAS=True, HAS_Z=False, SOFTPLUS=delta_softplus, **opts)
        _carry((gdsum, gloc, A_pad, genter, genter), batch, dim, geo.nchunks, npad, ndir=2, flip=True,
               write_final=False, opts=opts)
        dA_part = _alloc((nparts, 2 * dim, npad), f32, device)
        dD_part = _alloc((nparts, 2 * dim), f32, device)
        dbias_part = _alloc((nparts, 2 * dim), f32, device)
        common = (xo, dto, A_pad, Bo, Co, Dv, bias, xo, dyo, enter, genter)
        sizes = (dim, dpb, dim, dim, nstate, geo.nlines, geo.length, geo.nseg, geo.nchunks, geo.ntiles)
        flags = dict(NP=npad, LINES=geo.lines, BJ=geo.seg_len, NDIR=2, B_CONST=False, C_CONST=False, HAS_D=True,
                     HAS_BIAS=True, HAS_Z=False, SOFTPLUS=delta_softplus, **opts)
        if not SPLIT_BACKWARD:
            dxo = _plane(dx_pair, o)
            kernels.bwd_grads_kernel[grid](
                *common, dxo, ddto, dBo, dCo, dxo, dA_part, dA_part, dA_part, dD_part, dbias_part, *sizes,
                *su, *dto.stride(), *sB, *sC, 0, 0, 0, 0, *so, *dxo.stride(), *ddto.stride(), *sdB, *sdC,
                ACCUMULATE=o == 1, **flags)
        else:
            dxo = _oriented(dx_dirs, 1, o)
            kernels.bwd_grads_split_kernel[(geo.ntiles, batch, 2 * (dim // dpb))](
                *common, dxo, ddto, dBo, dCo, dxo, dA_part, dA_part, dA_part, dD_part, dbias_part, *sizes,
                su[0], su[2], su[3], su[4], *dto.stride(), *sB, *sC, 0, 0, 0, 0, *so, *dxo.stride(), *ddto.stride(),
                *sdB, *sdC, **flags)
        dA[o::2] = dA_part.sum(0).view(2, dim, npad)[..., :nstate]
        dD[o::2] = dD_part.sum(0).view(2, dim)
        dbias[o::2] = dbias_part.sum(0).view(2, dim)
    dx = dx_dirs.sum(1) if SPLIT_BACKWARD else dx_pair
    dBC = dBC_buf[0] if nblocks == 1 else dBC_buf.sum(0)
    return (dx.to(x.dtype), ddelta, dA.reshape(A.shape).to(A.dtype), dBC.to(BC.dtype), dD.reshape(D.shape).to(D.dtype),
            dbias.reshape(delta_bias.shape).to(delta_bias.dtype))


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("dermomamba_triton::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                       deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """1-D scan: (out in u's dtype, last_state (batch, dim, N) fp32, chunk states for the backward)."""
    return _ss_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, deterministic):
    batch, dim, length = u.shape
    nstate = A.shape[1]
    geo = _ss_geometry(int(length), u.device)
    npad = max(2, _next_pow2(int(nstate)))
    return (u.new_empty(u.shape), u.new_empty((batch, dim, nstate), dtype=torch.float32),
            u.new_empty((batch, 1, dim, geo.nchunks, npad), dtype=torch.float32))


@torch.library.custom_op("dermomamba_triton::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool, chunk_states: Tensor,
                       deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); empty for absent optional inputs.

    Always deterministic (no float atomics); ``deterministic`` is accepted for the common interface.
    """
    return _ss_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states)


@selective_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, deterministic):
    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), D.new_empty(D.shape) if D is not None else u.new_empty(0),
            z.new_empty(z.shape) if z is not None else u.new_empty(0),
            delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else u.new_empty(0))


def _ss_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, deterministic = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.deterministic = deterministic


def _ss_autograd_backward(ctx, dout, dlast_state, dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, dbias = torch.ops.dermomamba_triton.selective_scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, ctx.deterministic)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None, None)


selective_scan_fwd.register_autograd(_ss_autograd_backward, setup_context=_ss_setup_context)


@torch.library.custom_op("dermomamba_triton::multiaxial_scan_fwd", mutates_args=())
def multiaxial_scan_fwd(x: Tensor, delta: Tensor, A: Tensor, BC: Tensor, D: Tensor, delta_bias: Tensor,
                        delta_softplus: bool, deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """SS2D scan core: (y (batch, D, H, W) fp32, row-order chunk states, column-order chunk states).

    x (batch, D, H, W) any strides; delta (batch, 4, D, H, W) and BC (batch, 4, 2N, H, W) (B's rows, then
    C's) in the native (h, w) layout, any strides; A (4 D, N); D, delta_bias (4 D,).
    """
    return _multiaxial_forward(x, delta, A, BC, D, delta_bias, delta_softplus)


@multiaxial_scan_fwd.register_fake
def _(x, delta, A, BC, D, delta_bias, delta_softplus, deterministic):
    batch, dim, height, width = x.shape
    npad = max(2, _next_pow2(int(A.shape[1])))
    rows, cols = _orientations(int(height), int(width), x.device)
    return (x.new_empty(x.shape, dtype=torch.float32),
            x.new_empty((batch, 2, dim, rows.nchunks, npad), dtype=torch.float32),
            x.new_empty((batch, 2, dim, cols.nchunks, npad), dtype=torch.float32))


@torch.library.custom_op("dermomamba_triton::multiaxial_scan_bwd", mutates_args=())
def multiaxial_scan_bwd(dy: Tensor, x: Tensor, delta: Tensor, A: Tensor, BC: Tensor, D: Tensor,
                        delta_bias: Tensor, delta_softplus: bool, states_rows: Tensor, states_cols: Tensor,
                        deterministic: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, ddelta, dA, dBC, dD, ddelta_bias); always deterministic (no float atomics)."""
    return _multiaxial_backward(dy, x, delta, A, BC, D, delta_bias, delta_softplus, states_rows, states_cols)


@multiaxial_scan_bwd.register_fake
def _(dy, x, delta, A, BC, D, delta_bias, delta_softplus, states_rows, states_cols, deterministic):
    return (x.new_empty(x.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), BC.new_empty(BC.shape),
            D.new_empty(D.shape), delta_bias.new_empty(delta_bias.shape))


def _ma_setup_context(ctx, inputs, output):
    x, delta, A, BC, D, delta_bias, delta_softplus, deterministic = inputs
    ctx.save_for_backward(x, delta, A, BC, D, delta_bias, output[1], output[2])
    ctx.delta_softplus = delta_softplus
    ctx.deterministic = deterministic


def _ma_autograd_backward(ctx, dy, dstates_rows, dstates_cols):
    x, delta, A, BC, D, delta_bias, states_rows, states_cols = ctx.saved_tensors
    grads = torch.ops.dermomamba_triton.multiaxial_scan_bwd(
        dy, x, delta, A, BC, D, delta_bias, ctx.delta_softplus, states_rows, states_cols, ctx.deterministic)
    return tuple(grads) + (None, None)


multiaxial_scan_fwd.register_autograd(_ma_autograd_backward, setup_context=_ma_setup_context)
