"""Benchmark of the Triton selective scans (issue 4) at DermoMamba's SS2D shapes.

For each shape (batch 16, 192x256 input; d_inner = 2 d_model, N = 16, R = ceil(d_model / 16)) it times,
in one process on one GPU, forward and forward + backward (medians of ``triton.testing.do_bench``):

  triton      multiaxial_selective_scan(backend="triton"): projections in the native layout + fused scan
  cuda        the same op on our CUDA kernels (when dermomamba_kernels._C is built with CUDA)
  mamba_ssm   the published code's path: 4 materialised direction copies, two einsums, mamba-ssm's
              selective_scan_fn, merge (only when mamba_ssm and its compiled selective_scan_cuda import)
  triton-alt-bwd    the same with the backward's tuning alternative (--alt-backward)
  triton-baseline   the same op launching another version of kernels.py (--baseline-kernels FILE), to
                    check that a kernel change did not slow it (same process, same inputs)
  published+triton  that same published path with our Triton 1-D scan in place of mamba-ssm's
  reference   multiaxial_selective_scan_ref (Python loop over L; only for L <= --reference-max-len)

and the Triton scan core alone (the multiaxial_scan_fwd op on precomputed projections) with its achieved
bandwidth: bytes that must move (x, delta, B, C read once, y written once) over time, against the
device-to-device copy bandwidth measured in the same run.

Usage: python benchmarks/bench_triton_scan.py [--shapes 0,1] [--json out.json] [--baseline-kernels FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: an installed dermomamba (with its compiled _C) wins over the source tree.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from dermomamba_kernels import multiaxial_selective_scan, unavailable_reasons  # noqa: E402
from dermomamba_kernels.selective_scan import triton as triton_scan  # noqa: E402
from dermomamba_kernels.selective_scan.triton import ops  # noqa: E402

from common import (BATCH, DSTATE, NUM_DIRECTIONS, SHAPES, copy_bandwidth_gbs,  # noqa: E402
                    git_commit, import_mamba_ssm)
from common import published_core as published_path  # noqa: E402



@contextlib.contextmanager
def alternative_backward():
    """The backward's tuning alternative (ops.SPLIT_BACKWARD flipped). Held over the forward AND the
    backward: the op reads the flag when autograd runs its backward, after the forward has returned."""
    ops.SPLIT_BACKWARD = not ops.SPLIT_BACKWARD
    try:
        yield
    finally:
        ops.SPLIT_BACKWARD = not ops.SPLIT_BACKWARD


def load_kernels(path):
    """Another version of kernels.py (e.g. a previous commit's) as a module, to time against this one."""
    spec = importlib.util.spec_from_file_location("baseline_triton_scan_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def kernels_from(module):
    """The Triton ops launch ``module``'s kernels (same signatures as kernels.py) inside this block."""
    saved = ops.kernels
    ops.kernels = module
    try:
        yield
    finally:
        ops.kernels = saved


def make_inputs(d_model, height, width, batch=BATCH, device="cuda"):
    dim = 2 * d_model
    rank = math.ceil(d_model / 16)
    f32 = dict(dtype=torch.float32, device=device)
    return [torch.randn(batch, dim, height, width, **f32).requires_grad_(),
            (torch.randn(NUM_DIRECTIONS, rank + 2 * DSTATE, dim, **f32) / dim ** 0.5).requires_grad_(),
            (torch.randn(NUM_DIRECTIONS, dim, rank, **f32) / rank ** 0.5).requires_grad_(),
            (0.5 * torch.randn(NUM_DIRECTIONS, dim, **f32) - 1.0).requires_grad_(),
            torch.log(torch.rand(NUM_DIRECTIONS * dim, DSTATE, **f32) * 2 + 0.1).requires_grad_(),
            torch.randn(NUM_DIRECTIONS * dim, **f32).requires_grad_()]


def time_ms(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_and_fwd_bwd(op, args, quick=False, context=contextlib.nullcontext):
    """(forward ms, forward + backward ms); ``context`` (a context-manager factory) is held over both."""
    grad = torch.randn(args[0].shape, device=args[0].device)
    kw = dict(warmup=1, rep=1) if quick else {}

    def fwd():
        with torch.no_grad():
            op(*args)

    def fwd_bwd():
        torch.autograd.grad(op(*args), args, grad)

    with context():
        return time_ms(fwd, **kw), time_ms(fwd_bwd, **kw)


def scan_core(args):
    """(ms, bytes) of the Triton multiaxial scan forward on precomputed projections."""
    x, xw, dw, db, A_logs, Ds = [a.detach() for a in args]
    delta, BC = triton_scan.multiaxial_projections(x, xw, dw)
    A = -torch.exp(A_logs)
    bias = db.reshape(-1)
    ms = time_ms(lambda: torch.ops.dermomamba_triton.multiaxial_scan_fwd(x, delta, A, BC, Ds, bias, True, False))
    batch, dim, height, width = x.shape
    per_pixel = dim + NUM_DIRECTIONS * dim + 2 * NUM_DIRECTIONS * DSTATE + dim  # x, delta, B, C in; y out
    return ms, batch * height * width * per_pixel * 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(str(i) for i in range(len(SHAPES))))
    parser.add_argument("--reference-max-len", type=int, default=768)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-published-triton", action="store_true")
    parser.add_argument("--alt-backward", action="store_true",
                        help="also time the backward's tuning alternative (ops.SPLIT_BACKWARD flipped)")
    parser.add_argument("--baseline-kernels", default=None, metavar="KERNELS_PY",
                        help="also time the Triton op with the kernels of this file (another version of "
                             "kernels.py, e.g. `git show <commit>:dermomamba_kernels/selective_scan/triton/"
                             "kernels.py`) as 'triton-baseline', and print triton / triton-baseline")
    parser.add_argument("--compile-only", action="store_true",
                        help="run each Triton path once at batch 2 (fills Triton's on-disk cache; run several "
                             "of these in parallel before timing)")
    parser.add_argument("--profile", action="store_true",
                        help="print the GPU kernels' times of one Triton forward + backward per shape (torch.profiler)")
    args_ns = parser.parse_args()
    if args_ns.profile:
        from torch.profiler import ProfilerActivity, profile

        for index in (int(i) for i in args_ns.shapes.split(",")):
            args = make_inputs(*SHAPES[index])
            grad = torch.randn(args[0].shape, device="cuda")
            for _ in range(3):
                torch.autograd.grad(triton_scan.multiaxial_triton(*args), args, grad)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                torch.autograd.grad(triton_scan.multiaxial_triton(*args), args, grad)
                torch.cuda.synchronize()
            print(SHAPES[index])
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
        return
    if args_ns.compile_only:
        for index in (int(i) for i in args_ns.shapes.split(",")):
            args = make_inputs(*SHAPES[index], batch=2)
            variants = [(triton_scan.multiaxial_triton, contextlib.nullcontext),
                        (triton_scan.multiaxial_triton, alternative_backward),
                        (published_path(triton_scan.selective_scan_triton), contextlib.nullcontext)]
            if args_ns.baseline_kernels:
                baseline = load_kernels(args_ns.baseline_kernels)
                variants.append((triton_scan.multiaxial_triton, lambda: kernels_from(baseline)))
            for op, context in variants:
                with context():
                    torch.autograd.grad(op(*args), args, torch.randn(args[0].shape, device="cuda"))
        torch.cuda.synchronize()
        return
    assert torch.cuda.is_available(), "the benchmark needs a CUDA GPU"
    mamba_scan, mamba_error = import_mamba_ssm()
    cuda_reason = unavailable_reasons("multiaxial_selective_scan", "cuda").get("cuda")
    info = {
        "gpu": torch.cuda.get_device_name(), "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(), "torch": torch.__version__, "command": " ".join([os.path.basename(sys.executable)]
                                                                               + sys.argv),
        "mamba_ssm": "available" if mamba_scan else f"unavailable ({mamba_error})",
        "cuda_backend": "available" if cuda_reason is None else f"unavailable ({cuda_reason})",
    }
    import triton
    info["triton"] = triton.__version__
    info["copy_bandwidth_GBs"] = copy_bandwidth_gbs(time_ms)
    print(json.dumps(info, indent=1), flush=True)

    def triton_op(*a):
        return multiaxial_selective_scan(*a, backend="triton")

    # name -> (op, context-manager factory held over its forward and backward)
    paths = {"triton": (triton_op, contextlib.nullcontext)}
    if args_ns.baseline_kernels:
        baseline = load_kernels(args_ns.baseline_kernels)
        info["baseline_kernels"] = args_ns.baseline_kernels
        paths["triton-baseline"] = (triton_op, lambda: kernels_from(baseline))
    if args_ns.alt_backward:
        paths["triton-alt-bwd"] = (triton_op, alternative_backward)
    if cuda_reason is None:
        paths["cuda"] = (lambda *a: multiaxial_selective_scan(*a, backend="cuda"), contextlib.nullcontext)
    if mamba_scan is not None:
        paths["mamba_ssm"] = (published_path(mamba_scan), contextlib.nullcontext)
    if not args_ns.no_published_triton:
        paths["published+triton"] = (published_path(triton_scan.selective_scan_triton), contextlib.nullcontext)
    from dermomamba_kernels.selective_scan import multiaxial_selective_scan_ref

    rows = []
    for index in (int(i) for i in args_ns.shapes.split(",")):
        d_model, height, width = SHAPES[index]
        args = make_inputs(d_model, height, width)
        row = {"d_model": d_model, "d_inner": 2 * d_model, "H": height, "W": width, "L": height * width}
        for name, (op, context) in paths.items():
            try:
                row[name] = fwd_and_fwd_bwd(op, args, context=context)
            except Exception as exc:  # noqa: BLE001 - a failing path is reported, the others still run
                row[name] = None
                print(f"{name} failed at {SHAPES[index]}: {type(exc).__name__}: {exc}", flush=True)
        if height * width <= args_ns.reference_max_len:
            row["reference"] = fwd_and_fwd_bwd(multiaxial_selective_scan_ref, args, quick=True)
        core_ms, core_bytes = scan_core(args)
        row["core_fwd_ms"] = core_ms
        row["core_fwd_GBs"] = core_bytes / core_ms / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
        del args
        torch.cuda.empty_cache()

    def cell(row, name, i):
        return f"{row[name][i]:.3f}" if row.get(name) else "-"

    def ratio(row, num, den, i):
        return f"{row[num][i] / row[den][i]:.2f}x" if row.get(num) and row.get(den) else "-"

    names = [n for n in ("triton", "triton-baseline", "triton-alt-bwd", "cuda", "mamba_ssm", "published+triton",
                         "reference")
             if any(r.get(n) for r in rows)]
    print(f"\nGPU {info['gpu']}, {info['date']}, commit {info['commit']}, batch {BATCH}, N {DSTATE}, fp32; "
          f"copy bandwidth {info['copy_bandwidth_GBs']:.0f} GB/s")
    header = "| d_model @ HxW | " + " | ".join(f"{n} fwd / fwd+bwd ms" for n in names) + \
             " | mamba_ssm/triton fwd+bwd | triton/cuda fwd+bwd | triton/triton-baseline fwd, fwd+bwd |" \
             " core fwd GB/s (% copy) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        cells = [f"{cell(r, n, 0)} / {cell(r, n, 1)}" for n in names]
        print(f"| {r['d_model']} @ {r['H']}x{r['W']} | " + " | ".join(cells) +
              f" | {ratio(r, 'mamba_ssm', 'triton', 1)} | {ratio(r, 'triton', 'cuda', 1)} | "
              f"{ratio(r, 'triton', 'triton-baseline', 0)}, {ratio(r, 'triton', 'triton-baseline', 1)} | "
              f"{r['core_fwd_GBs']:.0f} ({100 * r['core_fwd_GBs'] / info['copy_bandwidth_GBs']:.0f}%) |")
    if args_ns.json:
        with open(args_ns.json, "w") as fh:
            json.dump({"info": info, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
