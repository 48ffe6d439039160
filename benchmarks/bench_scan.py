"""Benchmark of the CUDA selective scans (issue 3) against mamba-ssm and the reference, on one GPU.

Tables (medians of triton.testing.do_bench, which flushes L2 between runs; times in ms):

1. SS2D core at DermoMamba's shapes (batch 16, 192x256 input; d_inner = 2 d_model, N = 16,
   R = ceil(d_model / 16)), forward and forward + backward (grads of x and every parameter):
     cuda       multiaxial_selective_scan(backend="cuda"): projections in the native layout + our scan
     mamba      the published path: 4 materialised direction copies, two einsums, mamba-ssm's
                selective_scan_fn on fp32 inputs, 3 merge copies (when mamba-ssm imports)
     reference  multiaxial_selective_scan_ref (Python loop over L; only for L <= --reference-max-len)
2. The scan alone on precomputed projections (the multiaxial_scan_fwd / _bwd ops; mamba-ssm's
   selective_scan_fn on its materialised inputs), with achieved bandwidth = bytes that must move
   (counted in floor_bytes, see benchmarks/notes/scan.md) / time, against a device-to-device copy
   measured in the same run.
3. selective_scan_fn at mamba-ssm's own test shapes (batch 2, dim 64..1024, L 128..4096, N 16,
   variable B / C, D, z, delta_bias, softplus), ours against mamba-ssm's, fp32 and bf16.

Usage: python benchmarks/bench_scan.py [--out DIR] [--quick] [--chunks 64,128,256]
Writes DIR/bench_scan.json and DIR/bench_scan.md (DIR defaults to $OUT, else benchmarks/out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: an installed dermomamba (with its compiled _C) wins over the source tree.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

import dermomamba_kernels as dk  # noqa: E402
from dermomamba_kernels.selective_scan import extension  # noqa: E402  (fakes + autograd of the ops)

from common import (BATCH, DSTATE, NUM_DIRECTIONS, SHAPES, copy_bandwidth_gbs,  # noqa: E402
                    git_commit, import_mamba_ssm, published_core)

MAMBA_TEST_SHAPES = [(2, dim, length) for dim in (64, 1024) for length in (128, 512, 2048, 4096)]


def time_ms(fn, quick=False):
    from triton.testing import do_bench

    if quick:
        return do_bench(fn, warmup=5, rep=20, return_mode="median")
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


# ---- the published SS2D core around a 1-D scan ----

def make_ss2d_inputs(d_model, height, width, dtype=torch.float32):
    dim = 2 * d_model
    rank = math.ceil(d_model / 16)
    f32 = dict(dtype=torch.float32, device="cuda")
    return [torch.randn(BATCH, dim, height, width, **f32).to(dtype).requires_grad_(),
            (torch.randn(NUM_DIRECTIONS, rank + 2 * DSTATE, dim, **f32) / dim ** 0.5).requires_grad_(),
            (torch.randn(NUM_DIRECTIONS, dim, rank, **f32) / rank ** 0.5).requires_grad_(),
            (0.5 * torch.randn(NUM_DIRECTIONS, dim, **f32) - 1.0).requires_grad_(),
            torch.log(torch.rand(NUM_DIRECTIONS * dim, DSTATE, **f32) * 2 + 0.1).requires_grad_(),
            torch.randn(NUM_DIRECTIONS * dim, **f32).requires_grad_()]


def fwd_and_fwd_bwd(op, args, quick=False, grad_of=None):
    grad_of = args if grad_of is None else grad_of
    with torch.no_grad():
        probe = op(*args)
    grad = torch.randn(probe.shape, device=probe.device, dtype=probe.dtype)

    def fwd():
        with torch.no_grad():
            op(*args)

    def fwd_bwd():
        torch.autograd.grad(op(*args), grad_of, grad)

    return time_ms(fwd, quick), time_ms(fwd_bwd, quick)


# ---- floors: bytes that must move (see benchmarks/notes/scan.md) ----

def multiaxial_floor_bytes(batch, dim, height, width, dstate, x_bytes, proj_bytes, chunk):
    length = height * width
    chunks = -(-length // chunk)
    x = batch * dim * length * x_bytes
    delta = batch * NUM_DIRECTIONS * dim * length * proj_bytes
    bc = 2 * batch * NUM_DIRECTIONS * dstate * length * proj_bytes
    y = batch * dim * length * 4
    states = batch * NUM_DIRECTIONS * dim * chunks * dstate * 4
    fwd = x + delta + bc + y + states
    # backward: read x, delta, B, C, dy, chunk_states; write dx, ddelta, dB, dC
    bwd = (x + delta + bc + y + states) + (x + delta + bc)
    return fwd, bwd


def scan_only_ours(x, delta, A, B, C, D, bias, chunk):
    ops = torch.ops.dermomamba

    def fwd():
        return ops.multiaxial_scan_fwd(x, delta, A, B, C, D, bias, True, chunk)

    dy = torch.randn(x.shape, device=x.device)

    def fwd_bwd():
        y, states = ops.multiaxial_scan_fwd(x, delta, A, B, C, D, bias, True, chunk)
        return ops.multiaxial_scan_bwd(dy, x, delta, A, B, C, D, bias, True, states, chunk, False)

    return fwd, fwd_bwd


def projections_native(x, params):
    """The wrapper's native-layout projections, by the wrapper's own code (extension._projections): delta
    (B, 4, d, H, W) and B, C as views of one channel-last (B, H, W, 4, rows) projection whose rows are
    [B, C, dt, zeros] padded to a multiple of 8 (16-byte aligned B and C, what the model's scan reads)."""
    from dermomamba_kernels.selective_scan import extension
    x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds = params
    weights = extension._projection_weights(x_proj_weight, dt_projs_weight, x.dtype)
    _, delta, B, C = extension._projections(x, weights)
    return delta, B, C, -torch.exp(A_logs.float()), Ds.float(), dt_projs_bias.float().reshape(-1)


def fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(REPO_ROOT, "benchmarks", "out")))
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--reference-max-len", type=int, default=800)
    parser.add_argument("--chunks", default="64,128,256", help="chunk sizes tried for the scan-only table")
    parser.add_argument("--skip-1d", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False

    mamba_fn, mamba_err = import_mamba_ssm()
    device_name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs(lambda fn: time_ms(fn, args.quick))
    chunk = extension.chunk_size_for(torch.device("cuda"))
    header = (f"GPU {device_name}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {git_commit()}; "
              f"torch {torch.__version__}; device-to-device copy {copy_gbs:.0f} GB/s; chunk_size {chunk}; "
              f"mamba-ssm: {'available' if mamba_fn else 'NOT available (' + str(mamba_err) + ')'}")
    print(header, flush=True)
    results = {"header": header, "copy_gbs": copy_gbs, "ss2d": [], "scan_only": [], "selective_scan_1d": []}
    lines = [f"# bench_scan\n\n{header}\n"]

    # ---- table 1: the SS2D core, end to end ----
    lines.append("\n## SS2D core (multiaxial op incl. projections), fp32, batch 16; ms (median)\n")
    lines.append("| d_model | HxW | cuda fwd | cuda f+b | of which projections fwd | proj f+b | mamba fwd | "
                 "mamba f+b | ref fwd | ref f+b | x mamba fwd | x mamba f+b |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d_model, height, width in SHAPES:
        inputs = make_ss2d_inputs(d_model, height, width)
        row = {"d_model": d_model, "H": height, "W": width}

        def ours(*a):
            return dk.multiaxial_selective_scan(*a, backend="cuda")

        row["cuda_fwd"], row["cuda_fb"] = fwd_and_fwd_bwd(ours, inputs, args.quick)

        def projections(*a):
            # the wrapper's native-layout einsums alone, summed so that one gradient reaches all
            delta, B, C = projections_native(a[0], list(a[1:]))[:3]
            return delta.sum((1, 2)) + B.sum((1, 2)) + C.sum((1, 2))

        row["proj_fwd"], row["proj_fb"] = fwd_and_fwd_bwd(projections, inputs, args.quick, grad_of=inputs[:3])
        row["mamba_fwd"] = row["mamba_fb"] = None
        if mamba_fn is not None:
            row["mamba_fwd"], row["mamba_fb"] = fwd_and_fwd_bwd(published_core(mamba_fn), inputs, args.quick)
        row["ref_fwd"] = row["ref_fb"] = None
        if height * width <= args.reference_max_len:
            def ref(*a):
                return dk.multiaxial_selective_scan(*a, backend="reference")
            row["ref_fwd"], row["ref_fb"] = fwd_and_fwd_bwd(ref, inputs, quick=True)
        ratio_f = row["mamba_fwd"] / row["cuda_fwd"] if row["mamba_fwd"] else None
        ratio_fb = row["mamba_fb"] / row["cuda_fb"] if row["mamba_fb"] else None
        row["speedup_fwd"], row["speedup_fb"] = ratio_f, ratio_fb
        results["ss2d"].append(row)
        lines.append(f"| {d_model} | {height}x{width} | {fmt(row['cuda_fwd'])} | {fmt(row['cuda_fb'])} | "
                     f"{fmt(row['proj_fwd'])} | {fmt(row['proj_fb'])} | {fmt(row['mamba_fwd'])} | {fmt(row['mamba_fb'])} | {fmt(row['ref_fwd'], 1)} | "
                     f"{fmt(row['ref_fb'], 1)} | {fmt(ratio_f, 2)} | {fmt(ratio_fb, 2)} |")
        print(lines[-1], flush=True)
        del inputs
        torch.cuda.empty_cache()

    # ---- table 2: the scan alone, bandwidth ----
    chunks = [int(c) for c in args.chunks.split(",") if c]
    lines.append(f"\n## Scan alone on precomputed projections (fp32 unless noted); copy = {copy_gbs:.0f} GB/s\n")
    lines.append("| d_model | HxW | dtype | chunk | fwd ms | fwd GB/s | fwd % copy | f+b ms | f+b GB/s | f+b % copy | "
                 "mamba scan fwd | mamba scan f+b |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d_model, height, width in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_ss2d_inputs(d_model, height, width, dtype)
            x = inputs[0].detach()
            with torch.no_grad():
                delta, B, C, A, D, bias = projections_native(x, [p.detach() for p in inputs[1:]])
                delta = delta.contiguous()
            mamba_f = mamba_fb = None
            if mamba_fn is not None and dtype == torch.float32:
                batch, dim = x.shape[:2]
                length = height * width
                xs = torch.randn(batch, NUM_DIRECTIONS * dim, length, device="cuda", requires_grad=True)
                dts = (delta.reshape(batch, -1, length).float().clone()).requires_grad_()
                Bs = torch.randn(batch, NUM_DIRECTIONS, DSTATE, length, device="cuda", requires_grad=True)
                Cs = torch.randn(batch, NUM_DIRECTIONS, DSTATE, length, device="cuda", requires_grad=True)
                margs = [xs, dts, A.clone().requires_grad_(), Bs, Cs, D.clone().requires_grad_()]

                def mscan(u, dl, a, b, c, d):
                    return mamba_fn(u, dl, a, b, c, d, delta_bias=bias, delta_softplus=True)

                mamba_f, mamba_fb = fwd_and_fwd_bwd(mscan, margs, args.quick)
            for ch in chunks:
                if dtype != torch.float32 and ch != chunk:
                    continue
                fwd, fwd_bwd = scan_only_ours(x, delta, A, B, C, D, bias, ch)
                t_f, t_fb = time_ms(fwd, args.quick), time_ms(fwd_bwd, args.quick)
                itemsize = torch.finfo(dtype).bits // 8
                fb, bb = multiaxial_floor_bytes(BATCH, x.shape[1], height, width, DSTATE, itemsize, itemsize, ch)
                row = {"d_model": d_model, "H": height, "W": width, "dtype": str(dtype), "chunk": ch,
                       "fwd_ms": t_f, "fb_ms": t_fb, "floor_fwd_bytes": fb, "floor_bwd_bytes": bb,
                       "fwd_gbs": fb / t_f / 1e6, "fb_gbs": (fb + bb) / t_fb / 1e6,
                       "mamba_scan_fwd_ms": mamba_f if ch == chunk else None,
                       "mamba_scan_fb_ms": mamba_fb if ch == chunk else None}
                results["scan_only"].append(row)
                lines.append(f"| {d_model} | {height}x{width} | {str(dtype)[6:]} | {ch} | {t_f:.3f} | "
                             f"{row['fwd_gbs']:.0f} | {100 * row['fwd_gbs'] / copy_gbs:.0f}% | {t_fb:.3f} | "
                             f"{row['fb_gbs']:.0f} | {100 * row['fb_gbs'] / copy_gbs:.0f}% | "
                             f"{fmt(row['mamba_scan_fwd_ms'])} | {fmt(row['mamba_scan_fb_ms'])} |")
                print(lines[-1], flush=True)
            del inputs
            torch.cuda.empty_cache()

    # ---- table 3: selective_scan_fn at mamba-ssm's test shapes ----
    if not args.skip_1d:
        lines.append("\n## selective_scan_fn at mamba-ssm's test shapes (N 16, D, z, delta_bias, softplus); ms\n")
        lines.append("| batch | dim | L | dtype | cuda fwd | cuda f+b | mamba fwd | mamba f+b | x mamba fwd | "
                     "x mamba f+b |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for batch, dim, length in MAMBA_TEST_SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                f32 = dict(device="cuda", dtype=torch.float32)
                u = torch.randn(batch, dim, length, **f32).to(dtype).requires_grad_()
                delta = (0.5 * torch.rand(batch, dim, length, **f32)).to(dtype).requires_grad_()
                A = (-0.5 * torch.rand(dim, DSTATE, **f32)).requires_grad_()
                B = torch.randn(batch, DSTATE, length, **f32).to(dtype).requires_grad_()
                C = torch.randn(batch, DSTATE, length, **f32).to(dtype).requires_grad_()
                D = torch.randn(dim, **f32).requires_grad_()
                z = torch.randn(batch, dim, length, **f32).to(dtype).requires_grad_()
                bias = (0.5 * torch.randn(dim, **f32)).requires_grad_()
                sargs = [u, delta, A, B, C, D, z, bias]

                def ours(*a):
                    return dk.selective_scan_fn(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True,
                                                backend="cuda")

                c_f, c_fb = fwd_and_fwd_bwd(ours, sargs, args.quick)
                m_f = m_fb = None
                if mamba_fn is not None:
                    def theirs(*a):
                        return mamba_fn(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True)
                    m_f, m_fb = fwd_and_fwd_bwd(theirs, sargs, args.quick)
                row = {"batch": batch, "dim": dim, "L": length, "dtype": str(dtype), "cuda_fwd": c_f, "cuda_fb": c_fb,
                       "mamba_fwd": m_f, "mamba_fb": m_fb}
                results["selective_scan_1d"].append(row)
                lines.append(f"| {batch} | {dim} | {length} | {str(dtype)[6:]} | {c_f:.4f} | {c_fb:.4f} | "
                             f"{fmt(m_f, 4)} | {fmt(m_fb, 4)} | {fmt(m_f / c_f if m_f else None, 2)} | "
                             f"{fmt(m_fb / c_fb if m_fb else None, 2)} |")
                print(lines[-1], flush=True)

    with open(os.path.join(args.out, "bench_scan.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "bench_scan.md"), "w") as handle:
        handle.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
