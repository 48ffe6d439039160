"""Layer benchmark (issue 8): our drop-in layers against the same layers on mamba-ssm, one GPU, one run.

Rows (batch 16, 256x256 input, as the two networks build these layers):

  VM-UNet             SS2D and the whole VSSBlock (nn.LayerNorm pre-norm, SS2D v0 with d_state 16,
                      d_conv 3, expand 2, dt_rank "auto") at the four encoder stages: 96 channels at
                      64x64, 192 at 32x32, 384 at 16x16, 768 at 8x8.
                        ours       dermomamba_kernels.layers (the fused multiaxial_selective_scan)
                        mamba-ssm  the same module and weights with its SS2D core on VM-UNet's
                                   forward_corev0 (direction copies, einsums, fp32 casts,
                                   mamba_ssm's selective_scan_fn, merge; common.published_core)
  UltraLight-VM-UNet  the PVM layer at its six stages (24->32 at 32x32 ... 32->24 at 32x32): channels in
                      four chunks through one shared Mamba (d_model = channels / 4, L = H * W).
                        ours       PVMLayer around dermomamba_kernels.layers.Mamba
                        mamba-ssm  PVMLayer around mamba_ssm.modules.mamba_simple.Mamba (same state_dict;
                                   its unfused path, causal-conv1d not installed)

Each row is timed for "fwd" (eval, no grad: inference) and "fwd+bwd" (train mode, gradients of the
input and every parameter), in fp32 and under fp16 autocast: median of --repeats calls after --warmup,
CUDA events around each call (dermomamba.benchmark.time_ms). "x faster" = mamba-ssm ms / ours ms from the
same run. "out diff" = ||ours - mamba-ssm|| / ||mamba-ssm|| of one forward, a check that both sides
compute the same layer. PyTorch's default TF32 settings are left as they are (both sides share them).

Without mamba-ssm (``--baseline auto`` on a machine where it does not import, or ``--quick``), the
baseline runs the same layouts on our reference scan and the table says that it is NOT mamba-ssm.

Usage:
  python benchmarks/bench_layers.py [--markdown out.md] [--json out.json]   # GPU: the issue's table
  python benchmarks/bench_layers.py --quick                                 # CPU smoke: tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import shlex
import sys
import os

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
from common import git_commit  # noqa: E402
from dermomamba.benchmark import autocast_dtype, device_description, median, time_ms  # noqa: E402
from dermomamba_kernels.layers import SS2D, Mamba, VSSBlock  # noqa: E402
from layer_baselines import (ULTRALIGHT_PVM_STAGES, VMUNET_D_STATE, VMUNET_SS2D_STAGES, PVMLayer,  # noqa: E402
                             import_mamba_ssm_layers, use_published_core)

BATCH = 16
MODES = ("fwd", "fwd+bwd")
BASELINES = ("auto", "mamba", "reference")
COLUMNS = ["model", "layer", "shape", "precision", "pass", "ours ms", "mamba-ssm ms", "x faster", "out diff"]
SUMMARY_COLUMNS = ["model", "layer", "pass", "precision", "min x", "geomean x", "max x"]
# --quick: CPU-sized stand-ins with H != W (the real shapes take minutes on a CPU).
QUICK_BATCH = 2
QUICK_SS2D_STAGES = [(8, 6, 7)]
QUICK_PVM_STAGES = [("quick", 8, 12, 5, 6)]


# ---- the two sides of each row ----

def baseline_parts(choice: str, device: torch.device):
    """(scan_fn for the published SS2D core, Mamba class for the PVM layer, label, is_mamba_ssm)."""
    if choice not in BASELINES:
        raise ValueError(f"baseline: expected one of {', '.join(BASELINES)}, got {choice!r}")
    if choice != "reference" and device.type == "cuda":
        found = import_mamba_ssm_layers()
        if found.selective_scan_fn is not None and found.Mamba is not None:
            return found.selective_scan_fn, found.Mamba, "mamba-ssm (selective_scan_fn, mamba_simple.Mamba)", True
        if choice == "mamba":
            raise dk.BackendUnavailableError(f"baseline='mamba': mamba_ssm does not import "
                                             f"({found.scan_error or found.mamba_error})")
    elif choice == "mamba":
        raise dk.BackendUnavailableError("baseline='mamba': mamba-ssm's scan runs on CUDA only")

    def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
        return dk.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    backend="reference")

    return (reference_scan, functools.partial(Mamba, backend="reference"),
            "our reference scan (selective_scan_ref) in the same layouts", False)


def vmunet_layers(kind: str, d_model: int, backend: str, scan_fn, device):
    """(ours, baseline) on one set of weights: ``kind`` "SS2D" or "VSSBlock" as VM-UNet builds it."""
    def build(layer_backend):
        if kind == "SS2D":
            return SS2D(d_model, d_state=VMUNET_D_STATE, backend=layer_backend)
        # VM-UNet's VSSLayer hands nn.LayerNorm (eps 1e-5) to its blocks as the pre-norm.
        return VSSBlock(hidden_dim=d_model, norm_layer=nn.LayerNorm, d_state=VMUNET_D_STATE, backend=layer_backend)

    ours = build(backend).to(device)
    baseline = use_published_core(build(None), scan_fn).to(device)
    baseline.load_state_dict(ours.state_dict(), strict=True)
    return ours, baseline


def pvm_layers(input_dim: int, output_dim: int, backend: str, mamba_cls, device):
    ours = PVMLayer(input_dim, output_dim, Mamba, backend=backend).to(device)
    baseline = PVMLayer(input_dim, output_dim, mamba_cls).to(device)
    baseline.load_state_dict(ours.state_dict(), strict=True)
    return ours, baseline


# ---- measuring ----

def make_call(module, x, precision: str, mode: str):
    """One forward (eval, no grad) or forward + backward (train) of ``module`` on ``x``."""
    dtype = autocast_dtype(precision)
    device_type = x.device.type
    use_amp = dtype is not None

    def forward():
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=use_amp):
            return module(x)

    if mode == "fwd":
        module.eval()

        def call():
            with torch.no_grad():
                forward()
        return call
    if mode != "fwd+bwd":
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    module.train()
    x = x.detach().requires_grad_(True)
    with torch.no_grad():
        grad_out = torch.randn_like(forward())

    def call():
        module.zero_grad(set_to_none=True)
        x.grad = None
        forward().backward(grad_out)
    return call


def relative_difference(ours, baseline, x, precision):
    dtype = autocast_dtype(precision)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        a, b = ours.eval()(x).double(), baseline.eval()(x).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def measure_pair(ours, baseline, x, precision, mode, device, warmup, repeats, op):
    """Median ms of both sides, measured back to back, and the backend of ``op`` on our side."""
    result = {}
    for side, module in (("ours", ours), ("baseline", baseline)):
        times = time_ms(make_call(module, x, precision, mode), device, warmup=warmup, repeats=repeats)
        result[side] = median(times)
        if side == "ours":
            result["ours_backend"] = dk.last_backend(op)
    return result


def run(device="cuda", backend="auto", baseline="auto", precisions=("fp32", "fp16"), modes=MODES,
        models=("vmunet", "ultralight"), batch=BATCH, ss2d_stages=None, pvm_stages=None, warmup=5, repeats=30,
        log=print):
    """Every row: {"model", "layer", "shape", "precision", "mode", "ours_ms", "baseline_ms", "speedup",
    "rel_diff", "ours_backend"}; plus "info" about the run."""
    device = torch.device(device)
    ss2d_stages = VMUNET_SS2D_STAGES if ss2d_stages is None else ss2d_stages
    pvm_stages = ULTRALIGHT_PVM_STAGES if pvm_stages is None else pvm_stages
    scan_fn, mamba_cls, label, is_mamba = baseline_parts(baseline, device)
    info = {"device": device_description(device), "torch": torch.__version__, "backend": backend,
            "baseline": label, "baseline_is_mamba_ssm": is_mamba, "batch": batch, "warmup": warmup,
            "repeats": repeats}
    rows = []

    def add_rows(model, layer, shape, ours, base, x, op):
        for precision in precisions:
            diff = relative_difference(ours, base, x, precision)
            for mode in modes:
                got = measure_pair(ours, base, x, precision, mode, device, warmup, repeats, op)
                row = {"model": model, "layer": layer, "shape": shape, "precision": precision, "mode": mode,
                       "ours_ms": got["ours"], "baseline_ms": got["baseline"],
                       "speedup": got["baseline"] / got["ours"], "rel_diff": diff,
                       "ours_backend": got["ours_backend"]}
                rows.append(row)
                log(f"{model:18s} {layer:8s} {shape:28s} {precision} {mode:7s}: ours {row['ours_ms']:8.3f} ms, "
                    f"baseline {row['baseline_ms']:8.3f} ms, x{row['speedup']:.2f} (diff {diff:.1e})")
        release(device)

    if "vmunet" in models:
        for d_model, height, width in ss2d_stages:
            x = torch.randn(batch, height, width, d_model, device=device)
            for kind in ("VSSBlock", "SS2D"):
                ours, base = vmunet_layers(kind, d_model, backend, scan_fn, device)
                add_rows("VM-UNet", kind, f"B{batch} {d_model}ch {height}x{width}", ours, base, x,
                         "multiaxial_selective_scan")
                del ours, base
    if "ultralight" in models:
        for name, input_dim, output_dim, height, width in pvm_stages:
            x = torch.randn(batch, input_dim, height, width, device=device)
            ours, base = pvm_layers(input_dim, output_dim, backend, mamba_cls, device)
            shape = (f"B{batch} {input_dim}->{output_dim}ch {height}x{width} "
                     f"(Mamba {input_dim // 4}ch L{height * width})")
            add_rows("UltraLight-VM-UNet", f"PVM {name}", shape, ours, base, x, "selective_scan")
            del ours, base
    info["ours_backends"] = sorted({r["ours_backend"] for r in rows if r["ours_backend"]})
    return {"info": info, "rows": rows}


def release(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- output ----

def markdown_table(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(rows):
    groups = {}
    for r in rows:
        layer = "PVM" if r["layer"].startswith("PVM") else r["layer"]
        groups.setdefault((r["model"], layer, r["mode"], r["precision"]), []).append(r["speedup"])
    for (model, layer, mode, precision), values in groups.items():
        geomean = math.exp(sum(math.log(v) for v in values) / len(values))
        yield [model, layer, mode, precision, f"{min(values):.2f}", f"**{geomean:.2f}**", f"{max(values):.2f}"]


def to_markdown(results):
    info = results["info"]
    is_mamba = info["baseline_is_mamba_ssm"]
    baseline_note = "" if is_mamba else " (**NOT mamba-ssm: not the issue's baseline**)"
    columns = COLUMNS if is_mamba else [c.replace("mamba-ssm", "baseline") for c in COLUMNS]
    header = ["### Layers: ours vs the same layers on mamba-ssm (issue 8)", "",
              f"- Device: {info['device']}; torch {info['torch']}; date {info['date']}; commit {info['commit']}",
              f"- Command: `{info['command']}`",
              f"- Ours: backend {info['backend']!r} (ran: {', '.join(info['ours_backends']) or '-'}); "
              f"baseline: {info['baseline']}{baseline_note}",
              f"- Median of {info['repeats']} calls after {info['warmup']} warm-up, CUDA events (perf_counter on "
              "the CPU); fwd = eval + no_grad; fwd+bwd = gradients of the input and every parameter; "
              "fp16 = autocast; x faster = baseline ms / ours ms (same run); out diff = "
              "||ours - baseline|| / ||baseline|| of one forward", ""]
    table = [[r["model"], r["layer"], r["shape"], r["precision"], r["mode"], f"{r['ours_ms']:.3f}",
              f"{r['baseline_ms']:.3f}", f"**{r['speedup']:.2f}x**", f"{r['rel_diff']:.1e}"]
             for r in results["rows"]]
    parts = header + [markdown_table(columns, table), "", "Summary over the stages:", "",
                      markdown_table(SUMMARY_COLUMNS, summary_rows(results["rows"])), ""]
    return "\n".join(parts)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cuda, cpu")
    parser.add_argument("--backend", default="auto", help="our layers' scan backend (auto, cuda, triton, cpu, "
                                                          "reference)")
    parser.add_argument("--baseline", default="auto", choices=BASELINES,
                        help="auto: mamba-ssm if it imports, else our reference scan (labelled); mamba: required")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--models", nargs="+", default=["vmunet", "ultralight"], choices=("vmunet", "ultralight"))
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true",
                        help="CPU smoke run in seconds: batch 2, one tiny SS2D / VSSBlock and PVM shape, fp32, "
                             "1 call each, baseline on our reference scan")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the markdown tables here")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    ss2d_stages = pvm_stages = None
    if args.quick:
        args.device, args.baseline, args.precisions = "cpu", "reference", ["fp32"]
        args.batch, args.warmup, args.repeats = QUICK_BATCH, 0, 1
        ss2d_stages, pvm_stages = QUICK_SS2D_STAGES, QUICK_PVM_STAGES
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    results = run(device, args.backend, args.baseline, tuple(args.precisions), tuple(args.modes), tuple(args.models),
                  args.batch, ss2d_stages, pvm_stages, args.warmup, args.repeats,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    results["info"].update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           commit=git_commit(),
                           command=" ".join(["python"] + [shlex.quote(a) for a in
                                                          ["benchmarks/bench_layers.py"] + argv]))
    text = to_markdown(results)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
