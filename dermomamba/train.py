"""Training: the published recipe, on one device or many (``torchrun``), resumable after a kill.

    >>> from dermomamba.config import TrainConfig
    >>> from dermomamba.train import train
    >>> summary = train(TrainConfig(data="/data/isic2018", output="runs/isic"))   # the paper's recipe
    >>> summary["best_val_dice"], summary["run_dir"]

A run folder holds:

    config.yaml            the resolved configuration (what ``--resume`` rebuilds the run from)
    split.json             the ids of the train / val / test images
    metrics.csv            one row per epoch: losses, Dice, IoU, learning rate, time
    curves.png             the curves of metrics.csv
    tensorboard/           the same as TensorBoard events
    checkpoints/best/      config.json + model.safetensors of the best epoch by validation Dice
    checkpoints/last/      the last epoch: the model as above, plus train_state.json and
                           train_state.safetensors (optimiser, scheduler, gradient scaler, epoch, RNG states
                           of every rank) -- tensors and JSON only, nothing pickled
    test_metrics.json/.csv the best checkpoint on the test split, at each image's original resolution
    predictions/           (demo) a few test images, their predicted masks and contour overlays

Each checkpoint folder is written under a temporary name and swapped in with renames, so a kill at any moment
leaves either the previous or the new checkpoint, never a mix. Resuming restores everything needed to continue
exactly as if the run had not stopped: with deterministic kernels (the CPU), the weights after resuming are
bitwise the same as those of an uninterrupted run.

CUDA graphs (``cuda_graphs``, ``--cuda-graphs``): the training step is recorded once as a CUDA graph and replayed
for every later batch, so the host no longer launches its ~2,000 kernels one by one (on a host that launches
slowly the eager step is bound by them). The first steps run eagerly (Triton compiles, cuDNN chooses its
algorithms, Adam allocates its state); Adam is fused and capturable with its learning rate a device tensor, so
ReduceLROnPlateau's changes reach the recorded step. One CUDA device only.

Multi-GPU: ``torchrun --nproc_per_node=N -m dermomamba.cli train ...`` (or the ``dermomamba`` script under
torchrun) runs DistributedDataParallel with a distributed sampler; ``batch_size`` is per process; validation is
sharded and its sums are all-reduced; only rank 0 writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from dermomamba_kernels import graph_recording

from .config import TrainConfig, load_config, resolve_config, save_config
from .data.augment import PublishedAugmentation
from .data.folders import DataError, SegmentationDataset, discover
from .data.splits import load_split, published_split, random_split, save_split
from .data.synthetic import SyntheticLesionDataset

__all__ = ["train", "GraphedTrainStep", "graph_ready_lr", "DistContext", "init_distributed", "build_datasets", "find_last_checkpoint", "resume_config",
           "segmentation_scores", "TRAIN_STATE_JSON", "TRAIN_STATE_TENSORS"]

TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_VERSION = 1
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_dice", "val_loss", "val_dice", "val_iou", "epoch_seconds",
              "train_images_per_second")
# Other ranks wait at a barrier while rank 0 builds the data cache (a minute or two for ISIC 2018).
COLLECTIVE_TIMEOUT_MINUTES = 30
# Refresh the progress bar's loss and Dice every this many steps: reading them forces a device sync.
POSTFIX_EVERY = 10


# --------------------------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> the local rank's GPU if CUDA is available, else the CPU; "cuda" -> the local rank's GPU.

        >>> resolve_device("auto")          # device(type='cpu') on a machine without a GPU
    """
    if name == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={name!r}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: process LOCAL_RANK={local_rank} needs GPU {device.index}, but "
                         f"{torch.cuda.device_count()} is visible; start at most that many processes per node "
                         "or pass --device cpu")
    return device


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))
    return DistContext(rank, world_size, local_rank, device)


def _broadcast_object(value, ctx: DistContext):
    if not ctx.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _barrier(ctx: DistContext):
    if ctx.distributed:
        dist.barrier()


def _all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64,
                          device=ctx.device if ctx.device.type == "cuda" else "cpu")
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


