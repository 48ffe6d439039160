"""LayerNorm whose forward goes through the ``layer_norm`` dispatch point."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same constructor, parameters and state_dict) with a choice of backend.

    Args: as nn.LayerNorm (normalized_shape, eps, elementwise_affine, bias, device, dtype), plus
    ``backend``: "auto" (also for None: the Triton kernel for CUDA tensors where it applies, else
    PyTorch's native kernel), "reference", "cpu" or "triton" (see :func:`dermomamba_kernels.layer_norm.layer_norm`). The
    triton backend normalizes one last dim with weight and bias; other configurations
    (elementwise_affine=False, bias=False, several normalized dims) run on "reference" only, and
    asking for "triton" with them raises BackendUnavailableError.

    Parameters: ``weight`` and ``bias`` of shape normalized_shape (as nn.LayerNorm).

    Shapes: (..., *normalized_shape) -> the same.

    Example:
        >>> norm = LayerNorm(8, eps=1e-6)
        >>> norm(torch.randn(2, 6, 10, 8)).shape
        torch.Size([2, 6, 10, 8])
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        # None means "auto", not the process-wide DERMOMAMBA_BACKEND: that variable picks the kernels of
        # the scans, CBAM and the loss, and a process set to "cuda" (which has no LayerNorm kernel of
        # ours) must not stop every model's norms. Ask for a norm backend here, by name.
        self.backend = "auto" if backend is None else backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
