"""Guide Fusion Loss: BCE + boundary-weighted soft Dice, as the published DermoMamba trained with.

Two modes:

``mode="published"`` reproduces the released training loss exactly, quirks included (the paper's
numbers come from this mode)::

    p    = sigmoid(pred)
    dice = 1 - (2 * sum(p * t) + 1e-3) / (sum(p) + sum(t) + 1e-3)      # one soft Dice over the batch
    bce  = binary_cross_entropy_with_logits(p, t)                       # on sigmoid(pred): a double sigmoid
    att  = 1 / (1 + edt(t == 0) + edt(t == 1))                          # edt of the whole (B, 1, H, W) array
    loss = mean(bce + dice * att)

``edt`` is scipy's exact Euclidean distance transform. The released code ran it on the whole 4-D
array, so the batch axis counts as a spatial axis: a pixel's distance to the lesion boundary can be
measured to a pixel of the neighbouring image of the batch, and it depends on the batch order.

``mode="per_image"`` is the same formula with the two defects removed: the distance transform runs
per image and the BCE takes the logits (``binary_cross_entropy_with_logits(pred, t)``). The Dice
term is still one soft Dice over the whole batch.

In both modes ``att`` is near 1 at the lesion boundary and decays with the distance to it; for
soft targets (values strictly between 0 and 1, e.g. after bilinear resizing) both transforms are 0
there, so ``att`` = 1. Since ``bce`` and ``dice`` are scalars, the loss equals
``bce + dice * mean(att)``; the literal form is kept. An all-background or all-lesion target gives a
finite loss: a transform of an array without any zero measures to a point just outside the array
(scipy's rule), so ``att`` stays in (0, 1].

On CUDA the attention map comes from the Triton distance transform: the loss never leaves the
device and never synchronises with the host. It needs no gradient and gets none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dermomamba_kernels import distance_transform_edt

MODES = ("published", "per_image")
# The released code's Dice smoothing, added to numerator and denominator.
DICE_SMOOTH = 1e-3


def boundary_attention(target: torch.Tensor, per_image: bool = True, *, backend=None) -> torch.Tensor:
    """``1 / (1 + edt(t == 0) + edt(t == 1))``: the Guide Fusion Loss's boundary attention map.

    Shapes: target (B, 1, H, W) or (B, H, W); returns float32 of the same shape, on the same device,
    without gradient. ``per_image=False`` transforms the whole array at once (published behaviour).

    Example:
        >>> t = torch.zeros(2, 1, 8, 8); t[:, :, 2:6, 2:6] = 1
        >>> boundary_attention(t)[0, 0, 0, 0].item()   # 1 / (1 + 2 * sqrt(2))
        0.2612038850784302
    """
    with torch.no_grad():
        target = target.detach()
        to_background = distance_transform_edt(target == 0, per_image=per_image, backend=backend)
        to_lesion = distance_transform_edt(target == 1, per_image=per_image, backend=backend)
        return 1.0 / (1.0 + to_background + to_lesion)


class GuideFusionLoss(nn.Module):
    """BCE + soft Dice weighted by a boundary attention map; ``mode`` "published" or "per_image".

    Shapes: ``pred`` logits (B, 1, H, W) (or (B, H, W)), any real floating dtype; ``target`` of the
    same shape, 0/1 (bool, integer or float; soft values allowed). Returns a float32 scalar. The
    arithmetic runs in float32 whatever the input dtype and whatever autocast says. See the module
    docstring for the formula and the difference between the modes; ``backend`` picks the distance
    transform's backend ("auto" by default: Triton on CUDA, scipy on the CPU).

    Example:
        >>> loss_fn = GuideFusionLoss(mode="published")
        >>> pred = torch.randn(4, 1, 32, 48, requires_grad=True)
        >>> target = (torch.rand(4, 1, 32, 48) > 0.7).float()
        >>> loss = loss_fn(pred, target); loss.backward()
        >>> loss.shape, pred.grad.shape
        (torch.Size([]), torch.Size([4, 1, 32, 48]))
    """

    def __init__(self, mode: str = "published", *, backend=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.backend = backend

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(pred, target)
        per_image = self.mode == "per_image"
        with torch.autocast(device_type=pred.device.type, enabled=False):
            logits = pred.float()
            t = target.float()
            p = torch.sigmoid(logits)
            dice = 1 - (2 * (p * t).sum() + DICE_SMOOTH) / (p.sum() + t.sum() + DICE_SMOOTH)
            bce = F.binary_cross_entropy_with_logits(logits if per_image else p, t)
            att = boundary_attention(target, per_image=per_image, backend=self.backend)
            return torch.mean(bce + dice * att)


def _check_inputs(pred, target):
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"pred: expected a torch.Tensor of logits, got {type(pred).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch.Tensor mask, got {type(target).__name__}")
    if not pred.is_floating_point():
        raise TypeError(f"pred: expected real floating logits, got dtype {pred.dtype}")
    if target.is_complex():
        raise TypeError(f"target: expected a real or bool mask, got dtype {target.dtype}")
    if pred.dim() not in (3, 4) or (pred.dim() == 4 and pred.shape[1] != 1):
        raise ValueError(f"pred: expected shape (B, 1, H, W) or (B, H, W), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target: shape {tuple(target.shape)} differs from pred's {tuple(pred.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target: on {target.device}, pred on {pred.device}; put both on one device")
