"""dermomamba_kernels: fast Mamba kernels for segmentation networks.

Ops (each with ``backend="auto" | "cuda" | "triton" | "cpu" | "reference"``):
  selective_scan_fn          drop-in for mamba_ssm's selective_scan_fn
  multiaxial_selective_scan  VMamba SS2D's four-direction scan, fused
  distance_transform_edt     exact Euclidean distance transform (scipy semantics)
  cbam                       CBAM attention (channel then spatial gate), fused
  layer_norm                 LayerNorm over the last dim (a Triton kernel for few channels, opt-in)
and their pure-PyTorch specifications (``*_ref``). Layers live in ``dermomamba_kernels.layers``.
"""

from ._dispatch import (BACKEND_ENV_VAR, BACKENDS, BackendUnavailableError, available_backends, last_backend,
                        unavailable_reasons)
from ._ext import compiled_with_cuda, extension_error, extension_loaded
from .cbam import cbam, cbam_ref
from .distance_transform import distance_transform_edt, distance_transform_edt_ref
from .layer_norm import layer_norm, layer_norm_ref
from .selective_scan import (multiaxial_selective_scan, multiaxial_selective_scan_ref, selective_scan_fn,
                             selective_scan_ref)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "last_backend",
    "unavailable_reasons",
    "cbam",
    "cbam_ref",
    "compiled_with_cuda",
    "extension_error",
    "extension_loaded",
    "distance_transform_edt",
    "distance_transform_edt_ref",
    "layer_norm",
    "layer_norm_ref",
    "multiaxial_selective_scan",
    "multiaxial_selective_scan_ref",
    "selective_scan_fn",
    "selective_scan_ref",
]
