"""DermoMamba (Hoang et al., 2025): a U-shaped skin-lesion segmentation network built on VMamba's SS2D.

This module rebuilds the published network (github.com/hnkhai25/DermoMamba) module for module, from
our written specification of it, so that

* parameter and buffer names and shapes are the published ones (its checkpoints load with
  ``strict=True``), and at 192x256 the network has the published 4,953,425 parameters;
* the forward pass computes what the published code computes, its quirks included (one VSSBlock
  shared by three branches, the fourth channel quarter passed through, the Sweep-Mamba bottleneck
  scanning permuted axes with the bottleneck's height and width as channels, BatchNorm after GELU
  in the decoder, nearest upsampling).

What differs on purpose: the bottleneck sizes that the released code hard-codes (6 and 8, i.e. H/32
and W/32 at 192x256) follow from ``img_size``; every selective scan goes through the
``dermomamba_kernels`` dispatch (``backend=``); bad input gets a clear error.

Layout of the network (B batch, H x W input, widths c0..c5 = 16, 32, 64, 128, 256, 512):

    pw_in   1x1 conv in_channels -> c0
    e1..e5  EncoderBlock(c_{i-1}, c_i): ResMambaBlock, 3x3 conv + BN + ReLU (the skip), 2x2 max-pool
    s1..s5  CBAM(c_i) on skip i
    b2, b1  x = SweepMamba(PCAM(x) + x) at H/32 x W/32
    d5..d1  DecoderBlock(c_i, c_{i-1}): nearest x2, concat skip, 1x1 conv, 3x3 conv, GELU, BN
    conv_out 1x1 conv c0 -> classes (logits)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dermomamba_kernels.depthwise_conv import DepthwiseConv2d
from dermomamba_kernels.layers.batch_norm import BatchNorm2d
from dermomamba_kernels.layers import CBAM, SS2D, LayerNorm, VSSBlock

from ..hub import HubMixin
from ._registry import register_model

NUM_STAGES = 5
# Five 2x2 max-pools: the input must be divisible by 2**5 and the bottleneck is H/32 x W/32.
DOWNSAMPLE_FACTOR = 2 ** NUM_STAGES
# The Cross-Scale Mamba Block splits channels into four quarters (three scanned, one passed).
CHANNEL_GROUPS = 4
# Axial depthwise kernels of the cross-scale branches and their dilations (one per branch).
AXIAL_KERNEL = (7, 7)
BRANCH_DILATIONS = (1, 2, 3)
PCAM_KERNEL = 9
CBAM_REDUCTION = 16

PUBLISHED_WIDTHS = (16, 32, 64, 128, 256, 512)
TINY_WIDTHS = (8, 16, 16, 32, 32, 64)
PUBLISHED_IMG_SIZE = (192, 256)


def _pair(size: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or an (H, W) pair, got {size!r}") from None
    return height, width


class AxialSpatialDW(nn.Module):
    """Depthwise axial mixing: conv3x3(conv7x1(conv1x7(x))) + x, all depthwise, dilated, 'same'-padded.

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> AxialSpatialDW(4, (7, 7), dilation=2)(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 4, 8, 8])
    """

    def __init__(self, dim: int, mixer_kernel: Tuple[int, int] = AXIAL_KERNEL, dilation: int = 1):
        super().__init__()
        kernel_h, kernel_w = mixer_kernel
        self.mixer_h = DepthwiseConv2d(dim, (kernel_h, 1), padding="same", dilation=dilation)
        self.mixer_w = DepthwiseConv2d(dim, (1, kernel_w), padding="same", dilation=dilation)
        self.conv = DepthwiseConv2d(dim, 3, padding="same", dilation=dilation)

    def forward(self, x):
        # The width mixer runs first although the height mixer is registered first (published order).
        return self.conv(self.mixer_h(self.mixer_w(x))) + x


class CrossScaleMambaBlock(nn.Module):
    """Four channel quarters: three go through a dilated axial depthwise mixer (dilation 1, 2, 3) and
    then ONE VSSBlock shared by the three; the fourth passes unchanged; concat, BN, ReLU.

    The published code calls the shared VSSBlock three times. Here the three branches are stacked
    along the batch axis and go through it in one call (3B samples), then are split back. This
    computes the same thing: every op inside the VSSBlock works per sample or finer (LayerNorm per
    token, linear projections per token, depthwise conv per sample and channel, the selective scan
    per sequence, drop path one draw per sample), none uses statistics over the batch; BatchNorm
    comes after the split. Only float rounding of the batched GEMMs and of the weight-gradient sums
    may differ; the VSSBlock's kernels launch once instead of three times.

    Shapes: (B, C, H, W) -> (B, C, H, W), C divisible by 4.

    Example:
        >>> CrossScaleMambaBlock(16)(torch.randn(1, 16, 6, 8)).shape
        torch.Size([1, 16, 6, 8])
    """

    def __init__(self, dim: int, d_state: int = 16, backend: Optional[str] = None):
        super().__init__()
        if dim % CHANNEL_GROUPS:
            raise ValueError(f"CrossScaleMambaBlock: dim must be divisible by {CHANNEL_GROUPS}, got {dim}")
        quarter = dim // CHANNEL_GROUPS
        self.dw1 = AxialSpatialDW(quarter, AXIAL_KERNEL, dilation=BRANCH_DILATIONS[0])
        self.dw2 = AxialSpatialDW(quarter, AXIAL_KERNEL, dilation=BRANCH_DILATIONS[1])
        self.dw3 = AxialSpatialDW(quarter, AXIAL_KERNEL, dilation=BRANCH_DILATIONS[2])
        self.vss = VSSBlock(quarter, d_state=d_state, backend=backend)
        self.bn = BatchNorm2d(dim)
        self.act = nn.ReLU()

    def forward(self, x):
        batch = x.shape[0]
        x1, x2, x3, x4 = torch.chunk(x, CHANNEL_GROUPS, dim=1)
        # Each mixed branch is permuted (a view) before the cat, so the cat itself writes the
        # channels-last (3B, H, W, C/4) stack the VSSBlock takes: one copy, no separate transpose.
        stacked = torch.cat([dw(part).permute(0, 2, 3, 1)
                             for dw, part in ((self.dw1, x1), (self.dw2, x2), (self.dw3, x3))], dim=0)
        scanned = self.vss(stacked).permute(0, 3, 1, 2)  # (3B, C/4, H, W), a view
        # Likewise the final cat reads the three channels-last branches through their views.
        return self.act(self.bn(torch.cat(list(scanned.split(batch, dim=0)) + [x4], dim=1)))


class ResMambaBlock(nn.Module):
    """y = CrossScaleMambaBlock(x); LeakyReLU(InstanceNorm(conv3x3(y))) + y * scale (learned scalar).

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> ResMambaBlock(16)(torch.randn(1, 16, 6, 8)).shape
        torch.Size([1, 16, 6, 8])
    """

    def __init__(self, channels: int, d_state: int = 16, backend: Optional[str] = None):
        super().__init__()
        self.ins_norm = nn.InstanceNorm2d(channels, affine=True)
        self.act = nn.LeakyReLU(negative_slope=0.01)
        self.block = CrossScaleMambaBlock(channels, d_state=d_state, backend=backend)
        self.conv = nn.Conv2d(channels, channels, 3, padding="same")
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        x = self.block(x)
        return self.act(self.ins_norm(self.conv(x))) + x * self.scale


class EncoderBlock(nn.Module):
    """ResMambaBlock(in_c), then skip = ReLU(BN(conv3x3 in_c -> out_c)), then 2x2 max-pool.

    Shapes: (B, in_c, H, W) -> (pooled (B, out_c, H/2, W/2), skip (B, out_c, H, W)).

    Example:
        >>> pooled, skip = EncoderBlock(16, 32)(torch.randn(1, 16, 6, 8))
        >>> pooled.shape, skip.shape
        (torch.Size([1, 32, 3, 4]), torch.Size([1, 32, 6, 8]))
    """

    def __init__(self, in_c: int, out_c: int, d_state: int = 16, backend: Optional[str] = None):
        super().__init__()
        self.pw = nn.Conv2d(in_c, out_c, 3, padding="same")
        self.bn = BatchNorm2d(out_c)
        self.act = nn.ReLU()
        self.resmamba = ResMambaBlock(in_c, d_state=d_state, backend=backend)
        self.down = nn.MaxPool2d(2)

    def forward(self, x):
        skip = self.act(self.bn(self.pw(self.resmamba(x))))
        return self.down(skip), skip


class PCAM(nn.Module):
    """Channel attention around a depthwise 9x9 conv (``b2``).

    c = mean_HW(x); y = dw(x); c2 = mean_HW(y); r = softmax over channels of (c2 - c);
    output y * sigmoid(c2 * (1 + r)), one weight per (sample, channel).

    Shapes: (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> PCAM(8)(torch.randn(2, 8, 6, 8)).shape
        torch.Size([2, 8, 6, 8])
    """

    def __init__(self, dim: int, kernel_size: int = PCAM_KERNEL):
        super().__init__()
        self.dw = DepthwiseConv2d(dim, kernel_size, padding="same")

    def forward(self, x):
        before = x.mean(dim=(2, 3))
        y = self.dw(x)
        after = y.mean(dim=(2, 3))
        rise = torch.softmax(after - before, dim=1)
        return y * torch.sigmoid(after * (1 + rise))[:, :, None, None]


class SweepMamba(nn.Module):
    """The Sweep-Mamba bottleneck (``b1``): three SS2D scans of one projected map along three planes.

    With x = proj_in(LayerNorm(x)) of shape (B, h, w, c), c = dim / ratio:
      * mamba1 = SS2D(c) scans the (h, w) plane with the c features as channels;
      * mamba2 = SS2D(h) scans x permuted to (B, w, c, h): the (w, c) plane, h as channels;
      * mamba3 = SS2D(w) scans x permuted to (B, c, h, w): the (c, h) plane, w as channels;
    each result is permuted back to (B, h, w, c). With g = silu(x):
    out = ReLU(BN(proj_out(g * x1 + g * x2 + g * x3) + input * scale)).

    The released code hard-codes h = 6 and w = 8 (a 192x256 input); here they are ``spatial_size``.

    Shapes: (B, dim, h, w) -> (B, dim, h, w).

    Example:
        >>> SweepMamba(64, spatial_size=(2, 3))(torch.randn(1, 64, 2, 3)).shape
        torch.Size([1, 64, 2, 3])
    """

    def __init__(self, dim: int, spatial_size: Tuple[int, int], ratio: int = 8, d_state: int = 16,
                 backend: Optional[str] = None):
        super().__init__()
        if dim % ratio:
            raise ValueError(f"SweepMamba: dim={dim} must be divisible by ratio={ratio}")
        height, width = spatial_size
        hidden = dim // ratio
        self.spatial_size = (height, width)
        self.ln = LayerNorm(dim)
        self.proj_in = nn.Linear(dim, hidden)
        self.mamba1 = SS2D(d_model=hidden, d_state=d_state, backend=backend)
        self.mamba2 = SS2D(d_model=height, d_state=d_state, backend=backend)
        self.mamba3 = SS2D(d_model=width, d_state=d_state, backend=backend)
        self.proj_out = nn.Linear(hidden, dim)
        self.scale = nn.Parameter(torch.ones(1))
        self.bn = BatchNorm2d(dim)

    def forward(self, x):
        if tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(f"SweepMamba was built for a {self.spatial_size[0]}x{self.spatial_size[1]} bottleneck, "
                             f"got {tuple(x.shape[2:])[0]}x{tuple(x.shape[2:])[1]}")
        x = x.permute(0, 2, 3, 1)  # (B, h, w, dim)
        skip = x
        x = self.proj_in(self.ln(x))  # (B, h, w, c)
        x1 = self.mamba1(x)
        x2 = self.mamba2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x3 = self.mamba3(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # g*x1 + g*x2 + g*x3 of the published code, factored: equal up to float rounding, two
        # elementwise passes (and their backward) fewer.
        gate = F.silu(x)
        out = self.proj_out(gate * (x1 + x2 + x3)) + skip * self.scale
        return F.relu(self.bn(out.permute(0, 3, 1, 2)))


class DecoderBlock(nn.Module):
    """Nearest x2 upsample, concat the skip, 1x1 conv 2*in_c -> in_c, 3x3 conv in_c -> out_c, GELU, BN.

    BatchNorm comes last (after GELU) and has out_c channels, as in the published code.

    Shapes: x (B, in_c, h, w), skip (B, in_c, 2h, 2w) -> (B, out_c, 2h, 2w).

    Example:
        >>> DecoderBlock(32, 16)(torch.randn(1, 32, 3, 4), torch.randn(1, 32, 6, 8)).shape
        torch.Size([1, 16, 6, 8])
    """

    def __init__(self, in_c: int, out_c: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.pw = nn.Conv2d(2 * in_c, in_c, 1)
        self.bn = BatchNorm2d(out_c)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(in_c, out_c, 3, padding="same")

    def forward(self, x, skip):
        x = torch.cat([self.up(x), skip], dim=1)
        return self.bn(self.act(self.pw2(self.pw(x))))


class DermoMamba(HubMixin, nn.Module):
    """The DermoMamba segmentation network, faithful to the published code.

    Args:
        in_channels: input channels (3 for RGB dermoscopy).
        classes: output channels (logits; 1 for binary lesion masks).
        img_size: (H, W) or int; both divisible by 32. Fixes the Sweep-Mamba bottleneck's SS2D widths
            (H/32 and W/32), so the model runs at this size only.
        widths: channels (c0, ..., c5) of the stem and the five encoder stages; the published network
            is (16, 32, 64, 128, 256, 512). c0..c4 divisible by 4, c1..c5 at least 16 (CBAM's MLP),
            c5 divisible by ``sweep_ratio``.
        sweep_ratio: the bottleneck's projection ratio (c = c5 / sweep_ratio).
        d_state: state size of every SS2D.
        backend: selective-scan backend of every SS2D ("auto", "cuda", "triton", "cpu", "reference";
            None = the ``DERMOMAMBA_BACKEND`` environment variable, else auto). See
            :meth:`set_backend`.

    Shapes: (B, in_channels, H, W) -> logits (B, classes, H, W).

    Example:
        >>> model = DermoMamba(img_size=(64, 96), widths=(8, 16, 16, 32, 32, 64)).eval()
        >>> model(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 1, 64, 96])
    """

    def __init__(self, in_channels: int = 3, classes: int = 1,
                 img_size: Union[int, Sequence[int]] = PUBLISHED_IMG_SIZE,
                 widths: Sequence[int] = PUBLISHED_WIDTHS, sweep_ratio: int = 8, d_state: int = 16,
                 backend: Optional[str] = None):
        super().__init__()
        height, width = _pair(img_size, "img_size")
        if height <= 0 or width <= 0 or height % DOWNSAMPLE_FACTOR or width % DOWNSAMPLE_FACTOR:
            raise ValueError(f"img_size must be positive and divisible by {DOWNSAMPLE_FACTOR} "
                             f"(five 2x2 poolings), got {height}x{width}")
        widths = tuple(int(w) for w in widths)
        if len(widths) != NUM_STAGES + 1:
            raise ValueError(f"widths must list {NUM_STAGES + 1} channel counts (stem and {NUM_STAGES} stages), "
                             f"got {widths}")
        for index, channels in enumerate(widths[:-1]):
            if channels <= 0 or channels % CHANNEL_GROUPS:
                raise ValueError(f"widths[{index}]={channels} must be a positive multiple of {CHANNEL_GROUPS} "
                                 f"(the Cross-Scale Mamba Block splits channels into quarters)")
        for index, channels in enumerate(widths[1:], start=1):
            if channels < CBAM_REDUCTION:
                raise ValueError(f"widths[{index}]={channels} must be at least {CBAM_REDUCTION} "
                                 f"(CBAM's channel MLP reduces by {CBAM_REDUCTION})")
        for name, value in (("in_channels", in_channels), ("classes", classes), ("sweep_ratio", sweep_ratio),
                            ("d_state", d_state)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        self.img_size = (height, width)
        self.in_channels = in_channels
        self.classes = classes
        self.widths = widths
        self.config = {"in_channels": in_channels, "classes": classes, "img_size": [height, width],
                       "widths": list(widths), "sweep_ratio": sweep_ratio, "d_state": d_state}
        bottleneck = (height // DOWNSAMPLE_FACTOR, width // DOWNSAMPLE_FACTOR)
        c0, c1, c2, c3, c4, c5 = widths

        self.pw_in = nn.Conv2d(in_channels, c0, 1)
        self.e1 = EncoderBlock(c0, c1, d_state, backend)
        self.e2 = EncoderBlock(c1, c2, d_state, backend)
        self.e3 = EncoderBlock(c2, c3, d_state, backend)
        self.e4 = EncoderBlock(c3, c4, d_state, backend)
        self.e5 = EncoderBlock(c4, c5, d_state, backend)
        self.s1 = CBAM(c1, CBAM_REDUCTION, backend=backend)
        self.s2 = CBAM(c2, CBAM_REDUCTION, backend=backend)
        self.s3 = CBAM(c3, CBAM_REDUCTION, backend=backend)
        self.s4 = CBAM(c4, CBAM_REDUCTION, backend=backend)
        self.s5 = CBAM(c5, CBAM_REDUCTION, backend=backend)
        self.b1 = SweepMamba(c5, bottleneck, ratio=sweep_ratio, d_state=d_state, backend=backend)
        self.b2 = PCAM(c5)
        self.d5 = DecoderBlock(c5, c4)
        self.d4 = DecoderBlock(c4, c3)
        self.d3 = DecoderBlock(c3, c2)
        self.d2 = DecoderBlock(c2, c1)
        self.d1 = DecoderBlock(c1, c0)
        self.conv_out = nn.Conv2d(c0, classes, 1)

    @classmethod
    def config_from_state_dict(cls, state) -> dict:
        """Constructor arguments read off a state_dict's shapes (for published checkpoints).

        Entries whose keys are absent keep their defaults; the strict load then names those keys.
        """
        def width_of(key, dim=0):
            return int(state[key].shape[dim]) if key in state and state[key].dim() > dim else None

        config = {}
        if width_of("pw_in.weight", 1) is not None:
            config["in_channels"] = width_of("pw_in.weight", 1)
        if width_of("conv_out.weight") is not None:
            config["classes"] = width_of("conv_out.weight")
        widths = [width_of("pw_in.weight")] + [width_of(f"e{i}.pw.weight") for i in range(1, NUM_STAGES + 1)]
        if all(w is not None for w in widths):
            config["widths"] = widths
        # The bottleneck's second and third SS2D have d_model = H/32 and W/32: the training size.
        height, width = width_of("b1.mamba2.in_proj.weight", 1), width_of("b1.mamba3.in_proj.weight", 1)
        if height is not None and width is not None:
            config["img_size"] = [height * DOWNSAMPLE_FACTOR, width * DOWNSAMPLE_FACTOR]
        hidden = width_of("b1.proj_in.weight")
        if hidden and widths[-1] is not None and widths[-1] % hidden == 0:
            config["sweep_ratio"] = widths[-1] // hidden
        if width_of("b1.mamba1.A_logs", 1) is not None:
            config["d_state"] = width_of("b1.mamba1.A_logs", 1)
        return config

    def describe_mismatch(self, state) -> str:
        """A hint for a checkpoint that does not fit, e.g. one trained at another image size."""
        found = self.config_from_state_dict(state).get("img_size")
        if found is not None and tuple(found) != self.img_size:
            return (f"The checkpoint was trained at img_size=({found[0]}, {found[1]}) (its Sweep-Mamba widths), "
                    f"the model is built for img_size={self.img_size}")
        return ""

    def set_backend(self, backend: Optional[str]) -> "DermoMamba":
        """Route every selective scan (and fused layer that has one) through ``backend``; returns self."""
        for module in self.modules():
            if hasattr(module, "backend") and module is not self:
                module.backend = backend
        return self

    def check_input(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DermoMamba: x must be a (B, {self.in_channels}, H, W) tensor, got {got}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"DermoMamba: x has {x.shape[1]} channels, the model expects "
                             f"in_channels={self.in_channels}")
        if tuple(x.shape[2:]) != self.img_size:
            height, width = self.img_size
            raise ValueError(
                f"DermoMamba: input is {x.shape[2]}x{x.shape[3]} but the model was built for img_size="
                f"({height}, {width}) (expected input (B, {self.in_channels}, {height}, {width})); the "
                f"Sweep-Mamba bottleneck's widths depend on the size, so resize the input or create the "
                f"model with img_size=({x.shape[2]}, {x.shape[3]}) (each divisible by {DOWNSAMPLE_FACTOR})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.pw_in(x)
        x, skip1 = self.e1(x)
        x, skip2 = self.e2(x)
        x, skip3 = self.e3(x)
        x, skip4 = self.e4(x)
        x, skip5 = self.e5(x)
        skip1, skip2, skip3 = self.s1(skip1), self.s2(skip2), self.s3(skip3)
        skip4, skip5 = self.s4(skip4), self.s5(skip5)
        x = self.b1(self.b2(x) + x)
        x = self.d5(x, skip5)
        x = self.d4(x, skip4)
        x = self.d3(x, skip3)
        x = self.d2(x, skip2)
        x = self.d1(x, skip1)
        return self.conv_out(x)


@register_model
def dermomamba(in_channels: int = 3, classes: int = 1, img_size=PUBLISHED_IMG_SIZE, **kwargs) -> DermoMamba:
    """The published network: widths 16..512 (4,953,425 parameters at 192x256)."""
    kwargs.setdefault("widths", PUBLISHED_WIDTHS)
    return DermoMamba(in_channels=in_channels, classes=classes, img_size=img_size, **kwargs)


@register_model
def dermomamba_tiny(in_channels: int = 3, classes: int = 1, img_size=PUBLISHED_IMG_SIZE, **kwargs) -> DermoMamba:
    """Same structure with narrow widths (8, 16, 16, 32, 32, 64): for tests and smoke runs."""
    kwargs.setdefault("widths", TINY_WIDTHS)
    return DermoMamba(in_channels=in_channels, classes=classes, img_size=img_size, **kwargs)
