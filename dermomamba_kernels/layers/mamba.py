"""The 1-D Mamba block with mamba_ssm's constructor and state_dict, without mamba_ssm or causal-conv1d.

UltraLight-VM-UNet, LightM-UNet and U-Mamba build ``mamba_ssm.Mamba`` blocks over flattened image
tokens; swapping the import for ``dermomamba_kernels.layers.Mamba`` keeps their checkpoints
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) and runs on every
backend of :func:`dermomamba_kernels.selective_scan_fn`, the CPU included.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ..selective_scan import selective_scan_fn
from .ss2d import initial_dt_bias, resolve_dt_rank


def init_dt_projection(dt_proj: nn.Linear, dt_rank: int, dt_init="random", dt_scale=1.0, dt_min=0.001,
                       dt_max=0.1, dt_init_floor=1e-4):
    """Mamba's initialisation of the delta projection: weight uniform in +-dt_scale / sqrt(dt_rank)
    ("random") or that constant ("constant"); bias from :func:`initial_dt_bias`."""
    std = dt_rank ** -0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        dt_proj.bias.copy_(initial_dt_bias(dt_proj.out_features, dt_min, dt_max, dt_init_floor))


class Mamba(nn.Module):
    """Mamba (selective state space) block over a sequence: (batch, L, d_model) -> (batch, L, d_model).

    Same constructor arguments, defaults and parameter names as ``mamba_ssm.Mamba``; the depthwise
    causal conv1d runs as a plain ``F.conv1d`` (left padding, trimmed), so causal-conv1d is not
    needed. ``backend`` picks the scan's backend ("auto" by default). Step-by-step decoding with an
    inference cache (mamba_ssm's ``inference_params``) is not supported.

    Example:
        >>> block = Mamba(d_model=32, d_state=16, d_conv=4, expand=2)
        >>> block(torch.randn(2, 100, 32)).shape
        torch.Size([2, 100, 32])
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None, backend=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.use_fast_path = use_fast_path  # kept for signature compatibility; every path here is fused
        self.layer_idx = layer_idx
        self.backend = backend

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        init_dt_projection(self.dt_proj, self.dt_rank, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        self.dt_proj.bias._no_reinit = True

        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states, inference_params=None):
        if inference_params is not None:
            raise NotImplementedError("dermomamba_kernels.layers.Mamba does not support inference_params "
                                      "(step-by-step decoding); pass the whole sequence")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states: expected (batch, L, {self.d_model}), got {tuple(hidden_states.shape)}")
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 * d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added inside the scan
        y = selective_scan_fn(
            x.contiguous(), delta.contiguous(), -torch.exp(self.A_log.float()),
            B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float(), z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=self.backend)
        return self.out_proj(y.transpose(1, 2))
