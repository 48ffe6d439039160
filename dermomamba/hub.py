"""Saving and loading models: our ``config.json`` + ``model.safetensors`` folders, and checkpoints of
the published DermoMamba code (a plain ``state_dict`` ``.pth`` or a PyTorch Lightning ``.ckpt``).

    >>> model = dermomamba.create_model("dermomamba")
    >>> model.save_pretrained("runs/my-model")            # config.json + model.safetensors
    >>> same = DermoMamba.from_pretrained("runs/my-model")
    >>> published = DermoMamba.from_pretrained("best.ckpt")  # Lightning, keys prefixed "model."

Every load is strict: a missing or unexpected key or a shape mismatch raises
:class:`CheckpointError` naming the file and the offending keys. Published checkpoints are read with
``torch.load(weights_only=True)``, so loading one never runs code from the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
# Prefixes that wrappers put in front of the network's own keys: PyTorch Lightning modules that hold
# the network as ``self.model`` (the published training code), and (Distributed)DataParallel.
WRAPPER_PREFIXES = ("model.", "module.")
# How many offending keys an error lists before summarising the rest.
MAX_KEYS_SHOWN = 8

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model (keys, shapes, configuration) or cannot be read."""


def _atomic_write(target: Path, write: Callable[[str], None]):
    """Write through ``write(temp_path)`` next to ``target``, then rename over it in one step, so a
    crash or a full disk never leaves a half-written file under the final name."""
    handle, temp_path = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_path)
        with open(temp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_path, target)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def _write_json(data, path: str):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _listing(keys) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (f" ... (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else "")


def read_published_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The network's state_dict from a published-code checkpoint, wrapper prefixes removed.

    Accepts a plain state_dict (``torch.save(model.state_dict())``), a dict holding one under
    ``"state_dict"`` (PyTorch Lightning ``.ckpt``: keys ``model.<name>``), and DataParallel's
    ``module.`` prefix. Read with ``weights_only=True`` on the CPU.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(exc).__name__}: {exc}). "
            f"If it is a Lightning checkpoint holding non-tensor objects, re-save just its 'state_dict'.") from exc
    if isinstance(payload, Mapping) and "state_dict" in payload and isinstance(payload["state_dict"], Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload:
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), "
                              f"got {type(payload).__name__}")
    non_tensors = [key for key, value in payload.items() if not isinstance(value, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_listing(non_tensors)}")
    state = dict(payload)
    for prefix in WRAPPER_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            # Keys without the prefix stay as they are and are then reported as unexpected.
            state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
    return state


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: PathLike):
    """Raise :class:`CheckpointError` naming ``source`` unless ``state`` has exactly the model's keys
    with the model's shapes (what ``load_state_dict(strict=True)`` needs)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(value.shape)}"
                  for key, value in expected.items() if key in state and state[key].shape != value.shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
    hint = model.describe_mismatch(state) if hasattr(model, "describe_mismatch") else ""
    raise CheckpointError(f"{source}: does not fit {type(model).__name__}(" +
                          ", ".join(f"{k}={v}" for k, v in getattr(model, "config", {}).items()) + "): " +
                          "; ".join(problems) + (f". {hint}" if hint else ""))


class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` for a model with a ``config`` dict of constructor
    arguments (JSON-serialisable) and, for published checkpoints, a ``config_from_state_dict``
    classmethod that reads those arguments off the tensors' shapes."""

    config: Dict

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

        Each file is written to a temporary name and renamed into place, so an interrupted save
        never leaves a truncated file. Returns the directory.

        Example:
            >>> model.save_pretrained("runs/dermomamba-isic")
            PosixPath('runs/dermomamba-isic')
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().to("cpu").contiguous() for key, value in self.state_dict().items()}
        config = {"architecture": type(self).__name__, "format_version": FORMAT_VERSION, **self.config}
        _atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"}))
        _atomic_write(directory / CONFIG_NAME, lambda path: _write_json(config, path))
        return directory

    @classmethod
    def from_pretrained(cls, path: PathLike, *, backend: Optional[str] = None, **overrides):
        """Build the model and load weights strictly; returned on the CPU in eval mode.

        ``path`` is one of:
          * a folder written by :meth:`save_pretrained` (or its ``model.safetensors``, with the
            ``config.json`` beside it);
          * a published-code checkpoint: a plain ``state_dict`` file (``.pth``) or a PyTorch
            Lightning ``.ckpt`` (keys prefixed ``model.``). Its configuration (input channels,
            classes, widths, image size) is read off the tensor shapes.
        ``overrides`` replace configuration entries (e.g. ``img_size=(192, 256)``): if the weights do
        not fit them, the error says so. ``backend`` sets the selective-scan backend.

        Example:
            >>> model = DermoMamba.from_pretrained("checkpoints/best.ckpt")
            >>> model.img_size
            (192, 256)
        """
        path = Path(path)
        if path.is_dir():
            config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
            absent = [p.name for p in (config_path, weights_path) if not p.is_file()]
            if absent:
                raise CheckpointError(f"{path}: not a saved model folder, missing {', '.join(absent)}")
        elif path.is_file() and path.suffix == ".safetensors":
            config_path, weights_path = path.parent / CONFIG_NAME, path
            if not config_path.is_file():
                raise CheckpointError(f"{path}: no {CONFIG_NAME} beside it to say how to build the model")
        elif path.is_file():
            state = read_published_state_dict(path)
            config = {**cls.config_from_state_dict(state), **overrides}
            return cls._build_and_load(config, state, path, backend)
        else:
            raise FileNotFoundError(f"from_pretrained: {path} does not exist")

        from safetensors.torch import load_file

        try:
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_path}: cannot be read as JSON ({exc})") from exc
        architecture = config.pop("architecture", None)
        version = config.pop("format_version", None)
        if architecture != cls.__name__:
            raise CheckpointError(f"{config_path}: describes a {architecture!r}, not a {cls.__name__}")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{config_path}: format_version {version!r} is not supported "
                                  f"(this version reads {FORMAT_VERSION})")
        try:
            state = load_file(str(weights_path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{weights_path}: cannot be read as safetensors ({exc})") from exc
        return cls._build_and_load({**config, **overrides}, state, weights_path, backend)

    @classmethod
    def _build_and_load(cls, config, state, source, backend):
        try:
            model = cls(**config, backend=backend)
        except TypeError as exc:
            raise CheckpointError(f"{source}: configuration {config} does not fit {cls.__name__} ({exc})") from exc
        check_state_dict(model, state, source)
        model.load_state_dict(state, strict=True)
        return model.eval()
