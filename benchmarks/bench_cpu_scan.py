"""CPU selective scans: the C++ "cpu" backend against the loop reference at DermoMamba's SS2D shapes.

Batch 1, 192x256 input (d_inner = 2 * d_model, N = 16, R = ceil(d_model / 16)); each row is one
multiaxial_selective_scan call, projections included, forward and forward + backward, median wall
time of several runs (the reference runs once per measurement, it is slow). The last lines estimate
the scans of one whole image: DermoMamba makes three SS2D calls per encoder stage (the Cross-Scale
block's three axial branches share one VSSBlock) and one per Sweep-Mamba direction.

Usage:
    PYTHONPATH=. python benchmarks/bench_cpu_scan.py [--reps 5] [--no-reference] [--threads 2]
A "nan" reference entry was skipped (see --reference-backward-max-length).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch

from dermomamba_kernels import multiaxial_selective_scan

DSTATE = 16
# (label, d_model, H, W, SS2D calls per image)
SHAPES = [
    ("enc1 d4 192x256", 4, 192, 256, 3),
    ("enc2 d8 96x128", 8, 96, 128, 3),
    ("enc3 d16 48x64", 16, 48, 64, 3),
    ("enc4 d32 24x32", 32, 24, 32, 3),
    ("enc5 d64 12x16", 64, 12, 16, 3),
    ("sweep d64 6x8", 64, 6, 8, 1),
    ("sweep d6 8x64", 6, 8, 64, 1),
    ("sweep d8 64x6", 8, 64, 6, 1),
]


def make_inputs(d_model, height, width):
    dim = 2 * d_model
    rank = math.ceil(d_model / 16)
    return [
        torch.randn(1, dim, height, width),
        torch.randn(4, rank + 2 * DSTATE, dim) / dim ** 0.5,
        torch.randn(4, dim, rank) / rank ** 0.5,
        torch.randn(4, dim) * 0.5,
        torch.log(torch.arange(1, DSTATE + 1, dtype=torch.float32)).repeat(4 * dim, 1),
        torch.ones(4 * dim),
    ]


def timed(fn, reps, warmup=True):
    if warmup:
        fn()  # allocations, first-call dispatch
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward(inputs, backend):
    with torch.no_grad():
        return multiaxial_selective_scan(*inputs, backend=backend)


def forward_backward(inputs, backend):
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = multiaxial_selective_scan(*leaves, backend=backend)
    y.backward(torch.ones_like(y))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) loop reference")
    parser.add_argument("--reference-backward-max-length", type=int, default=1024,
                        help="skip the reference's forward+backward above this H*W: its autograd graph indexes "
                             "B and C per position, and each select's backward writes a full (batch, 4*dim, N, L) "
                             "zero tensor, so its backward costs O(L^2) memory traffic")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  torch {torch.__version__}  "
          f"{platform.processor() or platform.machine()}  {os.cpu_count()} CPUs, {args.threads} threads  "
          f"load average {os.getloadavg()[0]:.1f} at start")
    header = (f"| {'shape (batch 1)':18s} | {'L':>6s} | {'state upd':>9s} | {'cpu fwd ms':>10s} | {'cpu f+b ms':>10s} | "
              f"{'ref fwd ms':>10s} | {'ref f+b ms':>10s} | {'fwd x':>6s} | {'f+b x':>6s} | {'cpu fwd ns/upd':>14s} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    totals = {"cpu_f": 0.0, "cpu_fb": 0.0, "ref_f": 0.0, "ref_fb": 0.0, "updates": 0}
    for label, d_model, height, width, calls in SHAPES:
        inputs = make_inputs(d_model, height, width)
        dim = 2 * d_model
        updates = 4 * dim * height * width * DSTATE
        cpu_f = timed(lambda: forward(inputs, "cpu"), args.reps)
        cpu_fb = timed(lambda: forward_backward(inputs, "cpu"), args.reps)
        if args.no_reference:
            ref_f = ref_fb = float("nan")
        else:
            ref_f = timed(lambda: forward(inputs, "reference"), 1, warmup=False)
            ref_fb = float("nan")
            if height * width <= args.reference_backward_max_length:
                ref_fb = timed(lambda: forward_backward(inputs, "reference"), 1, warmup=False)
        totals["cpu_f"] += calls * cpu_f
        totals["cpu_fb"] += calls * cpu_fb
        totals["ref_f"] += calls * ref_f
        totals["ref_fb"] += calls * ref_fb  # nan when skipped
        totals["updates"] += calls * updates
        print(f"| {label:18s} | {height * width:6d} | {updates / 1e6:8.1f}M | {cpu_f * 1e3:10.2f} | {cpu_fb * 1e3:10.2f} | "
              f"{ref_f * 1e3:10.1f} | {ref_fb * 1e3:10.1f} | {ref_f / cpu_f:6.0f} | {ref_fb / cpu_fb:6.0f} | "
              f"{cpu_f / updates * 1e9:14.2f} |", flush=True)
    print(f"\nOne 192x256 image, all SS2D calls ({totals['updates'] / 1e6:.0f}M state updates): "
          f"cpu forward {totals['cpu_f'] * 1e3:.0f} ms, forward+backward {totals['cpu_fb'] * 1e3:.0f} ms; "
          f"reference forward {totals['ref_f'] * 1e3:.0f} ms, forward+backward {totals['ref_fb'] * 1e3:.0f} ms")
    print(f"# load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
