"""SS2D's output gate ``LayerNorm(y) * silu(z)``: the published expression (PyTorch eager) against the
fused Triton op (dermomamba_kernels.layer_norm.gated_layer_norm, backend="triton"). GPU only.

Shapes: DermoMamba's SS2D gates at batch 16, 192x256 in training (the shared VSSBlock's three calls
batched: 48 images), (rows, d_inner) = (48*192*256, 8), (48*96*128, 16), (48*48*64, 32), (48*24*32, 64),
(48*12*16, 128). y fp32 (the scan's sum), z fp16, fp32 parameters, under fp16 autocast, as SS2D runs.

Implementations: "reference" (``F.layer_norm(y) * F.silu(z)``, an fp32 result), "reference+cast" (the
same, cast to fp16 as out_proj does under autocast: what SS2D computes), "triton" (fp32 result) and
"triton-fp16" (``out_dtype=torch.float16``, as SS2D would call it). Per shape: median times (CUDA
events around each call, L2 flushed before each) of the forward (no grad) and of forward + backward
(dy, dz, dweight, dbias); the bytes the fused op must move at least (the floor: forward reads y, z and
writes out plus 8 bytes of statistics per row; backward reads dout, y, z, the statistics and writes
dy, dz) and the time that takes at the measured device-to-device copy rate; the achieved fraction of
it; the bytes autograd keeps for the backward; the ratio against the reference with the same result
dtype; and the max |triton - reference| of the result. Two columns separate the GPU's time from the
host's (eager launches, autograd, the custom op's Python): forward + backward captured once in a CUDA
graph and replayed ("graphed"), and the backward kernel alone (the registered backward op called
directly, triton rows only), with its grid capped at BACKWARD_PROGRAMS programs that loop over tiles
(the default) and uncapped (one tile per program; more partial sums to add): which grid is faster.

  DERMOMAMBA_COMMIT=<sha> python benchmarks/bench_gated_layer_norm.py [--shapes 2359296x8,...] [--reps 50]

``--smoke-cpu`` (with TRITON_INTERPRET=1 and small --shapes) runs the script's code path on the CPU
with wall-clock timing, to check the script itself; its numbers mean nothing.
"""

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dermomamba_kernels.layer_norm import gated_layer_norm  # noqa: E402
from bench_stamp import commit, parse_shapes  # noqa: E402

EPS = 1e-5
BATCH_IMAGES = 48  # batch 16 x the shared VSSBlock's 3 calls
SHAPES = ((BATCH_IMAGES * 192 * 256, 8), (BATCH_IMAGES * 96 * 128, 16), (BATCH_IMAGES * 48 * 64, 32),
          (BATCH_IMAGES * 24 * 32, 64), (BATCH_IMAGES * 12 * 16, 128))
STATS_BYTES_PER_ROW = 8  # fp32 mean and rstd
Y_BYTES, Z_BYTES = 4, 2  # fp32 y, fp16 z
L2_FLUSH_BYTES = 256 * 2 ** 20  # larger than any current GPU's L2
COPY_BYTES = 512 * 2 ** 20
WARMUP = 5


def implementations(channels):
    def published(y, z, w, b):
        return F.layer_norm(y, (channels,), w, b, EPS) * F.silu(z)

    return {
        "reference": published,
        "reference+cast": lambda y, z, w, b: published(y, z, w, b).to(torch.float16),
        "triton": lambda y, z, w, b: gated_layer_norm(y, z, w, b, EPS, backend="triton"),
        "triton-fp16": lambda y, z, w, b: gated_layer_norm(y, z, w, b, EPS, out_dtype=torch.float16,
                                                           backend="triton"),
    }


BASELINE_OF = {"reference": "reference", "reference+cast": "reference+cast", "triton": "reference",
               "triton-fp16": "reference+cast"}


def floor_bytes(rows, channels, out_bytes):
    elements = rows * channels
    stats = rows * STATS_BYTES_PER_ROW
    forward = elements * (Y_BYTES + Z_BYTES + out_bytes) + stats
    backward = elements * (out_bytes + Y_BYTES + Z_BYTES + Y_BYTES + Z_BYTES) + stats
    return forward, backward


DEVICE = "cuda"


def median_ms(fn, reps):
    """Median of CUDA-event times of fn, each call after an L2 flush (cold caches, as in a network)."""
    if DEVICE != "cuda":  # --smoke-cpu
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed_ms(fn, reps):
    """Median replay time of fn captured in a CUDA graph (the GPU's time only); None on the CPU smoke run."""
    if DEVICE != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_ms(graph.replay, reps)


def copy_rate_bytes_per_ms(reps):
    copy_bytes = COPY_BYTES if DEVICE == "cuda" else COPY_BYTES // 64
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    return 2 * copy_bytes / median_ms(lambda: dst.copy_(src), reps)


