"""Loads the compiled extension ``dermomamba_kernels._C`` (op schemas, C++ CPU and CUDA kernels).

Importing ``_C`` registers the ``torch.ops.dermomamba`` ops with PyTorch. A package installed
without it still works through the Python backends; :func:`extension_error` says why it is absent.
"""

from __future__ import annotations

import torch

import importlib.util
import os

_error = None
_C = None
if importlib.util.find_spec(__package__ + "._C") is None:
    _error = (f"no compiled _C in {os.path.dirname(__file__)}: install with "
              "`pip install --no-build-isolation .` after torch (a C++ compiler is needed)")
else:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.dermomamba.*)
    except ImportError as exc:  # built against another torch, or a missing shared library
        _error = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


def extension_error() -> str:
    return _error or ""


# Asked once: calling the op from a dispatch check inside torch.compile would break the graph.
_COMPILED_WITH_CUDA = _C is not None and bool(torch.ops.dermomamba.compiled_with_cuda())


def compiled_with_cuda() -> bool:
    """True when ``_C`` holds CUDA kernels (it was built by nvcc against a CUDA build of torch)."""
    return _COMPILED_WITH_CUDA
