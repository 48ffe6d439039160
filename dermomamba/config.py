"""Training configuration: the published recipe as defaults, overridable by a YAML file and by flags.

Precedence: command-line flags > YAML file (``--config``) > the defaults below. With no data given,
``dermomamba train`` runs a short demo on the synthetic set: :data:`DEMO_OVERRIDES` replace the defaults of
fields that neither the YAML file nor a flag set.

    >>> cfg = TrainConfig()                      # the published recipe
    >>> cfg.lr, cfg.epochs, cfg.batch_size, cfg.img_size
    (0.0001, 200, 4, (192, 256))
    >>> cfg = resolve_config({"epochs": 5}, yaml_path=None)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

__all__ = ["TrainConfig", "DEMO_OVERRIDES", "resolve_config", "load_yaml", "save_config", "load_config",
           "SPLIT_CHOICES", "PRECISIONS"]

SPLIT_CHOICES = ("auto", "published", "random", "official")
PRECISIONS = ("fp16", "bf16", "fp32")
LOSS_MODES = ("published", "per_image")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.yaml`` in the run folder.

    Data: ``data`` is a folder (ISIC 2018, PH2 or images/ + masks/ layout, see ``layout``), or None / "synthetic"
    for the built-in synthetic set. ``split``: "published" (the paper's 2,074 / 520 split, the 520 used for both
    validation and test), "random" (train / val / test by ``val_fraction``, ``test_fraction``, ``split_seed``),
    "official" (ISIC 2018's own Training / Validation / Test folders), a path to a saved ``split.json``, or
    "auto" (published for ISIC 2018, random otherwise).
    """

    # data
    data: Optional[str] = None
    layout: str = "auto"
    split: str = "auto"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    synthetic_train: int = 800
    synthetic_val: int = 100
    synthetic_test: int = 100
    synthetic_seed: int = 0
    cache_dir: Optional[str] = "~/.cache/dermomamba"
    workers: int = 2
    augment: bool = True
    # model
    model: str = "dermomamba"
    img_size: tuple = (192, 256)
    backend: Optional[str] = None
    # the published optimisation recipe
    epochs: int = 200
    batch_size: int = 4
    eval_batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_factor: float = 0.5
    lr_patience: int = 5
    loss: str = "published"
    precision: str = "fp16"
    # run
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    output: Optional[str] = None
    progress: bool = True
    tensorboard: bool = True
    evaluate_test: bool = True
    predict_samples: int = 0
    # Record the training step as one CUDA graph and replay it (one CUDA device, not under torchrun).
    cuda_graphs: bool = False
    # Stop (as if killed) after this many optimiser steps in this process, without saving: for resume tests.
    max_steps: Optional[int] = None

    def __post_init__(self):
        self.img_size = _size_pair(self.img_size)
        problems = []
        if self.split not in SPLIT_CHOICES and not str(self.split).endswith(".json"):
            problems.append(f"split must be one of {SPLIT_CHOICES} or a .json file, got {self.split!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.loss not in LOSS_MODES:
            problems.append(f"loss must be one of {LOSS_MODES}, got {self.loss!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            problems.append(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1, got {self.threads}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    @property
    def synthetic(self) -> bool:
        return self.data is None or str(self.data).lower() == "synthetic"

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["img_size"] = list(self.img_size)
        return out


# A brief demo for `dermomamba train` with no data: the tiny model at a small size, a higher learning rate so a
# minute on a laptop CPU already gives recognisable masks, and a few predicted masks at the end.
DEMO_OVERRIDES: dict[str, Any] = {
    "model": "dermomamba_tiny",
    "img_size": (64, 96),
    "synthetic_train": 128,
    "synthetic_val": 32,
    "synthetic_test": 32,
    "epochs": 6,
    "batch_size": 8,
    "eval_batch_size": 8,
    "lr": 3e-3,
    "predict_samples": 4,
    "cache_dir": None,
    # Rendering a 64x96 sample takes milliseconds: worker processes would only compete for the CPU.
    "workers": 0,
}


def _size_pair(value) -> tuple:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, str):
        value = value.replace("x", " ").replace(",", " ").split()
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        value = value * 2
    if len(value) != 2:
        raise ValueError(f"img_size must be H W, got {value}")
    return value


def load_yaml(path: str | os.PathLike) -> dict:
    """Fields of a YAML config file; unknown keys are an error naming the key and the file."""
    with open(os.fspath(path)) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file must be a mapping of field: value")
    values = {key.replace("-", "_"): value for key, value in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known keys: {sorted(known)}")
    return values


def resolve_config(flags: dict, yaml_path: Optional[str] = None, base: Optional[dict] = None) -> TrainConfig:
    """Combine ``base`` (e.g. a resumed run's config) < YAML file < explicit ``flags`` into a TrainConfig.

    With no data anywhere, the demo overrides fill the fields that nothing else set.
    """
    values = dict(base or {})
    if yaml_path:
        values.update(load_yaml(yaml_path))
    values.update(flags)
    # "--data synthetic" asks for the synthetic set with the full recipe; no data at all asks for the demo.
    if base is None and values.get("data") is None:
        for key, value in DEMO_OVERRIDES.items():
            values.setdefault(key, value)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    temporary = os.fspath(path) + ".tmp"
    with open(temporary, "w") as handle:
        yaml.safe_dump(cfg.to_dict(), handle, sort_keys=False)
    os.replace(temporary, os.fspath(path))


def load_config(path: str | os.PathLike) -> dict:
    """The fields of a saved ``config.yaml`` (a dict, to be passed as ``base`` to :func:`resolve_config`)."""
    return load_yaml(path)
