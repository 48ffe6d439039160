"""The CBAM small-path kernels (csrc/cuda/cbam_small.cu) run by the emulator against the fp64 reference,
with the GPU tests' tolerance rule (tests/cbam_parity.py): error <= 2 x the error of the reference run in
the same precision (largest over the summation orders) + a floor.

    sh tools/cbam_emulator/build.sh && python tools/cbam_emulator/check.py [case-name ...]

Every case is a fresh random draw; outputs and scratch start as NaN (an unwritten element fails).
The cases cover what the GPU tests cannot reach on a CPU: several channel groups per image (the grid-wide
phases), a last group with fewer channels, more own channels than threads, more hidden units than warps,
H x W above the block size, 1x1 and one-row images, k = 3, batch 1, eval, fp16 / bf16, 16-byte and scalar
loads, channels-last strides, tied maxima.
"""

import ctypes
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from cbam_parity import NAMES, SUMMATION_ORDERS, Case, relative_error, tolerance  # noqa: E402

LIB = ctypes.CDLL(os.path.join(HERE, "build", "libcbamemu.so"))
LIB.cbam_small_emulate.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_float,
                                   ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p)]
KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VECTOR_BYTES = 16
MOMENTUM, EPS = 0.1, 1e-5  # Case.run's


def nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def pixel_strides(t):
    return [t.stride(0), t.stride(1), t.stride(3) if t.size(3) != 1 else t.stride(2)]


def vector_ok(t, hw):
    width = VECTOR_BYTES // t.element_size()
    return (hw % width == 0 and pixel_strides(t)[2] == 1 and t.stride(1) % width == 0 and t.stride(0) % width == 0
            and t.data_ptr() % VECTOR_BYTES == 0)


def emulate(case, dtype, training, groups, channels_last=False, seed=1):
    """Output, every gradient and the updated running stats (fp64) of the emulated small path."""
    B, C, H, W = case.x.shape
    hw, hidden, ksize = H * W, case.params[0].shape[0], case.params[4].shape[-1]
    group_channels = math.ceil(C / groups)
    groups = math.ceil(C / group_channels)  # no empty group (cbam_cuda.cpp's plan_small)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = case.x.to(dtype).contiguous(memory_format=fmt)
    grad = case.grad.to(dtype).contiguous(memory_format=fmt)
    params = [p.to(dtype).contiguous() for p in case.params]
    running = [r.to(dtype).clone() for r in case.running]
    out = torch.empty_like(x).fill_(float("nan"))
    dx = torch.empty_like(x).fill_(float("nan"))
    cs, chan, pix, stats = nan(B, C), nan(B, 3, C), nan(B, 4, hw), nan(4)
    d_params = [torch.full_like(p, float("nan")) for p in params]
    vec = all(vector_ok(t, hw) for t in (x, grad, out, dx))
    cfg = (ctypes.c_int * 13)(B, C, H, W, hidden, ksize, int(training), KIND[dtype], int(vec), groups, group_channels,
                              KIND[dtype], seed)
    strides = (ctypes.c_int64 * 9)(*pixel_strides(x), *pixel_strides(grad), *pixel_strides(out))

    def run(direction, target, small_parts, small_image, conv_wparts, d_logit, hidden_buf):
        keep = [x, grad, target, *params, *running, cs, chan, pix, stats, small_parts, small_image, conv_wparts,
                d_logit, hidden_buf, *d_params]
        ptrs = (ctypes.c_void_p * len(keep))(*[t.data_ptr() for t in keep])
        LIB.cbam_small_emulate(direction, cfg, EPS, strides, ptrs)

    run(0, out, nan(groups * B * 3 * hw), nan(B * 3), nan(1), nan(1), nan(1))
    stats_forward = stats.clone()
    run(1, dx, nan(groups * B * hw), nan(B * 2), nan(2 * ksize * ksize * B), nan(B * C), nan(B * 3 * hidden))
    assert torch.allclose(stats, stats_forward, rtol=0, atol=0, equal_nan=True), "the backward wrote the saved statistics"
    if training:  # cbam_update_running_stats: fp32 arithmetic, one rounding
        running = [((1 - MOMENTUM) * r.float() + MOMENTUM * stats[i]).to(dtype) for r, i in zip(running, (2, 3))]
    return [t.double() for t in [out, dx] + d_params + running], vec, groups


