"""SS2D and VSSBlock: VMamba v0's state_dict, initialisation, channels-last I/O, and forward/backward
equal to a plain implementation of VMamba v0's SS2D (tests/published_transcription.py) with the
same weights."""

import math

import pytest
import torch
import torch.nn.functional as F

import published_transcription as plain
from dermomamba_kernels import BackendUnavailableError
from dermomamba_kernels.layers import SS2D, DropPath, VSSBlock

# Plain float32 arithmetic may differ from the float64 oracle by this many times its own error.
ERROR_FACTOR = 2.0
# Floor on top of that (relative error): a gradient of a few dozen elements summed over a short
# sequence has a float32 error that is one random draw of the summation order; plain float32's draw can
# be lucky (2e-7) where ours, in another order, lands at 1.8e-6 (measured: 300 draws of the 1x9, d_model 4
# case, 2026-11-27). 16 float32 epsilons (1.9e-6) is that spread; the CUDA scan tests use the same floor.
FLOOR = 16 * torch.finfo(torch.float32).eps


def vmamba_v0_shapes(d_model, d_state=16, d_conv=3, expand=2, dt_rank=None, bias=False, conv_bias=True):
    """The state_dict of VMamba v0's SS2D, written out from its definition."""
    d_inner = expand * d_model
    rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
    shapes = {
        "x_proj_weight": (4, rank + 2 * d_state, d_inner),
        "dt_projs_weight": (4, d_inner, rank),
        "dt_projs_bias": (4, d_inner),
        "A_logs": (4 * d_inner, d_state),
        "Ds": (4 * d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv2d.weight": (d_inner, 1, d_conv, d_conv),
        "out_norm.weight": (d_inner,),
        "out_norm.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    if conv_bias:
        shapes["conv2d.bias"] = (d_inner,)
    if bias:
        shapes["in_proj.bias"] = (2 * d_inner,)
        shapes["out_proj.bias"] = (d_model,)
    return shapes


@pytest.mark.parametrize("kwargs", [
    {"d_model": 96},
    {"d_model": 4},
    {"d_model": 17, "d_state": 8, "expand": 3, "d_conv": 5},
    {"d_model": 32, "dt_rank": 5, "bias": True, "conv_bias": False},
])
def test_ss2d_state_dict_is_vmamba_v0(kwargs):
    layer = SS2D(**kwargs)
    got = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert got == vmamba_v0_shapes(**kwargs)


def test_vss_block_state_dict_and_norm():
    block = VSSBlock(hidden_dim=12, d_state=8)
    expected = {"ln_1.weight": (12,), "ln_1.bias": (12,)}
    expected.update({"self_attention." + k: v for k, v in vmamba_v0_shapes(12, d_state=8).items()})
    assert {n: tuple(t.shape) for n, t in block.state_dict().items()} == expected
    assert block.ln_1.eps == 1e-6
    assert block.self_attention.out_norm.eps == 1e-5


def test_state_dict_round_trip_strict(seed):
    source, target = SS2D(24), SS2D(24)
    state = plain.perturbed(source.state_dict())
    target.load_state_dict(state, strict=True)
    for name, value in target.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_ss2d_initialisation(seed):
    d_model, d_state, dt_min, dt_max = 40, 16, 0.002, 0.05
    layer = SS2D(d_model, d_state=d_state, dt_min=dt_min, dt_max=dt_max)
    d_inner, rank = 2 * d_model, math.ceil(d_model / 16)
    expected_A_logs = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(4 * d_inner, d_state)
    assert torch.equal(layer.A_logs.detach(), expected_A_logs)
    assert torch.equal(layer.Ds.detach(), torch.ones(4 * d_inner))
    dt_bound = rank ** -0.5
    assert layer.dt_projs_weight.abs().max() <= dt_bound
    assert layer.dt_projs_weight.std() > 0.3 * dt_bound  # spread over the range, not a constant
    dt = F.softplus(layer.dt_projs_bias.detach().double())
    assert dt.min() >= dt_min * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    # log-uniform: the mean of log(dt) sits mid-way between log(dt_min) and log(dt_max)
    mid = 0.5 * (math.log(dt_min) + math.log(dt_max))
    assert abs(dt.log().mean().item() - mid) < 0.25 * (math.log(dt_max) - math.log(dt_min))
    assert layer.x_proj_weight.abs().max() <= 1 / math.sqrt(d_inner)
    assert layer.dt_rank == rank and layer.d_inner == d_inner


def test_ss2d_initialisation_constant_and_floor():
    layer = SS2D(8, dt_init="constant", dt_scale=2.0, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)
    assert torch.all(layer.dt_projs_weight == 2.0 * layer.dt_rank ** -0.5)
    dt = F.softplus(layer.dt_projs_bias.detach().double())
    assert torch.allclose(dt, torch.full_like(dt, 1e-3), rtol=1e-4)  # everything raised to the floor


@pytest.mark.parametrize("bad", [{"d_model": 0}, {"d_model": 8, "d_conv": 4}, {"d_model": 8, "dt_init": "xavier"},
                                 {"d_model": 8, "dt_rank": 0}, {"d_model": 8, "dt_min": 0.2, "dt_max": 0.1}])
def test_ss2d_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        SS2D(**bad)


def test_channels_last_io_and_errors(seed):
    layer = SS2D(6)
    x = torch.randn(2, 5, 7, 6)
    assert layer(x).shape == (2, 5, 7, 6)
    # a permuted (non-contiguous) channels-last view gives the same result as its contiguous copy
    base = torch.randn(2, 6, 5, 7)
    view = base.permute(0, 2, 3, 1)
    assert not view.is_contiguous()
    torch.testing.assert_close(layer(view), layer(view.contiguous()), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, H, W, 6\)"):
        layer(torch.randn(2, 6, 5, 7))
    with pytest.raises(ValueError, match="channels-last"):
        layer(torch.randn(5, 7, 6))


def test_backend_argument():
    x = torch.randn(1, 3, 4, 8)
    assert SS2D(8, backend="reference")(x).shape == x.shape
    with pytest.raises(ValueError, match="backend"):
        SS2D(8, backend="no-such-backend")(x)
    with pytest.raises(BackendUnavailableError):
        SS2D(8, backend="cuda")(x)  # CPU tensors: the CUDA kernels cannot run them


def _compare_with_plain(layer_fn, plain_fn, module, x):
    """Forward and backward of our module against the plain implementation with the same weights.

    Oracle: the plain implementation in float64. Our float32 error (output, input gradient and
    every parameter's gradient) must stay within ERROR_FACTOR x that of the plain one in float32.
    """
    state = plain.perturbed(module.state_dict())
    module.load_state_dict(state)
    grad_out = torch.randn(x.shape[:-1] + (module_out_dim(module),))

    def run(fn, weights, inp):
        weights = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in weights.items()}
        inp = inp.detach().clone().requires_grad_(True)
        out = fn(inp, weights)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), inp.grad, {k: v.grad for k, v in weights.items() if v.is_floating_point()}

    state64 = {k: v.double() for k, v in state.items()}
    oracle = run(plain_fn, state64, x.double())
    baseline = run(plain_fn, state, x)

    x_ours = x.detach().clone().requires_grad_(True)
    module.zero_grad()
    out = layer_fn(x_ours)
    out.backward(grad_out)
    ours_grads = {name: p.grad for name, p in module.named_parameters()}
    assert set(ours_grads) == set(oracle[2])

    pairs = [("output", out.detach(), baseline[0], oracle[0]), ("input grad", x_ours.grad, baseline[1], oracle[1])]
    pairs += [(name, ours_grads[name], baseline[2][name], oracle[2][name]) for name in oracle[2]]
    for name, ours, base, exact in pairs:
        assert ours is not None and torch.isfinite(ours).all(), name
        ours_err, base_err = plain.relative_error(ours, exact), plain.relative_error(base, exact)
        assert ours_err <= ERROR_FACTOR * base_err + FLOOR, (name, ours_err, base_err)


