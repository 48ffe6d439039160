"""Masks and the scipy comparison shared by the distance-transform tests (CPU interpreter and GPU).

Equality rule: with unit spacing every squared distance is an integer below 2**24 and the kernels'
square root is correctly rounded, so the result must equal scipy's float64 result rounded to
float32 exactly. With other spacings the kernels evaluate (d_row * s_row)**2 + (d_col * s_col)**2 in
float32: four roundings of at most half an ulp each before the square root halves the relative
error, plus the root's own half ulp; SPACING_RTOL = 3 ulps bounds that (measured: at most 1 ulp).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

FLOAT32_ULP = 2.0 ** -23
SPACING_RTOL = 3 * FLOAT32_ULP


def random_mask(shape, density, generator=None, dtype=torch.bool, device="cpu"):
    """Foreground (nonzero) with probability ``density``, in ``dtype``; random nonzero values for non-bool."""
    foreground = torch.rand(shape, generator=generator) < density
    if dtype == torch.bool:
        mask = foreground
    elif dtype.is_floating_point:
        # Arbitrary nonzero values (negative too): only "nonzero" may matter.
        values = torch.randn(shape, generator=generator).to(dtype)
        values = torch.where(values == 0, torch.ones_like(values), values)
        mask = torch.where(foreground, values, torch.zeros_like(values))
    else:
        high = 2 if dtype == torch.uint8 else 100
        values = torch.randint(1, high, shape, generator=generator).to(dtype)
        mask = torch.where(foreground, values, torch.zeros_like(values))
    return mask.to(device)


def blob_mask(shape, generator=None, device="cpu"):
    """Lesion-like masks: one random ellipse per image, (B, 1, H, W) bool."""
    batch, _, height, width = shape
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    masks = []
    for _ in range(batch):
        centre = torch.rand(2, generator=generator) * torch.tensor([height, width])
        radii = (0.1 + 0.35 * torch.rand(2, generator=generator)) * torch.tensor([height, width])
        masks.append(((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1)
    return torch.stack(masks)[:, None].to(device)


def scipy_edt(mask, sampling=None, per_image=True):
    """scipy's float64 answer for the public function's conventions (independent of the package)."""
    array = (mask.detach().cpu() != 0).numpy()
    if mask.dim() == 4:
        array = array[:, 0]
    if array.ndim == 2:
        return ndimage.distance_transform_edt(array, sampling=sampling)
    if per_image:
        return np.stack([ndimage.distance_transform_edt(image, sampling=sampling) for image in array])
    if sampling is not None and len(sampling) == 2:
        sampling = (1.0,) + tuple(sampling)
    return ndimage.distance_transform_edt(array, sampling=sampling)


def assert_matches_scipy(out, mask, sampling=None, per_image=True):
    assert out.dtype == torch.float32, out.dtype
    assert out.shape == mask.shape, (out.shape, mask.shape)
    assert out.device == mask.device
    got = out.detach().cpu().numpy()
    if mask.dim() == 4:
        got = got[:, 0]
    assert np.isfinite(got).all(), "non-finite distances (unwritten output?)"
    want = scipy_edt(mask, sampling, per_image)
    unit = sampling is None or all(float(s) == 1.0 for s in np.atleast_1d(sampling))
    if unit:
        mismatch = got != want.astype(np.float32)
        assert not mismatch.any(), (f"{int(mismatch.sum())} of {mismatch.size} differ; first at "
                                    f"{np.argwhere(mismatch)[0]}: {got[mismatch][0]} vs {want[mismatch][0]}")
    else:
        error = np.abs(got.astype(np.float64) - want)
        bound = SPACING_RTOL * want
        assert (error <= bound).all(), f"max relative error {np.max(error / np.maximum(want, 1e-300)):.3g}"


def edge_cases():
    """(name, mask) pairs with scipy's corner cases: no zero, no foreground, one pixel, thin lines."""
    cases = []
    for shape in [(1, 1), (1, 9), (9, 1), (5, 7), (2, 3, 4), (3, 1, 6, 5)]:
        cases.append((f"all_foreground_{shape}", torch.ones(shape, dtype=torch.bool)))
        cases.append((f"all_background_{shape}", torch.zeros(shape, dtype=torch.bool)))
    one_pixel = torch.zeros(11, 13, dtype=torch.bool)
    one_pixel[4, 9] = True
    cases.append(("one_foreground_pixel", one_pixel))
    cases.append(("one_background_pixel", ~one_pixel))
    corner = torch.ones(12, 10, dtype=torch.bool)
    corner[11, 9] = False
    cases.append(("one_zero_in_far_corner", corner))
    thin = torch.zeros(15, 17, dtype=torch.bool)
    thin[7, :] = True
    thin[:, 3] = True
    cases.append(("thin_foreground_lines", thin))
    cases.append(("thin_background_lines", ~thin))
    diagonal = torch.eye(13, 19, dtype=torch.bool)
    cases.append(("diagonal_line", diagonal))
    cases.append(("diagonal_gap", ~diagonal))
    checker = (torch.arange(9)[:, None] + torch.arange(14)[None, :]) % 2 == 0
    cases.append(("checkerboard", checker))
    # A batch whose middle image has no zero: per image it measures to its own outside point,
    # as a whole array to the neighbouring images.
    batch = torch.rand(3, 1, 8, 11) < 0.6
    batch[1] = True
    cases.append(("batch_with_full_image", batch))
    batch_empty = torch.zeros(4, 6, 9, dtype=torch.bool)
    batch_empty[2, 3, 4] = True
    cases.append(("batch_one_pixel_in_one_image", batch_empty))
    return cases
