"""Small launches of every CUDA kernel of the extension, for compute-sanitizer (memcheck, racecheck).

Odd sizes, several blocks per sequence, splits, both gradient modes, all three dtypes where a kernel has
a per-dtype instantiation. No timing and no parity (the tests do that): a sanitizer run wants every
kernel launched once on shapes that exercise its edges.

  compute-sanitizer --tool memcheck --kernel-name regex:dermomamba python benchmarks/sanitize_cases.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dermomamba_kernels  # noqa: E402,F401
from dermomamba_kernels.layers.cbam import CBAM  # noqa: E402
from dermomamba_kernels.selective_scan import selective_scan_fn  # noqa: E402

from bench_scan_v3 import small_case as multiaxial_small_case  # noqa: E402


def scan_1d_cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for deterministic in (False, True):
            batch, dim, length, dstate = 2, 5, 301, 16
            u, delta, z = (torch.randn(batch, dim, length, device="cuda", dtype=dtype, requires_grad=True)
                           for _ in range(3))
            A = (-torch.rand(dim, dstate, device="cuda") - 0.5).requires_grad_()
            B, C = (torch.randn(batch, 1, dstate, length, device="cuda", dtype=dtype, requires_grad=True)
                    for _ in range(2))
            D, bias = (torch.randn(dim, device="cuda", requires_grad=True) for _ in range(2))
            out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, backend="cuda",
                                          deterministic=deterministic)
            (out.float().sum() + last.sum()).backward()
    torch.cuda.synchronize()
    print("1-D scan cases done")


def cbam_cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels, height, width in ((48, 37, 53), (256, 3, 5)):
            layer = CBAM(channels, backend="cuda").cuda()
            x = torch.randn(2, channels, height, width, device="cuda", dtype=dtype, requires_grad=True)
            layer.train()
            layer(x).float().sum().backward()
            layer.eval()
            with torch.no_grad():
                layer(x)
    torch.cuda.synchronize()
    print("CBAM cases done")


if __name__ == "__main__":
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    scan_1d_cases()
    multiaxial_small_case()
    cbam_cases()
