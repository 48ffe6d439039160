"""Epoch-time benchmark (issue 7): training images per second with data loading included, 1 and N GPUs.

What it runs: ``dermomamba train`` itself (the command a user runs, not a synthetic loop) on an
ISIC 2018-layout folder of synthetic JPEGs at ISIC-like sizes, written once into ``--data-root``.
The first epoch builds the preprocessed cache and warms up kernels; the table reports the later
epochs (median), read back from each run's ``metrics.csv`` (``epoch_seconds`` is the wall time of the
training loop of an epoch: data loading, augmentation on the device, forward, loss, backward and
optimiser step; validation is not in it). Multi-GPU runs go through ``torchrun --nproc_per_node=N``
(DistributedDataParallel, distributed sampler; images/s counts all ranks).

Usage:
  python benchmarks/bench_epoch.py --gpus 1 2 --images 1024 --batch-size 16 --epochs 3
  python benchmarks/bench_epoch.py --gpus 1 --graphs  # also one process with --cuda-graphs (the recorded step)
  python benchmarks/bench_epoch.py --cpu-quick        # CPU smoke run: tiny model, 2 epochs, 1 process
  ... [--markdown out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from common import git_commit  # noqa: E402

# ISIC 2018 Task 1 images come in a few camera sizes; decoding and resizing them is the data
# loader's real work on the first epoch (the cache serves the later ones).
ISIC_LIKE_SIZES = ((450, 600), (768, 1024), (540, 722))


def write_dataset(root: str, images: int, sizes, seed: int) -> float:
    """Writes the synthetic ISIC-layout folder unless it is already complete; returns seconds spent."""
    from dermomamba.data.folders import find_isic2018
    from dermomamba.data.synthetic import write_synthetic_dataset

    started = time.perf_counter()
    try:
        if len(find_isic2018(root)) == images:
            return 0.0
    except Exception:  # noqa: BLE001 - absent or partial folder: write it again
        pass
    write_synthetic_dataset(root, images, layout="isic2018", sizes=sizes, seed=seed, workers=os.cpu_count() or 1)
    return time.perf_counter() - started


def train_command(processes: int, args, data_root: str, output: str, graphs: bool = False) -> list[str]:
    train_args = ["train", "--data", data_root, "--split", "random", "--val-fraction", str(args.val_fraction),
                  "--test-fraction", "0", "--model", args.model, "--img-size", str(args.img_size[0]),
                  str(args.img_size[1]), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                  "--eval-batch-size", str(args.eval_batch_size), "--workers", str(args.workers),
                  "--precision", args.precision, "--device", args.device, "--no-progress", "--no-tensorboard",
                  "--no-evaluate-test", "--predict-samples", "0", "--cache-dir", os.path.join(data_root, ".cache"),
                  "--output", output] + (["--cuda-graphs"] if graphs else [])
    if processes > 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={processes}", "-m", "dermomamba.cli"] + train_args
    return [sys.executable, "-m", "dermomamba.cli"] + train_args


def progress(message: str) -> None:
    print(f"[bench_epoch {datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {message}", file=sys.stderr,
          flush=True)


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        raise RuntimeError(f"{run_dir}: the training run wrote no metrics.csv")
    with open(path) as handle:
        return list(csv.DictReader(handle))


def run_one(processes: int, args, data_root: str, scratch: str, graphs: bool = False) -> dict:
    output = os.path.join(scratch, f"run-{processes}proc" + ("-graphs" if graphs else ""))  # the run folder itself
    command = train_command(processes, args, data_root, output, graphs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), REPO_ROOT])))
    started = time.perf_counter()
    progress(f"{processes} process(es): {shlex.join(command)}")
    # The run's own output streams through (to stderr): on the GPU machine a run cut short by a time
    # limit then still shows how far it got.
    result = subprocess.run(command, env=env, stdout=sys.stderr, stderr=sys.stderr)
    wall = time.perf_counter() - started
    progress(f"{processes} process(es): exit {result.returncode} after {wall:.1f} s")
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}); its output is above")
    rows = read_metrics(output)
    later = rows[1:] if len(rows) > 1 else rows
    return {"processes": processes, "cuda_graphs": graphs, "command": shlex.join(command), "wall_seconds": wall,
            "epochs": len(rows),
            "first_epoch_seconds": float(rows[0]["epoch_seconds"]),
            "epoch_seconds": statistics.median(float(r["epoch_seconds"]) for r in later),
            "images_per_second": statistics.median(float(r["train_images_per_second"]) for r in later),
            "val_dice_last": float(rows[-1]["val_dice"])}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()} visible"
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="process counts to run (one GPU each)")
    parser.add_argument("--images", type=int, default=1024, help="synthetic images in the folder")
    parser.add_argument("--val-fraction", type=float, default=0.125)
    parser.add_argument("--model", default="dermomamba")
    parser.add_argument("--img-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-root", default=None, help="folder for the synthetic data set (kept; default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--graphs", action="store_true",
                        help="also one process with `--cuda-graphs` (the training step recorded as a CUDA graph)")
    parser.add_argument("--cpu-quick", action="store_true", help="CPU smoke run: tiny model, 1 process")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sizes = ISIC_LIKE_SIZES
    if args.cpu_quick:
        args.gpus, args.images, args.model, args.img_size = [1], 12, "dermomamba_tiny", (64, 64)
        args.epochs, args.batch_size, args.eval_batch_size, args.workers = 2, 4, 4, 0
        args.precision, args.device, args.val_fraction = "fp32", "cpu", 0.25
        sizes = ((60, 80), (75, 100))
    if args.device.startswith("cuda"):
        import torch

        available = torch.cuda.device_count()
        if max(args.gpus) > available:
            parser.error(f"--gpus {max(args.gpus)}: only {available} CUDA device(s) visible")

    with tempfile.TemporaryDirectory(prefix="dermomamba-epoch-") as scratch:
        data_root = args.data_root or os.path.join(scratch, "isic-synthetic")
        progress(f"writing {args.images} synthetic images to {data_root}")
        write_seconds = write_dataset(data_root, args.images, sizes, args.seed)
        progress(f"written in {write_seconds:.1f} s")
        results = [run_one(n, args, data_root, scratch) for n in args.gpus]
        if args.graphs:
            results.append(run_one(1, args, data_root, scratch, graphs=True))

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Epoch time, `dermomamba train` on {args.images} synthetic ISIC-layout JPEGs "
              f"({', '.join(f'{h}x{w}' for h, w in sizes)}), {args.model} at {args.img_size[0]}x{args.img_size[1]}, "
              f"batch {args.batch_size} per process, {args.precision}, {args.workers} loader workers; "
              f"{device_name(args.device)}; {stamp}; commit {git_commit()}; "
              f"command `python benchmarks/bench_epoch.py {shlex.join(argv if argv is not None else sys.argv[1:])}`")
    lines = [header, "", "| processes | step | train images/s (data loading included) | epoch s | first epoch s (cache build, "
             "warm-up) | speed-up vs 1 | val Dice after last epoch |", "| --- | --- | --- | --- | --- | --- | --- |"]
    base = results[0]["images_per_second"]
    for r in results:
        lines.append(f"| {r['processes']} | {'CUDA graph' if r.get('cuda_graphs') else 'eager'} | {r['images_per_second']:.1f} | {r['epoch_seconds']:.2f} | "
                     f"{r['first_epoch_seconds']:.2f} | {r['images_per_second'] / base:.2f}x | {r['val_dice_last']:.3f} |")
    if write_seconds:
        lines.append(f"\n(writing the synthetic folder took {write_seconds:.1f} s, outside the table)")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"header": header, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