# name: (B, C, H, W, ksize, dtype, training, groups, channels_last, ties)
CASES = {
    "odd-fp32-scalar": (2, 16, 9, 11, 7, torch.float32, True, 2, False, False),
    "uneven-groups-vec": (3, 40, 8, 12, 7, torch.float32, True, 3, False, False),
    "fp16-vec": (2, 24, 8, 8, 7, torch.float16, True, 4, False, False),
    "bf16-eval": (2, 24, 7, 9, 7, torch.bfloat16, False, 2, False, False),
    "batch1-k3": (1, 32, 10, 6, 3, torch.float32, True, 4, False, False),
    "channels-last": (2, 20, 6, 10, 7, torch.float32, True, 2, True, False),
    "c3-hidden1": (2, 3, 5, 7, 7, torch.float32, True, 3, False, False),
    "one-pixel": (4, 8, 1, 1, 7, torch.float32, True, 2, False, False),
    "one-row": (2, 8, 1, 30, 7, torch.float32, True, 2, False, False),
    "hw-above-block": (2, 8, 30, 40, 7, torch.float32, True, 2, False, False),
    "many-channels": (1, 1100, 2, 3, 7, torch.float32, True, 2, False, False),
    "ties-fp32": (2, 32, 9, 10, 7, torch.float32, True, 2, False, True),
    "ties-bf16-eval": (2, 32, 8, 8, 7, torch.bfloat16, False, 2, False, True),
    "batch40": (40, 8, 3, 5, 7, torch.float32, True, 1, False, False),  # more images than a warp's lanes
}


def check(name):
    B, C, H, W, ksize, dtype, training, groups, channels_last, ties = CASES[name]
    case = Case(B, C, H, W, device="cpu", ksize=ksize)
    if ties:  # quantised and ReLU'd: tied maxima over HW and over C, exact in bf16
        case.x = torch.relu(torch.round(case.x * 2) / 2)
    start = time.time()
    got, vec, used_groups = emulate(case, dtype, training, groups, channels_last)
    seconds = time.time() - start
    exact = case.run("reference", torch.float64, training, inputs_dtype=dtype)
    references = [case.run("reference", dtype, training, variant=order) for order in SUMMATION_ORDERS]
    failures, rows = [], []
    for i, (label, e, k) in enumerate(zip(NAMES, exact, got)):
        ref_err = max(relative_error(r[i], e) for r in references)
        err = relative_error(k, e) if torch.isfinite(k).all() else float("inf")
        tol = tolerance(ref_err, dtype, e.numel())
        rows.append(f"    {label:12s} ref {ref_err:.2e}  small {err:.2e}  tol {tol:.2e}")
        if not err <= tol:
            failures.append(label)
    status = "ok" if not failures else "FAILED " + ", ".join(failures)
    print(f"{name}: {status}  (groups {used_groups}, vector loads {vec}, {seconds:.1f} s)")
    if failures:
        print("\n".join(rows))
    return not failures


def deterministic():
    """Two runs under different fiber and block schedules give the same bits (no order depends on timing)."""
    case = Case(3, 40, 8, 12, device="cpu")
    first, _, _ = emulate(case, torch.float32, True, 3, seed=1)
    second, _, _ = emulate(case, torch.float32, True, 3, seed=2)
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    print(f"determinism over two schedules: {'ok' if same else 'FAILED'}")
    return same


def main(names):
    results = [check(n) for n in (names or CASES)]
    if not names:
        results.append(deterministic())
    print(f"{sum(results)} of {len(results)} cases passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