def saved_bytes(fn, args):
    """Bytes of the distinct storages autograd keeps for the backward of fn(*args) (inputs included)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


UNCAPPED_PROGRAMS = 2 ** 31 - 1


def backward_kernel_ms(y, z, w, b, dout, reps, programs_cap=None):
    """The registered backward op alone (no autograd), from the statistics of one forward; ``programs_cap``
    replaces the kernels' BACKWARD_PROGRAMS for the measurement."""
    from dermomamba_kernels.layer_norm import triton_kernels  # its BACKWARD_PROGRAMS caps the gated grid too
    from dermomamba_kernels.layer_norm.gated_triton_ops import gated_backward_op, gated_forward_op

    default_cap = triton_kernels.BACKWARD_PROGRAMS
    triton_kernels.BACKWARD_PROGRAMS = programs_cap or default_cap
    try:
        with torch.no_grad():
            _, mean, rstd = gated_forward_op(y, z, w, b, EPS, torch.float32, dout.dtype)
            return median_ms(lambda: gated_backward_op(dout, y, z, w, b, mean, rstd, torch.float32), reps)
    finally:
        triton_kernels.BACKWARD_PROGRAMS = default_cap


def _ms(value):
    return "-" if value is None else f"{value:.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="rowsxC,rowsxC,...")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--smoke-cpu", action="store_true", help="check the script on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    global DEVICE
    if args.smoke_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("bench_gated_layer_norm.py needs a CUDA GPU")
    import triton

    rate = copy_rate_bytes_per_ms(args.reps)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke run (times mean nothing)"
    print(f"# {device_name} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='minutes')} | commit {commit()} | "
          f"copy {rate / 1e6:.0f} GB/s | `{' '.join(sys.argv)}`")
    print("| rows x C | impl | out | fwd ms | fwd+bwd ms | fwd+bwd graphed ms | bwd kernel ms | bwd kernel ms, uncapped grid | floor MB (fwd+bwd) | "
          "floor ms at copy rate | % of floor (graphed) | saved MB | ratio fwd | ratio fwd+bwd | ratio graphed | "
          "max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    wins = True
    for rows, channels in args.shapes:
        y = torch.randn(rows, channels, device=DEVICE).mul_(3).add_(1).requires_grad_(True)
        z = torch.randn(rows, channels, device=DEVICE).mul_(2).half().requires_grad_(True)
        w = torch.randn(channels, device=DEVICE, requires_grad=True)
        b = torch.randn(channels, device=DEVICE, requires_grad=True)
        inputs = (y, z, w, b)
        times, results = {}, {}
        for name, fn in implementations(channels).items():
            # (no autocast cache: a CUDA-graph capture must not reuse casts made outside it)
            with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                with torch.no_grad():
                    results[name] = fn(*inputs)
                    fwd = median_ms(lambda: fn(*inputs), args.reps)
                dout = torch.randn(results[name].shape, device=DEVICE).to(results[name].dtype)

                def forward_backward():
                    return torch.autograd.grad(fn(*inputs), inputs, dout)

                fb = median_ms(forward_backward, args.reps)
                graphed = graphed_ms(forward_backward, args.reps)
                kept = saved_bytes(fn, inputs)
                triton_row = name.startswith("triton")
                bwd_kernel = backward_kernel_ms(y, z, w, b, dout, args.reps) if triton_row else None
                bwd_uncapped = (backward_kernel_ms(y, z, w, b, dout, args.reps, UNCAPPED_PROGRAMS)
                                if triton_row else None)
            times[name] = (fwd, fb, graphed)
            out_bytes = results[name].element_size()
            floor_fwd, floor_bwd = floor_bytes(rows, channels, out_bytes)
            floor_ms = (floor_fwd + floor_bwd) / rate
            base = BASELINE_OF[name]
            base_fwd, base_fb, base_graphed = times[base]
            diff = (results[name].float() - results[base].float()).abs().max().item()
            graphed_ratio = "-" if graphed is None else f"{base_graphed / graphed:.2f}"
            print(f"| {rows}x{channels} | {name} | {str(results[name].dtype)[6:]} | {fwd:.4f} | {fb:.4f} | "
                  f"{_ms(graphed)} | {_ms(bwd_kernel)} | {_ms(bwd_uncapped)} | {(floor_fwd + floor_bwd) / 1e6:.1f} | {floor_ms:.4f} | "
                  f"{'-' if graphed is None else f'{100 * floor_ms / graphed:.0f}'} | {kept / 1e6:.1f} | "
                  f"{base_fwd / fwd:.2f} | {base_fb / fb:.2f} | {graphed_ratio} | {diff:.2e} |", flush=True)
            if name.startswith("triton"):
                wins &= fwd < base_fwd and fb < base_fb
    print(f"triton faster than the reference (fwd and fwd+bwd) on every shape: {'yes' if wins else 'no'} "
          "(the condition for it to join 'auto': dermomamba_kernels/layer_norm/gated.py)")


if __name__ == "__main__":
    main()
