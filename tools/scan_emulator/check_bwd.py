"""Drive the staged backward (real kernel source, emulator libemu.so) against the CPU op and float64.

The host glue of multiaxial_scan_bwd_cuda's staged branch is transcribed here: outputs poisoned with NaN
(dx zeroed for the atomic mode), dB / dC per grad_bc_mode (plain stores for one channel block, else fp32
atomics or per-block partials), then the host's fixed-order sums.

  python check_bwd.py            # one case
"""
import ctypes, os, sys, time
import torch
import torch.nn.functional as F
import check as E
from check import KIND, P, lib, strides, DEFAULT_LIB
import test_selective_scan_cuda as T

GRAD_NAMES = ("x", "delta", "A", "B", "C", "D", "delta_bias")
GRAD_BC_DIRECT, GRAD_BC_ATOMIC, GRAD_BC_PARTIALS = 0, 1, 2


def emu_backward(inp, dy, states, softplus, chunk, deterministic, concurrent=3, seed=1, delay_permille=0,
                 libpath=DEFAULT_LIB):
    """multiaxial_scan_bwd's seven gradients from the emulated staged backward; returns (grads, stats)."""
    x, delta, A, B_in, C_in, D, bias = (inp[k] for k in ("x", "delta", "A", "B", "C", "D", "delta_bias"))
    B, C = (B_in, C_in) if B_in.dtype == C_in.dtype else (B_in.float(), C_in.float())
    batch, dim, H, W = x.shape
    N = A.shape[1]
    L = H * W
    nch = -(-L // chunk)
    blocks_per_group = lib(libpath).staged_bwd_channel_blocks(dim, N, min(chunk, L), nch)
    assert blocks_per_group > 0, "layout refused"
    nan = float("nan")
    ddelta = torch.full(delta.shape, nan, dtype=delta.dtype)
    dx_accum = dx_planes = None
    if deterministic:
        dx_planes = torch.full((4, batch, dim, H, W), nan)
    else:
        dx_accum = torch.zeros(batch, dim, H, W)
    dB_final = torch.full(B.shape, nan, dtype=B.dtype)
    dC_final = torch.full(C.shape, nan, dtype=C.dtype)
    if blocks_per_group == 1:
        mode, dB_buf, dC_buf = GRAD_BC_DIRECT, dB_final, dC_final
    elif not deterministic:
        mode, dB_buf, dC_buf = GRAD_BC_ATOMIC, torch.zeros(B.shape), torch.zeros(C.shape)
    else:
        mode = GRAD_BC_PARTIALS
        dB_buf = torch.full((batch, 4, blocks_per_group, N, L), nan)
        dC_buf = torch.full((batch, 4, blocks_per_group, N, L), nan)
    dA_partial = torch.full((batch, 4 * dim, nch, N), nan)
    dD_partial = torch.full((batch, 4 * dim, nch), nan)
    dbias_partial = torch.full((batch, 4 * dim, nch), nan)
    states = states.contiguous()
    stats = (ctypes.c_long * 9)()
    cfg = (ctypes.c_int * 15)(batch, dim, H, W, N, chunk, int(softplus), KIND[B.dtype], KIND[x.dtype],
                              KIND[delta.dtype], concurrent, seed, delay_permille, KIND[dy.dtype], mode)
    A, D, bias = A.contiguous(), D.contiguous(), bias.contiguous()

    def ptr(t):
        return P(None if t is None else t.data_ptr())

    rc = lib(libpath).staged_backward(cfg, P(x.data_ptr()), strides(x), P(delta.data_ptr()), strides(delta),
                                      P(B.data_ptr()), strides(B), P(C.data_ptr()), strides(C), P(A.data_ptr()),
                                      P(D.data_ptr()), P(bias.data_ptr()), P(dy.data_ptr()), strides(dy),
                                      P(states.data_ptr()), ptr(dx_accum), ptr(dx_planes), P(ddelta.data_ptr()),
                                      P(dB_buf.data_ptr()), P(dC_buf.data_ptr()), P(dA_partial.data_ptr()),
                                      P(dD_partial.data_ptr()), P(dbias_partial.data_ptr()), stats)
    assert rc == 0, "layout refused"
    if mode != GRAD_BC_DIRECT:
        dB, dC = (dB_buf.sum(2), dC_buf.sum(2)) if mode == GRAD_BC_PARTIALS else (dB_buf, dC_buf)
        dB_final.copy_(dB.view(dB_final.shape))
        dC_final.copy_(dC.view(dC_final.shape))
    dx = dx_planes.sum(0) if deterministic else dx_accum
    grads = (dx.to(x.dtype), ddelta, dA_partial.sum((0, 2)), dB_final.to(B_in.dtype), dC_final.to(C_in.dtype),
             dD_partial.sum((0, 2)), dbias_partial.sum((0, 2)))
    names = ("blocks", "spins", "fence_delays", "tiles", "threads", "shared_bytes", "channel_blocks",
             "chunks_per_tile", "variant")
    return grads, dict(zip(names, list(stats)))


def scan64_linear(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """tests' scan64 (float64 selective scan, B / C (batch, groups, N, L)) with the time axis split once
    (as selective_scan_ref does): indexing [..., t] per step makes autograd's backward quadratic in L,
    hours on a CPU at L = 5110."""
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim = u.shape[1]
    Bf, Cf = (M.double().repeat_interleave(dim // M.shape[1], dim=1) for M in (B, C))
    state = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), Bf.unbind(-1), Cf.unbind(-1)):
        state = torch.exp(delta_t[..., None] * A) * state + (delta_t * u_t)[..., None] * B_t
        ys.append((state * C_t).sum(-1))
    out = torch.stack(ys, -1)
    if D is not None:
        out = out + u * D.double()[:, None]
    return out, state


def references(inp, dy, softplus):
    """Gradients of the float32 reference (the GPU tests' low-precision reference) and of float64."""
    def ref_lowp(**kw):
        return T.multiaxial_op_ref(scan=T.selective_scan_ref, softplus=softplus, **{k: v.float() for k, v in kw.items()})

    def ref_hi(**kw):
        return T.multiaxial_op_ref(scan=scan64_linear, softplus=softplus, **kw)

    _, g32 = T.reference_grads(ref_lowp, inp, dy)
    _, g64 = T.reference_grads(ref_hi, {k: v.double() for k, v in inp.items()}, dy.double())
    return g32, g64


def make_inputs(case):
    batch, dim, H, W, N, chunk, dtype, layout, softplus = case
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    inp = T.make_multiaxial(batch, dim, H, W, N, dtype, permuted=(layout == "permuted"), softplus=softplus)
    if layout == "wrapper":
        inp = T.wrapper_layout(inp)
    dy = torch.randn(batch, dim, H, W)
    return inp, dy


def check_case(case, deterministic, seed=1, concurrent=16, delay_permille=50, libpath=DEFAULT_LIB, verbose=True,
               refs=None, inputs=None):
    """Every gradient of the emulated staged backward (on the CPU op's chunk_states) within 2x the float32
    reference's error against float64 (+ FP32_FLOOR), and within 2x the CPU op backward's error."""
    batch, dim, H, W, N, chunk, dtype, layout, softplus = case
    inp, dy = inputs if inputs is not None else make_inputs(case)
    ops = torch.ops.dermomamba
    args = (inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"], softplus)
    _, states = ops.multiaxial_scan_fwd(*args, chunk)
    t0 = time.time()
    grads, stats = emu_backward(inp, dy, states, softplus, chunk, deterministic, concurrent, seed, delay_permille,
                                libpath)
    secs = time.time() - t0
    cpu = ops.multiaxial_scan_bwd(dy, *args, states, chunk, deterministic)
    g32, g64 = refs if refs is not None else references(inp, dy, softplus)
    ok = True
    worst = []
    for name, g, c in zip(GRAD_NAMES, grads, cpu):
        good = bool(torch.isfinite(g).all()) and g.dtype == inp[name].dtype and g.shape == inp[name].shape
        e, e32, ecpu = T.rel_err(g, g64[name]), T.rel_err(g32[name], g64[name]), T.rel_err(c, g64[name])
        good &= e <= 2 * e32 + T.FP32_FLOOR and e <= 2 * ecpu + T.FP32_FLOOR
        ok &= good
        worst.append(f"d{name} {e:.1e}/{e32:.1e}/{ecpu:.1e}{'' if good else ' FAIL'}")
    if verbose:
        print(f"{'PASS' if ok else 'FAIL'} {case[:6]} {str(dtype)[6:]} {layout} sp={int(softplus)} det={int(deterministic)} "
              f"| err/fp32 ref/cpu op: {'; '.join(worst)} | tiles {stats['tiles']} thr {stats['threads']} "
              f"cb {stats['channel_blocks']} var {stats['variant']} smem {stats['shared_bytes']} spins {stats['spins']} "
              f"| {secs:.1f}s", flush=True)
    return ok, grads, stats


if __name__ == "__main__":
    check_case((1, 8, 12, 11, 16, 16, torch.float32, "contiguous", True), deterministic=True)
