"""tests/test_selective_scan_cuda.py's checks of the staged backward on CPU: the multiaxial ops replaced by the
emulated staged forward and the emulated staged backward (check.py, check_bwd.py), check_multiaxial's
measured tolerances (every gradient against float64 via the reference's autograd) as on the GPU.
tests' scan64 is swapped for its linear-time twin (check_bwd.scan64_linear): same float64 arithmetic.

  python gpu_tests_on_cpu_bwd.py [quick]     (quick: fp32 only)
"""
import os, sys, types, torch
import check as E
import check_bwd as EB
import test_selective_scan_cuda as T

RUNS = [0]


def fwd(x, delta, A, B, C, D, bias, softplus, chunk):
    inp = dict(x=x, delta=delta, A=A, B=B, C=C, D=D, delta_bias=bias)
    y, states, _ = E.emu_forward(inp, softplus, chunk, concurrent=8, seed=RUNS[0], delay_permille=20)
    RUNS[0] += 1
    return y, states


def bwd(dy, x, delta, A, B, C, D, bias, softplus, states, chunk, deterministic):
    inp = dict(x=x, delta=delta, A=A, B=B, C=C, D=D, delta_bias=bias)
    grads, _ = EB.emu_backward(inp, dy, states, softplus, chunk, deterministic, concurrent=8, seed=RUNS[0],
                               delay_permille=20)
    RUNS[0] += 1
    return grads


T.ops = lambda: types.SimpleNamespace(multiaxial_scan_fwd=fwd, multiaxial_scan_bwd=bwd)
T.scan64 = EB.scan64_linear
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
dtypes = [torch.float32] if sys.argv[1:] == ["quick"] else T.DTYPES
done = 0
for case in T.STAGED_BWD_CASES:
    batch, dim, height, width, dstate, chunk, wrapper_bc = case
    for dtype in dtypes:
        for deterministic in (False, True):
            inp = T.make_multiaxial(batch, dim, height, width, dstate, dtype)
            if wrapper_bc:
                inp = T.wrapper_layout(inp)
            T.check_multiaxial(inp, softplus=True, tag=f"staged-bwd/{dtype}/{case}/det{int(deterministic)}",
                               chunk=chunk, deterministic=deterministic)
            done += 1
            print("passed", case, dtype, "deterministic" if deterministic else "atomic", flush=True)
for det in (False, True):
    T.check_multiaxial(T.make_multiaxial(1, 32, 10, 7, 8, torch.float32, permuted=True), softplus=True,
                       tag="permuted", chunk=32, deterministic=det); done += 1
T.check_multiaxial(T.make_multiaxial(1, 3, 8, 5, 5, torch.float32, softplus=False), softplus=False, tag="nosoftplus",
                   chunk=8); done += 1
print(f"all {done} checks passed ({RUNS[0]} emulated launches)")
