"""The staged (v4) multiaxial backward's compile-time variants (DERMOMAMBA_STAGED_BWD_VARIANT: v4, lean, lean80;
csrc/cuda/scan_staged_layout.h) at DermoMamba's five large SS2D shapes, batch 16, fp32 and bf16, on one GPU.

Per (shape, dtype, chunk size, variant): the backward alone (multiaxial_scan_bwd on the staged forward's
chunk_states, non-deterministic gradients, the training default) and forward + backward (staged forward, then
the variant's backward), medians of triton.testing.do_bench (L2 flushed between runs), ms, each as a ratio
against v4 at chunk 128 measured in the same run. Before timing, at each shape: the largest relative difference
(norm of the difference / norm of v4's, over the seven gradients, deterministic mode) to v4's gradients on the
same inputs (at chunk 64, v4 at chunk 64 on the same chunk size's chunk_states), expected at float rounding
(~1e-7 fp32), and which gradients are bit-identical to v4's: where the lean layout has v4's tiles (d_inner >= 16 at
chunk 128: one sub-chunk per tile in both) dx, ddelta, dA, dD and ddelta_bias should be (the lean walks run the
same operations in the same order; dB / dC sum the channels in pairs first); at d_inner 8 a v4 tile holds two
sub-chunks and a lean tile one, so the look-back groups the adjoint maps differently and every gradient differs
in rounding. And every variant's deterministic gradients must be bit-identical over two runs.
A preflight checks that an unknown variant name raises an error naming the variable.

Inputs are the wrapper's (bench_scan_v3.scan_op_args): x (B, d, H, W), delta (B, 4, d, H, W) contiguous, B and C
channel-last views of one (B, H, W, 4, R + 2N) projection.

  python benchmarks/bench_staged_bwd_variants.py [--variants v4 lean lean80] [--chunks 128 64] [--shapes 0 1 2 3 4]
      [--dtypes float32 bfloat16] [--quick]
Prints a markdown table; writes it to DIR/bench_staged_bwd_variants.md as well (DIR: --out, else $OUT, else
benchmarks/out).

  ncu --kernel-name regex:scan_staged_bwd --section LaunchStats --section Occupancy --section WarpStateStats \
      --section MemoryWorkloadAnalysis_Tables python benchmarks/bench_staged_bwd_variants.py --ncu-case
runs one staged backward per variant (in --variants order) at 192x256 fp32, chunk 128, no timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scan import time_ms  # noqa: E402
from bench_scan_v3 import rel_diff, scan_op_args  # noqa: E402
from common import SHAPES, git_commit  # noqa: E402

from dermomamba_kernels.selective_scan import extension  # noqa: E402,F401  (fakes + autograd of the ops)

OPS = torch.ops.dermomamba
VARIANT_VARIABLE = "DERMOMAMBA_STAGED_BWD_VARIANT"
VARIANTS = ("v4", "lean", "lean80")
BASELINE_VARIANT, BASELINE_CHUNK = "v4", 128
GRAD_NAMES = ("dx", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias")
# The five large SS2D shapes (the first five of common.SHAPES).
DEFAULT_SHAPES = (0, 1, 2, 3, 4)


def with_chunk(op_args, chunk):
    return op_args[:8] + (chunk,)


def forward(op_args):
    os.environ["DERMOMAMBA_SCAN_FWD_KERNEL"] = "staged"
    return OPS.multiaxial_scan_fwd(*op_args)


def backward(variant, dy, op_args, states, deterministic=False):
    os.environ["DERMOMAMBA_SCAN_BWD_KERNEL"] = "staged"
    os.environ[VARIANT_VARIABLE] = variant
    return OPS.multiaxial_scan_bwd(dy, *op_args[:8], states, op_args[8], deterministic)


def preflight_unknown_variant(op_args):
    """An unknown variant name must raise an error naming the variable (never run the default silently)."""
    dy = torch.randn(op_args[0].shape, device="cuda")
    states = forward(op_args)[1]
    try:
        backward("no-such-variant", dy, op_args, states)
    except RuntimeError as error:
        if VARIANT_VARIABLE not in str(error):
            raise AssertionError(f"the error does not name {VARIANT_VARIABLE}: {error}") from None
        return
    finally:
        os.environ.pop(VARIANT_VARIABLE, None)
    raise AssertionError(f"{VARIANT_VARIABLE}=no-such-variant did not raise")


def compare(grads, reference):
    """(largest relative difference over the seven gradients, names of the bit-identical ones)."""
    worst = max(rel_diff(a, b) for a, b in zip(grads, reference))
    identical = [name for name, a, b in zip(GRAD_NAMES, grads, reference) if torch.equal(a, b)]
    return worst, identical


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--shapes", type=int, nargs="+", default=list(DEFAULT_SHAPES),
                        help="indices into benchmarks/common.py SHAPES")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--out", default=None)
    parser.add_argument("--ncu-case", action="store_true",
                        help="one backward per variant at 192x256 fp32, chunk 128, for Nsight Compute; no timing")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    variants = [BASELINE_VARIANT] + [v for v in args.variants if v != BASELINE_VARIANT]
    chunks = [BASELINE_CHUNK] + [c for c in args.chunks if c != BASELINE_CHUNK]
    if args.ncu_case:
        op_args = scan_op_args(*SHAPES[0], torch.float32, BASELINE_CHUNK)
        dy = torch.randn(op_args[0].shape, device="cuda")
        states = forward(op_args)[1]
        for variant in variants:
            backward(variant, dy, op_args, states)
        torch.cuda.synchronize()
        print(f"ncu case: one staged backward per variant {variants} at {SHAPES[0]}, fp32, chunk {BASELINE_CHUNK}")
        return

    header = (f"GPU {torch.cuda.get_device_name()}; commit {git_commit()}; "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; batch 16; staged forward; "
              f"ratios against {BASELINE_VARIANT} at chunk {BASELINE_CHUNK} in the same run")
    lines = [header, "",
             "| d_model | HxW | dtype | chunk | variant | bwd ms | bwd vs v4@128 | fwd+bwd ms | f+b vs v4@128 "
             "| max rel grad diff vs v4 (same chunk) | bit-identical to v4 | deterministic repeatable |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    preflight_unknown_variant(scan_op_args(*SHAPES[args.shapes[-1]], torch.float32, BASELINE_CHUNK))
    print(f"preflight: an unknown {VARIANT_VARIABLE} raises an error naming it", flush=True)
    for index in args.shapes:
        d_model, height, width = SHAPES[index]
        for dtype_name in args.dtypes:
            base_args = scan_op_args(d_model, height, width, getattr(torch, dtype_name), BASELINE_CHUNK)
            dy = torch.randn(base_args[0].shape, device="cuda")
            base_bwd = base_fb = None
            for chunk in chunks:
                op_args = with_chunk(base_args, chunk)
                states = forward(op_args)[1]
                reference = backward(BASELINE_VARIANT, dy, op_args, states, deterministic=True)
                for variant in variants:
                    grads = backward(variant, dy, op_args, states, deterministic=True)
                    again = backward(variant, dy, op_args, states, deterministic=True)
                    repeatable = all(torch.equal(a, b) for a, b in zip(grads, again))
                    worst, identical = compare(grads, reference)
                    del grads, again
                    bwd_ms = time_ms(lambda: backward(variant, dy, op_args, states), args.quick)

                    def forward_backward():
                        backward(variant, dy, op_args, forward(op_args)[1])

                    fb_ms = time_ms(forward_backward, args.quick)
                    if base_bwd is None:  # the first row: v4 at chunk 128
                        base_bwd, base_fb = bwd_ms, fb_ms
                    row = (f"| {d_model} | {height}x{width} | {dtype_name} | {chunk} | {variant} | {bwd_ms:.3f} | "
                           f"{base_bwd / bwd_ms:.2f}x | {fb_ms:.3f} | {base_fb / fb_ms:.2f}x | {worst:.1e} | "
                           f"{', '.join(identical) or 'none'} | {'yes' if repeatable else 'NO'} |")
                    lines.append(row)
                    print(row, flush=True)
                del reference, states
            del base_args, dy
            torch.cuda.empty_cache()
    os.environ.pop(VARIANT_VARIABLE, None)
    out_dir = args.out or os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_staged_bwd_variants.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
