"""dermomamba: the DermoMamba skin-lesion segmentation network, its loss, metrics, data and CLI.

    >>> import dermomamba
    >>> model = dermomamba.create_model("dermomamba", in_channels=3, classes=1, img_size=(192, 256))

Names are loaded on first use, so ``import dermomamba`` stays cheap (the CLI starts fast).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "dermomamba.models",
    "list_models": "dermomamba.models",
    "DermoMamba": "dermomamba.models",
    "GuideFusionLoss": "dermomamba.loss",
    "cost_report": "dermomamba.flops",
    "metrics": "dermomamba.metrics",
    "data": "dermomamba.data",
    "TrainConfig": "dermomamba.config",
    "SyntheticLesionDataset": "dermomamba.data",
    "PublishedAugmentation": "dermomamba.data",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dermomamba' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if module.__name__.endswith("." + name) else getattr(module, name)


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
