"""Segmentation metrics on binary masks, with the official ISIC 2018 Task 1 scorer's conventions.

Metrics: Dice, Jaccard (IoU), thresholded Jaccard (ISIC 2018 Task 1's score: the per-image Jaccard,
counted as 0 below 0.65), precision, sensitivity (recall), specificity, accuracy and HD95.

Two reductions, named in every key of the table:

* ``*_per_image``: the metric of each image, then the mean over images (the ISIC scorer's
  "macro average"; its overall score is ``threshold_jaccard_per_image``).
* ``*_pooled``: one confusion matrix over all pixels of all images, then the metric. The
  thresholded Jaccard and HD95 are per-image quantities and have no pooled form.

Conventions (those of ``isic-challenge-scoring`` 5.6.0 where it has the metric):

* Binarisation: bool masks as they are; ``uint8`` masks (0/255 images) as ``value > 128``, the
  scorer's rule; floating masks (probabilities, or 0/1) as ``value > 0.5``; other integer dtypes as
  ``value > 0``. ``threshold=`` overrides all of these (``value > threshold``). Pass 0/1 ``uint8``
  masks as bool or with ``threshold=0``.
* An empty union (neither mask has a foreground pixel) scores Jaccard = Dice = 1 (so its
  thresholded Jaccard is 1 too).
* No truth positives: sensitivity = 1. No truth negatives: specificity = 1. No predicted positives:
  precision = 1 (the scorer's positive-predictive-value convention, ``binary_ppv``: it does not
  penalise an empty prediction of an empty truth; with truth positives the miss shows in
  sensitivity, Dice and Jaccard).
* HD95 (the scorer has none; this follows the common medpy definition): surfaces are the mask
  pixels with a 4-neighbour outside the mask (pixels outside the image count as background);
  the distances from each surface pixel of one mask to the nearest surface pixel of the other, in
  both directions, go into one set, and HD95 is its 95th percentile (linear interpolation, numpy's
  default), in pixels or in the units of ``sampling`` (row, column spacing). Both masks empty:
  0. Exactly one empty: undefined, NaN per image; ``hd95_per_image`` is the mean over the images
  where it is defined and ``hd95_undefined`` counts the others.

Everything runs on the masks' device (the distance transforms of HD95 on the GPU via Triton when the
masks are there); the table's numbers are Python floats.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from dermomamba_kernels import distance_transform_edt

# ISIC 2018 Task 1: a per-image Jaccard below this counts as 0.
ISIC_JACCARD_THRESHOLD = 0.65
# The scorer's binarisation of 8-bit mask images: value > 128.
UINT8_THRESHOLD = 128
FLOAT_THRESHOLD = 0.5
HD_PERCENTILE = 95.0

CONFUSION_FIELDS = ("tp", "fp", "fn", "tn")
RATIO_METRICS = ("dice", "jaccard", "precision", "sensitivity", "specificity", "accuracy")
PER_IMAGE_METRICS = ("dice", "jaccard", "threshold_jaccard", "precision", "sensitivity", "specificity",
                     "accuracy", "hd95")

MaskLike = Union[torch.Tensor, np.ndarray]


def binarize(mask: MaskLike, threshold: Optional[float] = None) -> torch.Tensor:
    """Boolean foreground of a mask, by the conventions in the module docstring.

    Example:
        >>> binarize(torch.tensor([0, 128, 129, 255], dtype=torch.uint8))
        tensor([False, False,  True,  True])
    """
    mask = torch.as_tensor(mask)
    if mask.is_complex():
        raise TypeError(f"mask: expected a real or bool mask, got dtype {mask.dtype}")
    if threshold is not None:
        return mask > threshold
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype == torch.uint8:
        return mask > UINT8_THRESHOLD
    if mask.is_floating_point():
        return mask > FLOAT_THRESHOLD
    return mask > 0


def _as_image_batch(mask: torch.Tensor, name: str) -> torch.Tensor:
    if mask.dim() == 2:
        return mask[None]
    if mask.dim() == 3:
        return mask
    if mask.dim() == 4 and mask.shape[1] == 1:
        return mask[:, 0]
    raise ValueError(f"{name}: expected shape (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")


def confusion_counts(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image confusion counts of boolean masks (B, H, W): int64 (B, 4) as (TP, FP, FN, TN).

    Example:
        >>> p = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.bool); t = torch.tensor([[[1, 0], [1, 0]]]) > 0
        >>> confusion_counts(p, t)
        tensor([[1, 1, 1, 1]])
    """
    pred = pred.flatten(1)
    truth = truth.flatten(1)
    tp = (pred & truth).sum(1)
    fp = (pred & ~truth).sum(1)
    fn = (~pred & truth).sum(1)
    tn = (~pred & ~truth).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, and 1 where the denominator is 0 (the scorer's "freebie")."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.ones_like(numerator), numerator / safe)


def metrics_from_counts(counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Ratio metrics from confusion counts (..., 4) = (TP, FP, FN, TN), float64, scorer's conventions."""
    tp, fp, fn, tn = counts.to(torch.float64).unbind(-1)
    jaccard = _ratio(tp, tp + fp + fn)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": jaccard,
        "threshold_jaccard": torch.where(jaccard >= ISIC_JACCARD_THRESHOLD, jaccard, torch.zeros_like(jaccard)),
        "precision": _ratio(tp, tp + fp),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
    }


def surface(mask: torch.Tensor) -> torch.Tensor:
    """Surface pixels of boolean masks (B, H, W): in the mask, with a 4-neighbour outside it.

    Pixels beyond the image border count as background (scipy's binary_erosion, border_value=0).
    """
    padded = F.pad(mask.to(torch.uint8), (1, 1, 1, 1), value=0).bool()
    interior = (mask & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
    return mask & ~interior


def _lerp_percentile(sorted_values: torch.Tensor, count: torch.Tensor, percentile: float) -> torch.Tensor:
    """numpy.percentile(..., method="linear") of the first ``count`` entries of each sorted row."""
    position = (count.to(torch.float64) - 1).clamp_min(0) * (percentile / 100.0)
    low = position.floor()
    fraction = position - low
    low_index = low.long()
    high_index = torch.minimum(low_index + 1, (count - 1).clamp_min(0))
    a = sorted_values.gather(1, low_index[:, None])[:, 0].to(torch.float64)
    b = sorted_values.gather(1, high_index[:, None])[:, 0].to(torch.float64)
    # numpy's _lerp: the same interpolation from the nearer end, for a monotone, exact-at-ends result.
    difference = b - a
    return torch.where(fraction >= 0.5, b - difference * (1 - fraction), a + difference * fraction)


def hd95(pred: torch.Tensor, truth: torch.Tensor, sampling: Optional[Sequence[float]] = None, *,
         backend=None) -> torch.Tensor:
    """95th-percentile symmetric surface distance of boolean masks (B, H, W): float64 (B,).

    See the module docstring for the definition and the empty-mask conventions (0 if both are
    empty, NaN if one is). Runs on the masks' device without leaving it (no synchronisation).

    Example:
        >>> p = torch.zeros(1, 9, 9, dtype=torch.bool); p[0, 2:5, 2:5] = True
        >>> t = torch.zeros(1, 9, 9, dtype=torch.bool); t[0, 2:5, 4:7] = True
        >>> hd95(p, t)
        tensor([2.], dtype=torch.float64)
    """
    surface_pred, surface_truth = surface(pred), surface(truth)
    to_truth = distance_transform_edt(~surface_truth, sampling=sampling, backend=backend)
    to_pred = distance_transform_edt(~surface_pred, sampling=sampling, backend=backend)
    inf = float("inf")  # a Python scalar: a device tensor made from it would be a host copy
    distances = torch.cat([torch.where(surface_pred, to_truth, inf).flatten(1),
                           torch.where(surface_truth, to_pred, inf).flatten(1)], dim=1)
    count = surface_pred.flatten(1).sum(1) + surface_truth.flatten(1).sum(1)
    value = _lerp_percentile(distances.sort(dim=1).values, count, HD_PERCENTILE)
    pred_empty = ~pred.flatten(1).any(1)
    truth_empty = ~truth.flatten(1).any(1)
    value = torch.where(pred_empty != truth_empty, torch.full_like(value, float("nan")), value)
    return torch.where(pred_empty & truth_empty, torch.zeros_like(value), value)


def _pairs(pred, truth) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(pred, truth) as a list of same-shape (B, H, W) batches: one batch, or one per list entry."""
    if isinstance(pred, (list, tuple)) or isinstance(truth, (list, tuple)):
        if not (isinstance(pred, (list, tuple)) and isinstance(truth, (list, tuple))):
            raise TypeError("pred, truth: pass two tensors, or two lists of masks of equal length")
        if len(pred) != len(truth):
            raise ValueError(f"pred, truth: {len(pred)} predictions for {len(truth)} truth masks")
        return [pair for p, t in zip(pred, truth) for pair in _pairs(p, t)]
    pred, truth = torch.as_tensor(pred), torch.as_tensor(truth)
    pred_images = _as_image_batch(pred, "pred")
    truth_images = _as_image_batch(truth, "truth")
    if pred_images.shape != truth_images.shape:
        raise ValueError(f"pred, truth: shapes {tuple(pred.shape)} and {tuple(truth.shape)} differ")
    if pred.device != truth.device:
        raise ValueError(f"pred, truth: on {pred.device} and {truth.device}; put both on one device")
    return [(pred_images, truth_images)]


def per_image_metrics(pred, truth, *, threshold: Optional[float] = None,
                      sampling: Optional[Sequence[float]] = None, with_hd95: bool = True,
                      backend=None) -> Dict[str, torch.Tensor]:
    """Every metric of every image: a dict of (N,) float64 tensors, plus "counts" (N, 4) int64.

    ``pred``, ``truth``: tensors (H, W), (B, H, W) or (B, 1, H, W) of one shape, or two lists of such
    masks (sizes may differ between entries); N images in order. ``threshold``: see :func:`binarize`.

    Example:
        >>> t = torch.zeros(2, 16, 16, dtype=torch.uint8); t[:, 4:12, 4:12] = 255
        >>> per_image_metrics(t, t)["dice"]
        tensor([1., 1.], dtype=torch.float64)
    """
    rows: Dict[str, List[torch.Tensor]] = {}
    for pred_images, truth_images in _pairs(pred, truth):
        p, t = binarize(pred_images, threshold), binarize(truth_images, threshold)
        counts = confusion_counts(p, t)
        values = metrics_from_counts(counts)
        values["counts"] = counts
        if with_hd95:
            values["hd95"] = hd95(p, t, sampling, backend=backend)
        for key, value in values.items():
            rows.setdefault(key, []).append(value)
    if not rows:
        raise ValueError("pred, truth: no masks given")
    device = rows["counts"][0].device
    return {key: torch.cat([v.to(device) for v in value]) for key, value in rows.items()}


def summarize(per_image: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The metric table from :func:`per_image_metrics`' output (or an accumulator's)."""
    counts = per_image["counts"]
    table: Dict[str, float] = OrderedDict()
    for name in PER_IMAGE_METRICS:
        if name == "hd95":
            continue
        table[f"{name}_per_image"] = per_image[name].mean().item()
    if "hd95" in per_image:
        defined = ~torch.isnan(per_image["hd95"])
        table["hd95_per_image"] = per_image["hd95"][defined].mean().item() if bool(defined.any()) else float("nan")
        table["hd95_undefined"] = int((~defined).sum().item())
    pooled = metrics_from_counts(counts.sum(0))
    for name in RATIO_METRICS:
        table[f"{name}_pooled"] = pooled[name].item()
    table["num_images"] = int(counts.shape[0])
    return table


def segmentation_metrics(pred, truth, *, threshold: Optional[float] = None,
                         sampling: Optional[Sequence[float]] = None, with_hd95: bool = True,
                         backend=None) -> Dict[str, float]:
    """The whole metric table for a batch, or for two lists of masks of different sizes.

    Returns a dict of floats: ``<metric>_per_image`` (mean over images) for dice, jaccard,
    threshold_jaccard, precision, sensitivity, specificity, accuracy and hd95;
    ``<metric>_pooled`` (one confusion matrix over all pixels) for dice, jaccard, precision,
    sensitivity, specificity and accuracy; ``hd95_undefined`` and ``num_images``. Conventions: see
    the module docstring. The ISIC 2018 Task 1 score is ``threshold_jaccard_per_image``.

    Example:
        >>> truth = torch.zeros(2, 1, 32, 32, dtype=torch.uint8); truth[..., 8:24, 8:24] = 255
        >>> pred = torch.zeros(2, 1, 32, 32); pred[..., 8:24, 10:26] = 0.9
        >>> round(segmentation_metrics(pred, truth)["dice_pooled"], 4)
        0.875
    """
    return summarize(per_image_metrics(pred, truth, threshold=threshold, sampling=sampling, with_hd95=with_hd95,
                                       backend=backend))


class SegmentationMetricAccumulator:
    """Collects per-image results over an evaluation loop; :meth:`compute` gives the table.

    ``update(pred, truth)`` takes what :func:`segmentation_metrics` takes and keeps per-image values
    on the masks' device (no synchronisation until :meth:`compute`).

    Example:
        >>> acc = SegmentationMetricAccumulator()
        >>> for _ in range(3):
        ...     t = torch.rand(4, 1, 24, 32) > 0.5
        ...     acc.update(t, t)
        >>> acc.compute()["dice_per_image"], acc.compute()["num_images"]
        (1.0, 12)
    """

    def __init__(self, *, threshold: Optional[float] = None, sampling: Optional[Sequence[float]] = None,
                 with_hd95: bool = True, backend=None):
        self.threshold = threshold
        self.sampling = sampling
        self.with_hd95 = with_hd95
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self._rows: Dict[str, List[torch.Tensor]] = {}

    def update(self, pred, truth) -> None:
        values = per_image_metrics(pred, truth, threshold=self.threshold, sampling=self.sampling,
                                   with_hd95=self.with_hd95, backend=self.backend)
        for key, value in values.items():
            self._rows.setdefault(key, []).append(value)

    def __len__(self) -> int:
        return sum(v.shape[0] for v in self._rows.get("counts", []))

    def per_image(self) -> Dict[str, torch.Tensor]:
        if not self._rows:
            raise RuntimeError("no masks seen yet: call update() first")
        device = self._rows["counts"][0].device
        return {key: torch.cat([v.to(device) for v in values]) for key, values in self._rows.items()}

    def compute(self) -> Dict[str, float]:
        return summarize(self.per_image())


__all__ = [
    "binarize",
    "confusion_counts",
    "metrics_from_counts",
    "surface",
    "hd95",
    "per_image_metrics",
    "summarize",
    "segmentation_metrics",
    "SegmentationMetricAccumulator",
    "ISIC_JACCARD_THRESHOLD",
]
