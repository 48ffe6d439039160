"""The whole network on the published code path, and its comparison with ours (issue 9).

Shared by ``dermomamba benchmark --compare-published`` and ``benchmarks/bench_model.py``. Two paths, in
one process, on the same weights:

  ours       ``create_model(name)`` with backend auto (on a GPU: CUDA multiaxial scan, Triton CBAM,
             Triton distance transform in the loss; on the CPU: the C++ scan), Guide Fusion Loss
             ("published" mode).
  published  the same model with every SS2D core swapped for the published cross-scan
             (``published_core``: stack / transpose / flip copies, two einsums, fp32 casts, merge)
             around mamba-ssm's ``selective_scan_fn`` when it imports, every Cross-Scale Mamba Block
             for the published three calls of its shared VSSBlock, every CBAM for the published
             unfused module (``PublishedCBAM``: full-window avg_pool2d / max_pool2d), and the loss's
             distance transform on the host with scipy (``GuideFusionLoss(backend="reference")``).
             Without mamba-ssm the 1-D scan inside the published layout is ours (``published_scan``),
             and the table says so: such a run is NOT the mamba-ssm baseline.

mamba-ssm is looked for where Python finds it, then in a source checkout's ``.bench-deps/`` (the build
of benchmarks/prepare_bench_deps.sh; never committed).

Example (CPU, about half a minute):
    >>> results = run("dermomamba_tiny", (64, 64), "cpu", train_batches=(1,), infer_batches=(1,),
    ...               losses=("bce_dice",), warmup=0, repeats=1, launches=False, log=lambda line: None)
    >>> sorted(results["train"][0])  # doctest: +NORMALIZE_WHITESPACE
    ['batch', 'loss', 'memory_ratio', 'ours', 'precision', 'published', 'speedup']
    >>> print(to_markdown(stamp(results, "example")))  # doctest: +ELLIPSIS
    ### Whole network: ours vs the published code path (dermomamba_tiny, 64x64)
    ...
"""

from __future__ import annotations

import datetime
import os
import sys
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

import dermomamba_kernels as dk
from dermomamba_kernels.layers import CBAM, SS2D

from .benchmark import (LEARNING_RATE, bce_dice_loss, count_launches, device_description, git_commit,
                        make_forward, make_graphed_forward, make_graphed_train_step, make_train_step, median, peak_memory_bytes,
                        random_batch, time_ms)
from .loss import GuideFusionLoss
from .models import create_model
from .models.dermomamba import CrossScaleMambaBlock

# State size the published cross-scan splits x_proj's output with (VMamba v0 / DermoMamba: 16).
DSTATE = 16
NUM_DIRECTIONS = 4
# The source checkout holding this package (its .bench-deps/ is where the device build of mamba-ssm lives).
CHECKOUT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# mamba-ssm 2.3.2.post1 built on the GPU machine (shared/tools/mamba-ssm-on-device.md); never committed.
MAMBA_SSM_SUBDIRS = (os.path.join(".bench-deps", "prebuilt"), os.path.join(".bench-deps", "mamba_ssm-2.3.2.post1"))
MAMBA_SSM_DIRS = tuple(os.path.join(CHECKOUT_ROOT, sub) for sub in MAMBA_SSM_SUBDIRS)

PATHS = ("ours", "published")
LOSSES = ("gfl", "bce_dice")
LOSS_TITLES = {"gfl": "Guide Fusion", "bce_dice": "BCE+Dice"}
PUBLISHED_SCANS = ("auto", "mamba", "ours", "reference")
GIB = 2 ** 30

TRAIN_COLUMNS = ["batch", "precision", "loss", "ours ms", "published ms", "x faster", "ours peak GiB",
                 "published peak GiB", "mem ratio", "ours launches", "published launches"]
INFER_COLUMNS = ["batch", "precision", "ours ms", "published ms", "ours img/s", "published img/s", "x faster",
                 "ours peak GiB", "published peak GiB", "ours launches", "published launches"]
# With graphs=True: ours once more, the whole step recorded as one CUDA graph and replayed.
GRAPH_TRAIN_COLUMNS = ["ours graph ms", "x faster (graph)", "ours graph peak GiB", "mem ratio (graph)"]
GRAPH_INFER_COLUMNS = ["ours graph ms", "ours graph img/s", "x faster (graph)"]

