"""dermomamba_kernels.layers.Mamba against a transcription of mamba_ssm's Mamba forward (its
unfused path: in_proj, causal depthwise conv1d, x_proj, dt_proj, selective_scan_ref, out_proj)."""

import pytest
import torch
import torch.nn.functional as F

import dermomamba_kernels as dk
from dermomamba_kernels.layers.mamba import Mamba

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


def transcribed_forward(block, hidden):
    batch, length, _ = hidden.shape
    xz = F.linear(hidden, block.in_proj.weight, block.in_proj.bias).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.conv1d(x, block.conv1d.weight, block.conv1d.bias, padding=block.d_conv - 1, groups=block.d_inner)
    x = F.silu(x[..., :length])
    x_dbl = x.transpose(1, 2).reshape(batch * length, block.d_inner) @ block.x_proj.weight.t()
    dt = block.dt_proj.weight @ x_dbl[:, :block.dt_rank].t()
    dt = dt.view(block.d_inner, batch, length).permute(1, 0, 2)
    B = x_dbl[:, block.dt_rank:block.dt_rank + block.d_state].view(batch, length, -1).transpose(1, 2)
    C = x_dbl[:, block.dt_rank + block.d_state:].view(batch, length, -1).transpose(1, 2)
    y = dk.selective_scan_ref(x, dt, -torch.exp(block.A_log.float()), B, C, block.D.float(), z=z,
                              delta_bias=block.dt_proj.bias.float(), delta_softplus=True)
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
    hidden = torch.randn(batch, length, d_model, requires_grad=True)
    out = block(hidden)
    expected = transcribed_forward(block, hidden)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [hidden, *block.parameters()], grad_out)
    expected_grads = torch.autograd.grad(expected, [hidden, *block.parameters()], grad_out)
    names = ["hidden"] + [n for n, _ in block.named_parameters()]
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_rejects_wrong_width():
    with pytest.raises(ValueError, match="hidden_states"):
        Mamba(d_model=8)(torch.randn(1, 5, 9))
