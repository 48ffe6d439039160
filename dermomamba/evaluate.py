"""Evaluation: a checkpoint on a data set, or a folder of predicted masks against ground-truth masks.

Metrics come from :mod:`dermomamba.metrics` (the official ISIC scorer's conventions): per-image means and
pooled values of Dice, Jaccard, precision, sensitivity, specificity, accuracy, plus the ISIC 2018 thresholded
Jaccard and HD95 per image. They are computed at each image's **original resolution**: the model's probabilities
are resized bilinearly to the size of the ground-truth file and thresholded at 0.5. Optionally also at the model
resolution (the resized ground truth), as the paper's code computed them -- labelled as such.

    >>> report = evaluate_checkpoint("runs/isic", "/data/PH2Dataset")      # PH2 as an external test set
    >>> print(report["table"]); write_report(report, "eval/", prefix="ph2")
    >>> report = evaluate_folders("predictions/", "/data/isic2018")        # masks written by `predict`
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .data.folders import (DataError, SegmentationDataset, discover, is_image_name, open_image, read_mask,
                           strip_mask_suffix)
from .metrics import PER_IMAGE_METRICS, SegmentationMetricAccumulator

__all__ = ["evaluate_dataset", "evaluate_checkpoint", "evaluate_folders", "write_report", "format_table"]

TABLE_METRICS = ("dice", "jaccard", "threshold_jaccard", "precision", "sensitivity", "specificity", "accuracy",
                 "hd95")


def _original_mask_source(dataset: Dataset):
    """A function (index into ``dataset``, item) -> the ground truth at original resolution as (H, W) bool."""
    base, indices = dataset, None
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    if isinstance(base, SegmentationDataset):
        def from_file(i, item):
            sample = base.samples[indices[i] if indices is not None else i]
            if sample.mask is None:
                raise DataError(f"no ground-truth mask for image {sample.image}")
            return torch.from_numpy(read_mask(sample.mask).astype(bool))
        return from_file
    # Generated data (the synthetic set) has no other resolution than the one it is rendered at.
    return lambda i, item: item["mask"][0].bool()


@torch.no_grad()
def evaluate_dataset(model, dataset: Dataset, device, *, batch_size: int = 1, precision: str = "fp16",
                     progress: bool = True, workers: int = 0, model_resolution: bool = False,
                     with_hd95: bool = True) -> dict:
    """Evaluate ``model`` on ``dataset`` (items as the data sets in :mod:`dermomamba.data` give them).

    Returns {"summary": metric table (dict), "per_image": [{"id", metrics...}], "resolution": "original",
    "table": printable text, and with ``model_resolution`` "model_resolution": {"summary", "per_image"}}.
    """
    from .predict import predict_logits, upsample_probabilities

    device = torch.device(device)
    model = model.to(device).eval()
    truth_at_original = _original_mask_source(dataset)
    accumulator = SegmentationMetricAccumulator(with_hd95=with_hd95)
    at_model = SegmentationMetricAccumulator(with_hd95=with_hd95) if model_resolution else None
    ids = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True)
    position = 0
    for batch in loader:
        logits = predict_logits(model, batch["image"], device, precision)
        predictions, truths = [], []
        for row in range(logits.shape[0]):
            item = {key: value[row] for key, value in batch.items()}
            truth = truth_at_original(position, item).to(device)
            position += 1
            predictions.append(upsample_probabilities(logits[row], tuple(truth.shape)) > 0.5)
            truths.append(truth)
            ids.append(batch["id"][row])
        accumulator.update(predictions, truths)
        if at_model is not None:
            at_model.update(logits > 0, batch["mask"].to(device) > 0)
    if not ids:
        raise ValueError("evaluate: the data set is empty")
    report = _report(accumulator, ids, "original")
    if at_model is not None:
        report["model_resolution"] = _report(at_model, ids, "model (the paper's code: resized ground truth)")
        report["table"] += "\n\n" + report["model_resolution"]["table"]
    return report


def _report(accumulator: SegmentationMetricAccumulator, ids: list, resolution: str) -> dict:
    summary = accumulator.compute()
    per_image = accumulator.per_image()
    rows = []
    for i, sample_id in enumerate(ids):
        row = {"id": sample_id}
        for name in PER_IMAGE_METRICS:
            if name in per_image:
                row[name] = float(per_image[name][i])
        row.update({k: int(v) for k, v in zip(("tp", "fp", "fn", "tn"), per_image["counts"][i].tolist())})
        rows.append(row)
    return {"resolution": resolution, "summary": summary, "per_image": rows,
            "table": format_table(summary, f"{summary['num_images']} images, at the {resolution} resolution")}


def format_table(summary: dict, title: str = "") -> str:
    """The metric table as text: one row per metric, per-image mean and pooled columns."""
    lines = [title] if title else []
    lines.append(f"{'metric':<20}{'per-image mean':>16}{'pooled':>12}")
    for name in TABLE_METRICS:
        mean = summary.get(f"{name}_per_image")
        if mean is None:
            continue
        pooled = summary.get(f"{name}_pooled")
        pooled_text = f"{pooled:>12.4f}" if pooled is not None else f"{'-':>12}"
        lines.append(f"{name:<20}{mean:>16.4f}{pooled_text}")
    if summary.get("hd95_undefined"):
        lines.append(f"(HD95 undefined for {summary['hd95_undefined']} images: exactly one mask empty)")
    return "\n".join(lines)


def write_report(report: dict, output_dir: str, prefix: str = "metrics") -> list[str]:
    """Write ``<prefix>.json`` (everything), ``<prefix>.csv`` (metric, per-image mean, pooled) and
    ``<prefix>_per_image.csv``; returns the paths. A model-resolution table goes to ``<prefix>_model_resolution.*``.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = []

    def dump(part: dict, stem: str, extra: Optional[dict] = None):
        json_path = os.path.join(output_dir, f"{stem}.json")
        payload = {"resolution": part["resolution"], "summary": _finite(part["summary"]),
                   "per_image": [_finite(r) for r in part["per_image"]], **(extra or {})}
        _write_text(json_path, json.dumps(payload, indent=1))
        summary = part["summary"]
        table_rows = [["metric", "per_image_mean", "pooled"]]
        for name in TABLE_METRICS:
            if f"{name}_per_image" in summary:
                pooled = summary.get(f"{name}_pooled")
                table_rows.append([name, summary[f"{name}_per_image"], "" if pooled is None else pooled])
        table_rows.append(["num_images", summary["num_images"], summary["num_images"]])
        csv_path = os.path.join(output_dir, f"{stem}.csv")
        _write_csv(csv_path, table_rows)
        fields = list(part["per_image"][0].keys()) if part["per_image"] else ["id"]
        per_image_path = os.path.join(output_dir, f"{stem}_per_image.csv")
        _write_csv(per_image_path, [fields] + [[r.get(f, "") for f in fields] for r in part["per_image"]])
        paths.extend([json_path, csv_path, per_image_path])

    dump(report, prefix)
    if "model_resolution" in report:
        dump(report["model_resolution"], f"{prefix}_model_resolution")
    return paths