# The GPU table at 192x256.
GPU_SETTINGS = {"train_batches": (4, 16), "infer_batches": (1, 16, 64), "precisions": ("fp32", "fp16"),
                "warmup": 3, "repeats": 10, "launches": True}
# The loop scan makes the published path's step about 4 s at 64x64 on the CPU and the profiler's trace
# of it gigabytes: one training batch, no launch counts, so that a run takes about a minute.
CPU_QUICK_SETTINGS = {"model": "dermomamba_tiny", "img_size": (64, 64), "train_batches": (1,),
                      "infer_batches": (1, 2), "precisions": ("fp32",), "warmup": 1, "repeats": 2,
                      "launches": False}


# ---- the published path, swapped in by wrapping modules (library code untouched) ----

def import_mamba_ssm(dirs=None):
    """(mamba_ssm's selective_scan_fn, None), or (None, why it is not importable).

    ``dirs``: folders put in front of sys.path first when they exist (default ``MAMBA_SSM_DIRS``, the
    checkout's .bench-deps/); an importable mamba_ssm elsewhere is found all the same.
    """
    for path in MAMBA_SSM_DIRS if dirs is None else dirs:
        if os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn, None
    except Exception as exc:  # noqa: BLE001 - any failure means "baseline not available", said in the output
        return None, f"{type(exc).__name__}: {exc}"


def published_core(scan_fn):
    """VMamba v0 forward_corev0 as the published DermoMamba code runs it, around `scan_fn`: four
    materialised direction copies, two einsums, one 1-D scan of 4 * D channels, merge copies.

    The returned function takes x (B, D, H, W) and an SS2D's x_proj_weight (4, R + 2 * 16, D),
    dt_projs_weight (4, D, R), dt_projs_bias (4, D), A_logs (4 * D, 16), Ds (4 * D) and returns the
    float32 sum of the four directions, (B, D, H, W). ``scan_fn`` has mamba-ssm's selective_scan_fn
    signature.

    Example:
        >>> from dermomamba_kernels import selective_scan_ref
        >>> layer = SS2D(8)
        >>> x = torch.randn(1, layer.d_inner, 4, 6)
        >>> published_core(selective_scan_ref)(x, layer.x_proj_weight, layer.dt_projs_weight,
        ...                                    layer.dt_projs_bias, layer.A_logs, layer.Ds).shape
        torch.Size([1, 16, 4, 6])
    """

    def run(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
        batch, dim, height, width = x.shape
        length = height * width
        rank = dt_projs_weight.shape[2]
        pair = torch.stack([x.reshape(batch, dim, length), x.transpose(2, 3).contiguous().reshape(batch, dim, length)],
                           dim=1)
        xs = torch.cat([pair, pair.flip(-1)], dim=1)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [rank, DSTATE, DSTATE], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)
        out = scan_fn(xs.float().reshape(batch, -1, length), dts.contiguous().float().reshape(batch, -1, length),
                      -torch.exp(A_logs.float()), Bs.float(), Cs.float(), Ds.float(),
                      delta_bias=dt_projs_bias.float().reshape(-1), delta_softplus=True)
        out = out.reshape(batch, NUM_DIRECTIONS, dim, length)
        back = out[:, 2:4].flip(-1)
        cols = (out[:, 1] + back[:, 1]).reshape(batch, dim, width, height).transpose(2, 3)
        return (out[:, 0] + back[:, 0]).reshape(batch, dim, height, width) + cols

    return run


