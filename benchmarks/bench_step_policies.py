"""The training step under each choice of its policies and opt-in kernels, in one run: step time and peak memory.

What is switched (one row each, same process, same inputs):
  * SS2D ``recompute_gate``: the output gate out_proj(out_norm(y) * silu(z)) recomputed in the backward;
  * the multiaxial scan's backward in batch slices (dermomamba_kernels.selective_scan.extension,
    BACKWARD_SLICE_PROJECTION_ELEMENTS): bounds the recomputed projections' transient;
  * opt-in kernels chosen by environment variables (read at call time; a CUDA graph records the choice at
    capture): the depthwise convs' Triton weight gradient, Triton BatchNorm, the fused gated LayerNorm.
Each row runs the eager training step (forward under autocast, Guide Fusion Loss, backward, Adam) and, on
CUDA, the step recorded as a CUDA graph; medians and torch.cuda.max_memory_allocated. With --inference-batch N,
also the eval-mode forward at batch N (eager and as a CUDA graph).

Example (GPU):
    python benchmarks/bench_step_policies.py --batch 16 --precision fp16
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dermomamba  # noqa: E402
from dermomamba import benchmark as bench  # noqa: E402
from dermomamba.loss import GuideFusionLoss  # noqa: E402
from dermomamba_kernels.layers import SS2D  # noqa: E402
from dermomamba_kernels.selective_scan import extension  # noqa: E402

# Large enough that no DermoMamba call is ever sliced: the unsliced backward.
UNSLICED = 1 << 62
# The kernels whose "auto" differs between eager steps (PyTorch's) and CUDA graphs (Triton's; see
# dermomamba_kernels.graph_recording), by the environment variable that forces one or the other.
KERNEL_VARIABLES = {"dw": "DERMOMAMBA_DEPTHWISE_BACKEND", "bn": "DERMOMAMBA_BATCHNORM_BACKEND",
                    "gate": "DERMOMAMBA_GATED_NORM_BACKEND", "fwd": "DERMOMAMBA_SCAN_FWD_KERNEL"}
PYTORCH = {"dw": "reference", "bn": "native", "gate": "reference"}
TRITON = {"dw": "triton", "bn": "triton", "gate": "triton"}
# (id, label, recompute_gate, sliced backward, forced kernels {key: value}; unset = auto)
CONFIGS = [
    ("defaults", "defaults (graph: Triton BN / dw / fused gate; eager: PyTorch's)", True, True, {}),
    ("pytorch", "PyTorch's BN, dw weight grad and unfused gate everywhere", True, True, PYTORCH),
    ("triton", "the Triton ones everywhere (eager too)", True, True, TRITON),
    ("no-bn", "defaults but PyTorch's BatchNorm", True, True, {"bn": "native"}),
    ("no-dw", "defaults but PyTorch's depthwise weight grad", True, True, {"dw": "reference"}),
    ("no-gate", "defaults but the unfused gate", True, True, {"gate": "reference"}),
    ("keep-gate", "defaults, unfused gate kept (no checkpoint)", False, True, {"gate": "reference"}),
    ("unsliced", "defaults, scan backward unsliced", True, False, {}),
    ("flat-fwd", "defaults, the flat (v6) scan forward", True, True, {"fwd": "flat"}),
]


def run(args):
    device = torch.device(args.device)
    images, masks = bench.random_batch(args.batch, tuple(args.img_size), device)
    criterion = GuideFusionLoss()
    default_slice = extension.BACKWARD_SLICE_PROJECTION_ELEMENTS
    print(f"{bench.device_description(device)}; batch {args.batch}, {args.img_size[0]}x{args.img_size[1]}, "
          f"{args.precision}, Guide Fusion Loss; median of {args.repeats}")
    inference_images = (bench.random_batch(args.inference_batch, tuple(args.img_size), device)[0]
                        if args.inference_batch else None)
    inference_head = (f" inference b{args.inference_batch} eager ms | inference b{args.inference_batch} graph ms |"
                      if args.inference_batch else "")
    print("| configuration | gate recomputed | backward sliced | eager ms | eager peak GiB | graph ms | graph peak GiB |"
          + inference_head)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.inference_batch else ""))
    if not args.no_global_warmup:
        # One untimed model first: allocator growth, cuDNN's algorithm choices and lazy initialisation would
        # otherwise land in the first row's eager column.
        warm = dermomamba.create_model(args.model, img_size=tuple(args.img_size)).to(device).train()
        bench.time_ms(bench.make_train_step(warm, images, masks, criterion, args.precision), device,
                      warmup=args.warmup, repeats=1)
        del warm
    unknown = set(args.configs or ()) - {c[0] for c in CONFIGS}
    if unknown:
        raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {[c[0] for c in CONFIGS]}")
    chosen = [c for c in CONFIGS if not args.configs or c[0] in args.configs]
    saved_environment = {variable: os.environ.get(variable) for variable in KERNEL_VARIABLES.values()}
    try:
        run_rows(args, chosen, device, images, masks, criterion, inference_images, default_slice)
    finally:
        for variable, value in saved_environment.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        extension.BACKWARD_SLICE_PROJECTION_ELEMENTS = default_slice


def run_rows(args, chosen, device, images, masks, criterion, inference_images, default_slice):
    for _, label, recompute_gate, sliced, forced in chosen:
        for key, variable in KERNEL_VARIABLES.items():
            if key in forced:
                os.environ[variable] = forced[key]
            else:
                os.environ.pop(variable, None)
        extension.BACKWARD_SLICE_PROJECTION_ELEMENTS = default_slice if sliced else UNSLICED
        torch.manual_seed(0)
        model = dermomamba.create_model(args.model, img_size=tuple(args.img_size)).to(device).train()
        for module in model.modules():
            if isinstance(module, SS2D):
                module.recompute_gate = recompute_gate
        step = bench.make_train_step(model, images, masks, criterion, args.precision)
        eager = bench.median(bench.time_ms(step, device, warmup=args.warmup, repeats=args.repeats))
        eager_peak = bench.peak_memory_bytes(step, device)
        graph_ms = graph_peak = None
        if device.type == "cuda" and not args.no_graphs:
            # The graph's peak: its warm-up steps, the capture (whose pool the replays reuse) and a replay.
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            graphed = bench.make_graphed_train_step(model, images, masks, criterion, args.precision)
            graphed()
            torch.cuda.synchronize(device)
            graph_peak = torch.cuda.max_memory_allocated(device)
            graph_ms = bench.median(bench.time_ms(graphed, device, warmup=args.warmup, repeats=args.repeats))
        inference = ""
        if inference_images is not None:
            forward = bench.make_forward(model, inference_images, args.precision)
            inference_eager = bench.median(bench.time_ms(forward, device, warmup=args.warmup, repeats=args.repeats))
            inference_graph = None
            if device.type == "cuda" and not args.no_graphs:
                graphed_forward = bench.make_graphed_forward(model, inference_images, args.precision)
                inference_graph = bench.median(bench.time_ms(graphed_forward, device, warmup=args.warmup,
                                                             repeats=args.repeats))
            inference = f" {inference_eager:.2f} | {'-' if inference_graph is None else f'{inference_graph:.2f}'} |"
            model.train()
        gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
        ms = lambda t: "-" if t is None else f"{t:.2f}"  # noqa: E731
        print(f"| {label} | {recompute_gate} | {sliced} | {eager:.2f} | {gib(eager_peak)} | {ms(graph_ms)} | {gib(graph_peak)} |"
              + inference, flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dermomamba")
    parser.add_argument("--img-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--no-global-warmup", action="store_true", help="skip the untimed model before the rows")
    parser.add_argument("--configs", nargs="*", default=None, help="ids of CONFIGS to run (default: all)")
    parser.add_argument("--inference-batch", type=int, default=0,
                        help="also time the eval-mode forward at this batch (0: not)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
