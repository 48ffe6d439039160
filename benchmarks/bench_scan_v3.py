"""Benchmark of the multiaxial scan's forward alone: the warp kernel (v2) against the lane kernels (v3:
"lane", one state per lane; "lane4", 4 lanes x 4 states per sequence) and mamba-ssm's
selective_scan_fn, at DermoMamba's eight SS2D shapes, on one GPU.

The forward kernel is chosen per call by DERMOMAMBA_SCAN_FWD_KERNEL=warp|lane|lane4 (read by
csrc/cuda/selective_scan_cuda.cpp on every call). Inputs are the wrapper's: x (B, d, H, W), delta
(B, 4, d, H, W) contiguous, B and C channel-last views of one (B, H, W, 4, R + 2N) projection;
mamba-ssm runs on its own materialised (B, 4 d, L) / (B, 4, N, L) fp32 inputs (the scan alone, no
copies or einsums counted). Achieved bandwidth = the forward's floor bytes (bench_scan.multiaxial_floor_bytes,
benchmarks/notes/scan.md section 1) / time, against a device-to-device copy measured in the same run.
Before timing, the lane kernels' outputs are compared with the warp kernel's at every shape (y and
chunk_states, relative difference).
Medians of triton.testing.do_bench (L2 flushed between runs), ms.

Usage: python benchmarks/bench_scan_v3.py [--out DIR] [--quick] [--chunk 128]
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
KERNELS = ("warp", "lane", "lane4")
LANE_KERNELS = KERNELS[1:]


def forward_with(kernel, args):
    os.environ[KERNEL_VARIABLE] = kernel
    return torch.ops.dermomamba.multiaxial_scan_fwd(*args)


def rel_diff(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "out")))
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--chunk", type=int, default=extension.chunk_size_for(torch.device("cuda")))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    previous = os.environ.get(KERNEL_VARIABLE)

    mamba_fn, mamba_err = import_mamba_ssm()
    copy_gbs = copy_bandwidth_gbs(lambda fn: time_ms(fn, args.quick))
    header = (f"GPU {torch.cuda.get_device_name()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"commit {git_commit()}; torch {torch.__version__}; device-to-device copy {copy_gbs:.0f} GB/s; "
              f"chunk_size {args.chunk}; mamba-ssm: {'available' if mamba_fn else 'NOT available (' + str(mamba_err) + ')'}")
    print(header, flush=True)
    lines = [f"# bench_scan_v3: multiaxial scan forward alone\n\n{header}\n",
             "| d_model | HxW | dtype | floor MB | warp ms | warp % copy | lane ms | lane % copy | lane4 ms | "
             "lane4 % copy | best lane / warp | mamba-ssm scan fwd ms | best lane vs mamba | "
             "rel diff to warp y / states: lane; lane4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for d_model, height, width in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            inputs = make_ss2d_inputs(d_model, height, width, dtype)
            x = inputs[0].detach()
            with torch.no_grad():
                delta, B, C, A, D, bias = projections_native(x, [p.detach() for p in inputs[1:]])
                delta = delta.contiguous()
            op_args = (x, delta, A, B, C, D, bias, True, args.chunk)
            outputs = {k: forward_with(k, op_args) for k in KERNELS}
            diffs = {k: (rel_diff(outputs[k][0], outputs["warp"][0]), rel_diff(outputs[k][1], outputs["warp"][1]))
                     for k in LANE_KERNELS}
            del outputs
            times = {}
            for kernel in KERNELS:
                os.environ[KERNEL_VARIABLE] = kernel
                times[kernel] = time_ms(lambda: torch.ops.dermomamba.multiaxial_scan_fwd(*op_args), args.quick)
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
            best = min(times[k] for k in LANE_KERNELS)
            row = {"d_model": d_model, "H": height, "W": width, "dtype": str(dtype), "floor_bytes": floor,
                   "mamba_scan_fwd_ms": mamba_ms}
            for k in KERNELS:
                row[f"{k}_ms"] = times[k]
                row[f"{k}_pct_copy"] = pct[k]
            for k in LANE_KERNELS:
                row[f"{k}_rel_diff_y"], row[f"{k}_rel_diff_states"] = diffs[k]
            rows.append(row)
            vs_mamba = f"{mamba_ms / best:.2f}x" if mamba_ms else "-"
            lines.append(f"| {d_model} | {height}x{width} | {str(dtype)[6:]} | {floor / 1e6:.1f} | {times['warp']:.3f} | "
                         f"{pct['warp']:.1f}% | {times['lane']:.3f} | {pct['lane']:.1f}% | {times['lane4']:.3f} | "
                         f"{pct['lane4']:.1f}% | {times['warp'] / best:.2f}x | "
                         f"{mamba_ms if mamba_ms is None else f'{mamba_ms:.3f}'} | {vs_mamba} | "
                         f"{diffs['lane'][0]:.1e} / {diffs['lane'][1]:.1e}; {diffs['lane4'][0]:.1e} / {diffs['lane4'][1]:.1e} |")
            print(lines[-1], flush=True)
            del inputs, x, delta, B, C
            torch.cuda.empty_cache()

    if previous is None:
        os.environ.pop(KERNEL_VARIABLE, None)
    else:
        os.environ[KERNEL_VARIABLE] = previous
    with open(os.path.join(args.out, "bench_scan_v3.json"), "w") as handle:
        json.dump({"header": header, "copy_gbs": copy_gbs, "rows": rows}, handle, indent=1)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "bench_scan_v3.md"), "w") as handle:
        handle.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