# --------------------------------------------------------------------------------------------- data
def build_datasets(cfg: TrainConfig, ctx: Optional[DistContext] = None, saved_split: Optional[dict] = None):
    """({'train', 'val', 'test'} -> Dataset, split dict with the ids of each part).

    Folder data: one :class:`SegmentationDataset` over all samples (one cache) and index subsets; the ISIC
    "official" split uses the Training, Validation and Test folders instead. ``saved_split`` (a resumed run's)
    wins over ``cfg.split``.
    """
    ctx = ctx or DistContext(0, 1, 0, torch.device("cpu"))
    cache_dir = None if cfg.cache_dir in (None, "", "none", "None") else os.path.expanduser(cfg.cache_dir)
    if cfg.synthetic:
        counts = {"train": cfg.synthetic_train, "val": cfg.synthetic_val, "test": cfg.synthetic_test}
        if counts["train"] < 1 or counts["val"] < 1:
            raise ValueError("synthetic_train and synthetic_val must be >= 1")
        datasets, offset = {}, 0
        for part in ("train", "val", "test"):
            # Rank 0 renders the cache (if any) first; the others then find it.
            make = lambda: SyntheticLesionDataset(counts[part], cfg.img_size, seed=cfg.synthetic_seed, offset=offset,
                                                  cache_dir=cache_dir, workers=max(cfg.workers, 1))
            if ctx.is_main:
                datasets[part] = make()
            _barrier(ctx)
            if not ctx.is_main:
                datasets[part] = make()
            offset += counts[part]
        split = {"method": "synthetic", "seed": cfg.synthetic_seed,
                 **{part: datasets[part].ids for part in ("train", "val", "test")}}
        return datasets, split

    def make(samples):
        # Rank 0 decodes and caches; the others wait, then open the finished cache.
        if ctx.is_main:
            dataset = SegmentationDataset(samples, cfg.img_size, cache_dir, workers=max(cfg.workers, 1),
                                          progress=cfg.progress)
        _barrier(ctx)
        if not ctx.is_main:
            dataset = SegmentationDataset(samples, cfg.img_size, cache_dir, workers=max(cfg.workers, 1))
        return dataset

    method = cfg.split
    if saved_split is None and method == "official":
        datasets, split = {}, {"method": "official"}
        for part, subset in (("train", "Training"), ("val", "Validation"), ("test", "Test")):
            samples = discover(cfg.data, "isic2018", subset)
            datasets[part] = make(samples)
            split[part] = [s.id for s in samples]
        return datasets, split

    layout = cfg.layout
    samples = discover(cfg.data, layout)
    ids = [s.id for s in samples]
    if saved_split is not None:
        split = saved_split
    elif method.endswith(".json"):
        split = load_split(method)
    elif method == "published" or (method == "auto" and _is_isic(cfg)):
        split = published_split(ids)
    else:
        split = random_split(ids, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    unknown = [i for part in ("train", "val", "test") for i in split.get(part, []) if i not in position]
    if unknown:
        raise DataError(f"the split names ids that are not in {cfg.data}: {unknown[:5]}")
    full = make(samples)
    datasets = {part: Subset(full, [position[i] for i in split.get(part, [])]) for part in ("train", "val", "test")}
    return datasets, split


def _is_isic(cfg: TrainConfig) -> bool:
    from .data.folders import detect_layout
    layout = cfg.layout if cfg.layout != "auto" else detect_layout(cfg.data)
    return layout == "isic2018"


def batch_to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and masks of a batch -> float (B, 3, H, W) in [0, 1] and (B, 1, H, W) in {0, 1} on device.

    Batches travel as uint8 (4x less to copy) and become float on the device.
    """
    images = batch["image"].to(device, non_blocking=True).float().div_(255.0)
    masks = batch["mask"].to(device, non_blocking=True).float()
    return images, masks


def segmentation_scores(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU (B,) of ``logits > 0`` (sigmoid > 0.5) against {0, 1} masks, both (B, 1, H, W).

    An empty prediction of an empty mask scores 1 (the ISIC scorer's convention).
    """
    predicted = logits.detach() > 0
    truth = masks > 0.5
    dims = tuple(range(1, logits.dim()))
    intersection = (predicted & truth).sum(dims).double()
    total = predicted.sum(dims).double() + truth.sum(dims).double()
    union = total - intersection
    dice = torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(total))
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
    return dice, iou


