"""Segmentation models: the DermoMamba network and its registered variants.

    >>> from dermomamba.models import create_model, list_models
    >>> list_models()
    ['dermomamba', 'dermomamba_tiny']
    >>> model = create_model("dermomamba_tiny", img_size=(64, 64))
"""

from ._registry import create_model, list_models, register_model
from .dermomamba import (AxialSpatialDW, CrossScaleMambaBlock, DecoderBlock, DermoMamba, EncoderBlock, PCAM,
                         ResMambaBlock, SweepMamba)

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "DermoMamba",
    "AxialSpatialDW",
    "CrossScaleMambaBlock",
    "ResMambaBlock",
    "EncoderBlock",
    "PCAM",
    "SweepMamba",
    "DecoderBlock",
]
