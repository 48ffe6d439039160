"""Whether one Adam step was applied: each weight after the step against the update that Adam's own state
(after the step) prescribes, in float64.

Used by the graphed-training-step tests, where the optimizer step runs inside a CUDA graph: "the weights
changed" is not enough (a weight with a gradient far below Adam's eps legitimately stays put, one with a
zero gradient but momentum legitimately moves), and the update must be Adam's.
"""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps
# The device computes the bias corrections 1 - beta**step in float32: beta**step is rounded to half an
# ulp of ~1 (6e-8) against 1 - beta2**step >= 1e-3 at beta2 = 0.999, i.e. up to 6e-5 relative, 3e-5 after
# the square root; the update's other roundings add a few float32 ulps. Twice that bound:
UPDATE_RELATIVE_TOLERANCE = 1e-4


def adam_steps(optimizer) -> dict:
    """The step counter of every parameter that has Adam state (a parameter -> float map)."""
    return {p: float(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]
            if p in optimizer.state and "step" in optimizer.state[p]}


def assert_adam_step_applied(optimizer, named_parameters, weights_before: dict, steps_before: dict) -> int:
    """Asserts that every parameter whose step counter advanced equals Adam's update of its weight before
    the step, and that every other parameter (a step skipped for an fp16 overflow) did not move.
    Returns how many parameters took a step. Plain Adam only (no weight decay, amsgrad or maximize)."""
    names = {p: name for name, p in named_parameters}
    stepped = 0
    for group in optimizer.param_groups:
        assert not group.get("weight_decay") and not group.get("amsgrad") and not group.get("maximize")
        lr, eps = float(group["lr"]), float(group["eps"])
        # The device raises the betas as float32 numbers.
        beta1, beta2 = (float(torch.tensor(b, dtype=torch.float32)) for b in group["betas"])
        for p in group["params"]:
            name = names[p]
            before, after = weights_before[name].double(), p.detach().double()
            step = float(optimizer.state[p]["step"]) if p in optimizer.state else 0.0
            if step == steps_before.get(p, 0.0):
                assert torch.equal(after, before), f"{name}: moved although Adam skipped the step"
                continue
            state = optimizer.state[p]
            m_hat = state["exp_avg"].double() / (1 - beta1 ** step)
            v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** step)
            update = lr * m_hat / (v_hat.sqrt() + eps)
            expected = before - update
            # The addition rounds to half an ulp of the weight; allow a whole one.
            tolerance = UPDATE_RELATIVE_TOLERANCE * update.abs() + FLOAT32_EPS * torch.maximum(before.abs(),
                                                                                              expected.abs())
            error = (after - expected).abs()
            worst = int(torch.argmax(error - tolerance))
            assert bool((error <= tolerance).all()), (
                f"{name}: not Adam's update at element {worst}: weight {after.flatten()[worst].item():.9g}, "
                f"expected {expected.flatten()[worst].item():.9g} (before {before.flatten()[worst].item():.9g}, "
                f"update {update.flatten()[worst].item():.3g})")
            stepped += 1
    return stepped
