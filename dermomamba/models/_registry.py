"""Model registry: variants register a constructor by name; :func:`create_model` builds them."""

from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``fn`` buildable as ``create_model(fn.__name__, ...)``."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"a model named {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def create_model(name: str, in_channels: int = 3, classes: int = 1, img_size=(192, 256), **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` ("dermomamba": the published network; "dermomamba_tiny":
            the same structure with narrow widths, for tests).
        in_channels, classes: input channels and output (logit) channels.
        img_size: (H, W) or int, each divisible by 32; the model runs at this size only.
        kwargs: further constructor arguments, e.g. ``backend="cpu"``, ``d_state``, ``widths``.

    Example:
        >>> model = create_model("dermomamba", in_channels=3, classes=1, img_size=(192, 256))
        >>> sum(p.numel() for p in model.parameters())
        4953425
    """
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model name {name!r}; choose one of {list_models()}")
    return _MODELS[name](in_channels=in_channels, classes=classes, img_size=img_size, **kwargs)
