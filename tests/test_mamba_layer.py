"""dermomamba_kernels.layers.Mamba against a transcription of mamba_ssm's Mamba forward (its
unfused path: in_proj, causal depthwise conv1d, x_proj, dt_proj, selective_scan_ref, out_proj)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import dermomamba_kernels as dk
from dermomamba_kernels.layers.mamba import Mamba
from published_transcription import relative_error
from scan_oracles import closed_form_scan

# Our float32 error may be this many times the float32 transcription's, both against float64.
ERROR_FACTOR = 2.0
# The measured float32 spread of few-element gradient sums (see tests/test_layers.py).
FLOOR = 16 * torch.finfo(torch.float32).eps

# mamba_ssm.Mamba's state_dict for d_model=32 (d_inner 64, dt_rank 2, d_state 16, d_conv 4), bias=False.
MAMBA_SSM_KEYS = {
    "A_log": (64, 16),
    "D": (64,),
    "in_proj.weight": (128, 32),
    "conv1d.weight": (64, 1, 4),
    "conv1d.bias": (64,),
    "x_proj.weight": (34, 64),
    "dt_proj.weight": (64, 2),
    "dt_proj.bias": (64,),
    "out_proj.weight": (32, 64),
}


def transcribed_forward(block, hidden, scan=dk.selective_scan_ref):
    """mamba_ssm's unfused Mamba forward; ``scan`` selective_scan_ref (float32, as mamba_ssm) or a float64 oracle."""
    batch, length, _ = hidden.shape
    real = hidden.dtype if scan is not dk.selective_scan_ref else torch.float32
    xz = F.linear(hidden, block.in_proj.weight, block.in_proj.bias).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.conv1d(x, block.conv1d.weight, block.conv1d.bias, padding=block.d_conv - 1, groups=block.d_inner)
    x = F.silu(x[..., :length])
    x_dbl = x.transpose(1, 2).reshape(batch * length, block.d_inner) @ block.x_proj.weight.t()
    dt = block.dt_proj.weight @ x_dbl[:, :block.dt_rank].t()
    dt = dt.view(block.d_inner, batch, length).permute(1, 0, 2)
    B = x_dbl[:, block.dt_rank:block.dt_rank + block.d_state].view(batch, length, -1).transpose(1, 2)
    C = x_dbl[:, block.dt_rank + block.d_state:].view(batch, length, -1).transpose(1, 2)
    y = scan(x, dt, -torch.exp(block.A_log.to(real)), B, C, block.D.to(real), z=z,
             delta_bias=block.dt_proj.bias.to(real), delta_softplus=True)
    if isinstance(y, tuple):  # the oracle returns (y, last_state)
        y = y[0]
    return F.linear(y.transpose(1, 2), block.out_proj.weight, block.out_proj.bias)


def test_state_dict_matches_mamba_ssm():
    block = Mamba(d_model=32)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == MAMBA_SSM_KEYS
    assert torch.allclose(block.A_log.exp()[3], torch.arange(1, 17, dtype=torch.float32))
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("batch,length,d_model", [(1, 37, 16), (2, 50, 24)])
def test_forward_backward_match_transcription(seed, backend, batch, length, d_model):
    if backend not in dk.available_backends("selective_scan", "cpu"):
        pytest.skip(dk.unavailable_reasons("selective_scan", "cpu")[backend])
    block = Mamba(d_model=d_model, backend=backend)
    block64 = copy.deepcopy(block).double()
    hidden = torch.randn(batch, length, d_model, requires_grad=True)
    hidden64 = hidden.detach().double().requires_grad_(True)
    grad_out = torch.randn(batch, length, d_model)
    names = ["output", "hidden"] + [n for n, _ in block.named_parameters()]

    def output_and_grads(module, inp, forward):
        out = forward(module, inp)
        return [out.detach()] + list(torch.autograd.grad(out, [inp, *module.parameters()], grad_out.to(out.dtype)))

    ours = output_and_grads(block, hidden, lambda m, h: m(h))
    transcription = output_and_grads(block, hidden, transcribed_forward)
    exact = output_and_grads(block64, hidden64, lambda m, h: transcribed_forward(m, h, scan=closed_form_scan))
    for name, got, base, want in zip(names, ours, transcription, exact):
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        err, base_err = relative_error(got, want), relative_error(base, want)
        assert err <= ERROR_FACTOR * base_err + FLOOR, f"{name}: error {err:.2e}, float32 transcription {base_err:.2e}"


def test_rejects_wrong_width():
    with pytest.raises(ValueError, match="hidden_states"):
        Mamba(d_model=8)(torch.randn(1, 5, 9))
