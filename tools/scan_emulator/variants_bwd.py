"""The staged backward's compile-time variants (DERMOMAMBA_STAGED_BWD_VARIANT, scan_staged_layout.h) on the
emulator: each lean variant against float64 and the CPU op (check_bwd.check_case's rule), against today's
kernel (v4) on the same inputs and chunk_states, and bit-identical over four schedules in deterministic mode.

What must hold against v4 (deterministic mode, so that no atomic order differs): every gradient within float
rounding (relative difference of norms at most 1e-6 for fp32 gradients, the gradient dtype's epsilon for 16-bit
ones). Where both run the same tiles (one sub-chunk per tile in v4 too: d 16 at chunk 128, the EXACT_CASES),
dx, ddelta, dA, dD and ddelta_bias must be bit-identical: the lean walk B runs the same operations in the same
order (only where h_{t-1} waits and when the butterfly's first round runs differ); dB and dC differ in rounding
(the channels are summed in pairs first, then the pairs in slot order). Elsewhere a lean tile is one sub-chunk
where v4's has two, so the look-back composes the adjoint maps in another grouping (rounding only).

  python variants_bwd.py [lean lean80]        (default: both lean variants)
"""
import os, sys, time
import torch
import check_bwd as EB
from cases import CASES

VARIABLE = "DERMOMAMBA_STAGED_BWD_VARIANT"
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
EXACT = ("x", "delta", "A", "D", "delta_bias")
# Where the lean kernels run (N <= 16, chunk_size a multiple of 16): cases.py's 0 (20 tiles, two reverse
# milestones, 4 chunks per sub-chunk, a short last block), 3 (DermoMamba's chunk and B / C layout, short last
# chunk), 4 (bf16), 5 (d 40: three channel blocks, dB / dC atomics or partials), 8 (H = 1), 9 (W = 1, permuted),
# plus odd shapes of their own:
LEAN_CASES = [CASES[i] for i in (0, 3, 4, 5, 8, 9)] + [
    (2, 5, 33, 40, 16, 16, f32, "permuted", True),     # odd dim: an idle odd slot in the dB / dC pair sum
    (1, 3, 8, 6, 5, 16, f32, "contiguous", False),     # N 5 (idle states), no softplus, one tile
    (1, 16, 40, 61, 16, 48, f16, "wrapper", True),     # d 16 (8 warps per sub-chunk), chunk 48, fp16
    (2, 9, 17, 9, 16, 32, bf16, "permuted", True),     # odd dim, bf16, batch 2
]
# v4 runs one sub-chunk per tile here as well (16 channels: 8 warps per sub-chunk, 86 KB): the same tiles.
EXACT_CASES = [(1, 16, 24, 40, 16, 128, f32, "wrapper", True), (2, 16, 13, 20, 16, 64, bf16, "contiguous", True)]
# Where a lean variant falls back to v4's layout and kernel (the check still runs: same results as v4).
FALLBACK_CASES = [CASES[1], CASES[2]]  # chunk 7; N 20 (32-lane groups)


def with_variant(variant, fn, *args, **kwargs):
    old = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = variant
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            del os.environ[VARIABLE]
        else:
            os.environ[VARIABLE] = old


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare_with_v4(case, variant, inputs, exact=False):
    """Deterministic-mode gradients of `variant` and of v4 on the same inputs and chunk_states."""
    inp, dy = inputs
    chunk, softplus = case[5], case[8]
    _, states = torch.ops.dermomamba.multiaxial_scan_fwd(inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"],
                                                         inp["D"], inp["delta_bias"], softplus, chunk)
    g4, s4 = with_variant("v4", EB.emu_backward, inp, dy, states, softplus, chunk, True, concurrent=8, seed=3)
    gv, sv = with_variant(variant, EB.emu_backward, inp, dy, states, softplus, chunk, True, concurrent=8, seed=4)
    report, ok = [], True
    for name, a, b in zip(EB.GRAD_NAMES, gv, g4):
        same = torch.equal(a, b)
        if (exact and name in EXACT) or sv["variant"] == 0:
            ok &= same
        tolerance = 1e-6 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps
        ok &= rel(a, b) <= tolerance
        report.append(f"d{name} {'==' if same else f'{rel(a, b):.1e}'}")
    return ok, sv, "; ".join(report)


def determinism(case, variant, inputs):
    inp, dy = inputs
    chunk, softplus = case[5], case[8]
    _, states = torch.ops.dermomamba.multiaxial_scan_fwd(inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"],
                                                         inp["D"], inp["delta_bias"], softplus, chunk)
    runs = [with_variant(variant, EB.emu_backward, inp, dy, states, softplus, chunk, True, concurrent=c, seed=s,
                         delay_permille=d)
            for c, s, d in ((1, 1, 0), (16, 2, 50), (8, 3, 200), (24, 4, 20))]
    return all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0][0], r[0])), [r[1]["spins"] for r in runs]


if __name__ == "__main__":
    variants = sys.argv[1:] or ["lean", "lean80"]
    fails = 0
    t0 = time.time()
    for i, case in enumerate(LEAN_CASES + EXACT_CASES + FALLBACK_CASES):
        inputs = EB.make_inputs(case)
        refs = EB.references(*inputs, case[-1])
        for variant in variants:
            for deterministic in (False, True):
                ok, _, stats = with_variant(variant, EB.check_case, case, deterministic, seed=i * 2 + deterministic,
                                            refs=refs, inputs=inputs)
                fails += not ok
            ok, stats, report = compare_with_v4(case, variant, inputs, exact=case in EXACT_CASES)
            fails += not ok
            print(f"{'PASS' if ok else 'FAIL'} {variant} vs v4 {case[:6]} {str(case[6])[6:]} {case[7]} (ran variant "
                  f"{stats['variant']}, {stats['threads']} threads, {stats['shared_bytes']} B): {report}", flush=True)
    for case in (CASES[0], CASES[5], LEAN_CASES[6]):
        inputs = EB.make_inputs(case)
        for variant in variants:
            same, spins = determinism(case, variant, inputs)
            fails += not same
            print(f"{'PASS' if same else 'FAIL'} {variant} {case[:6]} deterministic gradients bit-identical over 4 "
                  f"schedules: {same} | spins {spins}", flush=True)
    print(f"FAILS {fails} ({time.time() - t0:.0f} s)")
