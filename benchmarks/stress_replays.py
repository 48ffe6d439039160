"""Stress checks for intermittent faults (races, reads of uninitialised memory) that a single test run
can miss: many repetitions of the same computation, compared with each other.

1. ``--what scan``: the multiaxial forward (the kernel DERMOMAMBA_SCAN_FWD_KERNEL picks) called many
   times on the same inputs at DermoMamba's shapes; the staged kernel's chunk_states must be
   bit-identical every time (its look-back is deterministic), y within float32 atomics' spread.
2. ``--what compiled``: the tiny model under torch.compile(mode="reduce-overhead") (CUDA graphs),
   many steps on fresh batches, each step's gradients compared with an eager float32 run of the same
   weights; prints the largest relative difference seen (eager vs compiled should differ by rounding,
   ~1e-6 .. 1e-4; a race or a stale read shows as 1e-2 and more).

  python benchmarks/stress_replays.py --what scan --repeats 300
  python benchmarks/stress_replays.py --what compiled --repeats 40
"""

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dermomamba  # noqa: E402
from dermomamba.benchmark import bce_dice_loss, random_batch  # noqa: E402
from dermomamba_kernels.selective_scan import extension  # noqa: E402,F401  (registers the ops and their fakes)

SCAN_SHAPES = ((16, 8, 192, 256), (16, 16, 96, 128), (2, 16, 32, 64), (1, 12, 9, 13), (16, 64, 6, 8))
DSTATE, NUM_DIRECTIONS = 16, 4


def stress_scan(repeats):
    bad = 0
    for batch, dim, height, width in SCAN_SHAPES:
        x = torch.randn(batch, dim, height, width, device="cuda")
        delta = 0.5 * torch.randn(batch, NUM_DIRECTIONS, dim, height, width, device="cuda") - 1.5
        B, C = (torch.randn(batch, NUM_DIRECTIONS, DSTATE, height, width, device="cuda") for _ in range(2))
        A = -torch.rand(NUM_DIRECTIONS * dim, DSTATE, device="cuda") - 0.5
        D, bias = (torch.randn(NUM_DIRECTIONS * dim, device="cuda") for _ in range(2))
        args = (x, delta, A, B, C, D, bias, True, 128)
        y0, s0 = torch.ops.dermomamba.multiaxial_scan_fwd(*args)
        worst_y, state_mismatches = 0.0, 0
        for _ in range(repeats):
            y, s = torch.ops.dermomamba.multiaxial_scan_fwd(*args)
            state_mismatches += int(not torch.equal(s, s0))
            worst_y = max(worst_y, ((y - y0).abs().max() / y0.abs().max()).item())
        bad += state_mismatches + (worst_y > 1e-5)
        print(f"scan {batch}x{dim}x{height}x{width}: {repeats} repeats, chunk_states mismatches {state_mismatches}, "
              f"largest relative y difference {worst_y:.2e}", flush=True)
    return bad


def grads_of(model, images, masks):
    model.zero_grad(set_to_none=True)
    loss = bce_dice_loss(model(images), masks)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def stress_compiled(repeats, size=(32, 64), batch=2):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = dermomamba.create_model("dermomamba_tiny", img_size=size).cuda().train()
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    worst, bad = 0.0, 0
    for step in range(repeats):
        images, masks = random_batch(batch, size, torch.device("cuda"))
        eager = copy.deepcopy(model)
        torch.compiler.cudagraph_mark_step_begin()
        got = grads_of(compiled, images, masks).clone()
        want = grads_of(eager, images, masks)
        rel = ((got - want).norm() / want.norm()).item()
        worst = max(worst, rel)
        bad += rel > 1e-3
        if rel > 1e-3 or step < 3:
            print(f"step {step}: relative gradient difference compiled vs eager {rel:.2e}", flush=True)
    print(f"compiled: {repeats} steps, largest relative gradient difference {worst:.2e}, steps above 1e-3: {bad}")
    return bad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("scan", "compiled"), required=True)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"{torch.cuda.get_device_name()}; DERMOMAMBA_SCAN_FWD_KERNEL={os.environ.get('DERMOMAMBA_SCAN_FWD_KERNEL')}")
    bad = stress_scan(args.repeats) if args.what == "scan" else stress_compiled(args.repeats)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
