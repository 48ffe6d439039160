"""Exact Euclidean distance transform (scipy semantics), one dispatch point.

Backends: "triton" (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), exact separable
kernels in :mod:`.triton_edt`, registered as the custom op
``torch.ops.dermomamba.distance_transform_edt_triton``; "reference" (scipy on the host, any device:
a copy to the CPU and back). "auto" picks Triton for CUDA tensors and the reference on the CPU.
"""

from __future__ import annotations

import torch

from .._dispatch import OpDispatcher, always, triton_kernels
from .checks import check_mask, normalize_sampling
from .naive import distance_transform_edt_ref

distance_transform_dispatcher = OpDispatcher("distance_transform_edt")

_TRITON_MODULE = "dermomamba_kernels.distance_transform.triton_edt"
EAGER_SKIPS_CUSTOM_OP = True


def distance_transform_edt(mask, sampling=None, per_image=True, *, backend=None):
    """Distance of each nonzero element of ``mask`` to the nearest zero, float32, same shape and device.

    Shapes: (H, W), (B, H, W) or (B, 1, H, W); any bool, integer or real floating dtype (nonzero =
    foreground). ``per_image``: transform each (H, W) image separately (the default), or the whole
    array at once as scipy does on an N-D array (then a batch is a 3-D volume and distances run
    across neighbouring images, as in the published Guide Fusion Loss). ``sampling``: pixel spacing:
    None (unit), one number, (row, column) — in the whole-array mode with unit spacing across the
    batch — or, in the whole-array mode, one value per axis of the mask as scipy takes it.

    Semantics are scipy's ``ndimage.distance_transform_edt`` (spec:
    :func:`distance_transform_edt_ref`), including its answer for an array without any zero: the
    distance to the point one step before the origin along the first axis. With unit spacing the
    Triton result equals scipy's rounded to float32 exactly. On CUDA the Triton backend neither
    synchronises nor leaves the device. Not differentiable (zero gradient: it depends on mask != 0).

    ``backend``: "auto" (default, or ``DERMOMAMBA_BACKEND``), "triton" or "reference".

    Example:
        >>> m = torch.zeros(1, 1, 4, 6); m[..., 1:3, 1:5] = 1
        >>> distance_transform_edt(m).amax().item()
        1.0
    """
    check_mask(mask)
    if not isinstance(per_image, bool):
        raise TypeError(f"per_image: expected a bool, got {type(per_image).__name__}")
    return distance_transform_dispatcher(backend, mask.device, mask, sampling, per_image)


@distance_transform_dispatcher.register("reference", always)
def _reference(mask, sampling, per_image):
    return distance_transform_edt_ref(mask, sampling=sampling, per_image=per_image)


@distance_transform_dispatcher.register("triton", triton_kernels(_TRITON_MODULE))
def _triton(mask, sampling, per_image):
    from .triton_edt import MAX_AXIS_LENGTH, MAX_ELEMENTS, distance_transform_edt_triton_op, edt_triton

    kernel_spacing, _ = normalize_sampling(sampling, mask.dim(), per_image)
    if mask.numel() > MAX_ELEMENTS:
        raise ValueError(f"mask: {mask.numel()} elements exceed the Triton kernels' limit of {MAX_ELEMENTS}")
    if max(mask.shape) >= MAX_AXIS_LENGTH:
        raise ValueError(f"mask: an axis of {max(mask.shape)} elements exceeds the Triton kernels' limit "
                         f"of {MAX_AXIS_LENGTH - 1} (positions are exact float32 integers)")
    height, width = mask.shape[-2:]
    images = mask.reshape(-1, height, width)
    if images.dtype == torch.bool:
        # Same bytes, a dtype Triton loads everywhere.
        images = images.view(torch.uint8)
    images = images.contiguous()
    # A 2-D mask transformed "as a whole array" is just one image.
    per_image_kernel = per_image or mask.dim() == 2
    if EAGER_SKIPS_CUSTOM_OP and not torch.compiler.is_compiling():
        # Eager calls run the same kernels without the custom-op wrapper's per-call Python cost
        # (schema binding, autograd wrapping); its backward is zero anyway, which an output
        # without grad_fn also gives. Traced code (torch.compile, export) sees the custom op.
        out = edt_triton(images, kernel_spacing, per_image_kernel)
    else:
        out = distance_transform_edt_triton_op(images, list(kernel_spacing), per_image_kernel)
    return out.view(mask.shape)


__all__ = ["distance_transform_edt", "distance_transform_edt_ref", "distance_transform_dispatcher"]
