"""The flat forward (scan v6) on cases.py-style shapes (check_flat.py's rule), then chunk_states bit-identical
over four schedules (no atomics touch them: the block order must not matter).

  python cases_flat.py [case indices...]      a table of every case (or those named)
"""
import os, sys, torch
import check_flat as F
import test_selective_scan_cuda as T

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
NO_D, NO_BIAS, NEITHER = dict(with_D=False), dict(with_bias=False), dict(with_D=False, with_bias=False)
# (batch, dim, H, W, N, chunk, dtype, layout, softplus[, options]). Segments are 64 positions of a line; a row
# direction's y goes through a 32-step transpose window.
CASES = [
    (1, 8, 70, 130, 16, 100, f32, "xdbl", True),            # lines > 64 (3 / 2 segments), chunk not k x 64, vector
    (2, 5, 33, 40, 16, 7, f32, "permuted", True),           # odd dim (a warp past dim), odd chunk, channels-last
    (1, 6, 23, 29, 13, 64, f32, "contiguous", True),        # N 13: idle states, state-major B / C
    (2, 8, 31, 26, 16, 128, f16, "wrapper", True),          # tests' wrapper layout (off 16 bytes): scalar stride 1
    (1, 8, 64, 48, 16, 128, bf16, "xdbl", True),            # bf16 vector path, lines of exactly 64 / 48
    (1, 3, 8, 5, 5, 8, f32, "contiguous", False, NEITHER),  # batch 1, N 5, no softplus, no D, no delta_bias
    (2, 9, 5, 7, 16, 1000, f16, "xdbl", True),              # chunk >= L, fp16 vector path, 3 channel groups
    (1, 8, 1, 300, 16, 16, f32, "contiguous", True),        # H = 1: one row of 5 segments, columns of 1
    (1, 8, 300, 1, 16, 16, bf16, "permuted", True),         # W = 1
    (1, 16, 40, 60, 16, 40, f16, "permuted", True, NO_D),   # fp16 channels-last, no D
    (1, 4, 130, 70, 8, 96, bf16, "contiguous", True, NO_BIAS),  # N 8, columns > 64, bf16 state-major
    (3, 4, 65, 33, 16, 65, f32, "wrapper", False),          # lines of 65 (a 1-step segment), no softplus
    (1, 2, 97, 3, 16, 3, f16, "contiguous", True),          # chunk 3: a chunk boundary at most steps
    (1, 8, 45, 70, 16, 64, bf16, "xdbl", True, dict(fp32_params=True)),  # bf16 x, fp32 delta / B / C: vector fp32
    (2, 4, 129, 33, 16, 50, bf16, "wrapper", True),         # 5 row line groups (idle lanes), bf16 scalar stride 1
    (1, 8, 192, 256, 16, 128, bf16, "xdbl", True),          # DermoMamba's first stage, one image (~20 s)
    (2, 4, 37, 70, 16, 64, f16, "xdbl_dt4", True),          # strides k x 16 bytes, B / C 8 bytes off: scalar path
    (1, 4, 37, 70, 16, 64, f32, "xdbl_dt4", True),          # the same in fp32: 16 bytes in, the vector path
    # v6.1 (warp-gathered B / C rows, the row directions' x / delta tile, idle lanes kept for the gathers):
    (1, 3, 45, 100, 16, 32, f16, "permuted", True),         # fp16 vector, idle warp, rows 64 + 36 (window inside
                                                            # the 2nd segment), columns 45 (32 + 13), idle lanes
    (2, 5, 70, 20, 16, 24, bf16, "contiguous", True),       # scalar path, rows of 20 (< a window), 3 row groups
    (1, 7, 100, 45, 16, 50, f32, "permuted", False, NO_BIAS),  # fp32 vector, transposed shape of the f16 case
]


def table(rows):
    """Ratios: the check (err / (2 x cpu op err + floor), must be <= 1) and the bare err / cpu op err."""
    print("\n| case | B/C dtype | layout | softplus | options | kVector | y: err / bound | y: err / cpu err | "
          "states: err / bound | states: err / cpu err | y vs cpu op | states vs cpu op | |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    bare = lambda e, e_cpu: f"{e / e_cpu:.2f}" if e_cpu > 0 else ("0 / 0" if e == 0 else "inf")  # noqa: E731
    for r in rows:
        print(f"| {r['case']} | {r['dtype']} | {r['layout']} | {r['softplus']} | {r['options']} | {r['vector']} | "
              f"{r['ratio_y']:.3f} | {bare(r['e_y'], r['e_y_cpu'])} | {r['ratio_s']:.3f} | "
              f"{bare(r['e_s'], r['e_s_cpu'])} | {r['d_y']:.1e} | {r['d_s']:.1e} | {'PASS' if r['ok'] else 'FAIL'} |")


def determinism(case):
    batch, dim, H, W, N, chunk, dtype, layout, softplus = case[:9]
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    inp = F.make_inputs(batch, dim, H, W, N, dtype, layout, softplus)
    runs = [F.emu_flat_forward(inp, softplus, chunk, concurrent=c, seed=s, delay_permille=0)
            for c, s in ((1, 1), (16, 2), (8, 3), (24, 4))]
    same = all(torch.equal(runs[0][1], r[1]) for r in runs[1:])
    y_diff = max((r[0] - runs[0][0]).abs().max().item() for r in runs[1:])
    print(f"{case[:6]} {layout}: chunk_states bit-identical over 4 schedules: {same} | y max abs diff (atomic "
          f"order): {y_diff:.1e}", flush=True)
    return same


def refuses_large_state():
    """N > flat::kStates: the launcher returns cudaErrorInvalidValue (1) and launches nothing (the host glue
    raises a clear error before that)."""
    inp = F.make_inputs(1, 4, 6, 5, 17, torch.float32, "contiguous", True)
    try:
        F.emu_flat_forward(inp, True, 8)
    except AssertionError as e:
        ok = "CUDA error 1" in str(e)
    else:
        ok = False
    print(f"N = 17 refused by scan_forward_multiaxial_flat: {ok}", flush=True)
    return ok


if __name__ == "__main__":
    which = [int(a) for a in sys.argv[1:]] or range(len(CASES))
    rows = [F.check_case(CASES[i])[1] for i in which]
    table(rows)
    fails = sum(not r["ok"] for r in rows)
    if not sys.argv[1:]:
        fails += sum(not determinism(CASES[i]) for i in (0, 3))
        fails += not refuses_large_state()
    print("FAILS", fails)
    sys.exit(1 if fails else 0)
