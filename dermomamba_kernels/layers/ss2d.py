"""SS2D: VMamba's (v0) 2-D selective-scan layer, with its constructor and state_dict.

Checkpoints of models built on VMamba v0's ``SS2D`` (VM-UNet, H-vmunet, DermoMamba, ...) load into
this class with ``strict=True``: the parameters carry the same names and shapes. The four-direction
scan runs through :func:`dermomamba_kernels.multiaxial_selective_scan`, so the backend (CUDA, Triton,
C++ CPU or the pure-PyTorch reference) is chosen at one dispatch point, not here.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..depthwise_conv import DepthwiseConv2d
from ..layer_norm import gated_layer_norm, gated_layer_norm_backend
from ..selective_scan import multiaxial_selective_scan
from .layer_norm import LayerNorm

# Device types whose autocast SS2D follows (others, e.g. "meta", run without).
AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")
# The four scan directions of the core: row-major, column-major and both reversed.
NUM_DIRECTIONS = 4
# VMamba picks the low-rank width of the delta projection from the model width.
DT_RANK_DIVISOR = 16


def resolve_dt_rank(dt_rank: Union[int, str], d_model: int) -> int:
    """``"auto"`` -> ceil(d_model / 16) as in mamba_ssm and VMamba; an int is taken as given."""
    if dt_rank == "auto":
        return math.ceil(d_model / DT_RANK_DIVISOR)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    return dt_rank


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, for y > 0; written as y + log(1 - exp(-y)) to stay exact for small y."""
    return y + torch.log(-torch.expm1(-y))


