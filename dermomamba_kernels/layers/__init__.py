"""Reusable layers built on the dermomamba_kernels ops, drop-ins for the modules other Mamba
segmentation networks import (same constructor arguments and state_dict keys):

  SS2D, VSSBlock   VMamba v0's 2-D selective-scan layer and block (VM-UNet, H-vmunet, ...)
  Mamba            mamba_ssm's 1-D Mamba block (UltraLight-VM-UNet, LightM-UNet, U-Mamba)
  CBAM             CBAM attention as DermoMamba's skip connections use it
  LayerNorm        nn.LayerNorm with a backend choice (a Triton kernel for a small last dim)
"""

from .cbam import CBAM
from .layer_norm import LayerNorm
from .mamba import Mamba
from .ss2d import SS2D
from .vss_block import DropPath, VSSBlock

__all__ = ["CBAM", "LayerNorm", "Mamba", "SS2D", "VSSBlock", "DropPath"]
