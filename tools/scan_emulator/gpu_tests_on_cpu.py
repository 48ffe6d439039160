"""tests/test_selective_scan_cuda.py's multiaxial checks on CPU with the forward op replaced by the staged
kernel in the emulator (the backward: the CPU op, reading the emulated kernel's chunk_states), measured
tolerances as on the GPU. EMU_FWD_KERNEL=flat: the flat forward (scan v6, check_flat.py) instead, its cases
with N > 16 (which it refuses) skipped and counted; =regs: the v5 forward (emu.cpp)."""
import os, sys, types, torch
import check as E
import check_flat
import test_selective_scan_cuda as T

FLAT = os.environ.get("EMU_FWD_KERNEL") == "flat"
FLAT_MAX_STATES = 16

real = torch.ops.dermomamba
N_RUNS = [0]


def fwd(x, delta, A, B, C, D, bias, softplus, chunk):
    inp = dict(x=x, delta=delta, A=A, B=B, C=C, D=D, delta_bias=bias)
    if FLAT:
        y, states, _ = check_flat.emu_flat_forward(inp, softplus, chunk, concurrent=8, seed=N_RUNS[0] + 1)
    else:
        y, states, _ = E.emu_forward(inp, softplus, chunk, concurrent=8, seed=N_RUNS[0], delay_permille=20)
    N_RUNS[0] += 1
    return y, states


T.ops = lambda: types.SimpleNamespace(multiaxial_scan_fwd=fwd, multiaxial_scan_bwd=real.multiaxial_scan_bwd)
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
done = skipped = 0
for dtype in T.DTYPES:
    for hw in [(5, 7), (9, 4), (1, 13), (12, 11)]:
        T.check_multiaxial(T.make_multiaxial(2, 8, hw[0], hw[1], 16, dtype), softplus=True, tag=f"parity/{dtype}/{hw}",
                           chunk=16); done += 1
for dtype in (torch.float16, torch.bfloat16):
    T.check_multiaxial(T.make_multiaxial(1, 4, 6, 9, 16, dtype, fp32_params=True), softplus=True, tag="fp32proj",
                       chunk=16); done += 1
for det in (False, True):
    T.check_multiaxial(T.make_multiaxial(1, 32, 10, 7, 8, torch.float32, permuted=True), softplus=True,
                       tag="permuted", chunk=32, deterministic=det); done += 1
for column in (True, False):
    inp = T.make_multiaxial(2, 8, 1, 11, 16, torch.float32) if column else T.make_multiaxial(2, 8, 11, 1, 16, torch.float32)
    for key in ("x", "delta", "B", "C"):
        inp[key] = inp[key].transpose(-2, -1)
    T.check_multiaxial(inp, softplus=True, tag="one-row-col", chunk=4); done += 1
T.check_multiaxial(T.make_multiaxial(1, 3, 8, 5, 5, torch.float32, softplus=False), softplus=False, tag="nosoftplus",
                   chunk=8); done += 1
# test_multiaxial_forward_y_and_chunk_states's body, every LANE_CASE x dtype
for case in T.LANE_CASES:
    batch, dim, height, width, dstate, chunk, wrapper_bc = case
    if FLAT and dstate > FLAT_MAX_STATES:
        skipped += len(T.DTYPES)
        continue
    for dtype in T.DTYPES:
        inp = T.make_multiaxial(batch, dim, height, width, dstate, dtype)
        if wrapper_bc:
            inp = T.wrapper_layout(inp)
        y, states = fwd(inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"], True, chunk)
        length = height * width
        assert states.shape == (batch, 4, dim, -(-length // min(chunk, length)), dstate)
        assert torch.isfinite(y).all() and torch.isfinite(states).all()
        assert torch.equal(states[:, :, :, 0], torch.zeros_like(states[:, :, :, 0]))
        tag = f"ma-{'flat' if FLAT else 'staged'}/{dtype}/{case}"
        T.assert_close_measured(f"{tag}/chunk_states", states, T.chunk_states_ref(inp, True, min(chunk, length), torch.float32),
                                T.chunk_states_ref(inp, True, min(chunk, length), torch.float64))
        T.check_multiaxial(inp, softplus=True, tag=tag, chunk=chunk); done += 1
print(f"all {done} checks passed ({N_RUNS[0]} emulated {'flat' if FLAT else 'staged'} forwards"
      + (f"; {skipped} with N > {FLAT_MAX_STATES} skipped: the flat forward refuses them)" if FLAT else ")"))
