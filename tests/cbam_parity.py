"""Parity machinery for the CBAM op (imported by test_cbam.py and cbam_interpreter_cases.py).

A backend is checked against the fp64 reference, and its error must stay within twice the error
of the reference run in the same precision (plus a floor, see ``tolerance``): the tolerance is
measured on every draw, not fixed.
"""

from __future__ import annotations

import torch

from dermomamba_kernels.cbam import cbam

NAMES = ("out", "dx", "d_mlp1_w", "d_mlp1_b", "d_mlp2_w", "d_mlp2_b", "d_conv_w", "d_bn_weight", "d_bn_bias",
         "running_mean", "running_var")
# The kernels accumulate in fp32 whatever the input precision; reduction order alone moves fp32
# results by ~1e-6 relative, where the fp32 reference can be luckier.
FP32_NOISE = 1e-5
# A quantity of a few elements rounded once to a low precision can be off by half an ulp where the
# reference's rounding happened to land closer: that one rounding is the floor there.
FEW_ELEMENTS = 16


# Index of the 7x7 conv weight in Case.params (the one parameter that mirroring the image mirrors).
CONV_WEIGHT = 4
IDENTITY = (False, False, False)
# (reverse the batch, mirror the width, mirror the height): exact symmetries of CBAM that change every
# summation order. A result of a few elements (d_bn_bias is one number, often a sum that cancels) has a
# rounding error that is a single random draw: one draw of the reference is no scale for another draw
# of the kernel, so the reference's error is taken as the largest over these orders. Four orders (batch
# and width only) were not enough: CI once saw d_bn_weight of the Triton kernel at 2.8x the largest of
# four reference draws (3.68e-5 against 1.32e-5, seed 4059824162); all eight are used.
SUMMATION_ORDERS = [(b, w, h) for h in (False, True) for w in (False, True) for b in (False, True)]


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def tolerance(reference_error, dtype, numel):
    floor = max(FP32_NOISE, unit_roundoff(dtype)) if numel < FEW_ELEMENTS else FP32_NOISE
    return 2.0 * reference_error + floor


def variant_maps(variant):
    """(move, mirror_kernel) of a SUMMATION_ORDERS entry: ``move`` places a (B, C, H, W) tensor's elements as
    the variant does and is its own inverse; ``mirror_kernel`` mirrors the 7x7 conv weight (and its gradient)
    to match."""
    reverse_batch, mirror_width, mirror_height = variant
    spatial = [d for d, on in ((-1, mirror_width), (-2, mirror_height)) if on]

    def move(t):
        t = t.flip(0) if reverse_batch else t
        return t.flip(spatial) if spatial else t

    def mirror_kernel(w):
        return w.flip(spatial) if spatial else w

    return move, mirror_kernel


class Case:
    """One random draw: x, the output gradient, parameters and running stats, all in fp64."""

    def __init__(self, B, C, H, W, device, ksize=7, reduction=16):
        hidden = max(C // reduction, 1)
        f64 = dict(dtype=torch.float64, device=device)
        # x with a per-channel offset so the avg and max pools and the BatchNorm see non-trivial statistics
        self.x = torch.randn(B, C, H, W, **f64) + 0.5 * torch.randn(1, C, 1, 1, **f64)
        self.grad = torch.randn(B, C, H, W, **f64)
        self.params = [torch.randn(hidden, C, **f64) / C ** 0.5, 0.1 * torch.randn(hidden, **f64),
                       torch.randn(C, hidden, **f64) / hidden ** 0.5, 0.1 * torch.randn(C, **f64),
                       0.3 * torch.randn(1, 2, ksize, ksize, **f64), 0.5 + torch.rand(1, **f64),
                       0.2 * torch.randn(1, **f64)]
        self.running = [0.1 * torch.randn(1, **f64), 0.5 + torch.rand(1, **f64)]

    def run(self, backend, dtype, training, channels_last=False, inputs_dtype=None, variant=IDENTITY):
        """Output, every gradient and the updated running stats, as fp64, of one call in ``dtype``.

        ``inputs_dtype`` rounds the inputs first (so fp64 references see the low-precision inputs).
        ``variant`` = (reverse the batch, mirror the width, mirror the height): the same problem with its
        elements in other places, so every reduction sums in another order; results are mapped back.
        """
        inputs_dtype = inputs_dtype or dtype

        move, mirror_kernel = variant_maps(variant)

        # clone: with dtype == inputs_dtype == fp64 the casts return self.x itself, which must stay a plain leaf
        x = move(self.x.to(inputs_dtype).to(dtype)).clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        params = [p.to(inputs_dtype).to(dtype).clone() for p in self.params]
        params[CONV_WEIGHT] = mirror_kernel(params[CONV_WEIGHT])
        params = [p.requires_grad_(True) for p in params]
        running = [r.to(inputs_dtype).to(dtype).clone() for r in self.running]
        out = cbam(x, *params, *running, training=training, momentum=0.1, eps=1e-5, backend=backend)
        assert out.shape == x.shape and out.dtype == x.dtype
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last), "output lost the channels-last layout"
        out.backward(move(self.grad.to(inputs_dtype).to(dtype)))
        grads = [x.grad] + [p.grad for p in params]
        for name, g in zip(NAMES[1:], grads):
            assert g is not None, f"{name}: no gradient"
            assert g.dtype == dtype, f"{name}: gradient dtype {g.dtype}, expected {dtype}"
        grads[0] = move(grads[0])
        grads[1 + CONV_WEIGHT] = mirror_kernel(grads[1 + CONV_WEIGHT])
        return [t.detach().double() for t in [move(out)] + grads + running]


def relative_error(value, expected):
    return ((value - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def judge(name, value, reference, exact):
    """value (a kernel's, any dtype) vs exact (fp64): error at most 2x the same-precision reference's + fp32 noise.

    ``reference`` is one same-precision result or a list of them (the same problem in other summation
    orders, SUMMATION_ORDERS): the reference's error is then the largest of theirs.
    """
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    err = relative_error(value.double(), exact)
    ref_err = max(relative_error(r.double(), exact) for r in references)
    assert err <= 2.0 * ref_err + FP32_NOISE, f"{name}: kernel error {err:.2e}, same-precision reference {ref_err:.2e}"


def check_parity(case, backend, dtype, training, channels_last=False):
    """Asserts backend's error vs fp64 <= tolerance(error of the reference in ``dtype``). Returns the table."""
    exact = case.run("reference", torch.float64, training, inputs_dtype=dtype)
    references = [case.run("reference", dtype, training, variant=order) for order in SUMMATION_ORDERS]
    fused = case.run(backend, dtype, training, channels_last=channels_last)
    rows, failures = [], []
    for i, (name, e, k) in enumerate(zip(NAMES, exact, fused)):
        assert torch.isfinite(k).all(), f"{name}: non-finite values from {backend} (an unwritten output?)"
        ref_err = max(relative_error(r[i], e) for r in references)
        err = relative_error(k, e)
        tol = tolerance(ref_err, dtype, e.numel())
        rows.append((name, ref_err, err, tol))
        if not err <= tol:
            failures.append(f"{name}: {backend} error {err:.3e} > tolerance {tol:.3e} (reference {dtype} error "
                            f"{ref_err:.3e})")
    table = "\n".join(f"  {n:12s} ref {r:.2e}  {backend} {k:.2e}  tol {t:.2e}" for n, r, k, t in rows)
    assert not failures, "\n".join(failures) + "\n" + table
    return table
