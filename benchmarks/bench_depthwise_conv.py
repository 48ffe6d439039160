"""Depthwise convolution at DermoMamba's shapes: PyTorch's weight gradient (conv_depthwise2d_grad_weight /
cuDNN) against the Triton kernel of dermomamba_kernels.depthwise_conv (backend="triton"). GPU only.

Per call (batch, channels, H x W, kernel, dilation, dtype): median times (CUDA events, through
triton.testing.do_bench, L2 flushed between runs) of
  wgrad    d weight and d bias alone: aten.convolution_backward(output_mask=[False, True, True]) vs
           the Triton op (grad_weight_op);
  fwd+bwd  F.conv2d + autograd (y, dx, dweight, dbias) vs depthwise_conv2d(backend="triton") (the same
           forward and dx, the Triton d weight);
the ratio PyTorch / Triton, the Triton weight gradient's rate against its floor (read x and dy once)
and its max error against an fp64 reference. The default rows are the depthwise convs of one
training step at batch 16, 192x256 (each Cross-Scale Mamba Block: (1, 7), (7, 1), 3x3 at dilations
1-3 on a quarter of the channels; SS2D's 3x3 on 2x the quarter at batch 48, the three branches
stacked; PCAM's 9x9 at the bottleneck), so the "sum" line estimates a step's total. --grid runs the
brief's full grid (batch 16 and 48, 4/8/16/32 channels, 192x256 / 96x128 / 48x64, every kernel and
dilation). --sweep times the weight gradient under other tile / warp / program-count settings
(module constants of triton_kernels.py) on a subset, to choose them. The last line says whether
Triton beat PyTorch on every row (the condition for "auto" to take it: AUTO_ORDER in
dermomamba_kernels/depthwise_conv/__init__.py).

  DERMOMAMBA_COMMIT=<sha> python benchmarks/bench_depthwise_conv.py [--dtypes fp16,fp32] [--grid] [--sweep]
"""

import argparse
import datetime
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dermomamba_kernels.depthwise_conv import (depthwise_conv2d, depthwise_conv2d_grad_weight_ref,  # noqa: E402
                                               same_padding)
from dermomamba_kernels.depthwise_conv import triton_kernels  # noqa: E402
from dermomamba_kernels.depthwise_conv.triton_ops import grad_weight_op  # noqa: E402
from bench_stamp import commit  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP_MS, REP_MS = 25, 100
AXIAL_KERNELS = ((1, 7), (7, 1), (3, 3))
DILATIONS = (1, 2, 3)
BATCH = 16
BRANCHES = 3  # SS2D runs the three dilation branches stacked along the batch
# (H, W, quarter channels) of the Cross-Scale Mamba Blocks e1..e5 at a 192x256 input, widths (16, ..., 256).
LEVELS = ((192, 256, 4), (96, 128, 8), (48, 64, 16), (24, 32, 32), (12, 16, 64))
PCAM_CASE = (BATCH, 512, 6, 8, (9, 9), 1)
GRID_BATCHES = (16, 48)
GRID_CHANNELS = (4, 8, 16, 32)
GRID_MAPS = ((192, 256), (96, 128), (48, 64))
# Settings tried by --sweep, module constants of triton_kernels.py (ACC_REGISTERS 0: the per-tap
# reduction for every kernel).
SWEEP_KNOBS = ("ACC_REGISTERS", "WARPS", "TARGET_PROGRAMS", "HALO_RATIO")
SWEEP = ([(64, 4, 2048, 1)]  # the defaults, first
         + [combo for combo in itertools.product((32, 64), (4, 8), (1024, 4096), (1, 4))]
         + [(0, 4, 2048, 1), (0, 8, 2048, 1)])
SWEEP_ROWS = ((16, 4, 192, 256, (1, 7), 1), (16, 4, 192, 256, (7, 1), 3), (16, 4, 192, 256, (3, 3), 2),
              (48, 8, 192, 256, (3, 3), 1), (16, 16, 48, 64, (3, 3), 1), PCAM_CASE)


def model_rows():
    rows = []
    for height, width, quarter in LEVELS:
        rows += [(BATCH, quarter, height, width, kernel, d) for kernel in AXIAL_KERNELS for d in DILATIONS]
        rows.append((BRANCHES * BATCH, 2 * quarter, height, width, (3, 3), 1))
    return rows + [PCAM_CASE]


def grid_rows():
    return [(b, c, h, w, kernel, d) for b in GRID_BATCHES for c in GRID_CHANNELS for h, w in GRID_MAPS
            for kernel in AXIAL_KERNELS for d in DILATIONS] + [PCAM_CASE]


def median_ms(fn):
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def make_inputs(row, dtype):
    batch, channels, height, width, kernel, dilation = row
    x = (torch.randn(batch, channels, height, width, device="cuda") + 0.5).to(dtype)
    weight = torch.randn(channels, 1, *kernel, device="cuda").to(dtype)
    bias = torch.randn(channels, device="cuda").to(dtype)
    dy = torch.randn(batch, channels, height, width, device="cuda").to(dtype)
    return x, weight, bias, dy


def torch_wgrad(dy, x, weight, dilation):
    padding = same_padding(tuple(weight.shape[-2:]), (dilation, dilation))
    return torch.ops.aten.convolution_backward(dy, x, weight, [weight.shape[0]], [1, 1], [padding[0], padding[2]],
                                               [dilation, dilation], False, [0, 0], x.shape[1],
                                               [False, True, True])[1:]