def module_out_dim(module):
    return module.d_model if isinstance(module, SS2D) else module.self_attention.d_model


@pytest.mark.parametrize("batch, height, width, d_model", [(2, 5, 7, 6), (1, 3, 4, 20), (1, 1, 9, 4)])
def test_ss2d_matches_plain_vmamba_v0(seed, batch, height, width, d_model):
    layer = SS2D(d_model)
    x = torch.randn(batch, height, width, d_model)
    _compare_with_plain(layer, lambda inp, w: plain.ss2d(inp, w, ""), layer, x)


def test_ss2d_with_biases_matches_plain(seed):
    layer = SS2D(8, d_state=4, d_conv=5, expand=3, bias=True)
    x = torch.randn(2, 4, 6, 8)
    _compare_with_plain(layer, lambda inp, w: plain.ss2d(inp, w, ""), layer, x)


def test_vss_block_matches_plain(seed):
    block = VSSBlock(hidden_dim=8)
    x = torch.randn(2, 3, 5, 8)
    _compare_with_plain(block, lambda inp, w: plain.vss_block(inp, w, ""), block, x)


def test_drop_path(seed):
    block = DropPath(0.5)
    x = torch.randn(64, 3, 2, 2)
    assert block.eval()(x) is x
    y = block.train()(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert torch.all(kept | dropped)  # whole samples, never parts of one
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(y[kept], x[kept] * 2)
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.0)


def _saved_bytes_and_grads(layer, x, grad_out):
    """Forward + backward of layer on x; returns the bytes autograd kept between them and the grads."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(x)
    out.backward(grad_out)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = sum(n for ptr, n in storages.items() if ptr not in weights)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return kept, out.detach(), x.grad, grads


@pytest.mark.parametrize("bias", [False, True])
def test_ss2d_recomputed_gate_is_the_same_arithmetic(seed, bias):
    """recompute_gate (the default) keeps less for the backward and gives bit-identical results."""
    d_model, shape = 6, (2, 5, 7)
    recomputing = SS2D(d_model, bias=bias)
    keeping = SS2D(d_model, bias=bias, recompute_gate=False)
    keeping.load_state_dict(plain.perturbed(recomputing.state_dict()))
    recomputing.load_state_dict(keeping.state_dict())
    x = torch.randn(*shape, d_model)
    grad_out = torch.randn(*shape, d_model)
    kept_r, out_r, dx_r, grads_r = _saved_bytes_and_grads(recomputing, x, grad_out)
    kept_k, out_k, dx_k, grads_k = _saved_bytes_and_grads(keeping, x, grad_out)
    assert torch.equal(out_r, out_k) and torch.equal(dx_r, dx_k)
    assert set(grads_r) == set(grads_k)
    for name in grads_k:
        assert torch.equal(grads_r[name], grads_k[name]), name
    # y, z and the norm's statistics stay; the norm's output, silu(z) and out_proj's input go.
    d_inner, positions = 2 * d_model, math.prod(shape)
    assert kept_k - kept_r >= 3 * positions * d_inner * x.element_size(), (kept_k, kept_r)
