"""BatchNorm2d in training mode at DermoMamba's shapes (batch 16, 192x256): PyTorch's CUDA BatchNorm
(F.batch_norm: cuDNN for these inputs) against the Triton kernels of dermomamba_kernels.batch_norm.

Per shape, layout and dtype (fp32 weight, bias and running statistics, as the model's norms have under
autocast): median times from CUDA events of the training forward and of forward + backward (dx, d weight,
d bias), each timed two ways: "eager" (events around each call, so the host's launch overhead shows when
it is the bottleneck) and "graphed" (the same step captured in a CUDA graph and replayed, GPU time only,
as the model's graphed training step runs it). The floor is the bytes a training forward + backward must
move at least, ``5 x numel x itemsize`` (forward: read x, write y; backward: read x and dy, write dx;
per-channel statistics are negligible), and its time at the device-to-device copy bandwidth measured in
the same run. The Triton kernels move ``8 x numel x itemsize`` (one more read of x for the statistics
and one more of x and dy for the backward's reductions, unless L2 holds them).

The last table weights each shape by how often a DermoMamba training step runs it (two cross-scale /
decoder norms share most sizes) and sums the step's BatchNorm time for both implementations.

  DERMOMAMBA_COMMIT=<sha> python benchmarks/bench_batch_norm.py [--dtypes fp16,fp32] [--layouts nchw,cl]
      [--shapes 16x192x256,...] [--sweep]

``--sweep`` also times fp16 NCHW forward + backward (graphed) for a few tile / grid settings of the
Triton kernels (TILE_ELEMENTS, WARPS, TARGET_PROGRAMS) and prints the best one per shape.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dermomamba_kernels.batch_norm import batch_norm  # noqa: E402
from bench_stamp import commit, parse_shapes  # noqa: E402

BATCH = 16
EPS = 1e-5
MOMENTUM = 0.1
# (channels, H, W) of DermoMamba's BatchNorm2d inputs at 192x256, and how many of them a training step
# runs: e_i's cross-scale block norm (c_{i-1} at stage i) and d_i's output norm share sizes; the encoder
# skip norms (c_i at stage i) and the SweepMamba bottleneck norm (channels-last view) once each.
SHAPES = ((16, 192, 256), (32, 192, 256), (32, 96, 128), (64, 96, 128), (64, 48, 64), (128, 48, 64),
          (128, 24, 32), (256, 24, 32), (256, 12, 16), (512, 12, 16), (512, 6, 8))
PER_STEP = {(16, 192, 256): 2, (32, 192, 256): 1, (32, 96, 128): 2, (64, 96, 128): 1, (64, 48, 64): 2,
            (128, 48, 64): 1, (128, 24, 32): 2, (256, 24, 32): 1, (256, 12, 16): 2, (512, 12, 16): 1,
            (512, 6, 8): 1}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR_PASSES = 5   # x read, y written; x and dy read, dx written
TRITON_PASSES = 8  # + x read for the statistics; x and dy read for the backward's reductions
WARMUP, REPS = 10, 50
SWEEP_SETTINGS = ({"TILE_ELEMENTS": 4096, "WARPS": 4, "TARGET_PROGRAMS": 1024},
                  {"TILE_ELEMENTS": 2048, "WARPS": 4, "TARGET_PROGRAMS": 1024},
                  {"TILE_ELEMENTS": 8192, "WARPS": 8, "TARGET_PROGRAMS": 1024},
                  {"TILE_ELEMENTS": 4096, "WARPS": 8, "TARGET_PROGRAMS": 1024},
                  {"TILE_ELEMENTS": 4096, "WARPS": 4, "TARGET_PROGRAMS": 2048},
                  {"TILE_ELEMENTS": 4096, "WARPS": 4, "TARGET_PROGRAMS": 512})


def implementations():
    return {
        "native": lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS),
        "triton": lambda x, rm, rv, w, b: batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, backend="triton"),
    }


def median_ms(fn, reps=REPS, warmup=WARMUP):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def graphed_median_ms(fn):
    """fn captured once in a CUDA graph (after a warm-up on a side stream), the replays timed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay)


