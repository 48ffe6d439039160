"""Specification of the exact Euclidean distance transform: scipy.ndimage.distance_transform_edt.

Semantics (scipy's): each nonzero element gets its Euclidean distance to the nearest zero element;
zeros get 0. With no zero in the transformed array, scipy measures to the point one step before the
origin along the first axis, (-1, 0, ..., 0): in a (H, W) image without zero, pixel (i, j) gets
sqrt(((i + 1) * s_row) ** 2 + (j * s_col) ** 2).
"""

from __future__ import annotations

import numpy as np
import torch

from .checks import check_mask, normalize_sampling


def _spatial_batch(mask):
    """(H, W) | (B, H, W) | (B, 1, H, W) -> (B', H, W) view and a function restoring the shape."""
    if mask.dim() == 2:
        return mask[None], lambda d: d[0]
    if mask.dim() == 3:
        return mask, lambda d: d
    return mask[:, 0], lambda d: d[:, None]


def distance_transform_edt_ref(mask, sampling=None, per_image=True):
    """scipy's ``distance_transform_edt`` on a torch mask, float32 result on the mask's device.

    Shapes: (H, W), (B, H, W) or (B, 1, H, W); the result has the mask's shape.
    ``per_image=True`` transforms each (H, W) image on its own; ``per_image=False`` transforms the
    whole array at once as scipy sees it (distances then run across neighbouring images of a batch:
    the published Guide Fusion Loss did this). ``sampling``: pixel spacing (row, column), one number,
    or for the whole-array mode one value per axis of the mask (see ``normalize_sampling``).

    Example:
        >>> m = torch.ones(5, 7); m[2, 3] = 0
        >>> distance_transform_edt_ref(m)[0, 0].item()  # sqrt(2**2 + 3**2)
        3.605551242828369
    """
    from scipy import ndimage

    check_mask(mask)
    _, array_spacing = normalize_sampling(sampling, mask.dim(), per_image)
    if mask.numel() == 0:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    array = mask.detach().cpu().numpy() != 0
    if not per_image:
        out = ndimage.distance_transform_edt(array, sampling=array_spacing)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(mask.device)
    images, restore = _spatial_batch(torch.from_numpy(array))
    out = np.stack([ndimage.distance_transform_edt(image.numpy(), sampling=array_spacing) for image in images])
    return restore(torch.from_numpy(out.astype(np.float32))).to(mask.device)
