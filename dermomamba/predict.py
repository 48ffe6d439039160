"""Prediction: images or folders in, 0/255 single-channel PNG masks at each image's original resolution out.

Masks are named ``<id>_segmentation.png`` (``id`` = the image's file stem), so the output folder is what the
official ISIC scorer expects. Optional overlays draw the predicted contour over the original image.

    >>> from dermomamba.predict import predict
    >>> written = predict("runs/isic/checkpoints/best", ["photos/"], "predictions/", overlay=True)

Checkpoints (``load_model``): a run folder (its ``checkpoints/best``), a folder written by ``save_pretrained``
(config.json + model.safetensors), or a checkpoint of the published code (``.pth`` state_dict or Lightning
``.ckpt``).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data.folders import Sample, list_images, read_image, resize_image

__all__ = ["load_model", "predict", "upsample_probabilities", "contour_overlay", "resolve_checkpoint"]

OVERLAY_COLOUR = (0, 255, 0)
# Contour width in pixels per 1,000 pixels of the image's shorter side (at least 1 pixel).
OVERLAY_WIDTH_PER_1000 = 3


def resolve_checkpoint(path: str) -> str:
    """A run folder -> its ``checkpoints/best`` (else ``checkpoints/last``); anything else unchanged."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        for name in ("best", "last"):
            candidate = os.path.join(path, "checkpoints", name)
            if os.path.isfile(os.path.join(candidate, "config.json")):
                return candidate
        raise FileNotFoundError(f"{path} is a run folder without a saved checkpoint in checkpoints/best or last")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_model(checkpoint: Union[str, nn.Module], device: Union[str, torch.device] = "cpu",
               backend: Optional[str] = None, img_size=None) -> nn.Module:
    """A model in eval mode on ``device`` from a checkpoint path (see the module docstring) or a model.

    ``img_size`` is only needed for a published checkpoint whose size cannot be read off its tensors.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if isinstance(checkpoint, nn.Module):
        return checkpoint.to(device).eval()
    from .models import DermoMamba

    overrides = {"img_size": tuple(img_size)} if img_size is not None else {}
    model = DermoMamba.from_pretrained(resolve_checkpoint(checkpoint), backend=backend, **overrides)
    return model.to(device).eval()


class _ImageFiles(Dataset):
    def __init__(self, samples: Sequence[Sample], img_size):
        self.samples = list(samples)
        self.img_size = tuple(img_size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        image = read_image(self.samples[i].image)
        original = image.shape[:2]
        image = resize_image(image, self.img_size)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "index": i,
                "original_size": torch.tensor(original, dtype=torch.int64)}


def autocast_for(device: torch.device, precision: str = "fp16"):
    """The autocast context for inference: fp16/bf16 on CUDA, none (fp32) on the CPU or with "fp32"."""
    if device.type != "cuda" or precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


@torch.no_grad()
def predict_logits(model: nn.Module, images_uint8: torch.Tensor, device: torch.device, precision: str = "fp16"):
    """Logits (B, 1, h, w) float32 of a uint8 batch (B, 3, h, w) at the model's size."""
    images = images_uint8.to(device, non_blocking=True).float().div_(255.0)
    with autocast_for(device, precision):
        logits = model(images)
    return logits.float()


def upsample_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Sigmoid of one image's logits (1, h, w), resized bilinearly to ``size`` = (height, width): (H, W)."""
    probabilities = torch.sigmoid(logits.float())[None]
    if tuple(probabilities.shape[-2:]) != tuple(size):
        probabilities = F.interpolate(probabilities, size=tuple(int(v) for v in size), mode="bilinear",
                                      align_corners=False)
    return probabilities[0, 0]


def contour_overlay(image: np.ndarray, mask: np.ndarray, colour=OVERLAY_COLOUR) -> np.ndarray:
    """The image (H, W, 3) uint8 with the border of ``mask`` (H, W) bool drawn in ``colour``."""
    width = max(1, round(min(mask.shape) * OVERLAY_WIDTH_PER_1000 / 1000))
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    # Pixels of the mask within `width` of the background: the mask minus its erosion.
    eroded = -F.max_pool2d(-tensor, 2 * width + 1, stride=1, padding=width)
    border = (tensor - eroded)[0, 0].numpy() > 0
    out = image.copy()
    out[border] = colour
    return out


def predict(checkpoint: Union[str, nn.Module], inputs: Sequence[str], output_dir: str, *, device: str = "auto",
            batch_size: int = 4, threshold: float = 0.5, overlay: bool = False, overlay_dir: Optional[str] = None,
            progress: bool = True, workers: int = 2, backend: Optional[str] = None, precision: str = "fp16",
            img_size=None) -> list[str]:
    """Predict a mask for every image in ``inputs`` (files, or folders of images; other files are skipped).

    Writes ``<output_dir>/<id>_segmentation.png`` (mode "L", 0/255, the image's original width and height) and,
    with ``overlay``, ``<overlay_dir or output_dir/overlays>/<id>_overlay.jpg``. Returns the mask paths.

        >>> predict("runs/isic", ["ISIC2018_Task1-2_Test_Input"], "out/")   # 1,000 masks for the scorer
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from .train import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    model = load_model(checkpoint, device, backend, img_size)
    samples = list_images(inputs)
    os.makedirs(output_dir, exist_ok=True)
    overlay_dir = overlay_dir or os.path.join(output_dir, "overlays")
    if overlay:
        os.makedirs(overlay_dir, exist_ok=True)
    loader = DataLoader(_ImageFiles(samples, model.img_size), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True)
    written = []
    for batch in loader:
        logits = predict_logits(model, batch["image"], device, precision)
        for row, index in enumerate(batch["index"].tolist()):
            sample = samples[index]
            size = batch["original_size"][row].tolist()
            mask = (upsample_probabilities(logits[row], size) > threshold).cpu().numpy()
            path = os.path.join(output_dir, f"{sample.id}_segmentation.png")
            _save_atomic(Image.fromarray(mask.astype(np.uint8) * 255), path)
            written.append(path)
            if overlay:
                drawn = contour_overlay(read_image(sample.image), mask)
                _save_atomic(Image.fromarray(drawn), os.path.join(overlay_dir, f"{sample.id}_overlay.jpg"), quality=90)
    return written


def _save_atomic(image: Image.Image, path: str, **options):
    # A kill mid-write must not leave a truncated mask that the scorer would then read.
    temporary = f"{path}.tmp"
    image.save(temporary, format="PNG" if path.endswith(".png") else "JPEG", **options)
    os.replace(temporary, path)
