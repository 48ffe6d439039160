"""The executable specification of CBAM: the published module's arithmetic as one function.

Every fused backend is tested against :func:`cbam_ref` (output, every gradient, running stats).
Max pools split their gradient evenly among tied maxima (``amax`` semantics); the fused kernels
do the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cbam_ref(x, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean=None, running_var=None,
             training=True, momentum=0.01, eps=1e-5):
    """CBAM with pools avg and max and the spatial gate, in plain PyTorch ops (differentiable).

    Shapes: x (B, C, H, W); mlp1_w (C // r, C), mlp1_b (C // r,), mlp2_w (C, C // r), mlp2_b (C,);
    conv_w (1, 2, k, k) with k odd; bn_weight, bn_bias, running_mean, running_var (1,).
    ``training`` as in ``F.batch_norm``: batch statistics, and running stats (when given) updated
    in place with ``momentum``; otherwise the running stats normalise.

    Example:
        >>> x = torch.randn(2, 32, 6, 10)
        >>> out = cbam_ref(x, torch.randn(2, 32), torch.randn(2), torch.randn(32, 2), torch.randn(32),
        ...                torch.randn(1, 2, 7, 7), torch.ones(1), torch.zeros(1))
        >>> out.shape
        torch.Size([2, 32, 6, 10])
    """
    def mlp(pooled):
        return F.linear(F.relu(F.linear(pooled, mlp1_w, mlp1_b)), mlp2_w, mlp2_b)

    channel_logits = mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3)))
    gated = x * torch.sigmoid(channel_logits)[:, :, None, None]
    compressed = torch.cat([gated.amax(dim=1, keepdim=True), gated.mean(dim=1, keepdim=True)], dim=1)
    spatial_logits = F.conv2d(compressed, conv_w, padding=conv_w.shape[-1] // 2)
    spatial_logits = F.batch_norm(spatial_logits, running_mean, running_var, bn_weight, bn_bias, training, momentum,
                                  eps)
    return gated * torch.sigmoid(spatial_logits)
