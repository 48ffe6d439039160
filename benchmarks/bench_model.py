"""Whole-network benchmark (issue 9): our DermoMamba against the same network on the published code path.

Two paths, in one process, on the same weights:

  ours       ``create_model("dermomamba")`` with backend auto (on a GPU: CUDA multiaxial scan, Triton
             CBAM, Triton distance transform in the loss; on the CPU: the C++ scan), Guide Fusion Loss
             ("published" mode).
  published  the same model with every SS2D core swapped for the published cross-scan (stack /
             transpose / flip copies, two einsums, fp32 casts, merge: ``published_core`` of
             benchmarks/common.py, the one bench_scan.py times) around mamba-ssm's ``selective_scan_fn``
             when it imports, every CBAM for the published unfused module (full-window avg_pool2d /
             max_pool2d: ``PublishedCBAM`` of bench_cbam.py), and the loss's distance transform on the host with scipy
             (``GuideFusionLoss(backend="reference")``). Without mamba-ssm the 1-D scan inside the
             published layout is ours (``--published-scan``), and the table says so: such a run is NOT
             the mamba-ssm baseline.

Reported per path: training step (forward, loss, backward, Adam) at each batch of ``--train-batches``,
each precision of ``--precisions`` (autocast; GPU only) and each loss (Guide Fusion Loss, plain
BCE + Dice); inference images/s at each batch of ``--infer-batches``; peak memory
(torch.cuda.max_memory_allocated over one call); kernel launches of one call (torch.profiler);
and ours / published ratios from the same run. Both paths of a row are measured back to back.

Usage:
  python benchmarks/bench_model.py                         # GPU: the issue's table at 192x256
  python benchmarks/bench_model.py --cpu-quick             # CPU: tiny model, 64x64, ours vs the loop
  ... [--json out.json] [--markdown out.md] [--plot out.png]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import types

import torch
import torch.nn as nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# Appended, not prepended: an installed dermomamba (with its compiled _C) wins over the source tree.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import dermomamba_kernels as dk  # noqa: E402
from bench_cbam import PublishedCBAM  # noqa: E402
from common import DSTATE as PUBLISHED_CORE_DSTATE, git_commit, import_mamba_ssm, published_core  # noqa: E402
from dermomamba.benchmark import (bce_dice_loss, count_launches, device_description, make_forward,  # noqa: E402
                                  make_train_step, median, peak_memory_bytes, random_batch, time_ms)
from dermomamba.loss import GuideFusionLoss  # noqa: E402
from dermomamba.models import create_model  # noqa: E402
from dermomamba.models.dermomamba import CrossScaleMambaBlock  # noqa: E402
from dermomamba_kernels.layers import CBAM, SS2D  # noqa: E402

PATHS = ("ours", "published")
LOSSES = ("gfl", "bce_dice")
LOSS_TITLES = {"gfl": "Guide Fusion", "bce_dice": "BCE+Dice"}
PUBLISHED_SCANS = ("auto", "mamba", "ours", "reference")
GIB = 2 ** 30

TRAIN_COLUMNS = ["batch", "precision", "loss", "ours ms", "published ms", "x faster", "ours peak GiB",
                 "published peak GiB", "mem ratio", "ours launches", "published launches"]
INFER_COLUMNS = ["batch", "precision", "ours ms", "published ms", "ours img/s", "published img/s", "x faster",
                 "ours peak GiB", "published peak GiB", "ours launches", "published launches"]


# ---- the published path, swapped in by wrapping modules (library code untouched) ----

def published_scan_fn(choice: str, device: torch.device):
    """The 1-D scan inside the published layout: (fn with mamba-ssm's signature, label, is_mamba_ssm).

    "auto": mamba-ssm if it imports, else ours (our fastest 1-D scan on a GPU, the reference loop on
    the CPU, where the issue compares against the loop); "mamba" raises when mamba-ssm is missing.
    """
    if choice not in PUBLISHED_SCANS:
        raise ValueError(f"published_scan: expected one of {', '.join(PUBLISHED_SCANS)}, got {choice!r}")
    if choice in ("auto", "mamba") and device.type == "cuda":
        mamba_fn, error = import_mamba_ssm()
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
            if module.d_state != PUBLISHED_CORE_DSTATE:
                raise ValueError(f"published core: benchmarks/common.py's cross-scan is written for d_state="
                                 f"{PUBLISHED_CORE_DSTATE}, the model has {module.d_state}")

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


def build_paths(model_name: str, img_size, device: torch.device, published_scan: str = "auto"):
    """Both models on the same weights plus their losses: {path: (model, {loss: criterion})}, info."""
    ours = create_model(model_name, img_size=tuple(img_size))
    scan_fn, scan_label, is_mamba = published_scan_fn(published_scan, device)
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


def run(model_name="dermomamba", img_size=(192, 256), device="cuda", train_batches=(4, 16),
        infer_batches=(1, 16, 64), precisions=("fp32", "fp16"), losses=LOSSES, warmup=3, repeats=10,
        published_scan="auto", launches=True, log=print):
    """Measure both paths; returns {"info": ..., "train": [rows], "infer": [rows]}.

    Every row holds both paths' figures ({"ours": {...}, "published": {...}}) and the ratios
    published / ours (time) and ours / published (memory).
    """
    device = torch.device(device)
    if device.type != "cuda":
        # autocast is a GPU matter here; on the CPU every row is fp32.
        precisions = ("fp32",)
    paths, info = build_paths(model_name, img_size, device, published_scan)
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
                    step = make_train_step(model, images, masks, criteria[loss], precision)
                    row[path] = measure(step, device, warmup, repeats, launches)
                    del step
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


def train_table_rows(results):
    for r in results["train"]:
        o, p = r["ours"], r["published"]
        yield [r["batch"], r["precision"], LOSS_TITLES[r["loss"]], _fmt(o["ms"]), _fmt(p["ms"]),
               f"**{r['speedup']:.2f}x**", _fmt(_gib(o["peak_bytes"])), _fmt(_gib(p["peak_bytes"])),
               _fmt(r["memory_ratio"]), _fmt(o.get("launches")), _fmt(p.get("launches"))]


def infer_table_rows(results):
    for r in results["infer"]:
        o, p = r["ours"], r["published"]
        yield [r["batch"], r["precision"], _fmt(o["ms"]), _fmt(p["ms"]), _fmt(o["images_per_second"], 1),
               _fmt(p["images_per_second"], 1), f"**{r['speedup']:.2f}x**", _fmt(_gib(o["peak_bytes"])),
               _fmt(_gib(p["peak_bytes"])), _fmt(o.get("launches")), _fmt(p.get("launches"))]


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
    parts = header + ["Training step (forward, loss, backward, Adam):", "",
                      markdown_table(TRAIN_COLUMNS, train_table_rows(results)), "",
                      "Inference (eval, no grad):", "", markdown_table(INFER_COLUMNS, infer_table_rows(results)), ""]
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
        batches = [r["batch"] for r in rows]
        for name, style in (("ours", "-o"), ("published", "--s")):
            axis.plot(batches, [r[name]["ms"] for r in rows], style,
                      label=f"{name}, {precision}, {LOSS_TITLES[loss]}")
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


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dermomamba")
    parser.add_argument("--img-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cuda, cpu")
    parser.add_argument("--train-batches", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16", "bf16"),
                        help="autocast precisions (GPU; the CPU runs fp32 only)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--published-scan", default="auto", choices=PUBLISHED_SCANS,
                        help="1-D scan inside the published layout: auto (mamba-ssm if it imports, else ours: "
                             "the reference loop on the CPU), mamba (required), ours, reference")
    parser.add_argument("--no-launches", dest="launches", action="store_false", help="skip the profiler counts")
    parser.add_argument("--cpu-quick", action="store_true",
                        help="CPU run in about a minute: tiny model, 64x64, batch 1 (inference 1, 2), fp32, no "
                             "launch counts; ours (C++ scan) vs the published layout on the reference loop")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG of step time per batch size here")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    if args.cpu_quick:
        args.model, args.img_size, args.device = "dermomamba_tiny", (64, 64), "cpu"
        # The loop scan makes the published path's step about 4 s here and the profiler's trace of it
        # gigabytes: one training batch, no launch counts, so that the run takes about a minute.
        args.train_batches, args.infer_batches, args.precisions = [1], [1, 2], ["fp32"]
        args.warmup, args.repeats, args.launches = 1, 2, False
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        # The published code runs with PyTorch's defaults; TF32 would change both paths' einsums.
        torch.backends.cuda.matmul.allow_tf32 = False
    results = run(args.model, tuple(args.img_size), device, args.train_batches, args.infer_batches,
                  tuple(args.precisions), tuple(args.losses), args.warmup, args.repeats, args.published_scan,
                  args.launches, log=lambda line: print(line, file=sys.stderr, flush=True))
    results["info"].update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           commit=git_commit(),
                           command=" ".join(["python"] + [shlex.quote(a) for a in
                                                          ["benchmarks/bench_model.py"] + argv]))
    text = to_markdown(results)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
