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


_COMPILED_CUDA_ARCHS = (str(torch.ops.dermomamba.compiled_cuda_archs())
                        if _COMPILED_WITH_CUDA and hasattr(torch.ops.dermomamba, "compiled_cuda_archs") else "")


def compiled_cuda_archs() -> str:
    """The GPU code in ``_C``, e.g. ``"sm_80 sm_90"`` (``compute_XY`` for PTX); empty without CUDA kernels."""
    return _COMPILED_CUDA_ARCHS


def missing_kernel_image(capability, archs: str | None = None):
    """Why ``_C``'s CUDA kernels cannot run on a GPU of compute ``capability`` (major, minor), or None.

    Machine code for sm_XY runs on capabilities X.Z with Z >= Y (same major); PTX for compute_XY is
    compiled by the driver for any capability >= X.Y. An unknown build (no list) is not second-guessed.

    Example:
        >>> missing_kernel_image((8, 9), "sm_80 sm_90") is None  # sm_80 code runs on an 8.9 card
        True
        >>> missing_kernel_image((12, 0), "sm_80 sm_90") is None
        False
    """
    archs = compiled_cuda_archs() if archs is None else archs
    if not archs:
        return None
    major, minor = capability
    for entry in archs.split():
        kind, _, number = entry.partition("_")
        arch_major, arch_minor = divmod(int(number), 10)
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return None
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return None
    return (f"dermomamba_kernels._C holds GPU code for {archs} only, none of which runs on compute capability "
            f"{major}.{minor} (reinstall with DERMOMAMBA_CUDA_ARCHS=\"{major}.{minor}\" to build for it)")


def compiled_with_cuda() -> bool:
    """True when ``_C`` holds CUDA kernels (it was built by nvcc against a CUDA build of torch)."""
    return _COMPILED_WITH_CUDA
