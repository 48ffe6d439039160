"""Benchmark of the fused CBAM (issue 5) at DermoMamba's five skip connections, batch 16.

Forward + backward (``torch.autograd.grad`` of x and the seven parameters: no accumulation into
.grad), BatchNorm in training mode, medians of ``triton.testing.do_bench``, all in one process on
one GPU:

  published   the published module's structure, unfused: global pools as avg_pool2d / max_pool2d with
              a full-size window, ``torch.max(x, 1)[0]`` and ``torch.mean`` channel pools, BasicConv
  compiled    ``torch.compile`` of that module (default mode, static shapes)
  reference   our reference layer (``CBAM(backend="reference")``: ``mean`` / ``amax`` pools)
  fused       ``CBAM(backend="triton")``: the fused Triton kernels
  cuda        ``CBAM(backend="cuda")``: the fused CUDA C++ kernels (same pass structure; skipped with the
              reason when the extension has no CUDA kernels, or with --no-cuda), forced onto the pass
              structure (DERMOMAMBA_CBAM_CUDA_PATH=passes)
  cuda_small  the same layer on the CUDA small-shape path (DERMOMAMBA_CBAM_CUDA_PATH=small: one cooperative
              kernel per direction, csrc/cuda/cbam_small.cu), at shapes whose H x W is within the automatic
              rule's limit (kCbamSmallMaxAutoPixels); left out with the reason where it cannot run

and, for the fused op, the achieved bandwidth: the bytes the pass structure must move (forward:
x read three times and out written once; backward: grad_out and x read twice... see
benchmarks/notes/cbam.md) over time, against a device-to-device copy measured in the same run.

Usage: python benchmarks/bench_cbam.py [--shapes 0,4] [--dtypes float32,float16] [--json out.json]
       [--warm-only] [--no-compiled] [--no-cuda] [--graphs] [--profile]

Eager timings include the CPU's launch costs, which dominate every variant at the small shapes on
a slow host; ``--graphs`` also times each step captured in a CUDA graph (GPU work alone).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: an installed dermomamba (with its compiled _C) wins over the source tree.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

from common import git_commit  # noqa: E402
# The published unfused module lives in the package (the whole-network comparison swaps it in too).
from dermomamba.published_path import PublishedCBAM  # noqa: E402,F401
from dermomamba_kernels.layers import CBAM  # noqa: E402

BATCH = 16
SHAPES = [(32, 192, 256), (64, 96, 128), (128, 48, 64), (256, 24, 32), (512, 12, 16)]
# Full-size passes the fused forward and backward make over x-sized tensors (see notes/cbam.md):
# forward reads x 3 times and writes out; backward reads (g, x), x, (g, x) and writes dx.
FUSED_PASSES = 4 + 6
# The least any implementation must move: read x and write out; read g and x and write dx.
COMPULSORY_PASSES = 2 + 3


# The CUDA backend reads this at every call: which of its two kernel sets runs (see csrc/cuda/cbam_cuda.cpp).
CUDA_PATH_VARIABLE = "DERMOMAMBA_CBAM_CUDA_PATH"
# Variant name -> the CUDA path it forces.
CUDA_PATHS = {"cuda": "passes", "cuda_small": "small"}
# The automatic rule's pixel limit for the small path (kCbamSmallMaxAutoPixels in csrc/cuda/cbam_params.h).
SMALL_PATH_MAX_PIXELS = 1024


def fwd_bwd(module, x, grad, cuda_path=None):
    params = [p for p in module.parameters()]

    def step():
        previous = os.environ.get(CUDA_PATH_VARIABLE)
        if cuda_path is not None:
            os.environ[CUDA_PATH_VARIABLE] = cuda_path
        try:
            out = module(x)
            torch.autograd.grad(out, [x] + params, grad)
        finally:
            if cuda_path is not None:
                if previous is None:
                    del os.environ[CUDA_PATH_VARIABLE]
                else:
                    os.environ[CUDA_PATH_VARIABLE] = previous

    return step


def graphed(step):
    """The step captured in a CUDA graph: replays time the GPU work without the CPU's launch costs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def profile_kernels(step, title, iterations=10):
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    print(f"## kernels of {title} (per iteration)")
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    for e in sorted(events, key=lambda e: -e.device_time_total)[:16]:
        print(f"  {e.device_time_total / iterations:9.1f} us  x{e.count // iterations:<3d} {e.key[:90]}")