def _finite(values: dict) -> dict:
    # JSON has no NaN: an undefined value (HD95 with one empty mask) is written as null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def _write_text(path: str, text: str):
    with open(path + ".tmp", "w") as handle:
        handle.write(text + "\n")
    os.replace(path + ".tmp", path)


def _write_csv(path: str, rows: list):
    with open(path + ".tmp", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    os.replace(path + ".tmp", path)


def evaluate_checkpoint(checkpoint, data: Optional[str] = None, *, layout: str = "auto", subset: str = "Training",
                        part: str = "all", split_file: Optional[str] = None, device: str = "auto",
                        batch_size: int = 1, precision: str = "fp16", workers: int = 2, progress: bool = True,
                        model_resolution: bool = False, backend: Optional[str] = None, cache_dir=None,
                        with_hd95: bool = True) -> dict:
    """Evaluate a checkpoint (path, run folder or model) on a data set.

    ``data``: a folder in any supported layout. Without it, ``checkpoint`` must be a run folder and its own data
    and split are used (``part`` defaults to its test split then). ``part`` ("all", "train", "val", "test")
    selects ids from ``split_file`` (default: the run folder's split.json).
    """
    from .predict import load_model
    from .train import resolve_device

    device = resolve_device(device)
    run_dir = checkpoint if isinstance(checkpoint, str) and os.path.isfile(os.path.join(checkpoint, "config.yaml")) else None
    model = load_model(checkpoint, device, backend)
    if data is None:
        if run_dir is None:
            raise ValueError("evaluate: give --data, or a run folder as the checkpoint (to use its own test split)")
        from .config import load_config, resolve_config
        from .data.splits import load_split
        from .train import build_datasets

        cfg = resolve_config({}, None, base=load_config(os.path.join(run_dir, "config.yaml")))
        datasets, _ = build_datasets(cfg, saved_split=load_split(os.path.join(run_dir, "split.json")))
        dataset = datasets["test" if part == "all" else part]
    else:
        samples = discover(data, layout, subset)
        if part != "all":
            split_file = split_file or (os.path.join(run_dir, "split.json") if run_dir else None)
            if split_file is None:
                raise ValueError(f"evaluate: part={part!r} needs a split file (or a run folder as the checkpoint)")
            from .data.splits import load_split
            wanted = set(load_split(split_file).get(part, []))
            samples = [s for s in samples if s.id in wanted]
            if not samples:
                raise DataError(f"none of the {part} ids of {split_file} are in {data}")
        dataset = SegmentationDataset(samples, model.img_size, cache_dir=cache_dir)
    return evaluate_dataset(model, dataset, device, batch_size=batch_size, precision=precision, progress=progress,
                            workers=workers, model_resolution=model_resolution, with_hd95=with_hd95)


def _mask_files(folder: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and is_image_name(name):
            key = strip_mask_suffix(Path(name).stem)
            if key in found:
                raise DataError(f"two masks have the id {key!r}: {found[key]} and {path}")
            found[key] = path
    return found


def _read_grey(path: str) -> np.ndarray:
    return np.array(open_image(path).convert("L"))  # a writable copy, as torch.from_numpy wants


def evaluate_folders(predictions: str, truth: str, *, layout: str = "auto", subset: str = "Training",
                     progress: bool = True, with_hd95: bool = True, device: str = "cpu") -> dict:
    """Predicted masks (``<id>_segmentation.png`` or ``<id>.png``, 0/255) against ground truth.

    ``truth``: a folder of masks (ids from file names, suffixes like ``_segmentation`` stripped) or a data set
    folder in a supported layout (its masks are used). Both are binarised as the ISIC scorer does (> 128). Every
    ground-truth id needs a prediction of the same size; predictions without ground truth are ignored (listed).
    """
    if not os.path.isdir(predictions):
        raise DataError(f"prediction folder not found: {predictions}")
    try:
        truth_masks = {s.id: s.mask for s in discover(truth, layout, subset)}
    except DataError:
        if layout != "auto" or not os.path.isdir(truth):
            raise
        truth_masks = _mask_files(truth)
    predicted = _mask_files(predictions)
    missing = [i for i in sorted(truth_masks) if i not in predicted]
    if missing:
        raise DataError(f"no prediction for ground truth {truth_masks[missing[0]]} (expected "
                        f"{os.path.join(predictions, missing[0] + '_segmentation.png')})"
                        + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
    extra = sorted(set(predicted) - set(truth_masks))
    accumulator = SegmentationMetricAccumulator(with_hd95=with_hd95)
    ids = sorted(truth_masks)
    iterator = ids
    if progress:
        from tqdm import tqdm
        iterator = tqdm(ids, desc="evaluate", unit="mask", dynamic_ncols=True)
    for sample_id in iterator:
        pred = _read_grey(predicted[sample_id])
        true = _read_grey(truth_masks[sample_id])
        if pred.shape != true.shape:
            raise DataError(f"size mismatch: prediction {predicted[sample_id]} is {pred.shape[1]}x{pred.shape[0]} "
                            f"but ground truth {truth_masks[sample_id]} is {true.shape[1]}x{true.shape[0]}")
        accumulator.update(torch.from_numpy(pred).to(device), torch.from_numpy(true).to(device))
    report = _report(accumulator, ids, "original")
    report["ignored_predictions"] = extra
    return report
