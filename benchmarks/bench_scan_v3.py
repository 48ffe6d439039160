"""Benchmark of the multiaxial scan's forward alone: the warp kernel (v2) against the lane kernels (v3:
"lane", one state per lane; "lane4", 4 lanes x 4 states per sequence), the staged kernel (v4: each tile
staged in shared memory once, one launch with a decoupled look-back) and mamba-ssm's
selective_scan_fn, at DermoMamba's eight SS2D shapes, on one GPU.

The forward kernel is chosen per call by DERMOMAMBA_SCAN_FWD_KERNEL=warp|lane|lane4|staged|regs|flat (read by
csrc/cuda/selective_scan_cuda.cpp on every call). Inputs are the wrapper's: x (B, d, H, W), delta
(B, 4, d, H, W) contiguous, B and C channel-last views of one (B, H, W, 4, R + 2N) projection;
mamba-ssm runs on its own materialised (B, 4 d, L) / (B, 4, N, L) fp32 inputs (the scan alone, no
copies or einsums counted). Achieved bandwidth = the forward's floor bytes (bench_scan.multiaxial_floor_bytes,
benchmarks/notes/scan.md section 1) / time, against a device-to-device copy measured in the same run.
Before timing, the other kernels' outputs are compared with the warp kernel's at every shape (y and
chunk_states, relative difference).
Medians of triton.testing.do_bench (L2 flushed between runs), ms.

Second table: forward + backward (multiaxial_scan_fwd then multiaxial_scan_bwd, non-deterministic
gradients, the training default) for every (forward kernel, backward kernel) pair; the backward is
chosen by DERMOMAMBA_SCAN_BWD_KERNEL=warp|lane. Before timing, the lane backward's gradients are
compared with the warp backward's on the same chunk_states (largest relative difference over the
seven gradients). mamba-ssm: its scan's forward + backward (fp32, its own materialised inputs).

The regs kernels (scan v5: several states of one channel per thread) run at their own chunk size
(--regs-chunk; their sub-chunks are whole chunks and want short ones): their chunk_states then have another
shape, so only y is compared for them, and they pair only with each other.

Usage: python benchmarks/bench_scan_v3.py [--out DIR] [--quick] [--chunk 128] [--regs-chunk 32] [--skip-backward]
       [--kernels warp staged regs] [--pairs warp+warp staged+staged regs+regs]
       python benchmarks/bench_scan_v3.py --small-case   (small forwards of every kind, each followed by
       the lane backward, atomic and deterministic, for compute-sanitizer; no timing)
Writes DIR/bench_scan_v3.json and .md (DIR defaults to $OUT, else benchmarks/out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scan import (make_ss2d_inputs, multiaxial_floor_bytes, projections_native,  # noqa: E402
                        time_ms)
from common import BATCH, DSTATE, NUM_DIRECTIONS, SHAPES, copy_bandwidth_gbs, git_commit, import_mamba_ssm  # noqa: E402

from dermomamba_kernels.selective_scan import extension  # noqa: E402,F401  (fakes + autograd of the ops)

KERNEL_VARIABLE = "DERMOMAMBA_SCAN_FWD_KERNEL"
ALL_KERNELS = ("warp", "lane", "lane4", "staged", "regs", "flat")
BWD_KERNEL_VARIABLE = "DERMOMAMBA_SCAN_BWD_KERNEL"
ALL_BWD_KERNELS = ("warp", "lane", "staged", "regs")
# Set by main() from --kernels / --pairs: the forward kernels timed (warp first: the others are compared with
# it) and the (forward, backward) pairs of the second table.
KERNELS = ("warp", "staged", "regs")
OTHER_KERNELS = KERNELS[1:]
PAIRS = [("warp", "warp"), ("staged", "staged"), ("regs", "regs")]
BWD_KERNELS = ("warp", "staged", "regs")
# Chunk size per kernel (main() sets the regs kernels' from --regs-chunk).
CHUNK_FOR = {}


def with_chunk(op_args, kernel):
    """The op's arguments with the chunk size that ``kernel`` runs at."""
    return op_args[:8] + (CHUNK_FOR.get(kernel, op_args[8]),)


def forward_with(kernel, args):
    os.environ[KERNEL_VARIABLE] = kernel
    return torch.ops.dermomamba.multiaxial_scan_fwd(*with_chunk(args, kernel))