def copy_bandwidth(do_bench):
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(2 ** 28, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(map(str, range(len(SHAPES)))))
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--warm-only", action="store_true", help="run each variant once (fills compile caches)")
    parser.add_argument("--no-compiled", action="store_true")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ kernels")
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU times of the fused op")
    parser.add_argument("--graphs", action="store_true", help="also time every variant captured in a CUDA graph")
    args = parser.parse_args()

    from triton.testing import do_bench

    bench = (lambda fn: (fn(), torch.cuda.synchronize(), 0.0)[2]) if args.warm_only else \
        (lambda fn: do_bench(fn, warmup=25, rep=args.rep_ms, return_mode="median"))
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "commit": git_commit(), "command": " ".join(["python"] + sys.argv), "batch": BATCH}
    if not args.warm_only:
        info["copy_bandwidth_GBps"] = copy_bandwidth(do_bench) / 1e9
        print(f"# {info['gpu']} torch {info['torch']} commit {info['commit']} {info['date']}; "
              f"copy bandwidth {info['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    from dermomamba_kernels.cbam import cbam_dispatcher

    cuda_reason = "--no-cuda" if args.no_cuda else cbam_dispatcher.unavailable_reason("cuda", torch.device("cuda"))
    if cuda_reason is not None:
        print(f"# no 'cuda' column: {cuda_reason}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for index in map(int, args.shapes.split(",")):
            C, H, W = SHAPES[index]
            fused = CBAM(C, backend="triton").cuda()
            reference = CBAM(C, backend="reference").cuda()
            published = PublishedCBAM(C).cuda()
            reference.load_state_dict(fused.state_dict())
            published.load_state_dict(fused.state_dict())
            modules = {"published": published, "reference": reference, "fused": fused}
            if cuda_reason is None:
                modules["cuda"] = CBAM(C, backend="cuda").cuda()
                modules["cuda"].load_state_dict(fused.state_dict())
                if H * W <= SMALL_PATH_MAX_PIXELS:
                    modules["cuda_small"] = CBAM(C, backend="cuda").cuda()
                    modules["cuda_small"].load_state_dict(fused.state_dict())
            if not args.no_compiled:
                # a fresh dynamo per shape: ten shapes x dtypes of one forward exceed its recompile limit, past
                # which it silently runs eager (seen in the 2026-11-27 run for fp16 at the two smallest shapes)
                torch._dynamo.reset()
                # state first: a compiled module's state_dict keys carry an _orig_mod. prefix
                compiled = PublishedCBAM(C).cuda()
                compiled.load_state_dict(fused.state_dict())
                modules["compiled"] = torch.compile(compiled)
            for m in modules.values():
                m.to(dtype).train()
            x = torch.randn(BATCH, C, H, W, device="cuda", dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            if "cuda_small" in modules:
                try:
                    fwd_bwd(modules["cuda_small"], x, grad, "small")()
                    torch.cuda.synchronize()
                except RuntimeError as error:  # the small path cannot run this shape on this GPU
                    print(f"# no 'cuda_small' column at {C}x{H}x{W}: {error}".splitlines()[0])
                    del modules["cuda_small"]
            steps = {name: fwd_bwd(m, x, grad, CUDA_PATHS.get(name)) for name, m in modules.items()}
            times = {name: bench(step) for name, step in steps.items()}
            graph_times = {}
            for name, step in (steps.items() if args.graphs else ()):
                try:
                    graph_times[name] = bench(graphed(step))
                except RuntimeError as error:  # a capture the new path cannot do must not end the whole run
                    if name != "cuda_small":
                        raise
                    print(f"# no graphed 'cuda_small' at {C}x{H}x{W}: {error}".splitlines()[0])
            row = {"dtype": dtype_name, "shape": [BATCH, C, H, W], "ms": times, "graph_ms": graph_times}
            if not args.warm_only:
                nbytes = x.numel() * x.element_size()
                row["fused_GBps"] = FUSED_PASSES * nbytes / (times["fused"] * 1e-3) / 1e9
                row["fused_fraction_of_copy"] = row["fused_GBps"] / info["copy_bandwidth_GBps"]
                row["floor_ms"] = FUSED_PASSES * nbytes / (info["copy_bandwidth_GBps"] * 1e9) * 1e3
                row["compulsory_floor_ms"] = COMPULSORY_PASSES * nbytes / (info["copy_bandwidth_GBps"] * 1e9) * 1e3
                row["speedup_vs_published"] = times["published"] / times["fused"]
                row["speedup_vs_reference"] = times["reference"] / times["fused"]
                if "compiled" in times:
                    row["speedup_vs_compiled"] = times["compiled"] / times["fused"]
                if graph_times:
                    row["graph_fused_fraction_of_copy"] = (FUSED_PASSES * nbytes / (graph_times["fused"] * 1e-3)
                                                           / (info["copy_bandwidth_GBps"] * 1e9))
                if "cuda" in times:
                    row["cuda_GBps"] = FUSED_PASSES * nbytes / (times["cuda"] * 1e-3) / 1e9
                    row["cuda_fraction_of_copy"] = row["cuda_GBps"] / info["copy_bandwidth_GBps"]
                    row["cuda_speedup_vs_published"] = times["published"] / times["cuda"]
                    row["cuda_speedup_vs_triton"] = times["fused"] / times["cuda"]
                    if "compiled" in times:
                        row["cuda_speedup_vs_compiled"] = times["compiled"] / times["cuda"]
                    if graph_times:
                        row["graph_cuda_fraction_of_copy"] = (FUSED_PASSES * nbytes / (graph_times["cuda"] * 1e-3)
                                                              / (info["copy_bandwidth_GBps"] * 1e9))
                print(json.dumps(row), flush=True)
            rows.append(row)
            if args.profile and not args.warm_only:
                profile_kernels(fwd_bwd(fused, x, grad), f"fused {dtype_name} {BATCH}x{C}x{H}x{W}")
                for name in ("cuda", "cuda_small"):
                    if name in modules:
                        profile_kernels(steps[name], f"{name} {dtype_name} {BATCH}x{C}x{H}x{W}")
            del modules, x, grad
            torch.cuda.empty_cache()
    if args.warm_only:
        return
    print()
    nan = float("nan")
    print(f"{'dtype':8s} {'shape':>18s} {'published':>10s} {'compiled':>9s} {'reference':>9s} {'fused':>8s} "
          f"{'floor':>7s} {'x publ':>7s} {'x comp':>7s} {'x ref':>6s} {'%copy':>6s} {'cuda':>8s} {'x publ':>7s} "
          f"{'x comp':>7s} {'x trit':>7s} {'%copy':>6s}   (ms, fwd+bwd; fused = Triton)")
    for r in rows:
        t = r["ms"]
        print(f"{r['dtype']:8s} {'x'.join(map(str, r['shape'])):>18s} {t['published']:10.3f} "
              f"{t.get('compiled', float('nan')):9.3f} {t['reference']:9.3f} {t['fused']:8.3f} {r['floor_ms']:7.3f} "
              f"{r['speedup_vs_published']:7.1f} {r.get('speedup_vs_compiled', float('nan')):7.2f} "
              f"{r['speedup_vs_reference']:6.1f} {100 * r['fused_fraction_of_copy']:5.0f}% "
              f"{t.get('cuda', nan):8.3f} {r.get('cuda_speedup_vs_published', nan):7.1f} "
              f"{r.get('cuda_speedup_vs_compiled', nan):7.2f} {r.get('cuda_speedup_vs_triton', nan):7.2f} "
              f"{100 * r.get('cuda_fraction_of_copy', nan):5.0f}%")
    if args.graphs:
        print(f"\nCUDA graphs (GPU time without launch costs), ms fwd+bwd")
        print(f"{'dtype':8s} {'shape':>18s} {'published':>10s} {'compiled':>9s} {'reference':>9s} {'fused':>8s} "
              f"{'floor':>7s} {'x publ':>7s} {'x comp':>7s} {'x ref':>6s} {'%copy':>6s} {'cuda':>8s} {'x publ':>7s} "
              f"{'x comp':>7s} {'x trit':>7s} {'%copy':>6s}")
        for r in rows:
            t = r["graph_ms"]
            print(f"{r['dtype']:8s} {'x'.join(map(str, r['shape'])):>18s} {t['published']:10.3f} "
                  f"{t.get('compiled', float('nan')):9.3f} {t['reference']:9.3f} {t['fused']:8.3f} "
                  f"{r['floor_ms']:7.3f} {t['published'] / t['fused']:7.1f} "
                  f"{t.get('compiled', float('nan')) / t['fused']:7.2f} {t['reference'] / t['fused']:6.1f} "
                  f"{100 * r['graph_fused_fraction_of_copy']:5.0f}% {t.get('cuda', nan):8.3f} "
                  f"{t['published'] / t.get('cuda', nan):7.1f} {t.get('compiled', nan) / t.get('cuda', nan):7.2f} "
                  f"{t['fused'] / t.get('cuda', nan):7.2f} {100 * r.get('graph_cuda_fraction_of_copy', nan):5.0f}%")
    small_rows = [r for r in rows if "cuda_small" in r["ms"]]
    if small_rows:
        print("\nCUDA small-shape path (one cooperative kernel per direction) vs the CUDA passes, ms fwd+bwd")
        print(f"{'dtype':8s} {'shape':>18s} {'':6s} {'published':>10s} {'passes':>8s} {'small':>8s} "
              f"{'x publ':>7s} {'x passes':>8s}")
        for r in small_rows:
            for label, t in (("eager", r["ms"]), ("graph", r["graph_ms"])):
                if "cuda_small" not in t:
                    continue
                print(f"{r['dtype']:8s} {'x'.join(map(str, r['shape'])):>18s} {label:6s} {t['published']:10.3f} "
                      f"{t['cuda']:8.3f} {t['cuda_small']:8.3f} {t['published'] / t['cuda_small']:7.1f} "
                      f"{t['cuda'] / t['cuda_small']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
