"""Drive the flat forward (scan v6: csrc/cuda/scan_flat_kernels.cuh, its real launchers, in the emulator) against
the CPU op and float64, with check.py's rule: y and chunk_states each within 2x the CPU fp32 op's error against
float64, + T.FP32_FLOOR.

Layouts of B / C (and x, delta):
  contiguous  state-major B / C (state stride H * W): the scalar path (kVector false)
  permuted    every input a channels-last view (make_multiaxial(permuted=True)): states adjacent, 16-byte
              aligned rows at N = 16, so the vector path
  wrapper     tests' wrapper_layout: views of one channel-last (batch, H, W, 4, 1 + 2N) projection, B one
              element past the row start: states adjacent but off 16 bytes, so the scalar path with stride 1
  xdbl        the extension's projection (selective_scan/extension.py, _projections): rows [B, C, dt, zeros]
              padded to a multiple of 8, so B and C rows on 16-byte boundaries: the vector path at N = 16
  xdbl_dt4    rows [dt (4 columns), B, C, zeros] padded to a multiple of 8: every stride a multiple of 8 but, in
              fp16 / bf16, B and C 8 bytes off 16: flat_vector_bc must refuse the vector path on the base
              pointers alone (a 16-byte load there stops the emulator, exit code 4)
Every input sits in a NaN guard zone (a read past a tensor turns y NaN); the projection's columns other than B
and C are NaN too (a B / C read that strays into dt or the padding shows). y is zeroed as the host does and
chunk_states NaN-poisoned, both inside sentinel guard zones that must stay untouched.

  python check_flat.py                one case
"""
import ctypes, os, time
import torch
import check as E  # noqa: F401  (sys.path, the CPU op, T with DEVICE = "cpu")
from check import KIND, P, lib, strides, DEFAULT_LIB
import test_selective_scan_cuda as T

GUARD = 64  # elements around every buffer: a multiple of 16 bytes for every dtype, so alignment is kept
SENTINEL = 1234.5
OPTION_NAMES = (("with_D", "noD", True), ("with_bias", "nobias", True), ("fp32_params", "fp32proj", False))
STATS = ("vector", "launches", "agg_x", "agg_y", "agg_z", "agg_threads", "carry_x", "carry_y", "carry_z",
         "carry_threads", "out_x", "out_y", "out_z", "out_threads", "scratch_guards_ok", "segment_slots")


def extent(shape, stride):
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0


def guarded(t, fill=float("nan")):
    """t's values at t's strides inside a buffer whose elements outside t are `fill`."""
    buf = torch.full((extent(t.shape, t.stride()) + 2 * GUARD,), fill, dtype=t.dtype)
    view = buf.as_strided(t.shape, t.stride(), GUARD)
    view.copy_(t)
    return view