# --------------------------------------------------------------------------------------------- checkpoints
def _swap_in(scratch: str, target: str) -> None:
    """Replace folder ``target`` by ``scratch`` with renames (a kill leaves ``target`` or ``target.old``)."""
    old = target + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(target):
        os.replace(target, old)
    os.replace(scratch, target)
    shutil.rmtree(old, ignore_errors=True)


def _scratch_dir(target: str) -> str:
    scratch = f"{target}.tmp-{os.getpid()}"
    if os.path.isdir(scratch):
        shutil.rmtree(scratch)
    os.makedirs(scratch)
    return scratch


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _rng_snapshot(generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "augment": generator.get_state(), "python": random.getstate()}
    numpy_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_restore(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _json_safe(value):
    """``value`` with every 0-d tensor (a recorded step's learning rate, in the optimizer's and the scheduler's
    state) replaced by the number it holds."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return float(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_json_safe(item) for item in value)
    return value


def _save_train_state(folder: str, optimizer, scheduler, scaler, rng_states: list[dict], info: dict) -> None:
    from safetensors.torch import save_file

    tensors, optimizer_json = {}, {"param_groups": None, "state": {}}
    optimizer_state = optimizer.state_dict()
    # A recorded (CUDA-graph) step keeps its learning rate in a device tensor: stored as the number it holds.
    optimizer_json["param_groups"] = _json_safe(optimizer_state["param_groups"])
    for param_id, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                optimizer_json["state"].setdefault(str(param_id), {})[name] = value
    rng_json = []
    for rank, state in enumerate(rng_states):
        tensors[f"rng.{rank}.torch"] = state["torch"]
        tensors[f"rng.{rank}.augment"] = state["augment"]
        tensors[f"rng.{rank}.numpy_keys"] = state["numpy"]["keys"]
        if "cuda" in state:
            tensors[f"rng.{rank}.cuda"] = state["cuda"]
        rng_json.append({"python": state["python"], "numpy": {k: v for k, v in state["numpy"].items() if k != "keys"},
                         "has_cuda": "cuda" in state})
    payload = {"format": "dermomamba-train-state", "version": TRAIN_STATE_VERSION, **info,
               "optimizer": optimizer_json, "scheduler": _json_safe(scheduler.state_dict()), "grad_scaler": scaler.state_dict(),
               "rng": rng_json}
    save_file(tensors, os.path.join(folder, TRAIN_STATE_TENSORS), metadata={"format": "dermomamba-train-state"})
    with open(os.path.join(folder, TRAIN_STATE_JSON), "w") as handle:
        json.dump(payload, handle, indent=1)


def _load_train_state(folder: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    with open(os.path.join(folder, TRAIN_STATE_JSON)) as handle:
        payload = json.load(handle)
    if payload.get("format") != "dermomamba-train-state" or payload.get("version") != TRAIN_STATE_VERSION:
        raise ValueError(f"{folder}/{TRAIN_STATE_JSON}: not a dermomamba training state of version {TRAIN_STATE_VERSION}")
    return payload, load_file(os.path.join(folder, TRAIN_STATE_TENSORS))


def _optimizer_state(payload: dict, tensors: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, entries in payload["optimizer"]["state"].items():
        state.setdefault(int(param_id), {}).update(entries)
    return {"state": state, "param_groups": payload["optimizer"]["param_groups"]}


def _rng_state_of(payload: dict, tensors: dict, rank: int) -> Optional[dict]:
    if rank >= len(payload["rng"]):
        return None
    info = payload["rng"][rank]
    state = {"torch": tensors[f"rng.{rank}.torch"], "augment": tensors[f"rng.{rank}.augment"],
             "python": info["python"], "numpy": {"keys": tensors[f"rng.{rank}.numpy_keys"], **info["numpy"]}}
    if info["has_cuda"]:
        state["cuda"] = tensors[f"rng.{rank}.cuda"]
    return state


def find_last_checkpoint(run_dir: str) -> str:
    """The ``checkpoints/last`` folder of a run (or the ``.old`` copy a kill mid-swap left behind)."""
    for name in ("last", "last.old"):
        folder = os.path.join(run_dir, "checkpoints", name)
        if os.path.isfile(os.path.join(folder, TRAIN_STATE_JSON)):
            return folder
    raise FileNotFoundError(f"no checkpoint to resume in {run_dir} (expected checkpoints/last/{TRAIN_STATE_JSON}); "
                            "the run was stopped before its first epoch ended")


def resume_config(resume: str, flags: dict, yaml_path: Optional[str] = None) -> TrainConfig:
    """The configuration of the run in folder ``resume``, with ``flags`` (e.g. more epochs) applied on top."""
    run_dir = _run_dir_of(resume)
    base = load_config(os.path.join(run_dir, "config.yaml"))
    flags = {**flags, "output": run_dir}
    return resolve_config(flags, yaml_path, base=base)


def _run_dir_of(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return candidate
    raise FileNotFoundError(f"--resume {path}: not a run folder (no config.yaml in it or above it)")


# --------------------------------------------------------------------------------------------- logging
class RunLogger:
    """metrics.csv, TensorBoard events and curves.png of a run (rank 0 only)."""

    def __init__(self, run_dir: str, start_epoch: int, tensorboard: bool):
        self.run_dir = run_dir
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.rows: list[dict] = []
        if os.path.isfile(self.csv_path):
            # A resumed run: keep the epochs that the checkpoint includes (numbered from 1), drop any after it.
            with open(self.csv_path, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["epoch"]) <= start_epoch]
        self._write_csv()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_epoch + 1)
            except ImportError as error:  # tensorboard is a dependency, but a broken install should not stop training
                warnings.warn(f"TensorBoard logging disabled: {error}")

    def _write_csv(self):
        temporary = self.csv_path + ".tmp"
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.csv_path)

    def log(self, row: dict):
        self.rows.append({key: row.get(key, "") for key in CSV_FIELDS})
        self._write_csv()
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    group = "lr" if key == "lr" else key.split("_", 1)[0]
                    self.writer.add_scalar(f"{group}/{key}", value, row["epoch"])
            self.writer.flush()
        self.plot()

    def plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [int(r["epoch"]) for r in self.rows]
        series = lambda key: [float(r[key]) if r[key] not in ("", None) else math.nan for r in self.rows]
        figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(epochs, series("train_loss"), label="train")
        axes[0].plot(epochs, series("val_loss"), label="validation")
        axes[0].set_title("loss")
        axes[1].plot(epochs, series("train_dice"), label="train Dice")
        axes[1].plot(epochs, series("val_dice"), label="validation Dice")
        axes[1].plot(epochs, series("val_iou"), label="validation IoU")
        axes[1].set_title("Dice / IoU (per-image mean)")
        axes[2].plot(epochs, series("lr"))
        axes[2].set_yscale("log")
        axes[2].set_title("learning rate")
        for axis in axes:
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        axes[0].legend()
        axes[1].legend()
        figure.tight_layout()
        temporary = os.path.join(self.run_dir, ".curves.png.tmp")
        figure.savefig(temporary, format="png", dpi=100)
        plt.close(figure)
        os.replace(temporary, os.path.join(self.run_dir, "curves.png"))

    def close(self):
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------- the loop
def _autocast(cfg: TrainConfig, device: torch.device):
    if device.type != "cuda" or cfg.precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _step_body(model, images, masks, criterion, scaler, optimizer, autocast):
    """Forward under ``autocast()``, the loss in fp32, the scaled backward, the optimizer and scaler steps; returns
    (logits, loss). The gradients must be None or zero before it (the eager loop zeroes them, a recorded step
    writes them)."""
    with autocast():
        logits = model(images)
    loss = criterion(logits.float(), masks)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


class GraphedTrainStep:
    """The training step (forward under autocast, loss, backward, GradScaler and Adam steps) recorded as one CUDA
    graph and replayed.

    The first ``warmup_calls`` calls run eagerly on a side stream, as capture requires (Triton compiles and
    autotunes, cuDNN picks its algorithms, Adam and the GradScaler allocate their state: none of that may happen
    during a capture); the next call records the step and replays it; every later call only replays. Each call
    copies its batch into the graph's static inputs and returns ``(logits, loss)``, static tensors that the next
    call overwrites. The optimizer must be a fused, capturable Adam whose learning rates are device tensors
    (:func:`graph_ready_lr` keeps them so), the batch shape fixed (``drop_last=True``).

    Shapes: images (B, 3, H, W), masks (B, 1, H, W) on the model's CUDA device.

    Example (needs a GPU):
        >>> step = GraphedTrainStep(model, optimizer, scaler, criterion, autocast)   # doctest: +SKIP
        >>> for images, masks in batches: logits, loss = step(images, masks)          # doctest: +SKIP
    """

    def __init__(self, model, optimizer, scaler, criterion, autocast, warmup_calls: int = 3):
        self.model, self.optimizer, self.scaler, self.criterion = model, optimizer, scaler, criterion
        self.autocast = autocast
        self.warmup_calls = warmup_calls
        self.calls = 0
        self.graph = None
        self.outputs = None
        self.images = self.masks = None

    def _body(self):
        return _step_body(self.model, self.images, self.masks, self.criterion, self.scaler, self.optimizer,
                          self.autocast)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor):
        if self.images is None:
            if images.device.type != "cuda":
                raise ValueError(f"cuda_graphs: the batch must be on a CUDA device, got images on {images.device}")
            self.images, self.masks = torch.empty_like(images), torch.empty_like(masks)
        for name, new, static in (("images", images, self.images), ("masks", masks, self.masks)):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise ValueError(f"cuda_graphs: every batch must have the recorded shape and dtype; {name} "
                                 f"{tuple(new.shape)} {new.dtype}, recorded {tuple(static.shape)} {static.dtype} "
                                 "(the loader must drop the last, smaller batch)")
        self.images.copy_(images)
        self.masks.copy_(masks)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        current = torch.cuda.current_stream()
        if self.calls < self.warmup_calls:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(current)
            # The kernels chosen for graphs, in the warm-ups too: they compile what the capture records.
            with graph_recording(), torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                outputs = self._body()
            current.wait_stream(side)
            return outputs
        # Gradients None before the capture: the recorded backward writes them (no accumulation) on every replay.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with graph_recording(), torch.cuda.graph(graph):
            self.outputs = self._body()
        self.graph = graph
        # A capture records without running: this call's step is the first replay.
        graph.replay()
        return self.outputs


def graph_ready_lr(optimizer, lr_tensors: list) -> None:
    """Puts each param group's learning rate back into its device tensor (the one a recorded step reads) after
    anything that may have replaced it with a number: loading a state dict, or a scheduler of a torch version
    that assigns instead of filling."""
    for group, tensor in zip(optimizer.param_groups, lr_tensors):
        if group["lr"] is not tensor:
            tensor.fill_(float(group["lr"]))
            group["lr"] = tensor


def _make_loss(mode: str):
    from .loss import GuideFusionLoss
    return GuideFusionLoss(mode=mode)


def _create_model(cfg: TrainConfig) -> nn.Module:
    from .models import create_model
    kwargs = {"backend": cfg.backend} if cfg.backend else {}
    return create_model(cfg.model, in_channels=3, classes=1, img_size=cfg.img_size, **kwargs)


def _default_run_dir() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"dermomamba-{stamp}")


class _Interrupted(Exception):
    """max_steps reached: stop at once, as a kill would, without saving anything."""


@torch.no_grad()
def validate(model: nn.Module, loader, criterion, cfg: TrainConfig, ctx: DistContext, progress: bool) -> dict:
    """Validation loss, per-image mean Dice and IoU at the model resolution, summed over all ranks."""
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * images, dice, iou, images
    iterator = loader
    if progress:
        from tqdm import tqdm
        iterator = tqdm(loader, desc="  validate", leave=False, unit="batch", dynamic_ncols=True)
    for batch in iterator:
        images, masks = batch_to_device(batch, ctx.device)
        with _autocast(cfg, ctx.device):
            logits = model(images)
        logits = logits.float()
        loss = criterion(logits, masks)
        dice, iou = segmentation_scores(logits, masks)
        count = images.shape[0]
        sums[0] += float(loss) * count
        sums[1] += float(dice.sum())
        sums[2] += float(iou.sum())
        sums[3] += count
    loss_sum, dice_sum, iou_sum, count = _all_reduce_sum(sums, ctx)
    count = max(count, 1)
    return {"val_loss": loss_sum / count, "val_dice": dice_sum / count, "val_iou": iou_sum / count}


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train with ``cfg``; with ``resume``, continue the run in ``cfg.output`` from its last checkpoint.

    Returns a summary: run_dir, epochs_done, best_val_dice, best_epoch, interrupted (max_steps reached) and,
    after a completed run, test metrics.
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx, resume)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _log(ctx: DistContext, message: str):
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


def _train(cfg: TrainConfig, ctx: DistContext, resume: bool) -> dict:
    run_dir = (cfg.output or _default_run_dir()) if ctx.is_main else None
    run_dir = _broadcast_object(os.path.abspath(run_dir) if run_dir else None, ctx)
    cfg.output = run_dir
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif cfg.precision != "fp32":
        _log(ctx, f"[dermomamba] {ctx.device.type} device: training in fp32 ({cfg.precision} autocast is for CUDA)")

    state_payload = state_tensors = saved_split = None
    if resume:
        last = find_last_checkpoint(run_dir)
        state_payload, state_tensors = _load_train_state(last)
        split_path = os.path.join(run_dir, "split.json")
        saved_split = load_split(split_path) if os.path.isfile(split_path) else None
    elif ctx.is_main:
        if os.path.isdir(os.path.join(run_dir, "checkpoints")):
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                                  "or choose another --output")
        os.makedirs(run_dir, exist_ok=True)

    # Seed before building anything random (model initialisation); a resumed run overwrites the weights.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2 ** 32)
    random.seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + ctx.rank)

    datasets, split = build_datasets(cfg, ctx, saved_split)
    if ctx.is_main:
        # max_steps stops this process only; a resumed run must not inherit it.
        save_config(dataclasses.replace(cfg, max_steps=None), os.path.join(run_dir, "config.yaml"))
        save_split(split, os.path.join(run_dir, "split.json"))
    if len(datasets["train"]) < cfg.batch_size * ctx.world_size:
        raise ValueError(f"the training split has {len(datasets['train'])} images, fewer than one batch of "
                         f"{cfg.batch_size} per process x {ctx.world_size} processes")

    graphs = bool(cfg.cuda_graphs)
    if graphs and (ctx.device.type != "cuda" or ctx.distributed):
        raise ValueError("cuda_graphs: the recorded training step needs one CUDA device and no torchrun, got device "
                         f"{ctx.device}" + (f" with {ctx.world_size} processes" if ctx.distributed else ""))
    model = _create_model(cfg).to(ctx.device)
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    # PyTorch's fused Adam on CUDA: one kernel for all weights instead of a chain of foreach launches
    # (the published recipe's Adam, same arithmetic: PyTorch tests fused against foreach).
    # Recorded as a CUDA graph, Adam must also be capturable (its step counters on the device) and read its
    # learning rate from a device tensor, which ReduceLROnPlateau then fills in place.
    lr = torch.tensor(cfg.lr, dtype=torch.float32, device=ctx.device) if graphs else cfg.lr
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay,
                                 fused=ctx.device.type == "cuda", capturable=graphs)
    lr_tensors = [group["lr"] for group in optimizer.param_groups] if graphs else []
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_factor,
                                                           patience=cfg.lr_patience)
    use_scaler = ctx.device.type == "cuda" and cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    criterion = _make_loss(cfg.loss)
    augment = PublishedAugmentation() if cfg.augment else None
    def autocast():
        return _autocast(cfg, ctx.device)

    graphed_step = GraphedTrainStep(model, optimizer, scaler, criterion, autocast) if graphs else None

    start_epoch, global_step, best_dice, best_epoch = 0, 0, -math.inf, 0
    if state_payload is not None:
        from safetensors.torch import load_file
        weights = load_file(os.path.join(find_last_checkpoint(run_dir), "model.safetensors"))
        _unwrap(model).load_state_dict(weights, strict=True)
        saved = _optimizer_state(state_payload, state_tensors)
        # The run being resumed may have recorded its step or not: this run's Adam keeps its own mode.
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups):
            saved_group["capturable"], saved_group["fused"] = group["capturable"], group["fused"]
        optimizer.load_state_dict(saved)
        graph_ready_lr(optimizer, lr_tensors)
        scheduler.load_state_dict(state_payload["scheduler"])
        if use_scaler and state_payload["grad_scaler"]:
            scaler.load_state_dict(state_payload["grad_scaler"])
        start_epoch = state_payload["epoch"]
        global_step = state_payload["global_step"]
        best_dice = state_payload["best_val_dice"]
        best_epoch = state_payload["best_epoch"]
        rng = _rng_state_of(state_payload, state_tensors, ctx.rank)
        if rng is not None and state_payload.get("world_size") == ctx.world_size:
            _rng_restore(rng, generator, ctx.device)
        else:
            warnings.warn(f"resuming with {ctx.world_size} processes, the checkpoint had "
                          f"{state_payload.get('world_size')}: random streams restart from the seed")
        _log(ctx, f"[dermomamba] resuming {run_dir} at epoch {start_epoch + 1}/{cfg.epochs} "
                  f"(best validation Dice so far {best_dice:.4f} at epoch {best_epoch})")

    train_sampler = DistributedSampler(datasets["train"], num_replicas=ctx.world_size, rank=ctx.rank,
                                       shuffle=True, seed=cfg.seed, drop_last=True)
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(datasets["train"], batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True,
                              num_workers=cfg.workers, pin_memory=pin, persistent_workers=cfg.workers > 0)
    # Validation shards without padding (DistributedSampler would repeat images to even out the ranks).
    val_part = Subset(datasets["val"], list(range(ctx.rank, len(datasets["val"]), ctx.world_size)))
    val_loader = DataLoader(val_part, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.workers,
                            pin_memory=pin)

    logger = RunLogger(run_dir, start_epoch, cfg.tensorboard) if ctx.is_main else None
    progress = cfg.progress and ctx.is_main
    steps_here = 0
    interrupted = False
    epochs_done = start_epoch
    if ctx.is_main:
        parameters = sum(p.numel() for p in _unwrap(model).parameters())
        _log(ctx, f"[dermomamba] run folder {run_dir}\n[dermomamba] {cfg.model} ({parameters:,} parameters) at "
                  f"{cfg.img_size[0]}x{cfg.img_size[1]} on {ctx.device}"
                  + (f" x {ctx.world_size} processes" if ctx.distributed else "")
                  + f"; {len(datasets['train'])} training / {len(datasets['val'])} validation images; "
                    f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g}")
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            train_sampler.set_epoch(epoch)
            started = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            dice_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            batches = images_seen = 0
            iterator = train_loader
            if progress:
                from tqdm import tqdm
                iterator = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                                dynamic_ncols=True, leave=True)
            for batch in iterator:
                images, masks = batch_to_device(batch, ctx.device)
                if augment is not None:
                    images, masks = augment(images, masks, generator)
                if graphed_step is not None:
                    logits, loss = graphed_step(images, masks)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    logits, loss = _step_body(model, images, masks, criterion, scaler, optimizer, autocast)
                global_step += 1
                steps_here += 1
                batches += 1
                images_seen += images.shape[0]
                dice, _ = segmentation_scores(logits, masks)
                loss_sum += loss.detach().double()
                dice_sum += dice.mean()
                if progress and (batches % POSTFIX_EVERY == 0 or batches == len(train_loader)):
                    iterator.set_postfix(loss=f"{float(loss_sum) / batches:.4f}", dice=f"{float(dice_sum) / batches:.4f}")
                if cfg.max_steps is not None and steps_here >= cfg.max_steps:
                    raise _Interrupted()
            seconds = time.perf_counter() - started
            loss_total, dice_total, batch_total, image_total = _all_reduce_sum(
                [float(loss_sum), float(dice_sum), batches, images_seen], ctx)
            # The bare module: DDP's forward may broadcast buffers, a collective that would hang when the ranks'
            # validation shards differ in length.
            metrics = validate(_unwrap(model), val_loader, criterion, cfg, ctx, progress)
            lr = float(optimizer.param_groups[0]["lr"])
            scheduler.step(metrics["val_dice"])
            graph_ready_lr(optimizer, lr_tensors)
            improved = metrics["val_dice"] > best_dice
            if improved:
                best_dice, best_epoch = metrics["val_dice"], epoch + 1
            rng_states = [_rng_snapshot(generator, ctx.device)]
            if ctx.distributed:
                gathered = [None] * ctx.world_size
                dist.all_gather_object(gathered, rng_states[0])
                rng_states = gathered
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_total / max(batch_total, 1),
                   "train_dice": dice_total / max(batch_total, 1), **metrics, "epoch_seconds": seconds,
                   "train_images_per_second": image_total / max(seconds, 1e-9)}
            if ctx.is_main:
                core = _unwrap(model)
                if improved:
                    scratch = _scratch_dir(os.path.join(run_dir, "checkpoints", "best"))
                    core.save_pretrained(scratch)
                    with open(os.path.join(scratch, "metrics.json"), "w") as handle:
                        json.dump({"epoch": epoch + 1, **metrics}, handle, indent=1)
                    _swap_in(scratch, os.path.join(run_dir, "checkpoints", "best"))
                scratch = _scratch_dir(os.path.join(run_dir, "checkpoints", "last"))
                core.save_pretrained(scratch)
                _save_train_state(scratch, optimizer, scheduler, scaler, rng_states,
                                  {"epoch": epoch + 1, "global_step": global_step, "best_val_dice": best_dice,
                                   "best_epoch": best_epoch, "world_size": ctx.world_size, "metrics": row})
                _swap_in(scratch, os.path.join(run_dir, "checkpoints", "last"))
                logger.log(row)
                _log(ctx, f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} dice "
                          f"{row['train_dice']:.4f} | val loss {metrics['val_loss']:.4f} dice {metrics['val_dice']:.4f}"
                          f" iou {metrics['val_iou']:.4f}{' (best)' if improved else ''} | lr {lr:.2e} | {seconds:.1f} s")
            epochs_done = epoch + 1
            _barrier(ctx)
    except _Interrupted:
        interrupted = True
        _log(ctx, f"[dermomamba] stopped after {steps_here} steps (max_steps) without saving; "
                  f"resume with: dermomamba train --resume {run_dir}")
    finally:
        if logger is not None:
            logger.close()

    summary = {"run_dir": run_dir, "epochs_done": epochs_done, "global_step": global_step,
               "best_val_dice": best_dice, "best_epoch": best_epoch, "interrupted": interrupted}
    if interrupted or not ctx.is_main:
        return summary
    best_dir = os.path.join(run_dir, "checkpoints", "best")
    if cfg.evaluate_test and len(datasets["test"]) > 0 and os.path.isdir(best_dir):
        from .evaluate import evaluate_dataset, write_report
        from .predict import load_model
        best = load_model(best_dir, ctx.device, cfg.backend)
        report = evaluate_dataset(best, datasets["test"], ctx.device, batch_size=cfg.eval_batch_size,
                                  precision=cfg.precision, progress=cfg.progress, workers=cfg.workers)
        write_report(report, run_dir, prefix="test_metrics")
        summary["test"] = report["summary"]
        _log(ctx, "[dermomamba] best checkpoint on the test split (original resolution):\n" + report["table"])
    if cfg.predict_samples > 0 and os.path.isdir(best_dir):
        summary["predictions"] = _demo_predictions(cfg, datasets, best_dir, ctx)
    return summary


def _demo_predictions(cfg: TrainConfig, datasets: dict, best_dir: str, ctx: DistContext) -> str:
    """Write a few held-out images to predictions/images and predict their masks with the best checkpoint."""
    from PIL import Image

    from .predict import predict

    source = datasets["test"] if len(datasets["test"]) else datasets["val"]
    folder = os.path.join(cfg.output, "predictions")
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    for i in range(min(cfg.predict_samples, len(source))):
        item = source[i]
        Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(os.path.join(image_dir, f"{item['id']}.png"))
    written = predict(best_dir, [image_dir], os.path.join(folder, "masks"), device=str(ctx.device),
                      batch_size=cfg.eval_batch_size, overlay=True, overlay_dir=os.path.join(folder, "overlays"),
                      progress=False, workers=0, backend=cfg.backend)
    _log(ctx, f"[dermomamba] predicted {len(written)} masks into {folder}/masks (overlays in {folder}/overlays)")
    return folder