def initial_dt_bias(d_inner, dt_min, dt_max, dt_init_floor, *, device=None, dtype=None):
    """Bias of a delta projection such that softplus(bias) is log-uniform in [dt_min, dt_max].

    The delta the scan sees at initialisation then spans the time scales mamba_ssm starts from,
    independent of the input; values under ``dt_init_floor`` are raised to it.
    """
    log_dt = torch.rand(d_inner, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
    dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
    return inverse_softplus(dt).to(dtype or torch.get_default_dtype())


class SS2D(nn.Module):
    """VMamba v0's 2-D selective scan block on channels-last feature maps.

    in_proj splits the input into a scan branch x and a gate z; x goes through a depthwise conv
    and SiLU, then the four-direction selective scan (each direction with its own projections);
    the summed result is layer-normed, gated by silu(z) and projected back to ``d_model``.

    Args:
        d_model: channels of the input and output.
        d_state: state size N of the scan. d_conv: depthwise conv kernel (odd).
        expand: d_inner = expand * d_model. dt_rank: width R of the delta projection ("auto":
            ceil(d_model / 16)).
        dt_min, dt_max, dt_init_floor: range of the initial delta (see :func:`initial_dt_bias`).
        dt_init: "random" (uniform +-R^-0.5 * dt_scale) or "constant" initial delta weights.
        dropout: on the output. conv_bias / bias: biases of conv2d / of in_proj and out_proj.
        backend: scan backend ("auto", "cuda", "triton", "cpu", "reference"; None = the
            ``DERMOMAMBA_BACKEND`` environment variable, else auto).
        recompute_gate: in training, keep only y and z of the output gate
            ``out_proj(out_norm(y) * silu(z))`` for the backward and recompute the rest there (less
            activation memory, same results); False keeps everything autograd saves. Moot where the
            norm and gate run fused (:func:`dermomamba_kernels.layer_norm.gated_layer_norm`'s triton
            backend, chosen through ``out_norm.backend``): that op keeps only y, z and two fp32
            statistics per row (and out_proj its input), so nothing is recomputed.

    Parameters (names and shapes as in VMamba v0, with d_inner = expand * d_model, K = 4):
        in_proj.weight (2 * d_inner, d_model); conv2d.weight (d_inner, 1, d_conv, d_conv);
        conv2d.bias (d_inner,); x_proj_weight (K, R + 2N, d_inner); dt_projs_weight (K, d_inner, R);
        dt_projs_bias (K, d_inner); A_logs (K * d_inner, N); Ds (K * d_inner,);
        out_norm.weight/bias (d_inner,); out_proj.weight (d_model, d_inner).

    Shapes: input (B, H, W, d_model) -> output (B, H, W, d_model).

    Example:
        >>> layer = SS2D(d_model=8)
        >>> layer(torch.randn(2, 5, 7, 8)).shape
        torch.Size([2, 5, 7, 8])
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 dropout: float = 0.0, conv_bias: bool = True, bias: bool = False,
                 device=None, dtype=None, backend: Optional[str] = None, recompute_gate: bool = True):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd so the conv keeps H and W, got {d_conv}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.backend = backend
        self.recompute_gate = bool(recompute_gate)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # Depthwise: an nn.Conv2d (same parameters and state_dict) whose weight gradient has its own kernel.
        self.conv2d = DepthwiseConv2d(self.d_inner, d_conv, padding=(d_conv - 1) // 2, bias=conv_bias, **factory)

        proj_rows = self.dt_rank + 2 * d_state
        self.x_proj_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, proj_rows, self.d_inner, **factory))
        self.dt_projs_weight = nn.Parameter(torch.empty(NUM_DIRECTIONS, self.d_inner, self.dt_rank, **factory))
        self.dt_projs_bias = nn.Parameter(torch.empty(NUM_DIRECTIONS, self.d_inner, **factory))
        self.A_logs = nn.Parameter(torch.empty(NUM_DIRECTIONS * self.d_inner, d_state, **factory))
        self.Ds = nn.Parameter(torch.empty(NUM_DIRECTIONS * self.d_inner, **factory))
        # mamba_ssm's optimiser recipes exclude these from weight decay by this flag.
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True

        # Not given `backend`: that one names the scan's backend; the norm runs "auto" (PyTorch's
        # native kernel until the Triton one is timed on a GPU).
        self.out_norm = LayerNorm(self.d_inner, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self._dt_init = (dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        self.reset_scan_parameters()

    @torch.no_grad()
    def reset_scan_parameters(self):
        """VMamba v0's initialisation of the scan parameters (the rest keep PyTorch's defaults).

        x_proj_weight: each direction as a bias-free nn.Linear(d_inner, R + 2N) would start,
        uniform in +-1/sqrt(d_inner). dt_projs_weight: uniform in +-R^-0.5 * dt_scale ("random") or
        that constant. dt_projs_bias: inverse softplus of a log-uniform delta. A_logs: log(1..N) in
        every row, so A = -(1..N). Ds: ones (the skip term starts as identity).
        """
        dt_init, dt_scale, dt_min, dt_max, dt_init_floor = self._dt_init
        bound = 1.0 / math.sqrt(self.d_inner)
        self.x_proj_weight.uniform_(-bound, bound)
        dt_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "random":
            self.dt_projs_weight.uniform_(-dt_std, dt_std)
        else:
            self.dt_projs_weight.fill_(dt_std)
        for k in range(NUM_DIRECTIONS):
            self.dt_projs_bias[k] = initial_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor,
                                                    device=self.dt_projs_bias.device,
                                                    dtype=self.dt_projs_bias.dtype)
        state_index = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_logs.device)
        self.A_logs.copy_(torch.log(state_index).expand_as(self.A_logs))
        self.Ds.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_inner={self.d_inner}, "
                f"dt_rank={self.dt_rank}, backend={self.backend!r}")

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The four-direction core: (B, d_inner, H, W) -> fp32 (B, d_inner, H, W), summed."""
        return multiaxial_selective_scan(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                         self.A_logs, self.Ds, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D: x must be channels-last (B, H, W, {self.d_model}), got shape {tuple(x.shape)}")
        x, z = self._input_projection(x)
        # The conv wants channels-first; contiguous keeps the conv's arithmetic the published one.
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self.scan(x)
        y = y.permute(0, 2, 3, 1).contiguous()
        fused = self._gate_is_fused(y, z)
        if self.recompute_gate and not fused and torch.is_grad_enabled() and (y.requires_grad or z.requires_grad):
            # Autograd would keep the norm's fp32 output, silu(z) and out_proj's input for the
            # backward: three more maps per position than y and z themselves (at DermoMamba's first
            # stage, batch 16, fp16 autocast: ~150 MB). Recomputing the tail in the backward costs a
            # norm, an elementwise pass and a thin GEMM; the arithmetic is the same, so the results are.
            out = checkpoint(self._gated_output, y, z, use_reentrant=False, preserve_rng_state=False)
        else:
            out = self._gated_output(y, z, fused)
        return self.dropout(out)

    def _input_projection(self, x: torch.Tensor):
        """in_proj split into its x and z halves, as two products instead of one and a chunk: z then
        owns its memory, so keeping it for the backward does not keep the dead x half alive too. Each
        output element is the same dot product as in the single in_proj call."""
        weight, bias = self.in_proj.weight, self.in_proj.bias
        halves = (slice(0, self.d_inner), slice(self.d_inner, 2 * self.d_inner))
        return tuple(F.linear(x, weight[half], None if bias is None else bias[half]) for half in halves)

    def _gated_output(self, y: torch.Tensor, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """out_proj(out_norm(y) * silu(z)): y (B, H, W, d_inner) fp32, z (B, H, W, d_inner)."""
        norm = self.out_norm
        # The core's sum is fp32 (as in VMamba); under autocast the norm takes it as is. A model cast
        # to half/bf16 as a whole has low-precision norm weights, which need matching input.
        y = y.to(norm.weight.dtype)
        if fused:
            # One kernel each way, its result written directly in the dtype out_proj casts to under
            # autocast (the same values as the published fp32 product cast there, one copy fewer).
            return self.out_proj(gated_layer_norm(y, z, norm.weight, norm.bias, norm.eps,
                                                  out_dtype=_autocast_dtype(y), backend="triton"))
        return self.out_proj(norm(y) * F.silu(z))

    def _gate_is_fused(self, y: torch.Tensor, z: torch.Tensor) -> bool:
        """Whether out_norm's backend runs the norm and the gate as one op (gated_layer_norm's rule for
        "auto": opt-in through DERMOMAMBA_GATED_NORM_BACKEND=triton until measured)."""
        norm = self.out_norm
        if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
            return False
        return gated_layer_norm_backend(y, z, norm.weight, norm.bias, out_dtype=_autocast_dtype(y),
                                        backend=norm.backend) == "triton"


def _autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype out_proj casts its input to under autocast on t's device (None without autocast, or on a
    device with none, e.g. "meta" as the cost report runs the model)."""
    device_type = t.device.type
    # (A fixed list, not torch.amp.is_autocast_available: dynamo cannot trace that call in torch 2.11.)
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
