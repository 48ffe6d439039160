"""LayerNorm over a small last dimension (DermoMamba's SS2D norms: 4-64 channels, millions of rows):
PyTorch's native kernel, the same arithmetic as a row reduction plus elementwise ops, and the
Triton kernel of dermomamba_kernels.layer_norm (backend="triton"). GPU only.

Per shape and dtype (fp32 parameters, as the model's norms have under autocast): median times of
triton.testing.do_bench for the forward and for forward + backward (dx, dweight, dbias), the
achieved GB/s against the bytes that must move (forward: read x, write y, 8 bytes of mean / rstd
per row; backward: read x, dy, mean and rstd, write dx; counted in x's dtype, although under autocast
y and dy are fp32), the ratio native / triton, and the max
error against fp64. The last line says whether Triton beat native everywhere: the condition for it
to join "auto" (dermomamba_kernels/layer_norm/__init__.py, AUTO_ORDER).

  DERMOMAMBA_COMMIT=<sha> python benchmarks/bench_small_layernorm.py [--shapes 9437184x8,...] [--dtypes fp32,fp16]
"""

import argparse
import datetime
import os
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dermomamba_kernels.layer_norm import layer_norm  # noqa: E402
from bench_stamp import commit, parse_shapes  # noqa: E402

EPS = 1e-5
# (rows, C) of DermoMamba's norms at batch 16, 192x256 (the shared VSSBlock's 3 calls: 48 images).
SHAPES = ((48 * 192 * 256, 4), (48 * 192 * 256, 8), (48 * 96 * 128, 16), (48 * 48 * 64, 32))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATS_BYTES_PER_ROW = 8  # fp32 mean and rstd
WARMUP_MS, REP_MS = 25, 100


def layer_norm_by_rows(x, weight, bias):
    x32 = x.float()
    var, mean = torch.var_mean(x32, -1, keepdim=True, correction=0)
    return ((x32 - mean) * torch.rsqrt(var + EPS) * weight + bias).to(x.dtype)


def implementations(channels):
    return {
        "native": lambda x, w, b: F.layer_norm(x, (channels,), w, b, EPS),
        "rows": layer_norm_by_rows,
        "triton": lambda x, w, b: layer_norm(x, (channels,), w, b, EPS, backend="triton"),
    }


def bytes_moved(rows, channels, dtype):
    item = torch.empty((), dtype=dtype).element_size()
    forward = rows * channels * 2 * item + rows * STATS_BYTES_PER_ROW
    backward = rows * channels * 3 * item + rows * STATS_BYTES_PER_ROW
    return forward, backward


def forward_backward(fn, x, w, b, dy):
    y = fn(x, w, b)
    return torch.autograd.grad(y, (x, w, b), dy.to(y.dtype))


def median_ms(fn):
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=parse_shapes, default=SHAPES, help="rowsxC,rowsxC,...")
    parser.add_argument("--dtypes", default="fp32,fp16", help="comma-separated of fp32, fp16, bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_small_layernorm.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{datetime.date.today().isoformat()} | commit {commit()}")
    print("| rows x C | dtype | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | native/impl fwd | "
          "native/impl fwd+bwd | max err fwd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    triton_wins = True
    for rows, channels in args.shapes:
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            x = torch.randn(rows, channels, device="cuda").mul_(3).add_(1).to(dtype).requires_grad_(True)
            w = torch.randn(channels, device="cuda", requires_grad=True)
            b = torch.randn(channels, device="cuda", requires_grad=True)
            dy = torch.randn(rows, channels, device="cuda").to(dtype)
            exact = F.layer_norm(x.detach().double(), (channels,), w.detach().double(), b.detach().double(), EPS)
            fwd_bytes, bwd_bytes = bytes_moved(rows, channels, dtype)
            times = {}
            # Low-precision x with fp32 parameters is how the model's norms run: under autocast (PyTorch's
            # CUDA kernel refuses the mixed dtypes outside it; inside, it runs on an fp32 copy of x).
            autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
            for name, fn in implementations(channels).items():
                with torch.no_grad(), autocast:
                    fwd = median_ms(lambda: fn(x, w, b))
                with autocast:
                    fb = median_ms(lambda: forward_backward(fn, x, w, b, dy))
                times[name] = (fwd, fb)
                with torch.no_grad(), autocast:
                    err = (fn(x, w, b).double() - exact).abs().max().item()
                native_fwd, native_fb = times["native"]
                print(f"| {rows}x{channels} | {dtype_name} | {name} | {fwd:.3f} | {fwd_bytes / fwd / 1e6:.0f} | "
                      f"{fb:.3f} | {(fwd_bytes + bwd_bytes) / fb / 1e6:.0f} | {native_fwd / fwd:.2f} | "
                      f"{native_fb / fb:.2f} | {err:.2e} |", flush=True)
            triton_wins &= times["triton"][0] < times["native"][0] and times["triton"][1] < times["native"][1]
    print(f"triton faster than native (fwd and fwd+bwd) on every shape and dtype: {'yes' if triton_wins else 'no'}")


if __name__ == "__main__":
    main()