def case_inputs(channels, height, width, dtype, channels_last):
    x = (torch.randn(BATCH, channels, height, width, device="cuda") * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(channels, device="cuda", requires_grad=True)
    b = torch.randn(channels, device="cuda", requires_grad=True)
    dy = torch.randn_like(x)
    return x, w, b, dy


def time_impl(fn, x, w, b, dy):
    """(forward ms, forward + backward ms) eager, and forward + backward graphed; its own running stats."""
    channels = x.shape[1]
    rm, rv = torch.zeros(channels, device="cuda"), torch.ones(channels, device="cuda")

    def forward():
        with torch.no_grad():
            fn(x, rm, rv, w, b)

    def forward_backward():
        torch.autograd.grad(fn(x, rm, rv, w, b), (x, w, b), dy)

    fwd, fb = median_ms(forward), median_ms(forward_backward)
    try:
        graphed = graphed_median_ms(forward_backward)
    except Exception as exc:  # a capture failure must not stop the table
        print(f"<!-- graph capture failed: {exc!r} -->")
        graphed = float("nan")
    return fwd, fb, graphed


def max_differences(x, w, b, dy):
    """Max |triton - native| of y and dx (a sanity column; tests/test_batch_norm.py judges the errors)."""
    outs = {}
    for name, fn in implementations().items():
        leaf = x.detach().clone().requires_grad_(True)
        y = fn(leaf, torch.zeros(x.shape[1], device="cuda"), torch.ones(x.shape[1], device="cuda"), w, b)
        (dx,) = torch.autograd.grad(y, leaf, dy)
        outs[name] = (y.float(), dx.float())
    return tuple((outs["triton"][i] - outs["native"][i]).abs().max().item() for i in range(2))


def copy_gbs():
    try:
        from common import copy_bandwidth_gbs
        return copy_bandwidth_gbs(median_ms)
    except Exception:  # common.py needs the dermomamba package; measure here instead
        src = torch.empty(2 ** 28 // 4, device="cuda").uniform_()
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e6


def sweep(shapes):
    from dermomamba_kernels.batch_norm import triton_kernels

    defaults = {name: getattr(triton_kernels, name) for name in SWEEP_SETTINGS[0]}
    print("\n## Triton settings sweep (fp16, NCHW, forward + backward graphed, us)\n")
    print("| C x H x W | " + " | ".join(
        f"tile {s['TILE_ELEMENTS']} w{s['WARPS']} p{s['TARGET_PROGRAMS']}" for s in SWEEP_SETTINGS) + " | best |")
    print("|---|" + "---|" * (len(SWEEP_SETTINGS) + 1))
    triton_fn = implementations()["triton"]
    try:
        for channels, height, width in shapes:
            x, w, b, dy = case_inputs(channels, height, width, torch.float16, False)
            times = []
            for setting in SWEEP_SETTINGS:
                for name, value in setting.items():
                    setattr(triton_kernels, name, value)
                times.append(time_impl(triton_fn, x, w, b, dy)[2] * 1e3)
            best = min(range(len(times)), key=lambda i: times[i])
            print(f"| {channels}x{height}x{width} | " + " | ".join(f"{t:.1f}" for t in times) + f" | {best} |",
                  flush=True)
    finally:
        for name, value in defaults.items():
            setattr(triton_kernels, name, value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="CxHxW,CxHxW,... (batch 16)")
    parser.add_argument("--dtypes", default="fp16,fp32", help="comma-separated of fp32, fp16, bf16")
    parser.add_argument("--layouts", default="nchw,cl", help="comma-separated of nchw, cl (channels-last)")
    parser.add_argument("--sweep", action="store_true", help="also sweep the Triton tile / grid settings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_batch_norm.py needs a CUDA GPU")
    import triton

    bandwidth = copy_gbs()
    print(f"# BatchNorm2d training forward + backward, batch {BATCH} | {torch.cuda.get_device_name()} | "
          f"torch {torch.__version__} | triton {triton.__version__} | cudnn {torch.backends.cudnn.version()} | "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | commit {commit()} | "
          f"copy bandwidth {bandwidth:.0f} GB/s")
    print("\nTimes in us (medians of CUDA events). floor = 5 x numel x itemsize bytes at the copy bandwidth; "
          "triton moves 8 x numel x itemsize.\n")
    print("| C x H x W | layout | dtype | floor MB | floor us | native fwd | triton fwd | native fwd+bwd | "
          "triton fwd+bwd | speedup | native graphed | triton graphed | speedup graphed | triton graphed / floor | "
          "max diff y, dx |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    step = {}
    for layout in args.layouts.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            for channels, height, width in args.shapes:
                x, w, b, dy = case_inputs(channels, height, width, dtype, layout == "cl")
                floor_bytes = FLOOR_PASSES * x.numel() * x.element_size()
                floor_us = floor_bytes / bandwidth / 1e3
                times = {name: time_impl(fn, x, w, b, dy) for name, fn in implementations().items()}
                (nf, nfb, ng), (tf, tfb, tg) = times["native"], times["triton"]
                diff_y, diff_dx = max_differences(x, w, b, dy)
                print(f"| {channels}x{height}x{width} | {layout} | {dtype_name} | {floor_bytes / 1e6:.1f} | "
                      f"{floor_us:.1f} | {nf * 1e3:.1f} | {tf * 1e3:.1f} | {nfb * 1e3:.1f} | {tfb * 1e3:.1f} | "
                      f"{nfb / tfb:.2f} | {ng * 1e3:.1f} | {tg * 1e3:.1f} | {ng / tg:.2f} | "
                      f"{tg * 1e3 / floor_us:.2f} | {diff_y:.1e}, {diff_dx:.1e} |", flush=True)
                step[(layout, dtype_name, (channels, height, width))] = (nfb, tfb, ng, tg)
                del x, w, b, dy
    print("\n## Per DermoMamba training step (batch 16, 192x256; shapes weighted by their count per step)\n")
    print("| layout | dtype | norms | native fwd+bwd ms | triton fwd+bwd ms | speedup | native graphed ms | "
          "triton graphed ms | speedup graphed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        for dtype_name in args.dtypes.split(","):
            rows = [(PER_STEP.get(shape, 0), value) for (lay, dt, shape), value in step.items()
                    if lay == layout and dt == dtype_name]
            count = sum(n for n, _ in rows)
            if not count:
                continue
            totals = [sum(n * value[i] for n, value in rows) for i in range(4)]
            print(f"| {layout} | {dtype_name} | {count} | {totals[0]:.3f} | {totals[1]:.3f} | "
                  f"{totals[0] / totals[1]:.2f} | {totals[2]:.3f} | {totals[3]:.3f} | {totals[2] / totals[3]:.2f} |")
    if args.sweep:
        sweep(args.shapes)


if __name__ == "__main__":
    main()
