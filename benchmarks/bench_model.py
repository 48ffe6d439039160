"""Whole-network benchmark (issue 9): our DermoMamba against the same network on the published code path.

Two paths, in one process, on the same weights:

  ours       ``create_model("dermomamba")`` with backend auto (on a GPU: CUDA multiaxial scan, Triton
             CBAM, Triton distance transform in the loss; on the CPU: the C++ scan), Guide Fusion Loss
             ("published" mode).
  published  the same model with every SS2D core swapped for the published cross-scan (stack /
             transpose / flip copies, two einsums, fp32 casts, merge: ``published_core``, the one
             bench_scan.py times) around mamba-ssm's ``selective_scan_fn`` when it imports, every CBAM
             for the published unfused module (full-window avg_pool2d / max_pool2d: ``PublishedCBAM``,
             the one bench_cbam.py times), and the loss's distance transform on the host with scipy
             (``GuideFusionLoss(backend="reference")``). Without mamba-ssm the 1-D scan inside the
             published layout is ours (``--published-scan``), and the table says so: such a run is NOT
             the mamba-ssm baseline.

Reported per path: training step (forward, loss, backward, Adam) at each batch of ``--train-batches``,
each precision of ``--precisions`` (autocast; GPU only) and each loss (Guide Fusion Loss, plain
BCE + Dice); inference images/s at each batch of ``--infer-batches``; peak memory
(torch.cuda.max_memory_allocated over one call); kernel launches of one call (torch.profiler);
and ours / published ratios from the same run. Both paths of a row are measured back to back.

The paths, the measuring and the tables are dermomamba.published_path's (``dermomamba benchmark
--compare-published`` runs the same comparison from an installed package); this script is their
command line.

Usage:
  python benchmarks/bench_model.py                         # GPU: the issue's table at 192x256
  python benchmarks/bench_model.py --cpu-quick             # CPU: tiny model, 64x64, ours vs the loop
  ... [--json out.json] [--markdown out.md] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# Appended, not prepended: an installed dermomamba (with its compiled _C) wins over the source tree.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from common import MAMBA_SSM_DIRS  # noqa: E402
# Re-exported: tests and notebooks use bench_model.run, build_paths, to_markdown... as before the move.
from dermomamba.published_path import (CPU_QUICK_SETTINGS, GPU_SETTINGS, INFER_COLUMNS, LOSS_TITLES,  # noqa: E402,F401
                                       LOSSES, PATHS, PUBLISHED_SCANS, TRAIN_COLUMNS, add_ratios, build_paths,
                                       compare, infer_table_rows, markdown_table, measure, plot,
                                       published_cross_scale_forward, published_scan_fn, release, run,
                                       to_markdown, to_published, train_table_rows)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dermomamba")
    parser.add_argument("--img-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cuda, cpu")
    parser.add_argument("--train-batches", type=int, nargs="+", default=list(GPU_SETTINGS["train_batches"]))
    parser.add_argument("--infer-batches", type=int, nargs="+", default=list(GPU_SETTINGS["infer_batches"]))
    parser.add_argument("--precisions", nargs="+", default=list(GPU_SETTINGS["precisions"]),
                        choices=("fp32", "fp16", "bf16"), help="autocast precisions (GPU; the CPU runs fp32 only)")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--warmup", type=int, default=GPU_SETTINGS["warmup"])
    parser.add_argument("--repeats", type=int, default=GPU_SETTINGS["repeats"])
    parser.add_argument("--published-scan", default="auto", choices=PUBLISHED_SCANS,
                        help="1-D scan inside the published layout: auto (mamba-ssm if it imports, else ours: "
                             "the reference loop on the CPU), mamba (required), ours, reference")
    parser.add_argument("--no-launches", dest="launches", action="store_false", help="skip the profiler counts")
    parser.add_argument("--cpu-quick", action="store_true",
                        help="CPU run in about a minute: tiny model, 64x64, batch 1 (inference 1, 2), fp32, no "
                             "launch counts; ours (C++ scan) vs the published layout on the reference loop")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--graphs", action="store_true",
                        help="also time our training step and forward recorded once as a CUDA graph and replayed")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG of step time per batch size here")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    if args.cpu_quick:
        args.device = "cpu"
        for name, value in CPU_QUICK_SETTINGS.items():
            setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    command = " ".join(["python"] + [shlex.quote(a) for a in ["benchmarks/bench_model.py"] + argv])
    results = compare(args.model, tuple(args.img_size), device, command, train_batches=args.train_batches,
                      infer_batches=args.infer_batches, precisions=tuple(args.precisions), losses=tuple(args.losses),
                      warmup=args.warmup, repeats=args.repeats, published_scan=args.published_scan,
                      launches=args.launches, graphs=args.graphs, log=lambda line: print(line, file=sys.stderr, flush=True),
                      # This checkout's .bench-deps/, also when an installed dermomamba is the one imported.
                      mamba_ssm_dirs=MAMBA_SSM_DIRS)
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