def triton_wgrad(dy, x, weight, dilation):
    kernel = list(weight.shape[-2:])
    return grad_weight_op(dy, x, kernel, [dilation, dilation], list(same_padding(kernel, (dilation, dilation))))


def forward_backward(fn, x, weight, bias, dy):
    leaves = (x, weight, bias)
    return torch.autograd.grad(fn(*leaves), leaves, dy)


def floor_bytes(row, dtype):
    batch, channels, height, width, _, _ = row
    return 2 * batch * channels * height * width * torch.empty((), dtype=dtype).element_size()


def max_error(row, x, weight, dy, dilation):
    kernel = tuple(weight.shape[-2:])
    exact, _ = depthwise_conv2d_grad_weight_ref(dy.double(), x.double(), kernel, (dilation, dilation),
                                                same_padding(kernel, (dilation, dilation)))
    ours = triton_wgrad(dy, x, weight, dilation)[0].double()
    theirs = torch_wgrad(dy, x, weight, dilation)[0].double()
    return (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()


def row_label(row):
    batch, channels, height, width, (kh, kw), dilation = row
    return f"{batch} | {channels} | {height}x{width} | {kh}x{kw} | {dilation}"


def run_table(rows, dtype_names):
    print("| B | C | HxW | kernel | dil | dtype | wgrad torch us | wgrad triton us | ratio | triton GB/s | "
          "fwd+bwd torch us | fwd+bwd triton us | ratio | err triton | err torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    triton_wins = True
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        totals = [0.0, 0.0, 0.0, 0.0]
        for row in rows:
            x, weight, bias, dy = make_inputs(row, dtype)
            dilation = row[-1]
            wgrad_torch = median_ms(lambda: torch_wgrad(dy, x, weight, dilation)) * 1e3
            wgrad_triton = median_ms(lambda: triton_wgrad(dy, x, weight, dilation)) * 1e3
            leaves = [t.detach().requires_grad_(True) for t in (x, weight, bias)]
            native = (lambda a, w, b: F.conv2d(a, w, b, 1, "same", dilation, a.shape[1]))
            ours = (lambda a, w, b: depthwise_conv2d(a, w, b, dilation, "same", backend="triton"))
            fb_torch = median_ms(lambda: forward_backward(native, *leaves, dy)) * 1e3
            fb_triton = median_ms(lambda: forward_backward(ours, *leaves, dy)) * 1e3
            err_ours, err_theirs = max_error(row, x, weight, dy, dilation)
            for i, value in enumerate((wgrad_torch, wgrad_triton, fb_torch, fb_triton)):
                totals[i] += value
            triton_wins &= wgrad_triton < wgrad_torch and fb_triton < fb_torch
            print(f"| {row_label(row)} | {dtype_name} | {wgrad_torch:.1f} | {wgrad_triton:.1f} | "
                  f"{wgrad_torch / wgrad_triton:.2f} | {floor_bytes(row, dtype) / wgrad_triton / 1e3:.0f} | "
                  f"{fb_torch:.1f} | {fb_triton:.1f} | {fb_torch / fb_triton:.2f} | {err_ours:.2e} | "
                  f"{err_theirs:.2e} |", flush=True)
        print(f"| sum of the {len(rows)} rows | {dtype_name} | {totals[0]:.0f} | {totals[1]:.0f} | "
              f"{totals[0] / totals[1]:.2f} | | {totals[2]:.0f} | {totals[3]:.0f} | {totals[2] / totals[3]:.2f} | | |",
              flush=True)
    return triton_wins


def run_sweep(dtype_names):
    saved = {name: getattr(triton_kernels, name) for name in SWEEP_KNOBS}
    print(f"\nweight gradient alone, us; columns: {', '.join(SWEEP_KNOBS)}")
    print("\n| B | C | HxW | kernel | dil | dtype | " + " | ".join("a{} w{} p{} h{}".format(*combo) for combo in SWEEP)
          + " |")
    print("|---" * (6 + len(SWEEP)) + "|")
    try:
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            for row in SWEEP_ROWS:
                x, weight, _, dy = make_inputs(row, dtype)
                cells = []
                for combo in SWEEP:
                    for name, value in zip(SWEEP_KNOBS, combo):
                        setattr(triton_kernels, name, value)
                    try:
                        cells.append(f"{median_ms(lambda: triton_wgrad(dy, x, weight, row[-1])) * 1e3:.1f}")
                    except Exception as exc:  # e.g. out of registers / shared memory for a setting
                        cells.append(f"fail ({type(exc).__name__})")
                print(f"| {row_label(row)} | {dtype_name} | " + " | ".join(cells) + " |", flush=True)
    finally:
        for name, value in saved.items():
            setattr(triton_kernels, name, value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="fp16,fp32", help="comma-separated of fp32, fp16, bf16")
    parser.add_argument("--grid", action="store_true", help="the full grid of batches, channels, maps and kernels")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernel's tile / warp settings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_depthwise_conv.py needs a CUDA GPU")
    dtype_names = args.dtypes.split(",")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} | commit {commit()} | "
          + ", ".join(f"{name} {getattr(triton_kernels, name)}" for name in SWEEP_KNOBS))
    wins = run_table(grid_rows() if args.grid else model_rows(), dtype_names)
    print(f"triton faster than PyTorch (wgrad and fwd+bwd) on every row: {'yes' if wins else 'no'}")
    if args.sweep:
        run_sweep(dtype_names[:1])


if __name__ == "__main__":
    main()
