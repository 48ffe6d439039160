"""Where the time of one training step goes (issue 9): torch.profiler over our step, per-op GPU time.

Runs our network's training step (forward under autocast, Guide Fusion Loss, backward, Adam with a
GradScaler under fp16) at each batch size given, and prints the operators and kernels sorted by their
total GPU time, plus the step's wall time and the GPU-busy time of the profiled steps. Comparing two
batch sizes shows which part grows faster than the batch. `--inference` profiles the eval-mode forward
(no autograd) instead; `--graph-kernels` runs under `dermomamba_kernels.graph_recording()`, so "auto" picks
the kernels a CUDA-graphed step records (what the graphed figures of bench_model.py run).

Usage:
  python benchmarks/profile_step.py --batches 4 16 --precision fp16 [--loss gfl|bce_dice] [--top 40]
      [--inference] [--graph-kernels] [--trace-dir DIR]   # also write a Chrome trace per batch size
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from dermomamba.benchmark import (  # noqa: E402
    bce_dice_loss, make_forward, make_train_step, random_batch, synchronize)
from dermomamba_kernels import graph_recording  # noqa: E402
from dermomamba.loss import GuideFusionLoss  # noqa: E402
from dermomamba.models import create_model  # noqa: E402


def profile_batch(model_name, img_size, batch, precision, loss, steps, top, trace_dir, device,
                  inference=False, graph_kernels=False):
    with graph_recording() if graph_kernels else contextlib.nullcontext():
        _profile_batch(model_name, img_size, batch, precision, loss, steps, top, trace_dir, device, inference)


def _profile_batch(model_name, img_size, batch, precision, loss, steps, top, trace_dir, device, inference):
    torch.manual_seed(0)
    model = create_model(model_name, img_size=img_size).to(device)
    images, masks = random_batch(batch, img_size, device)
    if inference:
        model.eval()
        forward = make_forward(model, images, precision=precision)
        loss = "none (inference)"

        def step():
            with torch.no_grad():
                forward()
    else:
        criterion = GuideFusionLoss("published") if loss == "gfl" else bce_dice_loss
        step = make_train_step(model, images, masks, criterion, precision=precision)
    for _ in range(3):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1e3 / steps

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    # The table's last line ("Self CUDA time total") is the GPU time of the profiled steps: divide by steps.
    print(f"\n=== {model_name} {img_size[0]}x{img_size[1]} batch {batch} {precision} loss {loss}: "
          f"step wall {wall_ms:.1f} ms ({wall_ms / batch:.2f} ms/image); {steps} steps profiled", flush=True)
    print(events.table(sort_by=sort_key, row_limit=top, max_name_column_width=70), flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort_key, row_limit=top // 2,
                                                            max_name_column_width=50, max_shapes_column_width=70),
          flush=True)
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(
            trace_dir, f"step_b{batch}_{precision}_{'inference' if inference else loss}.json"))
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dermomamba")
    parser.add_argument("--img-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--loss", default="gfl", choices=("gfl", "bce_dice"))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per batch size")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--inference", action="store_true", help="profile the eval-mode forward, no autograd")
    parser.add_argument("--graph-kernels", action="store_true",
                        help="pick the kernels a recorded CUDA graph uses (dermomamba_kernels.graph_recording)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for batch in args.batches:
        profile_batch(args.model, tuple(args.img_size), batch, args.precision, args.loss, args.steps, args.top,
                      args.trace_dir, device, inference=args.inference, graph_kernels=args.graph_kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
