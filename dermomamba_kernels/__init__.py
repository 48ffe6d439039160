"""dermomamba_kernels: fast Mamba kernels for segmentation networks.

Ops (each with ``backend="auto" | "cuda" | "triton" | "cpu" | "reference"``):
  selective_scan_fn          drop-in for mamba_ssm's selective_scan_fn
  multiaxial_selective_scan  VMamba SS2D's four-direction scan, fused
  distance_transform_edt     exact Euclidean distance transform (scipy semantics)
  cbam                       CBAM attention (channel then spatial gate), fused
  layer_norm                 LayerNorm over the last dim (a Triton kernel for few channels)
  gated_layer_norm           LayerNorm(y) * silu(z), SS2D's output gate, fused
  batch_norm                 BatchNorm (train and eval; Triton kernels for few channels)
  depthwise_conv2d           depthwise conv2d (a Triton kernel for its weight gradient)
and their pure-PyTorch specifications (``*_ref``). Layers live in ``dermomamba_kernels.layers``.
"""

from ._dispatch import (BACKEND_ENV_VAR, BACKENDS, BackendUnavailableError, available_backends, graph_recording,
                        in_graph_recording, last_backend, unavailable_reasons)
from .batch_norm import batch_norm, batch_norm_ref
from ._ext import compiled_with_cuda, extension_error, extension_loaded
from .cbam import cbam, cbam_ref
from .distance_transform import distance_transform_edt, distance_transform_edt_ref
from .depthwise_conv import depthwise_conv2d, depthwise_conv2d_ref
from .layer_norm import gated_layer_norm, gated_layer_norm_ref, layer_norm, layer_norm_ref
from .selective_scan import (multiaxial_selective_scan, multiaxial_selective_scan_ref, selective_scan_fn,
                             selective_scan_ref)

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV_VAR",
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "batch_norm",
    "batch_norm_ref",
    "depthwise_conv2d",
    "depthwise_conv2d_ref",
    "gated_layer_norm",
    "gated_layer_norm_ref",
    "graph_recording",
    "in_graph_recording",
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
