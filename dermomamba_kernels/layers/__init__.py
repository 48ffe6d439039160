"""Reusable layers built on the dermomamba_kernels ops."""

from .cbam import CBAM

__all__ = ["CBAM"]
