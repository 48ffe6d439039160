"""Parity machinery for the Triton selective scans (used by test_selective_scan_triton.py and
triton_scan_interpreter_cases.py).

Every check draws fresh inputs, computes a float64 oracle (the closed forms of scan_oracles.py on
small CPU problems, a float64 recurrence on GPU-sized ones), runs the reference in the precision
under test, and requires the backend's error against the oracle to stay within twice the
reference's error (or the rounded inputs' own error, where the reference was luckier than that:
see rounded_inputs) plus a floor: the tolerance is measured on every draw, not fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dermomamba_kernels.selective_scan import naive
from scan_oracles import closed_form_multiaxial, closed_form_scan, direction_index

# The kernels accumulate in fp32 in another order than the reference (chunked scans, tree sums):
# that alone moves fp32 results by ~1e-6 relative where the fp32 reference can be luckier.
FP32_NOISE = 1e-5
# A quantity of few elements (at 1x2x5x3: dx 30, x_proj_weight 72, dt_projs_weight and dt_projs_bias 8)
# gives a noisy relative error, dominated by its few largest values: it is a statistic of the inputs'
# rounding to the precision under test and of an implementation's own roundings in that precision (the
# final one, up to one unit roundoff, and intermediate ones, as fp16 ddelta's or dx's partial sums, that
# a sum with cancellation amplifies), and the reference's error is one draw of that, which can be lucky.
# One fp16 draw at 5x3 (DERMOMAMBA_TEST_SEED=190): ddt_projs_weight's largest value -129.017; the Triton
# path's and the reference's ddelta were the same fp16 values, the exact sum of their products -129.090;
# the Triton path rounded that correctly to -129.125, 1.68 unit roundoffs off overall, where the
# reference's fp16 product landed on -129.0, 0.34 off (the rounded inputs' own error 0.13). Measured
# with the error scale of rounded_inputs over 600 draws of each precision at 5x3: 7 of 4200 fp16
# quantities needed a floor, at most 1.35 unit roundoffs (dx, seed 527; then 1.00, the draw above; the
# rest 0.40 or less), no bf16 one did; fp16 dx_proj_weight (72 values) came within 0.92 of its tolerance
# without a floor (seed 69). One epsilon of the precision (two unit roundoffs) is the floor below 128
# elements: with it no draw came above 0.82 of a tolerance in fp16 or 0.47 in bf16.
FEW_ELEMENTS = 128


# The project's rule where the summation order is the only difference allowed (as in
# tests/test_mamba_ssm_parity.py): 16 fp32 epsilons, two orders of magnitude below fp16 / bf16 rounding.
STRICT_FP32_FLOOR = 16 * torch.finfo(torch.float32).eps


def tolerance(error_scale, precision, numel, floor=FP32_NOISE):
    """Twice the error scale (the reference's error in the same precision, or the rounded inputs' own
    error where that is larger: see rounded_inputs), plus a floor (see above)."""
    if numel < FEW_ELEMENTS:
        floor = max(floor, torch.finfo(precision).eps)
    return 2.0 * error_scale + floor


def rounded_inputs(inputs, precision, low_precision_names):
    """The float64 inputs as a run in ``precision`` receives them (``_run``'s casts), back in float64.

    The float64 oracle at these inputs is the result without any rounding error of its own: its error
    against the oracle at the exact inputs is the rounded inputs' own error, which no implementation
    given those inputs can beat but by luck. The reference run in the same precision adds its own
    roundings to it, and on a quantity dominated by few values they can cancel it: CI saw bf16
    ddt_projs_weight at 5x3 (8 values, one of them -31.35) with the reference 1.0e-3 off, the rounded
    inputs' own error 5.3e-3 and the Triton path (bf16 runs it on fp32 copies under the interpreter:
    exact at the rounded inputs to 7e-8 before its one final rounding) 7.3e-3 off (seed 3303764311).
    Over 600 bf16 draws at 5x3, twice the reference's error (and half an epsilon below 64 elements)
    failed 7 draws (ddt_projs_weight 5 times, up to 1.39 times its tolerance; dx_proj_weight twice,
    out once), and 2 of 600 fp16 draws (dx_proj_weight 1.53, dx 1.13); no fp32 draw came near. So the
    error scale is the larger of the reference's error and the rounded inputs' own error. With the
    floor above, no draw failed; the floor alone left bf16 out (30 values, which the Triton path returns
    in fp32, exact at the rounded inputs) at 0.91 of its tolerance, where this scale brings every bf16
    quantity under 0.47. An implementation exact at the rounded inputs failed the former rule on 4 of 300
    bf16 and 2 of 300 fp16 draws, and fails this one on none (test_selective_scan_triton.py checks it).
    """
    return {name: None if t is None else t.detach().to(precision if name in low_precision_names
                                                       else torch.float32).double()
            for name, t in inputs.items()}


SCAN_INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
MULTIAXIAL_INPUT_NAMES = ("x", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def rel_err(value, oracle):
    value, oracle = value.double(), oracle.double()
    return ((value - oracle).norm() / oracle.norm().clamp_min(1e-300)).item()


def recurrent_scan_fp64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The scan as a float64 recurrence (O(L) memory, differentiable): the oracle on GPU sizes."""
    u, delta, A = u.double(), delta.double(), A.double()
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    dt = F.softplus(delta) if delta_softplus else delta

    def full(M):
        M = M.double()
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, M.shape[1], length)
        if M.dim() == 3:
            M = M[:, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1)

    B_full, C_full = full(B), full(C)
    decay = torch.exp(dt[:, :, None, :] * A[None, :, :, None])
    drive = (dt * u)[:, :, None, :] * B_full
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * C_full[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def recurrent_multiaxial_fp64(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """SS2D in float64 through per-direction gathers and the recurrence (GPU-sized oracle)."""
    batch, dim, height, width = x.shape
    dt_rank = dt_projs_weight.shape[2]
    dstate = A_logs.shape[1]
    flat = x.double().reshape(batch, dim, height * width)
    index = direction_index(height, width).to(x.device)
    total = torch.zeros(batch, dim, height * width, dtype=torch.float64, device=x.device)
    for k in range(4):
        seq = flat[:, :, index[k]]
        proj = torch.einsum("cd,bdl->bcl", x_proj_weight[k].double(), seq)
        dts, Bk, Ck = proj[:, :dt_rank], proj[:, dt_rank:dt_rank + dstate], proj[:, dt_rank + dstate:]
        delta = torch.einsum("dr,brl->bdl", dt_projs_weight[k].double(), dts)
        channels = slice(k * dim, (k + 1) * dim)
        y, _ = recurrent_scan_fp64(seq, delta, -torch.exp(A_logs[channels].double()), Bk, Ck, D=Ds[channels],
                                   delta_bias=dt_projs_bias[k], delta_softplus=True)
        total = total.index_add(2, index[k], y)
    return total.view(batch, dim, height, width)


def scan_inputs(batch, dim, length, dstate, device, b_layout="variable", c_layout="variable", groups=1,
                with_D=True, with_z=True, with_bias=True, delta_softplus=True):
    """Fresh float64 inputs of the 1-D scan (None where an optional input is left out).

    Without softplus, delta is drawn positive (a step size), as mamba's callers pass it.
    """
    f64 = dict(dtype=torch.float64, device=device)

    def state_operand(layout):
        if layout == "constant":
            return torch.randn(dim, dstate, **f64)
        if layout == "variable":
            return torch.randn(batch, dstate, length, **f64)
        return torch.randn(batch, groups, dstate, length, **f64)

    return {
        "u": torch.randn(batch, dim, length, **f64),
        "delta": (0.5 * torch.randn(batch, dim, length, **f64) - 1.0 if delta_softplus
                  else 0.5 * torch.rand(batch, dim, length, **f64)),
        "A": -torch.exp(0.5 * torch.randn(dim, dstate, **f64)),
        "B": state_operand(b_layout),
        "C": state_operand(c_layout),
        "D": torch.randn(dim, **f64) if with_D else None,
        "z": torch.randn(batch, dim, length, **f64) if with_z else None,
        "delta_bias": 0.5 * torch.randn(dim, **f64) if with_bias else None,
    }


def _run(fn, inputs, grad_out, dtype, low_precision_names, **kwargs):
    """Output and gradients of fn on the inputs cast to dtype (fp32 for the others), in their own dtypes."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            continue
        leaves[name] = t.detach().to(dtype if name in low_precision_names else torch.float32).requires_grad_()
    args = {name: leaves.get(name) for name in inputs}
    result = fn(**args, **kwargs)
    out = result[0] if isinstance(result, tuple) else result
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(out.dtype))
    values = {"out": out.detach()}
    if isinstance(result, tuple):
        values["last_state"] = result[1].detach()
    values.update({"d" + n: g for n, g in zip(names, grads)})
    return values


def _oracle(fn, inputs, grad_out, **kwargs):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    args = {name: leaves.get(name) for name in inputs}
    result = fn(**args, **kwargs)
    out = result[0] if isinstance(result, tuple) else result
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out)
    values = {"out": out.detach()}
    if isinstance(result, tuple):
        values["last_state"] = result[1].detach()
    values.update({"d" + n: g for n, g in zip(names, grads)})
    return values


def compare(backend_values, reference_values, oracle_values, precision, floor=FP32_NOISE, rounded_oracle=None):
    """Per quantity: (backend error, error scale, tolerance); raises AssertionError on a miss.

    ``precision``: the dtype the inputs were rounded to (the precision under test); ``floor``: the
    tolerance's floor (FP32_NOISE, or STRICT_FP32_FLOOR for the project's GPU rule). The error scale
    is the reference's error, or the rounded inputs' own error where that is larger (see
    rounded_inputs): ``rounded_oracle`` returns the float64 oracle's values at the rounded inputs. It
    costs a second oracle run (a float64 recurrence at GPU sizes), so it runs only for a draw where
    some quantity misses twice the reference's error, which gives the same verdict as always running it.
    """
    report, failures = {}, []
    rounded = None
    for name, oracle in oracle_values.items():
        value = backend_values[name]
        assert value.shape == oracle.shape, f"{name}: shape {tuple(value.shape)} != {tuple(oracle.shape)}"
        assert torch.isfinite(value).all(), f"{name}: non-finite values (unwritten output?)"
        err = rel_err(value, oracle)
        ref_err = scale = rel_err(reference_values[name], oracle)
        tol = tolerance(scale, precision, value.numel(), floor)
        detail = f"reference error {ref_err:.3g}"
        if not err <= tol and rounded_oracle is not None:
            if rounded is None:
                rounded = rounded_oracle()
            rounding_err = rel_err(rounded[name], oracle)
            scale = max(ref_err, rounding_err)
            tol = tolerance(scale, precision, value.numel(), floor)
            detail += f", the rounded inputs' own error {rounding_err:.3g}"
        report[name] = (err, scale, tol)
        if not err <= tol:
            failures.append(f"{name}: error {err:.3g} > tolerance {tol:.3g} ({detail})")
    assert not failures, "; ".join(failures)
    return report


def assert_no_gradient_for_A(grad, what):
    """A sequence of one position starts from the zero state, so A (through exp(delta A) h_0) has an
    exactly zero gradient: any value at all is a bug (on the GPU, an FMA left b_t's rounding error
    in h_t - b_t), and a norm-relative error against 0 would only print as 1e290."""
    nonzero = grad[grad != 0]
    assert nonzero.numel() == 0, (f"{what}: must be exactly 0 for a sequence of one position; "
                                  f"{nonzero.numel()} values are not, largest |value| {nonzero.abs().max():.3g}")


def check_selective_scan(backend_fn, inputs, dtype, delta_softplus=True, oracle="closed_form", floor=FP32_NOISE):
    """Parity of ``backend_fn`` (selective_scan_fn's signature) with the reference, output and grads."""
    low = ("u", "delta", "z", "B", "C")
    length = inputs["u"].shape[-1]
    grad_out = torch.randn_like(inputs["u"])
    oracle_fn = closed_form_scan if oracle == "closed_form" else recurrent_scan_fp64
    oracle_values = _oracle(oracle_fn, inputs, grad_out, delta_softplus=delta_softplus)
    ref = _run(naive.selective_scan_ref, inputs, grad_out, dtype, low, delta_softplus=delta_softplus,
               return_last_state=True)
    got = _run(backend_fn, inputs, grad_out, dtype, low, delta_softplus=delta_softplus, return_last_state=True)
    assert got["out"].shape[-1] == length
    if length == 1:
        assert_no_gradient_for_A(got["dA"], "dA")
    return compare(got, ref, oracle_values, dtype, floor, rounded_oracle=lambda: _oracle(
        oracle_fn, rounded_inputs(inputs, dtype, low), grad_out, delta_softplus=delta_softplus))


# Steps with delta |A| from about 1 to 40, so that a_t = exp(delta_t A) is often tiny: h_t is then almost
# all b_t, and a_t h_{t-1} formed as h_t - b_t (as the Triton backward once did) keeps b_t's rounding error.
# Over 40 seeds under the interpreter that put dA at up to 9000 times the reference's error in 1-D scans
# (median 40 to 115 times) and dA_logs at up to 500 times in multiaxial ones (median 15 times).
FAST_DECAY_DELTA_SHIFT = 4.0  # added to the delta bias: softplus(delta + bias) around 3 to 5
FAST_DECAY_A_SCALE = 4.0  # |A| 1.5 to 11 instead of 0.4 to 2.7 (1-D); 0.4 to 8.4 instead of 0.1 to 2.1 (SS2D)


def with_fast_decay(inputs):
    """scan_inputs' or multiaxial_inputs' draw with steps that make a_t = exp(delta_t A) often tiny.

    Example: ``check_multiaxial(fn, with_fast_decay(multiaxial_inputs(1, 2, 5, 3, 2, "cpu")), torch.float32)``
    """
    out = dict(inputs)
    if "A_logs" in out:  # SS2D: A = -exp(A_logs), delta's bias per direction
        out["dt_projs_bias"] = out["dt_projs_bias"] + FAST_DECAY_DELTA_SHIFT
        out["A_logs"] = out["A_logs"] + math.log(FAST_DECAY_A_SCALE)
    else:
        assert out["delta_bias"] is not None, "with_fast_decay shifts delta through delta_bias"
        out["delta_bias"] = out["delta_bias"] + FAST_DECAY_DELTA_SHIFT
        out["A"] = out["A"] * FAST_DECAY_A_SCALE
    return out


def multiaxial_inputs(batch, dim, height, width, dstate, device, channels_last=False):
    rank = -(-dim // 16)
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(batch, dim, height, width, **f64)
    if channels_last:  # a permuted view: the kernels must read it through its strides
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return {
        "x": x,
        "x_proj_weight": torch.randn(4, rank + 2 * dstate, dim, **f64) / dim ** 0.5,
        "dt_projs_weight": torch.randn(4, dim, rank, **f64) / rank ** 0.5,
        "dt_projs_bias": 0.5 * torch.randn(4, dim, **f64) - 1.0,
        "A_logs": torch.log(torch.rand(4 * dim, dstate, **f64) * 2.0 + 0.1),
        "Ds": torch.randn(4 * dim, **f64),
    }


def check_multiaxial(backend_fn, inputs, dtype, oracle="closed_form", floor=FP32_NOISE):
    """Parity of ``backend_fn`` (multiaxial_selective_scan's signature) with the reference."""
    grad_out = torch.randn(inputs["x"].shape, dtype=torch.float64, device=inputs["x"].device)
    oracle_fn = closed_form_multiaxial if oracle == "closed_form" else recurrent_multiaxial_fp64
    oracle_values = _oracle(oracle_fn, inputs, grad_out)
    # The projections run in x's dtype. A permuted x stays permuted: .to() preserves its strides.
    low = ("x", "x_proj_weight", "dt_projs_weight")
    ref = _run(naive.multiaxial_selective_scan_ref, inputs, grad_out, dtype, low)
    got = _run(backend_fn, inputs, grad_out, dtype, low)
    height, width = inputs["x"].shape[-2:]
    if height * width == 1:  # every direction is a sequence of one position
        assert_no_gradient_for_A(got["dA_logs"], "dA_logs")
    return compare(got, ref, oracle_values, dtype, floor,
                   rounded_oracle=lambda: _oracle(oracle_fn, rounded_inputs(inputs, dtype, low), grad_out))
