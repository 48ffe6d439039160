"""The published training augmentations, in torch, applied to a whole batch on its own device (GPU or CPU).

The released code augments PIL images one at a time on the CPU. Here the same transforms, with the same
parameters and order, run on the batch after it reaches the device, identically for image and mask:

1. with p=0.1, a random resized crop: area fraction uniform in [0.8, 0.95], aspect ratio log-uniform in
   [3/4, 4/3] (10 tries, then a centre crop, as torchvision samples it), resized back to the input size with
   bilinear interpolation — for the mask too, as published; the mask is then re-binarised at 0.5 so the loss
   sees {0, 1} targets;
2. with p=0.5, a rotation by an angle uniform in [-15, 15] degrees about the image centre, nearest-neighbour,
   corners filled with 0;
3. a horizontal flip with p=0.5, then a vertical flip with p=0.5.

Random parameters are drawn from a CPU ``torch.Generator``, so a run is reproducible (and resumable: the
generator's state is checkpointed) whatever device applies them.

    >>> augment = PublishedAugmentation()
    >>> gen = torch.Generator().manual_seed(0)
    >>> images, masks = torch.rand(4, 3, 192, 256), (torch.rand(4, 1, 192, 256) > 0.5).float()
    >>> out_images, out_masks = augment(images, masks, gen)      # same shapes, same device
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PublishedAugmentation", "random_resized_crop_box", "rotation_theta"]


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) sampled like torchvision's RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return top, left, crop_h, crop_w
    # Fallback: the largest centre crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def rotation_theta(degrees: float, height: int, width: int) -> torch.Tensor:
    """(2, 3) affine_grid matrix of a rotation about the centre in pixel space (correct for H != W)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid works in [-1, 1]^2 coordinates; rotate in pixel units: scale to pixels, rotate, scale back.
    return torch.tensor([[cos, -sin * height / width, 0.0],
                         [sin * width / height, cos, 0.0]], dtype=torch.float64)


def _warp(tensor: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta.to(device=tensor.device, dtype=torch.float32), list(tensor.shape), align_corners=False)
    return F.grid_sample(tensor.float(), grid, mode=mode, padding_mode="zeros", align_corners=False).to(tensor.dtype)


@dataclass
class PublishedAugmentation:
    """Batch augmentation with the released recipe's parameters (see the module docstring).

    Call with images (B, C, H, W) float and masks (B, 1, H, W) float in {0, 1} on any device, and a CPU
    ``torch.Generator``; returns new tensors of the same shapes, dtypes and device.
    """

    crop_p: float = 0.1
    crop_scale: tuple[float, float] = (0.8, 0.95)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate_p: float = 0.5
    max_degrees: float = 15.0
    hflip_p: float = 0.5
    vflip_p: float = 0.5

    def sample_params(self, batch: int, height: int, width: int, generator: torch.Generator) -> list[dict]:
        """Per-sample parameters: {'crop': box or None, 'angle': degrees or None, 'hflip': bool, 'vflip': bool}."""
        params = []
        for _ in range(batch):
            crop = None
            if float(torch.rand(1, generator=generator)) < self.crop_p:
                crop = random_resized_crop_box(height, width, self.crop_scale, self.crop_ratio, generator)
            angle = None
            if float(torch.rand(1, generator=generator)) < self.rotate_p:
                angle = float(torch.empty(1).uniform_(-self.max_degrees, self.max_degrees, generator=generator))
            hflip = float(torch.rand(1, generator=generator)) < self.hflip_p
            vflip = float(torch.rand(1, generator=generator)) < self.vflip_p
            params.append({"crop": crop, "angle": angle, "hflip": hflip, "vflip": vflip})
        return params

    def apply(self, images: torch.Tensor, masks: torch.Tensor, params: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply given per-sample parameters (from :meth:`sample_params`)."""
        if images.dim() != 4 or masks.dim() != 4:
            raise ValueError(f"images and masks must be (B, C, H, W), got {tuple(images.shape)} and {tuple(masks.shape)}")
        if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} differ in batch or size")
        if len(params) != images.shape[0]:
            raise ValueError(f"params has {len(params)} entries for a batch of {images.shape[0]}")
        height, width = images.shape[-2:]
        images, masks = images.clone(), masks.clone()
        for i, p in enumerate(params):
            if p["crop"] is not None:
                # Slice, then resize: pixels outside the box never leak in at its edges (as with a PIL crop).
                top, left, crop_h, crop_w = p["crop"]
                resize = lambda t: F.interpolate(t[None, :, top:top + crop_h, left:left + crop_w].float(),
                                                 size=(height, width), mode="bilinear", align_corners=False)[0]
                images[i] = resize(images[i]).to(images.dtype)
                masks[i] = (resize(masks[i]) >= 0.5).to(masks.dtype)
        rotated = [i for i, p in enumerate(params) if p["angle"] is not None]
        if rotated:
            theta = torch.stack([rotation_theta(params[i]["angle"], height, width) for i in rotated])
            images[rotated] = _warp(images[rotated], theta, "nearest")
            masks[rotated] = _warp(masks[rotated], theta, "nearest")
        for key, dim in (("hflip", -1), ("vflip", -2)):
            flipped = [i for i, p in enumerate(params) if p[key]]
            if flipped:
                images[flipped] = images[flipped].flip(dim)
                masks[flipped] = masks[flipped].flip(dim)
        return images, masks

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, masks, params)
