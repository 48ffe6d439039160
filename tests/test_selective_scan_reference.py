"""The reference scans (the executable spec) against independent float64 formulations.

Fresh random inputs per test (see conftest's `seed`), odd sizes: L not a multiple of any chunk size,
H != W, batch 1, groups in B/C, constant B/C, every optional input.
"""

import pytest
import torch

from dermomamba_kernels.selective_scan.naive import (direction_sequences, merge_directions,
                                                     multiaxial_selective_scan_ref, selective_scan_ref)
from scan_oracles import closed_form_multiaxial, closed_form_scan


def assert_close_scaled(actual, expected, rel=2e-5, name=""):
    """fp32 loop vs fp64: errors relative to the largest magnitude of the expected tensor."""
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().clamp_min(1e-6).item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{name}: {m}")


def random_scan_inputs(batch, dim, length, dstate, b_kind="variable", c_kind="variable", groups=1, optional=True):
    def operand(kind):
        if kind == "constant":
            return torch.randn(dim, dstate)
        if kind == "variable3":
            return torch.randn(batch, dstate, length)
        return torch.randn(batch, groups, dstate, length)

    return dict(
        u=torch.randn(batch, dim, length),
        delta=0.5 * torch.randn(batch, dim, length),
        A=-torch.rand(dim, dstate) * 2 - 0.05,
        B=operand(b_kind),
        C=operand(c_kind),
        D=torch.randn(dim) if optional else None,
        z=torch.randn(batch, dim, length) if optional else None,
        delta_bias=0.3 * torch.randn(dim) if optional else None,
    )


SCAN_CASES = [
    # (batch, dim, L, N, B kind, C kind, groups, optional inputs, softplus)
    (1, 4, 67, 16, "variable", "variable", 1, True, True),
    (2, 6, 45, 8, "variable", "variable", 3, True, False),
    (2, 3, 31, 5, "variable3", "variable3", 1, False, True),
    (1, 5, 29, 4, "constant", "variable3", 1, True, True),
    (2, 4, 23, 3, "constant", "constant", 1, False, False),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: f"b{c[0]}d{c[1]}L{c[2]}N{c[3]}-{c[4]}-{c[5]}-g{c[6]}")
def test_selective_scan_ref_matches_closed_form(seed, case):
    batch, dim, length, dstate, b_kind, c_kind, groups, optional, softplus = case
    inputs = random_scan_inputs(batch, dim, length, dstate, b_kind, c_kind, groups, optional)
    names = [k for k, v in inputs.items() if v is not None]
    ref_in = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    oracle_in = {k: (v.double().requires_grad_() if v is not None else None) for k, v in inputs.items()}

    out, last = selective_scan_ref(**ref_in, delta_softplus=softplus, return_last_state=True)
    expected, expected_last = closed_form_scan(**oracle_in, delta_softplus=softplus)
    assert out.dtype == torch.float32 and out.shape == (batch, dim, length)
    assert_close_scaled(out, expected, name="out")
    assert_close_scaled(last, expected_last, name="last_state")

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [ref_in[k] for k in names], grad)
    want = torch.autograd.grad(expected, [oracle_in[k] for k in names], grad.double())
    for name, g, w in zip(names, got, want):
        assert_close_scaled(g, w, rel=5e-5, name=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_selective_scan_ref_low_precision_output_dtype(seed, dtype):
    inputs = random_scan_inputs(1, 4, 19, 6)
    low = {k: (v.to(dtype) if k in ("u", "delta", "z") else v) for k, v in inputs.items()}
    out = selective_scan_ref(**low, delta_softplus=True)
    assert out.dtype == dtype
    expected, _ = closed_form_scan(**low, delta_softplus=True)
    # the only low-precision step of the reference is the final rounding to dtype
    torch.testing.assert_close(out.double(), expected, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def random_multiaxial_inputs(batch, dim, height, width, dstate, dt_rank):
    return [
        torch.randn(batch, dim, height, width),
        torch.randn(4, dt_rank + 2 * dstate, dim) / dim ** 0.5,
        torch.randn(4, dim, dt_rank) / dt_rank ** 0.5,
        0.5 * torch.randn(4, dim),
        torch.log(torch.rand(4 * dim, dstate) * 4 + 0.1),
        torch.randn(4 * dim),
    ]


MULTIAXIAL_CASES = [(1, 4, 5, 7, 8, 1), (2, 3, 6, 4, 5, 2), (1, 2, 1, 9, 4, 1), (1, 3, 7, 1, 3, 1)]


@pytest.mark.parametrize("case", MULTIAXIAL_CASES, ids=lambda c: "b{}d{}h{}w{}n{}r{}".format(*c))
def test_multiaxial_ref_matches_closed_form(seed, case):
    inputs = random_multiaxial_inputs(*case)
    ref_in = [t.clone().requires_grad_() for t in inputs]
    oracle_in = [t.double().requires_grad_() for t in inputs]
    y = multiaxial_selective_scan_ref(*ref_in)
    expected = closed_form_multiaxial(*oracle_in)
    assert y.dtype == torch.float32 and y.shape == inputs[0].shape
    assert_close_scaled(y, expected, name="y")
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, ref_in, grad)
    want = torch.autograd.grad(expected, oracle_in, grad.double())
    names = ["x", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]
    for name, g, w in zip(names, got, want):
        assert_close_scaled(g, w, rel=5e-5, name=f"d{name}")


def test_multiaxial_ref_on_permuted_view_equals_contiguous_copy(seed):
    batch, dim, height, width = 2, 3, 5, 6
    base = torch.randn(batch, height, dim, width)
    x_view = base.permute(0, 2, 1, 3)  # (batch, dim, H, W), non-contiguous
    assert not x_view.is_contiguous()
    params = random_multiaxial_inputs(batch, dim, height, width, 4, 1)[1:]
    y_view = multiaxial_selective_scan_ref(x_view, *params)
    y_copy = multiaxial_selective_scan_ref(x_view.contiguous(), *params)
    torch.testing.assert_close(y_view, y_copy, rtol=1e-6, atol=1e-6)


def test_direction_sequences_visit_each_position_in_the_published_orders(seed):
    batch, dim, height, width = 1, 2, 3, 5
    x = torch.randn(batch, dim, height, width)
    seqs = direction_sequences(x)
    flat = x.reshape(batch, dim, -1)
    rows = [h * width + w for h in range(height) for w in range(width)]
    cols = [h * width + w for w in range(width) for h in range(height)]
    for k, order in enumerate([rows, cols, rows[::-1], cols[::-1]]):
        torch.testing.assert_close(seqs[:, k], flat[:, :, order], rtol=0, atol=0)
    torch.testing.assert_close(merge_directions(seqs, height, width), 4 * x, rtol=0, atol=0)
