"""The ``dermomamba`` command: train, evaluate, predict, info, benchmark.

    dermomamba train                                  # no data: a short demo on the synthetic set
    dermomamba train --data /data/isic2018            # the published recipe on ISIC 2018 Task 1
    dermomamba train --resume runs/dermomamba-...     # continue a stopped run exactly
    torchrun --nproc_per_node=4 -m dermomamba.cli train --data /data/isic2018   # DistributedDataParallel
    dermomamba evaluate -c runs/x --data /data/PH2Dataset
    dermomamba evaluate --predictions out/ --truth /data/isic2018
    dermomamba predict -c runs/x photos/ -o out/ --overlay
    dermomamba info --model dermomamba --img-size 192 256
    dermomamba benchmark --model dermomamba --batch-size 4
    dermomamba benchmark --compare-published          # whole network: ours vs the published code path

Every ``train`` option is a field of :class:`dermomamba.config.TrainConfig`; ``--config file.yaml`` sets any of
them, flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

# Help text of each training option; the flag is the field name with dashes.
TRAIN_HELP = {
    "data": "data folder (ISIC 2018 Task 1, PH2, or images/ + masks/); 'synthetic' for the built-in set with the "
            "full recipe; omit for a short synthetic demo",
    "layout": "data layout: auto, isic2018, ph2, folder (default: auto)",
    "split": "auto (published for ISIC 2018, else random), published, random, official (ISIC's own "
             "Training/Validation/Test folders), or a split.json file",
    "val_fraction": "validation fraction of a random split (default 0.1)",
    "test_fraction": "test fraction of a random split (default 0.1)",
    "split_seed": "seed of a random split (default 0)",
    "synthetic_train": "synthetic training images", "synthetic_val": "synthetic validation images",
    "synthetic_test": "synthetic test images", "synthetic_seed": "seed of the synthetic images",
    "cache_dir": "folder of the preprocessed (resized, memory-mapped) data cache; 'none' to decode every epoch",
    "workers": "data loader worker processes",
    "augment": "the published augmentations (on the training device)",
    "model": "model name: dermomamba (published) or dermomamba_tiny",
    "img_size": "model input height and width, divisible by 32 (default 192 256)",
    "backend": "selective-scan backend: auto, cuda, triton, cpu, reference",
    "epochs": "epochs (default 200)", "batch_size": "training batch per process (default 4)",
    "eval_batch_size": "validation batch (default 1, as published)",
    "lr": "Adam learning rate (default 1e-4)", "weight_decay": "Adam weight decay (default 0)",
    "lr_factor": "ReduceLROnPlateau factor on validation Dice (default 0.5)",
    "lr_patience": "ReduceLROnPlateau patience in epochs (default 5)",
    "loss": "Guide Fusion Loss mode: published (the released code's) or per_image",
    "precision": "CUDA autocast precision: fp16 (published), bf16 or fp32",
    "seed": "training seed (initialisation, shuffling, augmentation)",
    "device": "auto, cpu, cuda, cuda:1 ... (under torchrun: the local rank's GPU)",
    "output": "run folder (default runs/dermomamba-<date>-<time>)",
    "threads": "CPU threads for torch (default: torch's choice; 1 helps on a machine busy with other work)",
    "progress": "progress bars", "tensorboard": "TensorBoard event files",
    "evaluate_test": "evaluate the best checkpoint on the test split at the end",
    "predict_samples": "after training, predict masks for this many held-out images into <run>/predictions",
    "cuda_graphs": "record the training step (forward, loss, backward, Adam) once as a CUDA graph and replay it: "
                   "no per-kernel launch cost (one CUDA device; not under torchrun)",
    "max_steps": "stop after this many optimiser steps without saving, as a kill would (for testing --resume)",
}


def _add_train_options(parser: argparse.ArgumentParser):
    from .config import TrainConfig

    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        help_text = TRAIN_HELP.get(field.name, "")
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif field.name == "img_size":
            parser.add_argument(flag, dest=field.name, type=int, nargs=2, metavar=("H", "W"),
                                default=argparse.SUPPRESS, help=help_text)
        else:
            kind = {"int": int, "float": float, "Optional[int]": int}.get(str(field.type), str)
            parser.add_argument(flag, dest=field.name, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--config", help="YAML file of training options (flags override it)")
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    parser.add_argument("-o", dest="output", default=argparse.SUPPRESS, help="same as --output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermomamba", description="DermoMamba skin-lesion segmentation.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    train = commands.add_parser("train", help="train a model (no data: a short synthetic demo)",
                                description="Train with the published recipe (Adam 1e-4, ReduceLROnPlateau on "
                                            "validation Dice, 200 epochs, batch 4, fp16, 192x256, Guide Fusion "
                                            "Loss). With no data: a short demo on the synthetic set.")
    _add_train_options(train)

    evaluate = commands.add_parser("evaluate", help="metrics of a checkpoint on data, or of predicted masks",
                                   description="Per-image mean and pooled metrics at each image's original "
                                               "resolution, printed and written as JSON and CSV.")
    evaluate.add_argument("-c", "--checkpoint", help="run folder, saved model folder, or published .pth/.ckpt")
    evaluate.add_argument("--data", help="data folder (any layout); default with a run folder: its test split")
    evaluate.add_argument("--layout", default="auto", help="auto, isic2018, ph2, folder")
    evaluate.add_argument("--subset", default="Training", help="ISIC 2018 subset: Training, Validation, Test")
    evaluate.add_argument("--part", default="all", choices=("all", "train", "val", "test"),
                          help="evaluate only these ids of the split file")
    evaluate.add_argument("--split-file", help="split.json (default: the run folder's)")
    evaluate.add_argument("--predictions", help="folder of predicted masks (<id>_segmentation.png)")
    evaluate.add_argument("--truth", help="ground truth: a mask folder or a data folder")
    evaluate.add_argument("--model-resolution", action="store_true",
                          help="also report metrics at the model resolution, as the paper's code did")
    evaluate.add_argument("--no-hd95", dest="hd95", action="store_false", help="skip HD95 (faster)")
    evaluate.add_argument("-o", "--output", default="evaluation", help="folder for metrics.json/.csv")
    evaluate.add_argument("--name", default="metrics", help="file name stem of the written tables")
    _add_runtime_options(evaluate, batch_size=1)

    predict = commands.add_parser("predict", help="predict masks for images",
                                  description="0/255 PNG masks at each image's original resolution, named "
                                              "<id>_segmentation.png (what the ISIC scorer expects).")
    predict.add_argument("-c", "--checkpoint", required=True,
                         help="run folder, saved model folder, or published .pth/.ckpt")
    predict.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    predict.add_argument("-o", "--output", default="predictions", help="folder for the masks (default predictions)")
    predict.add_argument("--overlay", action="store_true", help="also write contour overlays to <output>/overlays")
    predict.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    predict.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"),
                         help="model size, only for a published checkpoint that does not tell")
    _add_runtime_options(predict, batch_size=4)

    info = commands.add_parser("info", help="parameters and FLOPs of a model")
    info.add_argument("--model", default="dermomamba", help="model name (default dermomamba)")
    info.add_argument("--img-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    info.add_argument("-c", "--checkpoint", help="report on this checkpoint's model instead")
    info.add_argument("--json", action="store_true", help="print JSON")

    bench = commands.add_parser(
        "benchmark", help="time a forward pass and a training step on this device, or (--compare-published) the "
                          "whole network against the published code path",
        description="Time a forward pass and a training step of our model on this device. With "
                    "--compare-published: the whole network, ours against the same network on the published "
                    "code path (mamba-ssm's selective_scan_fn in the published cross-scan when it imports, else our "
                    "scan in that layout, which the table says; unfused CBAM; the scipy distance transform in the "
                    "Guide Fusion Loss), in one process on the same weights: training step per batch, precision "
                    "and loss, inference images/s, peak memory, launches and the ratios, as a markdown table "
                    "(benchmarks/bench_model.py's). On the CPU the published path's scan is the reference loop and "
                    "the defaults are bench_model.py --cpu-quick's (batch 1, inference 1 and 2, fp32, 1 warm-up, "
                    "2 timed, no launch counts); give --model dermomamba_tiny --img-size 64 64 for a run of about "
                    "a minute.")
    bench.add_argument("--model", default="dermomamba")
    bench.add_argument("--img-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    bench.add_argument("--batch-size", type=int, default=4)
    bench.add_argument("--steps", type=int, default=None,
                       help="timed iterations (default 10; --compare-published on the CPU: 2)")
    bench.add_argument("--warmup", type=int, default=None,
                       help="untimed iterations first (default 3; --compare-published on the CPU: 1)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    bench.add_argument("--backend", default=None)
    bench.add_argument("--json", action="store_true", help="print JSON")
    compare = bench.add_argument_group("whole network against the published code path")
    compare.add_argument("--compare-published", action="store_true",
                         help="compare ours with the published code path (instead of timing ours alone)")
    compare.add_argument("--train-batches", type=int, nargs="+", default=None,
                         help="training-step batches (default 4 16; CPU: 1)")
    compare.add_argument("--infer-batches", type=int, nargs="+", default=None,
                         help="inference batches (default 1 16 64; CPU: 1 2)")
    compare.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "fp16", "bf16"),
                         help="autocast precisions (default fp32 fp16; the CPU runs fp32 only)")
    compare.add_argument("--losses", nargs="+", default=None, choices=("gfl", "bce_dice"),
                         help="losses of the training step: gfl (Guide Fusion), bce_dice (default both)")
    compare.add_argument("--published-scan", default="auto", choices=("auto", "mamba", "ours", "reference"),
                         help="1-D scan inside the published layout: auto (mamba-ssm if it imports, else ours: "
                              "the reference loop on the CPU), mamba (required), ours, reference")
    compare.add_argument("--no-launches", dest="launches", action="store_false", default=None,
                         help="skip the profiler's launch counts (never counted on the CPU)")
    compare.add_argument("--graphs", action="store_true", default=None,
                         help="also time our step and forward recorded once as a CUDA graph and replayed (GPU)")
    return parser


def _add_runtime_options(parser, batch_size: int):
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"),
                        help="CUDA autocast precision (default fp16)")
    parser.add_argument("--backend", default=None, help="selective-scan backend")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _run_train(args) -> int:
    from .config import resolve_config
    from .train import resume_config, train

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume")}
    if isinstance(flags.get("cache_dir"), str) and flags["cache_dir"].lower() == "none":
        flags["cache_dir"] = None
    if args.resume:
        cfg = resume_config(args.resume, flags, args.config)
    else:
        cfg = resolve_config(flags, args.config)
    started = time.perf_counter()
    summary = train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:
        minutes = (time.perf_counter() - started) / 60
        print(f"[dermomamba] done in {minutes:.1f} min; run folder: {summary['run_dir']} "
              f"(best validation Dice {summary['best_val_dice']:.4f})", file=sys.stderr)
    return 0


def _run_evaluate(args) -> int:
    from .evaluate import evaluate_checkpoint, evaluate_folders, write_report

    if args.predictions or args.truth:
        if not (args.predictions and args.truth):
            raise ValueError("evaluate: --predictions and --truth go together")
        if args.checkpoint:
            raise ValueError("evaluate: give either --checkpoint or --predictions/--truth, not both")
        report = evaluate_folders(args.predictions, args.truth, layout=args.layout, subset=args.subset,
                                  progress=args.progress, with_hd95=args.hd95)
    elif args.checkpoint:
        report = evaluate_checkpoint(args.checkpoint, args.data, layout=args.layout, subset=args.subset,
                                     part=args.part, split_file=args.split_file, device=args.device,
                                     batch_size=args.batch_size, precision=args.precision, workers=args.workers,
                                     progress=args.progress, model_resolution=args.model_resolution,
                                     backend=args.backend, with_hd95=args.hd95)
    else:
        raise ValueError("evaluate: give --checkpoint (with --data or a run folder) or --predictions and --truth")
    print(report["table"])
    if report.get("ignored_predictions"):
        print(f"({len(report['ignored_predictions'])} predictions without ground truth ignored)")
    paths = write_report(report, args.output, prefix=args.name)
    print("written: " + ", ".join(paths))
    return 0


def _run_predict(args) -> int:
    from .predict import predict

    written = predict(args.checkpoint, args.inputs, args.output, device=args.device, batch_size=args.batch_size,
                      threshold=args.threshold, overlay=args.overlay, progress=args.progress, workers=args.workers,
                      backend=args.backend, precision=args.precision, img_size=args.img_size)
    print(f"{len(written)} masks written to {args.output}" + (f" (overlays in {args.output}/overlays)"
                                                               if args.overlay else ""))
    return 0


def _run_info(args) -> int:
    if args.checkpoint:
        from .predict import load_model
        model = load_model(args.checkpoint, "cpu")
        name, img_size = type(model).__name__, tuple(model.img_size)
    else:
        from .models import create_model
        model = create_model(args.model, img_size=tuple(args.img_size))
        name, img_size = args.model, tuple(args.img_size)
    parameters = sum(p.numel() for p in model.parameters())
    from .flops import cost_report
    report = cost_report(model, img_size)
    if args.json:
        payload = {"model": name, "img_size": list(img_size), "parameters": parameters}
        payload["cost_report"] = report.as_dict() if hasattr(report, "as_dict") else str(report)
        print(json.dumps(payload, indent=1, default=str))
    else:
        print(f"model: {name} at {img_size[0]}x{img_size[1]}\nparameters: {parameters:,}")
        print(report)
    return 0


def _run_compare_published(args) -> int:
    import shlex

    from .published_path import (CPU_QUICK_SETTINGS, GPU_SETTINGS, LOSSES, MAMBA_SSM_DIRS, MAMBA_SSM_SUBDIRS,
                                 compare, to_markdown)
    from .train import resolve_device

    if args.backend:
        raise ValueError("benchmark: --backend does not go with --compare-published (ours runs backend auto, "
                         "the published path its own code)")
    device = resolve_device(args.device)
    defaults = GPU_SETTINGS if device.type == "cuda" else CPU_QUICK_SETTINGS
    chosen = {"train_batches": args.train_batches, "infer_batches": args.infer_batches,
              "precisions": args.precisions, "warmup": args.warmup, "repeats": args.steps,
              "launches": args.launches}
    settings = {name: defaults[name] if value is None else value for name, value in chosen.items()}
    settings["losses"] = tuple(args.losses or LOSSES)
    settings["graphs"] = bool(args.graphs)
    # An installed package has no .bench-deps/ of its own: a checkout the command runs in may have one.
    dirs = MAMBA_SSM_DIRS + tuple(os.path.join(os.getcwd(), sub) for sub in MAMBA_SSM_SUBDIRS)
    command = " ".join(["dermomamba"] + [shlex.quote(str(a)) for a in getattr(args, "argv", ["benchmark"])])
    results = compare(args.model, tuple(args.img_size), device, command, published_scan=args.published_scan,
                      log=lambda line: print(line, file=sys.stderr, flush=True), mamba_ssm_dirs=dirs,
                      **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    print(json.dumps(results, indent=1) if args.json else to_markdown(results))
    return 0


def _run_benchmark(args) -> int:
    if args.compare_published:
        return _run_compare_published(args)
    compare_only = [flag for flag, value in (("--train-batches", args.train_batches),
                                             ("--infer-batches", args.infer_batches),
                                             ("--precisions", args.precisions), ("--losses", args.losses),
                                             ("--no-launches", args.launches), ("--graphs", args.graphs))
                    if value is not None]
    if args.published_scan != "auto":
        compare_only.append("--published-scan")
    if compare_only:
        raise ValueError(f"benchmark: {', '.join(compare_only)} only go with --compare-published")
    args.steps = 10 if args.steps is None else args.steps
    args.warmup = 3 if args.warmup is None else args.warmup
    import torch

    from .benchmark import (device_description, make_forward, make_train_step, median, random_batch,
                            time_ms)
    from .loss import GuideFusionLoss
    from .models import create_model
    from .train import resolve_device

    device = resolve_device(args.device)
    kwargs = {"backend": args.backend} if args.backend else {}
    model = create_model(args.model, img_size=tuple(args.img_size), **kwargs).to(device)
    images, masks = random_batch(args.batch_size, tuple(args.img_size), device)
    # Autocast only exists here on CUDA; on the CPU every precision runs (and is reported as) fp32.
    precision = args.precision if device.type == "cuda" else "fp32"
    steps = {"forward": make_forward(model, images, precision),
             "train_step": make_train_step(model, images, masks, GuideFusionLoss("published"), precision)}

    results = {"model": args.model, "img_size": list(args.img_size), "batch_size": args.batch_size,
               "device": device_description(device), "precision": precision, "torch": torch.__version__}
    for name, step in steps.items():
        times = sorted(time_ms(step, device, warmup=args.warmup, repeats=args.steps))
        results[f"{name}_ms_median"] = median(times)
        results[f"{name}_ms_min"] = times[0]
        results[f"{name}_images_per_second"] = args.batch_size / (median(times) / 1000)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{args.model} {args.img_size[0]}x{args.img_size[1]} batch {args.batch_size} on {results['device']}, "
              f"{results['precision']}, median of {args.steps} after {args.warmup} warm-up:")
        for name in steps:
            print(f"  {name:<11} {results[f'{name}_ms_median']:9.1f} ms  (min {results[f'{name}_ms_min']:.1f} ms)  "
                  f"{results[f'{name}_images_per_second']:8.1f} images/s")
        print("(ours against the published code path: dermomamba benchmark --compare-published)")
    return 0


COMMANDS = {"train": _run_train, "evaluate": _run_evaluate, "predict": _run_predict, "info": _run_info,
            "benchmark": _run_benchmark}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (1 with a one-line message for bad input or data)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    if args.command == "benchmark":
        # The command as typed, for the stamp of a --compare-published table.
        args.argv = argv
    from .data.folders import DataError
    from .hub import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (DataError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as error:
        if os.environ.get("DERMOMAMBA_DEBUG"):
            raise
        print(f"dermomamba {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dermomamba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
