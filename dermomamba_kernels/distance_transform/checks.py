"""Argument checks and normalisation shared by every backend of the distance transform."""

from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch

ACCEPTED_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                   torch.bfloat16, torch.float32, torch.float64)
ACCEPTED_SHAPES = "(H, W), (B, H, W) or (B, 1, H, W)"


def check_mask(mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"mask: dtype {mask.dtype} is not supported; use bool, an integer or a real floating "
                        f"dtype (nonzero = foreground)")
    if mask.dim() not in (2, 3, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise ValueError(f"mask: expected shape {ACCEPTED_SHAPES}, got {tuple(mask.shape)}")
    if mask.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"mask: tensors on {mask.device} are not supported (CPU or CUDA)")


def _spacing_value(value, where: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"sampling: {where} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"sampling: {where} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"sampling: {where} must be a finite positive spacing, got {value}")
    return value


def normalize_sampling(sampling, mask_dim: int, per_image: bool) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Spacings for the kernels and for scipy, from the user's ``sampling``.

    Returns ``(kernel_spacing, array_spacing)``: ``kernel_spacing`` is (row, column) per image, or
    (batch, row, column) for the whole-array mode of a batched mask; ``array_spacing`` has one value
    per axis of the array scipy transforms ((H, W) images per image; the mask itself otherwise).

    Accepted: None (unit spacing); one number (every axis); (row, column) (per image, and in the
    whole-array mode with unit spacing across the batch axis, as the published loss had); in the
    whole-array mode also one value per axis of the mask, as scipy takes it (the channel axis of a
    (B, 1, H, W) mask has length 1 and its spacing changes nothing).
    """
    whole_3d = not per_image and mask_dim >= 3
    if sampling is None:
        values = (1.0,) * (3 if whole_3d else 2)
        given = None
    elif isinstance(sampling, (numbers.Real, torch.Tensor)) and not (
            isinstance(sampling, torch.Tensor) and sampling.dim() > 0):
        value = _spacing_value(sampling, "the spacing")
        values = (value,) * (3 if whole_3d else 2)
        given = (value,) * (mask_dim if not per_image else 2)
    else:
        try:
            given = tuple(_spacing_value(v, f"entry {i}") for i, v in enumerate(sampling))
        except TypeError as exc:
            if "must be" in str(exc):
                raise
            raise TypeError(f"sampling: expected None, a number or a sequence of numbers, got "
                            f"{type(sampling).__name__}") from None
        if len(given) == 2:
            values = ((1.0,) + given) if whole_3d else given
            given = None if whole_3d else given
        elif whole_3d and len(given) == mask_dim:
            values = (given[0], given[-2], given[-1])
        else:
            expected = "2 values (row, column)" if not whole_3d else \
                f"2 values (row, column) or {mask_dim} (one per axis of the mask)"
            raise ValueError(f"sampling: expected {expected}, got {len(given)}")
    if per_image or mask_dim == 2:
        return values, values
    if given is None or len(given) != mask_dim:
        array = (values[0],) + (1.0,) * (mask_dim - 3) + values[1:]
    else:
        array = given
    return values, array
