"""Specification of the depthwise 2-D convolution (stride 1): F.conv2d(groups=C)'s arithmetic, spelled out.

With the input zero-padded by (top, bottom, left, right) rows / columns,

    y[b, c, h, w]       = bias[c] + sum_{i, j} weight[c, 0, i, j] * xpad[b, c, h + i * dh, w + j * dw]
    d weight[c, 0, i, j] = sum_{b, h, w} dy[b, c, h, w] * xpad[b, c, h + i * dh, w + j * dw]
    d bias[c]           = sum_{b, h, w} dy[b, c, h, w]

for h < H_out = H + top + bottom - dh * (kh - 1) and w < W_out likewise. The padding "same" is
F.conv2d's: a total of d * (k - 1) per axis, the smaller half before (top / left), the larger after.

Arithmetic in fp32 (fp64 for fp64 input); results in the input's dtype. Differentiable through
autograd, so the forward is also an oracle of d x.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Padding4 = Tuple[int, int, int, int]


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> Padding4:
    """(top, bottom, left, right) that F.conv2d's padding="same" applies (stride 1).

    Example:
        >>> same_padding((7, 1), (3, 3)), same_padding((4, 4), (1, 1))
        ((9, 9, 0, 0), (1, 2, 1, 2))
    """
    sides = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        sides.append((total // 2, total - total // 2))
    return sides[0] + sides[1]


def output_size(in_size: Tuple[int, int], kernel_size: Sequence[int], dilation: Sequence[int],
                padding: Padding4) -> Tuple[int, int]:
    """(H_out, W_out) of a stride-1 convolution of an (H, W) map (may be < 1 for a too-large kernel)."""
    top, bottom, left, right = padding
    return (in_size[0] + top + bottom - dilation[0] * (kernel_size[0] - 1),
            in_size[1] + left + right - dilation[1] * (kernel_size[1] - 1))


def _shifted_windows(x: Tensor, kernel_size, dilation, padding):
    """Yields (i, j, the (B, C, H_out, W_out) window of the padded x that tap (i, j) multiplies)."""
    top, bottom, left, right = padding
    xpad = F.pad(x, (left, right, top, bottom))
    out_h, out_w = output_size(tuple(x.shape[-2:]), kernel_size, dilation, padding)
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            row, col = i * dilation[0], j * dilation[1]
            yield i, j, xpad[:, :, row:row + out_h, col:col + out_w]


def depthwise_conv2d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         dilation: Sequence[int] = (1, 1), padding: Padding4 = (0, 0, 0, 0)) -> Tensor:
    """Depthwise convolution of x by weight, as a sum of shifted, weighted copies of x.

    Shapes: x (B, C, H, W); weight (C, 1, kh, kw); bias (C,) or None; padding (top, bottom, left,
    right). Returns (B, C, H_out, W_out) in x's dtype.

    Example:
        >>> x, w = torch.randn(2, 3, 5, 6), torch.randn(3, 1, 3, 3)
        >>> depthwise_conv2d_ref(x, w, None, (1, 1), same_padding((3, 3), (1, 1))).shape
        torch.Size([2, 3, 5, 6])
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xc, wc = x.to(compute), weight.to(compute)
    out = None
    for i, j, window in _shifted_windows(xc, tuple(weight.shape[-2:]), dilation, padding):
        term = wc[:, 0, i, j].view(1, -1, 1, 1) * window
        out = term if out is None else out + term
    if bias is not None:
        out = out + bias.to(compute).view(1, -1, 1, 1)
    return out.to(x.dtype)


def depthwise_conv2d_grad_weight_ref(grad_out: Tensor, x: Tensor, kernel_size: Sequence[int],
                                     dilation: Sequence[int] = (1, 1),
                                     padding: Padding4 = (0, 0, 0, 0)) -> Tuple[Tensor, Tensor]:
    """d weight and d bias of the depthwise convolution: the correlation of dy with the padded x.

    Shapes: grad_out (B, C, H_out, W_out); x (B, C, H, W). Returns d weight (C, 1, kh, kw) and
    d bias (C,), in x's dtype.

    Example:
        >>> x, dy = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
        >>> dw, db = depthwise_conv2d_grad_weight_ref(dy, x, (3, 3), (1, 1), (1, 1, 1, 1))
        >>> dw.shape, db.shape
        (torch.Size([3, 1, 3, 3]), torch.Size([3]))
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    dy, xc = grad_out.to(compute), x.to(compute)
    kh, kw = kernel_size
    grad_weight = torch.empty((x.shape[1], 1, kh, kw), dtype=compute, device=x.device)
    for i, j, window in _shifted_windows(xc, kernel_size, dilation, padding):
        grad_weight[:, 0, i, j] = (dy * window).sum(dim=(0, 2, 3))
    return grad_weight.to(x.dtype), dy.sum(dim=(0, 2, 3)).to(x.dtype)
