"""Drive the staged forward (real kernel source, emulator libemu.so) against the CPU op and float64."""
import ctypes, os, sys, time
import torch
REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "tests"))
# Built by build.sh (default location), or EMULATOR_LIB.
DEFAULT_LIB = os.environ.get("EMULATOR_LIB", os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "libemu.so"))
import dermomamba_kernels  # noqa: F401  (loads _C: the CPU op)
import test_selective_scan_cuda as T

T.DEVICE = "cpu"
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
P = ctypes.c_void_p
_libs = {}


def lib(path):
    if path not in _libs:
        _libs[path] = ctypes.CDLL(path)
    return _libs[path]


def strides(t):
    return (ctypes.c_int64 * t.dim())(*t.stride())


def emu_forward(inp, softplus, chunk, concurrent=3, seed=1, delay_permille=0, libpath=DEFAULT_LIB):
    """selective_scan_cuda.cpp's multiaxial_scan_fwd_cuda (staged branch), transcribed: y zeroed,
    chunk_states NaN-poisoned; returns (y, chunk_states, stats)."""
    x, delta, A, B, C, D, bias = (inp[k] for k in ("x", "delta", "A", "B", "C", "D", "delta_bias"))
    if B.dtype != C.dtype:
        B, C = B.float(), C.float()
    batch, dim, H, W = x.shape
    N = A.shape[1]
    L = H * W
    nch = -(-L // chunk)
    y = torch.zeros(batch, dim, H, W)
    states = torch.full((batch, 4, dim, nch, N), float("nan"))
    stats = (ctypes.c_long * 8)()
    cfg = (ctypes.c_int * 13)(batch, dim, H, W, N, chunk, int(softplus), KIND[B.dtype], KIND[x.dtype],
                              KIND[delta.dtype], concurrent, seed, delay_permille)
    A, D, bias = A.contiguous(), D.contiguous(), bias.contiguous()
    rc = lib(libpath).staged_forward(cfg, P(x.data_ptr()), strides(x), P(delta.data_ptr()), strides(delta),
                                     P(B.data_ptr()), strides(B), P(C.data_ptr()), strides(C), P(A.data_ptr()),
                                     P(D.data_ptr()), P(bias.data_ptr()), P(y.data_ptr()), P(states.data_ptr()),
                                     stats)
    assert rc == 0, "layout refused"
    names = ("blocks", "spins", "fence_delays", "tiles", "threads", "shared_bytes", "channel_blocks",
             "chunks_per_tile")
    return y, states, dict(zip(names, list(stats)))


def y_ref(inp, softplus, scan):
    return T.multiaxial_op_ref(scan=scan, softplus=softplus, **inp)


def rel(a, b):
    return T.rel_err(a, b)


def check_case(case, seed=1, concurrent=16, delay_permille=50, libpath=DEFAULT_LIB, verbose=True):
    batch, dim, H, W, N, chunk, dtype, layout, softplus = case
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    inp = T.make_multiaxial(batch, dim, H, W, N, dtype, permuted=(layout == "permuted"), softplus=softplus)
    if layout == "wrapper":
        inp = T.wrapper_layout(inp)
    t0 = time.time()
    y, states, stats = emu_forward(inp, softplus, chunk, concurrent, seed, delay_permille, libpath)
    secs = time.time() - t0
    ops = torch.ops.dermomamba
    y_cpu, states_cpu = ops.multiaxial_scan_fwd(inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"],
                                                inp["delta_bias"], softplus, chunk)
    inp64 = {k: v.double() for k, v in inp.items()}
    y64 = y_ref(inp64, softplus, T.scan64)
    st64 = T.chunk_states_ref(inp, softplus, min(chunk, H * W), torch.float64)
    ok = bool(torch.isfinite(y).all() and torch.isfinite(states).all())
    ok &= bool(torch.equal(states[:, :, :, 0], torch.zeros_like(states[:, :, :, 0])))
    e_y, e_y_cpu = rel(y, y64), rel(y_cpu, y64)
    e_s, e_s_cpu = rel(states, st64), rel(states_cpu, st64)
    ok &= e_y <= 2 * e_y_cpu + T.FP32_FLOOR and e_s <= 2 * e_s_cpu + T.FP32_FLOOR
    d_y, d_s = rel(y, y_cpu), rel(states, states_cpu)
    if verbose:
        print(f"{'PASS' if ok else 'FAIL'} {case[:6]} {str(dtype)[6:]} {layout} softplus={int(softplus)} "
              f"| y err {e_y:.2e} (cpu op {e_y_cpu:.2e}) states err {e_s:.2e} (cpu op {e_s_cpu:.2e}) "
              f"| vs cpu op: y {d_y:.1e} states {d_s:.1e} | {stats} | {secs:.1f}s", flush=True)
    return ok, states, stats


if __name__ == "__main__":
    case = (1, 8, 12, 11, 16, 16, torch.float32, "contiguous", True)
    check_case(case)