class _PublishedChannelGate(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(channels, channels // reduction), nn.ReLU(),
                                 nn.Linear(channels // reduction, channels))

    def forward(self, x):
        window = (x.size(2), x.size(3))
        attention = self.mlp(F.avg_pool2d(x, window, stride=window)) + self.mlp(F.max_pool2d(x, window, stride=window))
        return x * torch.sigmoid(attention).unsqueeze(2).unsqueeze(3).expand_as(x)


class _PublishedBasicConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, stride=1, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class _PublishedSpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial = _PublishedBasicConv()

    def forward(self, x):
        pooled = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class PublishedCBAM(nn.Module):
    """The published module's op sequence (state_dict-compatible with ``CBAM``), unfused.

    Shapes: x (B, C, H, W) -> (B, C, H, W); ``channels`` // 16 hidden units in the channel MLP.

    Example:
        >>> PublishedCBAM(32)(torch.randn(2, 32, 5, 7)).shape
        torch.Size([2, 32, 5, 7])
    """

    def __init__(self, channels):
        super().__init__()
        self.ChannelGate = _PublishedChannelGate(channels)
        self.SpatialGate = _PublishedSpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


def published_scan_fn(choice: str, device: torch.device, mamba_ssm_dirs=None):
    """The 1-D scan inside the published layout: (fn with mamba-ssm's signature, label, is_mamba_ssm).

    "auto": mamba-ssm if it imports, else ours (our fastest 1-D scan on a GPU, the reference loop on
    the CPU, where the issue compares against the loop); "mamba" raises when mamba-ssm is missing.
    ``mamba_ssm_dirs``: where else to look for mamba-ssm (``import_mamba_ssm``'s ``dirs``).

    Example:
        >>> fn, label, is_mamba = published_scan_fn("auto", torch.device("cpu"))
        >>> label, is_mamba
        ('our reference loop (selective_scan_ref), NOT mamba-ssm', False)
    """
    if choice not in PUBLISHED_SCANS:
        raise ValueError(f"published_scan: expected one of {', '.join(PUBLISHED_SCANS)}, got {choice!r}")
    if choice in ("auto", "mamba") and device.type == "cuda":
        mamba_fn, error = import_mamba_ssm(mamba_ssm_dirs)
        if mamba_fn is not None:
            return mamba_fn, "mamba-ssm selective_scan_fn", True
        if choice == "mamba":
            raise dk.BackendUnavailableError(f"published_scan='mamba': mamba_ssm does not import ({error})")
    elif choice == "mamba":
        raise dk.BackendUnavailableError("published_scan='mamba': mamba-ssm's scan runs on CUDA only")
    backend = "reference" if choice == "reference" or (choice == "auto" and device.type != "cuda") else "auto"

    def ours_1d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return dk.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend=backend)

    label = ("our reference loop (selective_scan_ref), NOT mamba-ssm" if backend == "reference"
             else "our selective_scan_fn (backend auto), NOT mamba-ssm")
    return ours_1d, label, False


def published_cross_scale_forward(self, x):
    """The published Cross-Scale Mamba Block: the shared VSSBlock called once per branch (ours
    stacks the three branches along the batch axis and calls it once)."""
    x1, x2, x3, x4 = torch.chunk(x, 4, dim=1)
    scanned = [self.vss(dw(part).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
               for dw, part in ((self.dw1, x1), (self.dw2, x2), (self.dw3, x3))]
    return self.act(self.bn(torch.cat(scanned + [x4], dim=1)))


def to_published(model: nn.Module, scan_fn) -> nn.Module:
    """Swap, in place, every SS2D core for the published cross-scan around ``scan_fn``, every
    Cross-Scale Mamba Block for the published three calls of its shared VSSBlock, and every CBAM for
    the published unfused module (same state_dict); returns the model."""
    core = published_core(scan_fn)
    for module in model.modules():
        if isinstance(module, CrossScaleMambaBlock):
            module.forward = types.MethodType(published_cross_scale_forward, module)
        if isinstance(module, SS2D):
            if module.d_state != DSTATE:
                raise ValueError(f"published core: the published cross-scan is written for d_state="
                                 f"{DSTATE}, the model has {module.d_state}")

            def scan(self, x):
                return core(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)

            module.scan = types.MethodType(scan, module)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CBAM):
                published = PublishedCBAM(child.ChannelGate.mlp[1].in_features)
                published.load_state_dict(child.state_dict())
                setattr(parent, name, published.to(next(child.parameters()).device))
    return model


def build_paths(model_name: str, img_size, device: torch.device, published_scan: str = "auto", mamba_ssm_dirs=None):
    """Both models on the same weights plus their losses: {path: (model, {loss: criterion})}, info."""
    ours = create_model(model_name, img_size=tuple(img_size))
    scan_fn, scan_label, is_mamba = published_scan_fn(published_scan, device, mamba_ssm_dirs)
    published = create_model(model_name, img_size=tuple(img_size))
    published.load_state_dict(ours.state_dict())
    # Anything not swapped below runs its reference arithmetic, which is the published one.
    published.set_backend("reference")
    to_published(published, scan_fn)
    paths = {"ours": (ours.to(device), {"gfl": GuideFusionLoss("published"), "bce_dice": bce_dice_loss}),
             "published": (published.to(device), {"gfl": GuideFusionLoss("published", backend="reference"),
                                                  "bce_dice": bce_dice_loss})}
    return paths, {"published_scan": scan_label, "published_scan_is_mamba_ssm": is_mamba}


# ---- measuring ----

def measure(step, device, warmup, repeats, launches=True):
    times = time_ms(step, device, warmup=warmup, repeats=repeats)
    result = {"ms": median(times), "ms_all": times, "peak_bytes": peak_memory_bytes(step, device)}
    if launches:
        result["launches"], result["launches_of"] = count_launches(step, device)
    return result


def measure_graphed(build, device, warmup, repeats):
    """Capture (``build()`` returns the replaying callable) and time the replays. The peak covers the
    capture too: the graph's private memory pool is allocated then. A step that cannot be captured is
    reported with its error instead of stopping the run."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        replay = build()
    except Exception as error:  # noqa: BLE001 - recorded in the table, the other rows still run
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    times = time_ms(replay, device, warmup=warmup, repeats=repeats)
    torch.cuda.synchronize(device)
    return {"ms": median(times), "ms_all": times, "peak_bytes": torch.cuda.max_memory_allocated(device)}


def run(model_name="dermomamba", img_size=(192, 256), device="cuda", train_batches=(4, 16),
        infer_batches=(1, 16, 64), precisions=("fp32", "fp16"), losses=LOSSES, warmup=3, repeats=10,
        published_scan="auto", launches=True, log=print, mamba_ssm_dirs=None, graphs=False):
    """Measure both paths; returns {"info": ..., "train": [rows], "infer": [rows]}.

    Every row holds both paths' figures ({"ours": {...}, "published": {...}}) and the ratios
    published / ours (time) and ours / published (memory). With ``graphs`` (CUDA only) every row also
    holds "ours_graph": our step or forward recorded once as a CUDA graph and replayed
    (dermomamba.benchmark.make_graphed_train_step / make_graphed_forward); the published path stays
    eager, as its code runs (its loss reads the mask on the host every step).
    """
    device = torch.device(device)
    if graphs and device.type != "cuda":
        raise ValueError(f"graphs: CUDA graphs need a CUDA device, got device={device}")
    if device.type != "cuda":
        # autocast is a GPU matter here; on the CPU every row is fp32.
        precisions = ("fp32",)
    paths, info = build_paths(model_name, img_size, device, published_scan, mamba_ssm_dirs)
    initial = {path: {k: v.clone() for k, v in model.state_dict().items()} for path, (model, _) in paths.items()}
    info.update(model=model_name, img_size=list(img_size), device=device_description(device),
                torch=torch.__version__, warmup=warmup, repeats=repeats)
    results = {"info": info, "train": [], "infer": []}
    for batch in train_batches:
        images, masks = random_batch(batch, img_size, device)
        for precision in precisions:
            for loss in losses:
                row = {"batch": batch, "precision": precision, "loss": loss}
                for path, (model, criteria) in paths.items():
                    # Same starting weights and a fresh Adam for every row: its state is part of the peak.
                    model.load_state_dict(initial[path])
                    # Ours trains with PyTorch's fused Adam on CUDA (one kernel for all weights, as
                    # `dermomamba train` does); the published path with plain Adam, as its code does.
                    optimizer = (torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=True)
                                 if path == "ours" and device.type == "cuda" else None)
                    step = make_train_step(model, images, masks, criteria[loss], precision, optimizer)
                    row[path] = measure(step, device, warmup, repeats, launches)
                    del optimizer
                    del step
                    release(device)
                if graphs:
                    model, criteria = paths["ours"]
                    model.load_state_dict(initial["ours"])
                    row["ours_graph"] = measure_graphed(
                        lambda: make_graphed_train_step(model, images.clone(), masks.clone(), criteria[loss], precision),
                        device, warmup, repeats)
                    # The gradients live in the graph's pool: drop them with it.
                    model.zero_grad(set_to_none=True)
                    release(device)
                add_ratios(row)
                results["train"].append(row)
                log(f"train  batch {batch:3d} {precision} {loss:8s}: ours {row['ours']['ms']:9.2f} ms, published "
                    f"{row['published']['ms']:9.2f} ms, x{row['speedup']:.2f}")
    for batch in infer_batches:
        images, _ = random_batch(batch, img_size, device)
        for precision in precisions:
            row = {"batch": batch, "precision": precision}
            for path, (model, _) in paths.items():
                model.load_state_dict(initial[path])
                row[path] = measure(make_forward(model, images, precision), device, warmup, repeats, launches)
                row[path]["images_per_second"] = batch / (row[path]["ms"] / 1e3)
                release(device)
            if graphs:
                model, _ = paths["ours"]
                model.load_state_dict(initial["ours"])
                row["ours_graph"] = measure_graphed(lambda: make_graphed_forward(model, images.clone(), precision),
                                                    device, warmup, repeats)
                if "ms" in row["ours_graph"]:
                    row["ours_graph"]["images_per_second"] = batch / (row["ours_graph"]["ms"] / 1e3)
                release(device)
            add_ratios(row)
            results["infer"].append(row)
            log(f"infer  batch {batch:3d} {precision}: ours {row['ours']['images_per_second']:9.1f} img/s, "
                f"published {row['published']['images_per_second']:9.1f} img/s, x{row['speedup']:.2f}")
    return results


def add_ratios(row):
    ours, published = row["ours"], row["published"]
    row["speedup"] = published["ms"] / ours["ms"]
    row["memory_ratio"] = (ours["peak_bytes"] / published["peak_bytes"]
                           if ours["peak_bytes"] and published["peak_bytes"] else None)
    graphed = row.get("ours_graph")
    if graphed and "ms" in graphed:
        row["speedup_graph"] = published["ms"] / graphed["ms"]
        row["memory_ratio_graph"] = (graphed["peak_bytes"] / published["peak_bytes"]
                                     if published["peak_bytes"] else None)


def release(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- output ----

def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _gib(nbytes):
    return None if nbytes is None else nbytes / GIB


def has_graphs(results):
    return any("ours_graph" in r for r in results["train"] + results["infer"])


def _graph_cells(row, *fields):
    """Cells of the graph columns: the figures, or the capture error in the first cell."""
    graphed = row.get("ours_graph") or {}
    if "error" in graphed:
        return [f"capture failed: {graphed['error']}"] + ["-"] * (len(fields) - 1)
    return [field(row, graphed) for field in fields]


def train_table_rows(results):
    graphs = has_graphs(results)
    for r in results["train"]:
        o, p = r["ours"], r["published"]
        cells = [r["batch"], r["precision"], LOSS_TITLES[r["loss"]], _fmt(o["ms"]), _fmt(p["ms"]),
                 f"**{r['speedup']:.2f}x**", _fmt(_gib(o["peak_bytes"])), _fmt(_gib(p["peak_bytes"])),
                 _fmt(r["memory_ratio"]), _fmt(o.get("launches")), _fmt(p.get("launches"))]
        if graphs:
            cells += _graph_cells(r, lambda r, g: _fmt(g.get("ms")),
                                  lambda r, g: f"**{r['speedup_graph']:.2f}x**" if "speedup_graph" in r else "-",
                                  lambda r, g: _fmt(_gib(g.get("peak_bytes"))),
                                  lambda r, g: _fmt(r.get("memory_ratio_graph")))
        yield cells


def infer_table_rows(results):
    graphs = has_graphs(results)
    for r in results["infer"]:
        o, p = r["ours"], r["published"]
        cells = [r["batch"], r["precision"], _fmt(o["ms"]), _fmt(p["ms"]), _fmt(o["images_per_second"], 1),
                 _fmt(p["images_per_second"], 1), f"**{r['speedup']:.2f}x**", _fmt(_gib(o["peak_bytes"])),
                 _fmt(_gib(p["peak_bytes"])), _fmt(o.get("launches")), _fmt(p.get("launches"))]
        if graphs:
            cells += _graph_cells(r, lambda r, g: _fmt(g.get("ms")),
                                  lambda r, g: _fmt(g.get("images_per_second"), 1),
                                  lambda r, g: f"**{r['speedup_graph']:.2f}x**" if "speedup_graph" in r else "-")
        yield cells


def markdown_table(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(results):
    info = results["info"]
    launches_of = next((r["ours"].get("launches_of") for r in results["train"] + results["infer"]), None)
    height, width = info["img_size"]
    header = [f"### Whole network: ours vs the published code path ({info['model']}, {height}x{width})", "",
              f"- Device: {info['device']}; torch {info['torch']}; date {info['date']}; commit {info['commit']}",
              f"- Command: `{info['command']}`",
              f"- Published path's 1-D scan: {info['published_scan']}"
              + ("" if info["published_scan_is_mamba_ssm"] else " (**not the mamba-ssm baseline**)"),
              f"- Median of {info['repeats']} after {info['warmup']} warm-up; peak = max_memory_allocated over "
              f"one call (GPU only); launches = "
              + (f"{launches_of} in one call" if launches_of else "not counted (--no-launches or --cpu-quick)")
              + "; x faster = published / ours (same run); mem ratio = ours / published", ""]
    graphs = has_graphs(results)
    if graphs:
        header.insert(-1, "- ours graph = our step recorded once as a CUDA graph and replayed (fused capturable "
                          "Adam; under fp16 a GradScaler kept on the device); the published path runs eagerly, as "
                          "its code does; the graph columns' peak includes the capture")
    train_columns = TRAIN_COLUMNS + (GRAPH_TRAIN_COLUMNS if graphs else [])
    infer_columns = INFER_COLUMNS + (GRAPH_INFER_COLUMNS if graphs else [])
    parts = header + ["Training step (forward, loss, backward, Adam):", "",
                      markdown_table(train_columns, train_table_rows(results)), "",
                      "Inference (eval, no grad):", "", markdown_table(infer_columns, infer_table_rows(results)), ""]
    return "\n".join(parts)


def plot(results, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series = sorted({(r["precision"], r["loss"]) for r in results["train"]})
    for precision, loss in series:
        rows = sorted((r for r in results["train"] if (r["precision"], r["loss"]) == (precision, loss)),
                      key=lambda r: r["batch"])
        for name, style in (("ours", "-o"), ("published", "--s"), ("ours_graph", ":^")):
            points = [(r["batch"], r[name]["ms"]) for r in rows if "ms" in r.get(name, {})]
            if points:
                axis.plot(*zip(*points), style, label=f"{name.replace('_', ' ')}, {precision}, {LOSS_TITLES[loss]}")
    info = results["info"]
    axis.set_xlabel("batch size")
    axis.set_ylabel("training step (ms, median)")
    axis.set_yscale("log")
    axis.set_xticks(sorted({r["batch"] for r in results["train"]}))
    axis.set_title(f"{info['model']} {info['img_size'][0]}x{info['img_size'][1]} on {info['device']}\n"
                   f"commit {info['commit']}, {info['date']}", fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


# ---- one call: measure, stamp ----

def stamp(results, command: str):
    """Add the date, the commit and the command that made ``results`` to its info; returns ``results``."""
    results["info"].update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           commit=git_commit(CHECKOUT_ROOT), command=command)
    return results


def compare(model_name="dermomamba", img_size=(192, 256), device="cuda", command="", **settings):
    """``run`` on ``device`` with the usual precautions, stamped with ``command``; returns its results.

    On CUDA, TF32 matmuls are switched off for the process (the published code runs with PyTorch's
    defaults; TF32 would change both paths' einsums). ``settings`` are ``run``'s keyword arguments.

    Example:
        >>> results = compare("dermomamba_tiny", (64, 64), "cpu", command="doc", train_batches=(1,),
        ...                   infer_batches=(1,), losses=("bce_dice",), warmup=0, repeats=1, launches=False,
        ...                   log=lambda line: None)
        >>> results["info"]["command"], [row["batch"] for row in results["infer"]]
        ('doc', [1])
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    return stamp(run(model_name, tuple(img_size), device, **settings), command)