def guard_intact(view):
    buf = torch.as_strided(view, (view.untyped_storage().nbytes() // view.element_size(),), (1,), 0)
    return bool((buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all())


def projection_layout(inp, rank, row_multiple, dt_first):
    """B, C as (batch, 4, N, H, W) views of one channel-last (batch, H, W, 4, rows) projection whose rows are
    [dt (rank), B, C] (dt_first: tests' wrapper_layout at rank 1, row_multiple 1) or the extension's [B, C, dt],
    padded to a multiple of row_multiple. Columns other than B and C are NaN."""
    batch, _, dstate, height, width = inp["B"].shape
    rows = -(-(rank + 2 * dstate) // row_multiple) * row_multiple
    b0 = rank if dt_first else 0
    c0 = b0 + dstate
    x_dbl = guarded(torch.full((batch, height, width, T.NUM_DIRECTIONS, rows), float("nan"), dtype=inp["B"].dtype))
    x_dbl[..., b0:b0 + dstate] = inp["B"].permute(0, 3, 4, 1, 2)
    x_dbl[..., c0:c0 + dstate] = inp["C"].permute(0, 3, 4, 1, 2)
    out = dict(inp)
    out["B"] = x_dbl[..., b0:b0 + dstate].permute(0, 3, 4, 1, 2)
    out["C"] = x_dbl[..., c0:c0 + dstate].permute(0, 3, 4, 1, 2)
    return out


def make_inputs(batch, dim, H, W, N, dtype, layout, softplus, with_D=True, with_bias=True, fp32_params=False):
    inp = T.make_multiaxial(batch, dim, H, W, N, dtype, fp32_params=fp32_params, permuted=(layout == "permuted"),
                            softplus=softplus)
    inp = {k: guarded(v) for k, v in inp.items()}
    if layout == "wrapper":
        inp = projection_layout(inp, rank=1, row_multiple=1, dt_first=True)
    elif layout == "xdbl":
        inp = projection_layout(inp, rank=max(1, -(-dim // 16)), row_multiple=8, dt_first=False)
    elif layout == "xdbl_dt4":
        inp = projection_layout(inp, rank=4, row_multiple=8, dt_first=True)
    if not with_D:
        inp["D"] = None
    if not with_bias:
        inp["delta_bias"] = None
    return inp


def emu_flat_forward(inp, softplus, chunk, concurrent=8, seed=1, delay_permille=0, libpath=DEFAULT_LIB,
                     atomic_yield_permille=100):
    """multiaxial_scan_fwd_cuda's flat branch: y zeroed, chunk_states NaN-poisoned (both in sentinel guards),
    the real scan_forward_multiaxial_flat launcher; returns (y, chunk_states, stats). atomic_yield_permille: how
    often a lane yields to its block's other lanes before an atomicAdd or a global __ldg and after a __shfl_sync
    (emu.cpp), so lanes interleave between barriers."""
    x, delta, A, B, C, D, bias = (inp[k] for k in ("x", "delta", "A", "B", "C", "D", "delta_bias"))
    if B.dtype != C.dtype:  # common_bc
        B, C = guarded(B.float()), guarded(C.float())
    batch, dim, H, W = x.shape
    N = A.shape[1]
    nch = -(-(H * W) // chunk)
    y = guarded(torch.zeros(batch, dim, H, W), fill=SENTINEL)
    states = guarded(torch.full((batch, 4, dim, nch, N), float("nan")), fill=SENTINEL)
    stats = (ctypes.c_long * len(STATS))()
    cfg = (ctypes.c_int * 14)(batch, dim, H, W, N, chunk, int(softplus), KIND[B.dtype], KIND[x.dtype],
                              KIND[delta.dtype], concurrent, seed, delay_permille, atomic_yield_permille)
    ptr = lambda t: P(t.data_ptr()) if t is not None else None  # noqa: E731
    A, D, bias = (guarded(t.contiguous()) if t is not None else None for t in (A, D, bias))
    rc = lib(libpath).flat_forward(cfg, ptr(x), strides(x), ptr(delta), strides(delta), ptr(B), strides(B), ptr(C),
                                   strides(C), ptr(A), ptr(D), ptr(bias), ptr(y), ptr(states), stats)
    assert rc == 0, f"scan_forward_multiaxial_flat returned CUDA error {rc}"
    stats = dict(zip(STATS, list(stats)))
    stats["output_guards_ok"] = guard_intact(y) and guard_intact(states)
    return y, states, stats


def check_case(case, concurrent=8, seed=None, delay_permille=0, libpath=DEFAULT_LIB, verbose=True):
    """case: (batch, dim, H, W, N, chunk, dtype, layout, softplus[, options]) with options a dict of
    with_D, with_bias, fp32_params. Returns (ok, row of the case table)."""
    batch, dim, H, W, N, chunk, dtype, layout, softplus = case[:9]
    options = case[9] if len(case) > 9 else {}
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    seed = seed if seed is not None else int.from_bytes(os.urandom(2), "little")
    inp = make_inputs(batch, dim, H, W, N, dtype, layout, softplus, **options)
    t0 = time.time()
    y, states, stats = emu_flat_forward(inp, softplus, chunk, concurrent, seed, delay_permille, libpath)
    secs = time.time() - t0
    # The op's view: absent D / delta_bias are zeros (the op's schema takes tensors; the kernel takes null).
    op_inp = dict(inp)
    for key in ("D", "delta_bias"):
        if op_inp[key] is None:
            op_inp[key] = torch.zeros(4 * dim)
    y_cpu, states_cpu = torch.ops.dermomamba.multiaxial_scan_fwd(
        op_inp["x"], op_inp["delta"], op_inp["A"], op_inp["B"], op_inp["C"], op_inp["D"], op_inp["delta_bias"],
        softplus, chunk)
    inp64 = {k: v.double() for k, v in op_inp.items()}
    y64 = T.multiaxial_op_ref(scan=T.scan64, softplus=softplus, **inp64)
    st64 = T.chunk_states_ref(op_inp, softplus, min(chunk, H * W), torch.float64)
    finite = bool(torch.isfinite(y).all() and torch.isfinite(states).all())
    first_zero = bool(torch.equal(states[:, :, :, 0], torch.zeros_like(states[:, :, :, 0])))
    e_y, e_y_cpu = T.rel_err(y, y64), T.rel_err(y_cpu, y64)
    e_s, e_s_cpu = T.rel_err(states, st64), T.rel_err(states_cpu, st64)
    ratio_y = e_y / (2 * e_y_cpu + T.FP32_FLOOR)
    ratio_s = e_s / (2 * e_s_cpu + T.FP32_FLOOR)
    guards = bool(stats["scratch_guards_ok"] and stats["output_guards_ok"])
    ok = finite and first_zero and guards and ratio_y <= 1 and ratio_s <= 1
    d_y, d_s = T.rel_err(y, y_cpu), T.rel_err(states, states_cpu)
    extra = ",".join(name for key, name, default in OPTION_NAMES if options.get(key, default) != default) or "-"
    row = dict(case=f"b{batch} d{dim} {H}x{W} N{N} chunk{chunk}", dtype=str(B_dtype(inp))[6:], layout=layout,
               softplus=int(softplus), options=extra, vector=stats["vector"], e_y=e_y, e_y_cpu=e_y_cpu, e_s=e_s,
               e_s_cpu=e_s_cpu, ratio_y=ratio_y, ratio_s=ratio_s, d_y=d_y, d_s=d_s, secs=secs, ok=ok)
    if verbose:
        print(f"{'PASS' if ok else 'FAIL'} {row['case']} B/C {row['dtype']} {layout} softplus={int(softplus)} "
              f"{extra} kVector={stats['vector']} | y err {e_y:.2e} (cpu op {e_y_cpu:.2e}, ratio {ratio_y:.2f}) "
              f"states err {e_s:.2e} (cpu op {e_s_cpu:.2e}, ratio {ratio_s:.2f}) | vs cpu op: y {d_y:.1e} "
              f"states {d_s:.1e} | finite {finite} first-chunk zero {first_zero} guards {guards} "
              f"| grids {stats['agg_x']}x{stats['agg_y']}x{stats['agg_z']}, carry {stats['carry_x']} "
              f"| {secs:.1f}s", flush=True)
    return ok, row, states


def B_dtype(inp):
    return inp["B"].dtype if inp["B"].dtype == inp["C"].dtype else torch.float32


if __name__ == "__main__":
    case = (1, 8, 70, 130, 16, 100, torch.float32, "xdbl", True)
    check_case(case)
