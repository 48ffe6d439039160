"""How far torch.compile(mode="reduce-overhead") gradients land from the float64 truth, against plain
float32 runs, over many fresh draws: the distribution behind tests/test_compile.py's
`test_tiny_model_compiled_with_cuda_graphs_reduce_overhead` criterion (candidate error <= 2x the larger
reference error + a floor, per top-level module), instead of the single draw a test run sees.

For each draw (fresh weights, fresh batch) it prints every module's ratio candidate error / reference error
and flags those above the test's bound; with `--gate both` the SS2D output gate is once recomputed
(torch.utils.checkpoint, the default) and once kept, to see whether the checkpoint region changes the error.

  python benchmarks/compiled_error_ratios.py --draws 8 --gate both
  python benchmarks/compiled_error_ratios.py --draws 8 --gate recomputed --inductor-reference   # the test's rule
"""

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import test_compile as tc  # noqa: E402  (the test's own helpers: one definition of the criterion's parts)
from dermomamba.benchmark import random_batch  # noqa: E402


def module_errors(grads, truth_grads):
    squares = {}
    for name, exact in truth_grads.items():
        group = name.split(".")[0]
        diff = (grads[name].detach().double().cpu() - exact.double().cpu()).norm().item()
        squares[group] = squares.get(group, 0.0) + diff ** 2
    return {group: math.sqrt(v) for group, v in squares.items()}


def one_config(recompute_gate, draws, inductor_reference):
    torch._dynamo.reset()
    model = tc._tiny(tc.GPU_SIZE).cuda().train()
    reference_model = tc._tiny(tc.GPU_SIZE).cuda().train()
    compiled_reference = torch.compile(reference_model, fullgraph=True) if inductor_reference else None
    for module in model.modules():
        if hasattr(module, "recompute_gate"):
            module.recompute_gate = recompute_gate
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    worst = {}
    failures = 0
    for draw in range(draws):
        fresh = tc._tiny(tc.GPU_SIZE)
        model.load_state_dict(fresh.state_dict())
        for _ in range(3):  # the third call is a replay, as in the test
            torch.compiler.cudagraph_mark_step_begin()
            images, masks = random_batch(tc.GPU_BATCH, tc.GPU_SIZE, torch.device("cuda"))
            before = {k: v.clone() for k, v in model.state_dict().items()}
            model.zero_grad(set_to_none=True)
            loss = tc._bce_dice(compiled(images), masks)
            loss.backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        truth_loss, truth_grads = tc._float64_truth(before, images, masks)
        references = tc._float32_references(before, images, masks)
        if compiled_reference is not None:
            reference_model.load_state_dict(before)
            references.append(tc._loss_and_grads(reference_model, images, masks, forward=compiled_reference))
        candidate = module_errors(grads, truth_grads)
        reference = {g: max(module_errors(r, truth_grads)[g] for _, r in references) for g in candidate}
        norms = module_errors({n: torch.zeros_like(g) for n, g in truth_grads.items()}, truth_grads)
        line = []
        for group in sorted(candidate):
            bound = tc.ERROR_FACTOR * reference[group] + tc.FLOOR * norms[group]
            ratio = candidate[group] / max(reference[group], 1e-30)
            worst[group] = max(worst.get(group, 0.0), ratio)
            flag = "!" if candidate[group] > bound else ""
            failures += bool(flag)
            line.append(f"{group} {ratio:.2f}{flag}")
        print(f"gate {'recomputed' if recompute_gate else 'kept'} draw {draw}: " + ", ".join(line), flush=True)
    print(f"gate {'recomputed' if recompute_gate else 'kept'}: {draws} draws, modules over the bound: {failures}; "
          "largest ratio per module: " + ", ".join(f"{g} {r:.2f}" for g, r in sorted(worst.items())), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--gate", choices=("recomputed", "kept", "both"), default="both")
    parser.add_argument("--inductor-reference", action="store_true",
                        help="add torch.compile's default mode (inductor without CUDA graphs) to the references, "
                             "as the test does")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for recompute in {"recomputed": [True], "kept": [False], "both": [True, False]}[args.gate]:
        one_config(recompute, args.draws, args.inductor_reference)


if __name__ == "__main__":
    main()
