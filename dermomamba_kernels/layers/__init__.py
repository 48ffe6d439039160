"""Reusable layers built on the dermomamba_kernels ops."""

from .cbam import CBAM
from .ss2d import SS2D
from .vss_block import DropPath, VSSBlock

__all__ = ["CBAM", "SS2D", "VSSBlock", "DropPath"]
