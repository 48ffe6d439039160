"""Faithfulness: our DermoMamba modules against an independent, functional transcription of the
published forward pass (tests/published_transcription.py, written from the specification of the
published network, not from our modules), with the same weights.

Tolerance: the transcription run in float64 is the oracle; our float32 model may differ from it by
at most ERROR_FACTOR times what the same transcription run in float32 differs (plus a few float32
ulps of the output's scale). Weights are moved off their initial values first (BatchNorm running
statistics included), so that no quirk hides behind an identity.
"""

import pytest
import torch

import published_transcription as plain
from dermomamba.models import DecoderBlock, PCAM, SweepMamba, create_model

ERROR_FACTOR = 2.0
FLOOR = 4 * torch.finfo(torch.float32).eps


def as_float64(state):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}


def assert_within_float32_rounding(ours, plain_fn, x, state):
    oracle = plain_fn(x.double(), as_float64(state))
    baseline = plain_fn(x, state)
    ours_err, base_err = plain.relative_error(ours, oracle), plain.relative_error(baseline, oracle)
    assert ours_err <= ERROR_FACTOR * base_err + FLOOR, (ours_err, base_err)


def load_perturbed(module):
    state = plain.perturbed(module.state_dict())
    module.load_state_dict(state)
    return module.eval(), state


@pytest.mark.parametrize("name", ["dermomamba_tiny", "dermomamba"])
def test_whole_network_matches_transcription(seed, name):
    size = (32, 64)  # bottleneck 1x2: H != W everywhere
    model, state = load_perturbed(create_model(name, img_size=size))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(x)
        assert_within_float32_rounding(ours, plain.dermomamba, x, state)


def test_sweep_mamba_matches_transcription_forward_and_backward(seed):
    # h, w and the projected width all differ, so a permute and a reshape cannot be confused.
    dim, h, w = 40, 3, 5
    block, state = load_perturbed(SweepMamba(dim, spatial_size=(h, w), ratio=8))
    assert block.mamba2.d_model == h and block.mamba3.d_model == w
    x = torch.randn(2, dim, h, w)
    grad_out = torch.randn(2, dim, h, w)

    x_ours = x.clone().requires_grad_(True)
    ours = block(x_ours)
    ours.backward(grad_out)
    assert_within_float32_rounding(ours.detach(), lambda inp, p: plain.sweep_mamba(inp, p, ""), x, state)

    def input_grad(inp):
        inp = inp.clone().requires_grad_(True)
        plain.sweep_mamba(inp, as_float64(state) if inp.dtype == torch.float64 else state, "").backward(
            grad_out.to(inp.dtype))
        return inp.grad

    oracle, baseline = input_grad(x.double()), input_grad(x)
    ours_err, base_err = plain.relative_error(x_ours.grad, oracle), plain.relative_error(baseline, oracle)
    assert ours_err <= ERROR_FACTOR * base_err + FLOOR, (ours_err, base_err)


def test_sweep_mamba_scans_permuted_axes(seed):
    """mamba2 must see the projected map as (B, w, c, h) by permutation (a scan over the (w, c) plane
    with the rows as channels), not the same memory reinterpreted by a reshape."""
    dim, h, w = 16, 2, 3
    block = SweepMamba(dim, spatial_size=(h, w), ratio=4).eval()
    seen = {}
    block.mamba2.register_forward_pre_hook(lambda mod, args: seen.setdefault("mamba2", args[0]))
    block.mamba3.register_forward_pre_hook(lambda mod, args: seen.setdefault("mamba3", args[0]))
    x = torch.randn(1, dim, h, w)
    with torch.no_grad():
        block(x)
        projected = block.proj_in(block.ln(x.permute(0, 2, 3, 1)))  # (B, h, w, c)
    assert torch.equal(seen["mamba2"], projected.permute(0, 2, 3, 1))
    assert torch.equal(seen["mamba3"], projected.permute(0, 3, 1, 2))


def test_pcam_and_decoder_match_transcription(seed):
    pcam, pcam_state = load_perturbed(PCAM(12))
    x = torch.randn(2, 12, 5, 7)
    with torch.no_grad():
        assert_within_float32_rounding(pcam(x), lambda inp, p: plain.pcam(inp, p, ""), x, pcam_state)
    decoder, dec_state = load_perturbed(DecoderBlock(8, 4))
    low, skip = torch.randn(2, 8, 3, 5), torch.randn(2, 8, 6, 10)
    with torch.no_grad():
        ours = decoder(low, skip)
        oracle = plain.decoder(low.double(), skip.double(), as_float64(dec_state), "")
        baseline = plain.decoder(low, skip, dec_state, "")
    assert plain.relative_error(ours, oracle) <= ERROR_FACTOR * plain.relative_error(baseline, oracle) + FLOOR
