"""Specification of the exact Euclidean distance transform: scipy.ndimage.distance_transform_edt.

Semantics (scipy's): each nonzero element gets its Euclidean distance to the nearest zero element;
zeros get 0. With no zero in the transformed array scipy measures to a point just outside it.
"""

from __future__ import annotations

import numpy as np
import torch


def _spatial_batch(mask):
    """(H, W) | (B, H, W) | (B, 1, H, W) -> (B', H, W) view and a function restoring the shape."""
    if mask.dim() == 2:
        return mask[None], lambda d: d[0]
    if mask.dim() == 3:
        return mask, lambda d: d
    if mask.dim() == 4 and mask.shape[1] == 1:
        return mask[:, 0], lambda d: d[:, None]
    raise ValueError(f"mask: expected shape (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")


def distance_transform_edt_ref(mask, sampling=None, per_image=True):
    """scipy's ``distance_transform_edt`` on a torch mask, float32 result on the mask's device.

    ``per_image=True`` transforms each (H, W) image on its own; ``per_image=False`` transforms the
    whole array at once as scipy sees it (distances then run across neighbouring images of a batch:
    the published Guide Fusion Loss did this). ``sampling``: pixel spacing (row, column), or for the
    whole-array mode one value per axis of the input.

    Example:
        >>> m = torch.ones(5, 7); m[2, 3] = 0
        >>> distance_transform_edt_ref(m)[0, 0].item()  # sqrt(2**2 + 3**2)
        3.605551242828369
    """
    from scipy import ndimage

    array = mask.detach().cpu().numpy() != 0
    if not per_image:
        out = ndimage.distance_transform_edt(array, sampling=sampling)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(mask.device)
    images, restore = _spatial_batch(torch.from_numpy(array))
    out = np.stack([ndimage.distance_transform_edt(image.numpy(), sampling=sampling) for image in images])
    return restore(torch.from_numpy(out.astype(np.float32))).to(mask.device)
