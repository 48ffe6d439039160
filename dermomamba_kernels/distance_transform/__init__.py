"""Exact Euclidean distance transform (scipy semantics), one dispatch point."""

from __future__ import annotations

from .._dispatch import OpDispatcher, always
from .naive import distance_transform_edt_ref

distance_transform_dispatcher = OpDispatcher("distance_transform_edt")


def distance_transform_edt(mask, sampling=None, per_image=True, *, backend=None):
    """Distance of each nonzero element of ``mask`` to the nearest zero, float32, same shape and device.

    Shapes: (H, W), (B, H, W) or (B, 1, H, W). ``per_image``: transform each image separately (the
    default), or the whole array at once as scipy does on an N-D array. ``sampling``: pixel
    spacing (row, column). Spec: :func:`distance_transform_edt_ref`.

    Example:
        >>> m = torch.zeros(1, 1, 4, 6); m[..., 1:3, 1:5] = 1
        >>> distance_transform_edt(m).amax().item()
        1.0
    """
    return distance_transform_dispatcher(backend, mask.device, mask, sampling, per_image)


@distance_transform_dispatcher.register("reference", always)
def _reference(mask, sampling, per_image):
    return distance_transform_edt_ref(mask, sampling=sampling, per_image=per_image)


__all__ = ["distance_transform_edt", "distance_transform_edt_ref", "distance_transform_dispatcher"]
