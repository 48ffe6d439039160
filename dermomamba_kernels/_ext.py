"""Loads the compiled extension ``dermomamba_kernels._C`` (op schemas, C++ CPU and CUDA kernels).

Importing ``_C`` registers the ``torch.ops.dermomamba`` ops with PyTorch. A package installed
without it still works through the Python backends; :func:`extension_error` says why it is absent.
"""

from __future__ import annotations

import torch

_error = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.dermomamba.*)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _error = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


def extension_error() -> str:
    return _error or ""


def compiled_with_cuda() -> bool:
    """True when ``_C`` holds CUDA kernels (it was built by nvcc against a CUDA build of torch)."""
    return _C is not None and bool(torch.ops.dermomamba.compiled_with_cuda())