def rel_diff(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def scan_op_args(d_model, height, width, dtype, chunk):
    """multiaxial_scan_fwd's arguments at one SS2D shape, in the wrapper's layout (delta contiguous, B / C
    channel-last views of the projection), softplus on."""
    inputs = make_ss2d_inputs(d_model, height, width, dtype)
    x = inputs[0].detach()
    with torch.no_grad():
        delta, B, C, A, D, bias = projections_native(x, [p.detach() for p in inputs[1:]])
    return (x, delta.contiguous(), A, B, C, D, bias, True, chunk)


def backward_with(kernel, dy, op_args, states):
    os.environ[BWD_KERNEL_VARIABLE] = kernel
    return torch.ops.dermomamba.multiaxial_scan_bwd(dy, *op_args[:8], states, with_chunk(op_args, kernel)[8], False)


def forward_backward_table(args, copy_gbs, mamba_fn):
    """Forward + backward per (forward kernel, backward kernel) pair at every shape."""
    lines = ["\n## forward + backward, per (forward kernel, backward kernel)\n",
             "| d_model | HxW | dtype | f+b floor MB | " + " | ".join(f"{f}+{b} ms" for f, b in PAIRS)
             + " | best pair | best % copy | best vs warp+warp | mamba-ssm scan f+b ms | best vs mamba | "
             + " | ".join(f"{k} bwd vs warp bwd max rel diff" for k in BWD_KERNELS[1:]) + " |",
             "|" + "---|" * (len(PAIRS) + 8 + len(BWD_KERNELS))]
    rows = []
    for d_model, height, width in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            op_args = scan_op_args(d_model, height, width, dtype, args.chunk)
            x, delta, A, B, C, D, bias = op_args[:7]
            dy = torch.randn(x.shape, device=x.device)
            # Each backward on its own chunk size's states (from the warp forward at that chunk size).
            grads = {k: backward_with(k, dy, op_args, forward_with("warp", with_chunk(op_args, k))[1])
                     for k in BWD_KERNELS}
            diffs = {k: max(rel_diff(a, b) for a, b in zip(grads[k], grads["warp"])) for k in BWD_KERNELS[1:]}
            del grads
            times = {}
            for fwd_kernel, bwd_kernel in PAIRS:
                def fwd_bwd():
                    _, st = forward_with(fwd_kernel, op_args)
                    backward_with(bwd_kernel, dy, op_args, st)

                times[(fwd_kernel, bwd_kernel)] = time_ms(fwd_bwd, args.quick)
            mamba_ms = None
            if mamba_fn is not None and dtype == torch.float32:
                batch, dim = x.shape[:2]
                length = height * width
                xs = torch.randn(batch, NUM_DIRECTIONS * dim, length, device="cuda", requires_grad=True)
                dts = delta.reshape(batch, -1, length).float().clone().requires_grad_()
                Bs = torch.randn(batch, NUM_DIRECTIONS, DSTATE, length, device="cuda", requires_grad=True)
                Cs = torch.randn(batch, NUM_DIRECTIONS, DSTATE, length, device="cuda", requires_grad=True)
                As, Ds = A.clone().requires_grad_(), D.clone().requires_grad_()
                grad_out = torch.randn(batch, NUM_DIRECTIONS * dim, length, device="cuda")

                def mamba_fwd_bwd():
                    out = mamba_fn(xs, dts, As, Bs, Cs, Ds, delta_bias=bias, delta_softplus=True)
                    torch.autograd.grad(out, (xs, dts, As, Bs, Cs, Ds), grad_out)

                mamba_ms = time_ms(mamba_fwd_bwd, args.quick)
                del xs, dts, Bs, Cs
            itemsize = torch.finfo(dtype).bits // 8
            fwd_floor, bwd_floor = multiaxial_floor_bytes(BATCH, x.shape[1], height, width, DSTATE, itemsize, itemsize,
                                                          args.chunk)
            floor = fwd_floor + bwd_floor
            best_pair = min(times, key=times.get)
            baseline = ("warp", "warp")
            best = times[best_pair]
            rows.append({"d_model": d_model, "H": height, "W": width, "dtype": str(dtype), "floor_bytes": floor,
                         "ms": {f"{f}+{b}": t for (f, b), t in times.items()}, "mamba_scan_fb_ms": mamba_ms,
                         **{f"{k}_vs_warp_bwd_max_rel_diff": d for k, d in diffs.items()}})
            lines.append(f"| {d_model} | {height}x{width} | {str(dtype)[6:]} | {floor / 1e6:.1f} | "
                         + " | ".join(f"{times[p]:.3f}" for p in PAIRS)
                         + f" | {'+'.join(best_pair)} | {100 * floor / best / 1e6 / copy_gbs:.1f}% | "
                         f"{(f'{times[baseline] / best:.2f}x') if baseline in times else '-'} | "
                         f"{'-' if mamba_ms is None else f'{mamba_ms:.3f}'} | "
                         f"{'-' if mamba_ms is None else f'{mamba_ms / best:.2f}x'} | "
                         + " | ".join(f"{d:.1e}" for d in diffs.values()) + " |")
            print(lines[-1], flush=True)
            del x, delta, B, C
            torch.cuda.empty_cache()
    return lines, rows


def small_case():
    """Small multiaxial forwards of every kind, each followed by the lane backward in both gradient modes,
    and the staged backward in both modes: odd sizes, several blocks per direction, splits, and (third
    shape) ten staged forward tiles / 14 staged backward tiles, so that both staged kernels' look-backs
    cross a milestone (what compute-sanitizer should look at)."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    for dim, height, width, dstate, chunk in ((12, 9, 13, 16, 32), (9, 7, 6, 20, 16), (8, 48, 53, 16, 16)):
        x = torch.randn(1, dim, height, width, device="cuda")
        delta = 0.5 * torch.randn(1, NUM_DIRECTIONS, dim, height, width, device="cuda") - 1.5
        B, C = (torch.randn(1, NUM_DIRECTIONS, dstate, height, width, device="cuda") for _ in range(2))
        A = -torch.rand(NUM_DIRECTIONS * dim, dstate, device="cuda") - 0.5
        D, bias = (torch.randn(NUM_DIRECTIONS * dim, device="cuda") for _ in range(2))
        op_args = (x, delta, A, B, C, D, bias, True, chunk)
        dy = torch.randn(x.shape, device="cuda")
        # lane4 holds 4 states per lane in 4 lanes: N <= 16 only (it raises otherwise, by design).
        # lane4 and flat (v6) hold all N <= 16 states of a sequence per lane group / thread.
        for fwd_kernel in ("lane", "lane4", "staged", "warp", "flat") if dstate <= 16 else ("lane", "staged", "warp"):
            states = forward_with(fwd_kernel, op_args)[1]
            for deterministic in (False, True):
                os.environ[BWD_KERNEL_VARIABLE] = "lane"
                grads = torch.ops.dermomamba.multiaxial_scan_bwd(dy, *op_args[:8], states, chunk, deterministic)
                torch.cuda.synchronize()
                assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
        # The staged and regs backwards (dim 9 at N 20 is two channel blocks of 8 + 1: dB / dC by atomics and
        # partials): one forward's chunk_states serve, the backward does not depend on the forward's kernel.
        os.environ[KERNEL_VARIABLE] = "regs"
        states = torch.ops.dermomamba.multiaxial_scan_fwd(*op_args)[1]
        for tiled in ("staged", "regs"):
            for deterministic in (False, True):
                os.environ[BWD_KERNEL_VARIABLE] = tiled
                grads = torch.ops.dermomamba.multiaxial_scan_bwd(dy, *op_args[:8], states, chunk, deterministic)
                torch.cuda.synchronize()
                assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    print("small case done")


def main():
    global KERNELS, OTHER_KERNELS, PAIRS, BWD_KERNELS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "out")))
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--chunk", type=int, default=extension.chunk_size_for(torch.device("cuda")))
    parser.add_argument("--regs-chunk", type=int, default=32, help="chunk size of the regs (v5) kernels")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=ALL_KERNELS,
                        help="forward kernels to time (warp is always first: the others are compared with it)")
    parser.add_argument("--pairs", nargs="+", default=[f"{f}+{b}" for f, b in PAIRS],
                        help="(forward+backward) kernel pairs of the second table")
    parser.add_argument("--skip-backward", action="store_true", help="forward table only")
    parser.add_argument("--small-case", action="store_true", help="small fwd + bwd of each kind for compute-sanitizer")
    args = parser.parse_args()
    if args.small_case:
        small_case()
        return
    KERNELS = ("warp",) + tuple(k for k in args.kernels if k != "warp")
    OTHER_KERNELS = KERNELS[1:]
    PAIRS = [tuple(pair.split("+")) for pair in args.pairs]
    for pair in PAIRS:
        if len(pair) != 2 or pair[0] not in ALL_KERNELS or pair[1] not in ALL_BWD_KERNELS:
            parser.error(f"--pairs: {'+'.join(pair)} is not forward+backward of {ALL_KERNELS} / {ALL_BWD_KERNELS}")
        if (pair[0] == "regs") != (pair[1] == "regs"):
            parser.error(f"--pairs: {'+'.join(pair)}: the regs kernels run at --regs-chunk, so pair only with each other")
    BWD_KERNELS = ("warp",) + tuple(dict.fromkeys(b for _, b in PAIRS if b != "warp"))
    CHUNK_FOR["regs"] = args.regs_chunk
    os.makedirs(args.out, exist_ok=True)
    previous = {name: os.environ.get(name) for name in (KERNEL_VARIABLE, BWD_KERNEL_VARIABLE)}

    mamba_fn, mamba_err = import_mamba_ssm()
    copy_gbs = copy_bandwidth_gbs(lambda fn: time_ms(fn, args.quick))
    header = (f"GPU {torch.cuda.get_device_name()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"commit {git_commit()}; torch {torch.__version__}; device-to-device copy {copy_gbs:.0f} GB/s; "
              f"chunk_size {args.chunk} (regs: {args.regs_chunk}); mamba-ssm: {'available' if mamba_fn else 'NOT available (' + str(mamba_err) + ')'}")
    print(header, flush=True)
    lines = [f"# bench_scan_v3: multiaxial scan forward alone\n\n{header}\n",
             "| d_model | HxW | dtype | floor MB | " + " | ".join(f"{k} ms | {k} % copy" for k in KERNELS)
             + " | best other / warp | mamba-ssm scan fwd ms | best other vs mamba | rel diff to warp y / states: "
             + "; ".join(OTHER_KERNELS) + " |",
             "|" + "---|" * (2 * len(KERNELS) + 8)]
    rows = []
    for d_model, height, width in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            op_args = scan_op_args(d_model, height, width, dtype, args.chunk)
            x, delta, A, B, C, D, bias = op_args[:7]
            outputs = {k: forward_with(k, op_args) for k in KERNELS}
            # chunk_states compare only at the same chunk size (the regs kernels may run at another).
            diffs = {k: (rel_diff(outputs[k][0], outputs["warp"][0]),
                         rel_diff(outputs[k][1], outputs["warp"][1])
                         if outputs[k][1].shape == outputs["warp"][1].shape else float("nan"))
                     for k in OTHER_KERNELS}
            del outputs
            times = {}
            for kernel in KERNELS:
                os.environ[KERNEL_VARIABLE] = kernel
                kernel_args = with_chunk(op_args, kernel)
                times[kernel] = time_ms(lambda: torch.ops.dermomamba.multiaxial_scan_fwd(*kernel_args), args.quick)
            mamba_ms = None
            if mamba_fn is not None and dtype == torch.float32:
                batch, dim = x.shape[:2]
                length = height * width
                xs = torch.randn(batch, NUM_DIRECTIONS * dim, length, device="cuda")
                dts = delta.reshape(batch, -1, length).float().clone()
                Bs = torch.randn(batch, NUM_DIRECTIONS, DSTATE, length, device="cuda")
                Cs = torch.randn(batch, NUM_DIRECTIONS, DSTATE, length, device="cuda")

                def mamba_forward():
                    with torch.no_grad():
                        mamba_fn(xs, dts, A, Bs, Cs, D, delta_bias=bias, delta_softplus=True)

                mamba_ms = time_ms(mamba_forward, args.quick)
                del xs, dts, Bs, Cs
            itemsize = torch.finfo(dtype).bits // 8
            floor, _ = multiaxial_floor_bytes(BATCH, x.shape[1], height, width, DSTATE, itemsize, itemsize, args.chunk)
            pct = {k: 100 * floor / times[k] / 1e6 / copy_gbs for k in KERNELS}
            best = min(times[k] for k in OTHER_KERNELS)
            row = {"d_model": d_model, "H": height, "W": width, "dtype": str(dtype), "floor_bytes": floor,
                   "mamba_scan_fwd_ms": mamba_ms}
            for k in KERNELS:
                row[f"{k}_ms"] = times[k]
                row[f"{k}_pct_copy"] = pct[k]
            for k in OTHER_KERNELS:
                row[f"{k}_rel_diff_y"], row[f"{k}_rel_diff_states"] = diffs[k]
            rows.append(row)
            vs_mamba = f"{mamba_ms / best:.2f}x" if mamba_ms else "-"
            lines.append(f"| {d_model} | {height}x{width} | {str(dtype)[6:]} | {floor / 1e6:.1f} | "
                         + " | ".join(f"{times[k]:.3f} | {pct[k]:.1f}%" for k in KERNELS)
                         + f" | {times['warp'] / best:.2f}x | {mamba_ms if mamba_ms is None else f'{mamba_ms:.3f}'} | "
                         f"{vs_mamba} | " + "; ".join(f"{diffs[k][0]:.1e} / {diffs[k][1]:.1e}" for k in OTHER_KERNELS)
                         + " |")
            print(lines[-1], flush=True)
            del x, delta, B, C
            torch.cuda.empty_cache()

    fb_rows = []
    if not args.skip_backward:
        fb_lines, fb_rows = forward_backward_table(args, copy_gbs, mamba_fn)
        lines += fb_lines

    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    with open(os.path.join(args.out, "bench_scan_v3.json"), "w") as handle:
        json.dump({"header": header, "copy_gbs": copy_gbs, "rows": rows, "forward_backward_rows": fb_rows}, handle,
                  indent=1)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "bench_scan_v3.md"), "w") as handle:
        handle.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
