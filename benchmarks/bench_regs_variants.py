"""The scan v5 ("regs") kernels' compile-time variants against the staged (v4) kernels, forward and backward
separately, at DermoMamba's SS2D shapes, batch 16, on one GPU: which variant should be the default.

The variants are chosen per call by DERMOMAMBA_REGS_FWD_VARIANT / DERMOMAMBA_REGS_BWD_VARIANT (read by the
launchers on every call); the kernels by DERMOMAMBA_SCAN_FWD_KERNEL / _BWD_KERNEL. The staged kernels run at
--chunk (128), the regs kernels at --regs-chunk (32). Every backward reads chunk_states of its own chunk size
(from the staged forward at that chunk size). Before timing, each variant's gradients are compared with the
staged backward's (largest relative difference over the seven). Medians of triton.testing.do_bench, ms.

  python benchmarks/bench_regs_variants.py --fwd-variants a b --bwd-variants s8 s4b3 s4 [--shapes 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scan import time_ms  # noqa: E402
from bench_scan_v3 import rel_diff, scan_op_args  # noqa: E402
from common import SHAPES, git_commit  # noqa: E402

OPS = torch.ops.dermomamba


def with_chunk(op_args, chunk):
    return op_args[:8] + (chunk,)


def forward(kernel, variant, op_args):
    os.environ["DERMOMAMBA_SCAN_FWD_KERNEL"] = kernel
    if variant is not None:
        os.environ["DERMOMAMBA_REGS_FWD_VARIANT"] = variant
    return OPS.multiaxial_scan_fwd(*op_args)


def backward(kernel, variant, dy, op_args, states):
    os.environ["DERMOMAMBA_SCAN_BWD_KERNEL"] = kernel
    if variant is not None:
        os.environ["DERMOMAMBA_REGS_BWD_VARIANT"] = variant
    return OPS.multiaxial_scan_bwd(dy, *op_args[:8], states, op_args[8], False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--regs-chunk", type=int, default=32)
    parser.add_argument("--fwd-variants", nargs="*", default=[])
    parser.add_argument("--bwd-variants", nargs="*", default=[])
    parser.add_argument("--shapes", type=int, nargs="+", default=list(range(len(SHAPES))))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    fwd_variants = args.fwd_variants or [None]
    bwd_variants = args.bwd_variants or [None]
    print(f"GPU {torch.cuda.get_device_name()}; commit {git_commit()}; staged chunk {args.chunk}, regs chunk "
          f"{args.regs_chunk}")
    print("| d_model | HxW | dtype | staged fwd | " + " | ".join(f"regs fwd {v}" for v in fwd_variants)
          + " | staged bwd | " + " | ".join(f"regs bwd {v} (max rel diff)" for v in bwd_variants) + " |")
    print("|" + "---|" * (5 + len(fwd_variants) + len(bwd_variants)))
    for index in args.shapes:
        d_model, height, width = SHAPES[index]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            op_args = scan_op_args(d_model, height, width, dtype, args.chunk)
            staged_args, regs_args = with_chunk(op_args, args.chunk), with_chunk(op_args, args.regs_chunk)
            dy = torch.randn(op_args[0].shape, device="cuda")
            cells = [f"{time_ms(lambda: forward('staged', None, staged_args)):.3f}"]
            for v in fwd_variants:
                cells.append(f"{time_ms(lambda: forward('regs', v, regs_args)):.3f}")
            staged_states = forward("staged", None, staged_args)[1]
            regs_states = forward("staged", None, regs_args)[1]
            reference = backward("staged", None, dy, regs_args, regs_states)
            cells.append(f"{time_ms(lambda: backward('staged', None, dy, staged_args, staged_states)):.3f}")
            for v in bwd_variants:
                grads = backward("regs", v, dy, regs_args, regs_states)
                diff = max(rel_diff(a, b) for a, b in zip(grads, reference))
                ms = time_ms(lambda: backward("regs", v, dy, regs_args, regs_states))
                cells.append(f"{ms:.3f} ({diff:.1e})")
            print(f"| {d_model} | {height}x{width} | {dtype_name} | " + " | ".join(cells) + " |", flush=True)
            del op_args, staged_args, regs_args, dy, staged_states, regs_states, reference
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
