"""Guide Fusion Loss and the distance transform on the GPU against the published scipy path.

Measures, in one run on one machine:
  * the loss, forward + backward, batch 16 at 192x256 (the training shape), published mode:
    attention map from the Triton transform on the GPU, against the published path (the same loss
    with the scipy transform: target copied to the host, scipy, map copied back, every step);
  * the transform alone: Triton on the GPU against scipy on this machine's CPU (array already on
    the host, so scipy's figure excludes the copies), at 16x192x256 per image and as one array, and
    at 2048x2048.

GPU figures are medians of CUDA-event timings after warm-up; host figures are medians of wall-clock
timings with the device synchronised. Results go to stdout as a Markdown table and, with --out, to
a Markdown file and a JSON file.

    python benchmarks/bench_loss.py --out results_edt.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

# Appended, not prepended: an installed dermomamba (with its compiled _C) wins over the source tree.
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from dermomamba.loss import GuideFusionLoss  # noqa: E402
from dermomamba_kernels import distance_transform_edt, last_backend  # noqa: E402


def lesion_masks(batch, height, width, generator):
    """One random ellipse per image, (B, 1, H, W) float 0/1, like the training targets."""
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    masks = []
    for _ in range(batch):
        centre = torch.rand(2, generator=generator) * torch.tensor([height, width])
        radii = (0.1 + 0.35 * torch.rand(2, generator=generator)) * torch.tensor([height, width])
        masks.append((((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1).float())
    return torch.stack(masks)[:, None]


def gpu_median_ms(fn, warmup=10, repeats=100):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def host_median_ms(fn, warmup=1, repeats=7):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def loss_step(loss_fn, pred, target):
    def step():
        loss = loss_fn(pred, target)
        torch.autograd.grad(loss, pred)
    return step


def sweep(batch_mask, big_mask):
    """Time the transform with other tile shapes (min-plus positions x lanes x warps; scan lines x warps)."""
    from dermomamba_kernels.distance_transform import triton_edt

    defaults = {name: getattr(triton_edt, name) for name in
                ("MINPLUS_BLOCK_POSITIONS", "MINPLUS_BLOCK_LANES", "MINPLUS_WARPS", "SCAN_BLOCK_LINES", "SCAN_WARPS")}
    configs = [(32, 64, 4, 16, 4), (16, 64, 2, 16, 4), (64, 64, 4, 16, 4), (64, 64, 8, 16, 4), (32, 128, 4, 16, 4),
               (64, 128, 8, 16, 4), (128, 64, 8, 16, 4), (16, 128, 4, 16, 4), (32, 64, 4, 8, 2), (32, 64, 4, 32, 8)]
    print("| min-plus pos x lanes x warps | scan lines x warps | 16x192x256 per image ms | whole ms | 2048^2 ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    want_big = distance_transform_edt(big_mask)
    try:
        for pos, lanes, warps, lines, scan_warps in configs:
            triton_edt.MINPLUS_BLOCK_POSITIONS, triton_edt.MINPLUS_BLOCK_LANES = pos, lanes
            triton_edt.MINPLUS_WARPS = warps
            triton_edt.SCAN_BLOCK_LINES, triton_edt.SCAN_WARPS = lines, scan_warps
            assert torch.equal(distance_transform_edt(big_mask), want_big)
            a = gpu_median_ms(lambda: distance_transform_edt(batch_mask))
            b = gpu_median_ms(lambda: distance_transform_edt(batch_mask, per_image=False))
            c = gpu_median_ms(lambda: distance_transform_edt(big_mask), warmup=2, repeats=10)
            print(f"| {pos} x {lanes} x {warps} | {lines} x {scan_warps} | {a:.3f} | {b:.3f} | {c:.3f} |")
    finally:
        for name, value in defaults.items():
            setattr(triton_edt, name, value)


def profile(loss_fn, pred, target):
    """Where the loss's time goes: the transform's layers, the attention map, and a profiler table."""
    import dermomamba_kernels.distance_transform as dt
    from dermomamba.loss import boundary_attention
    from dermomamba_kernels.distance_transform.triton_edt import edt_triton

    mask = target == 1
    images = mask.reshape(-1, *mask.shape[-2:]).view(torch.uint8)
    op = torch.ops.dermomamba.distance_transform_edt_triton.default
    timings = {
        "edt_triton() (kernels + allocation)": lambda: edt_triton(images, (1.0, 1.0, 1.0), False),
        "custom op call": lambda: op(images, [1.0, 1.0, 1.0], False),
        "distance_transform_edt (eager path)": lambda: distance_transform_edt(mask, per_image=False),
        "boundary_attention (published)": lambda: boundary_attention(target, per_image=False),
        "loss forward": lambda: loss_fn(pred, target),
        "loss fwd+bwd": loss_step(loss_fn, pred, target),
    }
    for name, fn in timings.items():
        print(f"profile | {name} | {gpu_median_ms(fn):.3f} ms")
    dt.EAGER_SKIPS_CUSTOM_OP = False
    print(f"profile | loss fwd+bwd through the custom op | {gpu_median_ms(loss_step(loss_fn, pred, target)):.3f} ms")
    dt.EAGER_SKIPS_CUSTOM_OP = True
    step = loss_step(loss_fn, pred, target)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


def commit():
    if os.environ.get("DERMOMAMBA_COMMIT"):
        return os.environ["DERMOMAMBA_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write a Markdown table here (and JSON beside it)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    parser.add_argument("--large", type=int, default=2048, help="side of the large single-image case")
    parser.add_argument("--sweep", action="store_true", help="also time other tile shapes of the kernels")
    parser.add_argument("--profile", action="store_true", help="also break the loss's time down")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    height, width = args.size
    device = torch.device("cuda")
    target = lesion_masks(args.batch, height, width, generator).to(device)
    pred = (3 * torch.randn(args.batch, 1, height, width, generator=generator)).to(device).requires_grad_()
    rows = []

    # The two loss paths agree before they are timed.
    ours_fn = GuideFusionLoss("published")
    scipy_fn = GuideFusionLoss("published", backend="reference")
    ours, published = ours_fn(pred, target), scipy_fn(pred, target)
    assert last_backend("distance_transform_edt") == "reference"
    ours_fn(pred, target)
    assert last_backend("distance_transform_edt") == "triton"
    agreement = abs(ours.item() - published.item()) / abs(published.item())
    assert agreement < 1e-5, agreement

    t_scipy_loss = host_median_ms(loss_step(scipy_fn, pred, target))
    t_ours_loss = gpu_median_ms(loss_step(ours_fn, pred, target))
    t_ours_loss_wall = host_median_ms(loss_step(ours_fn, pred, target), warmup=3, repeats=50)
    per_image_fn = GuideFusionLoss("per_image")
    t_per_image_loss = gpu_median_ms(loss_step(per_image_fn, pred, target))
    shape = f"{args.batch}x1x{height}x{width}"
    rows.append(("loss fwd+bwd, published mode", shape, "scipy path (host round trip)", t_scipy_loss,
                 "Triton EDT on GPU", t_ours_loss))
    rows.append(("loss fwd+bwd, published mode (wall clock, synchronised)", shape, "scipy path (host round trip)",
                 t_scipy_loss, "Triton EDT on GPU", t_ours_loss_wall))
    rows.append(("loss fwd+bwd, per_image mode", shape, "scipy path, published mode", t_scipy_loss,
                 "Triton EDT on GPU", t_per_image_loss))

    # The transform alone.
    mask = target == 1
    host_mask = mask.cpu().numpy()
    for per_image in (True, False):
        if per_image:
            scipy_fn_edt = lambda: [ndimage.distance_transform_edt(image[0]) for image in host_mask]  # noqa: E731
        else:
            scipy_fn_edt = lambda: ndimage.distance_transform_edt(host_mask)  # noqa: E731
        t_scipy = host_median_ms(scipy_fn_edt)
        t_ours = gpu_median_ms(lambda: distance_transform_edt(mask, per_image=per_image))
        rows.append((f"EDT {'per image' if per_image else 'whole array'}", shape, "scipy (CPU, no copies)",
                     t_scipy, "Triton", t_ours))

    side = args.large
    big_lesion = lesion_masks(1, side, side, generator)[0, 0].to(device) == 1
    big_sparse = torch.rand(side, side, generator=generator).to(device) < 0.99999  # a few zeros: long distances
    for name, big in (("lesion", big_lesion), ("~20 zeros", big_sparse)):
        host_big = big.cpu().numpy()
        t_scipy = host_median_ms(lambda: ndimage.distance_transform_edt(host_big), repeats=3)
        t_ours = gpu_median_ms(lambda: distance_transform_edt(big), warmup=3, repeats=20)
        want = ndimage.distance_transform_edt(host_big).astype(np.float32)
        assert np.array_equal(distance_transform_edt(big).cpu().numpy(), want)
        rows.append((f"EDT {name}", f"{side}x{side}", "scipy (CPU, no copies)", t_scipy, "Triton", t_ours))

    if args.sweep:
        sweep(target == 1, big_sparse)
    if args.profile:
        profile(ours_fn, pred, target)

    gpu_name = torch.cuda.get_device_name()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/bench_loss.py " + " ".join(sys.argv[1:])
    lines = [f"GPU: {gpu_name}; CPU for scipy: {platform.processor() or platform.machine()} "
             f"({os.cpu_count()} cores); torch {torch.__version__}; date {stamp}; commit {commit()}",
             f"Command: `{command}`", "",
             "| what | shape | baseline | baseline ms | ours | ours ms | speed-up |",
             "| --- | --- | --- | ---: | --- | ---: | ---: |"]
    for what, size, base, t_base, mine, t_mine in rows:
        lines.append(f"| {what} | {size} | {base} | {t_base:.3f} | {mine} | {t_mine:.3f} | {t_base / t_mine:.0f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"gpu": gpu_name, "date": stamp, "commit": commit(), "command": command,
             "rows": [dict(zip(("what", "shape", "baseline", "baseline_ms", "ours", "ours_ms"), r)) for r in rows]},
            indent=2))


if __name__ == "__main__":
    main()
