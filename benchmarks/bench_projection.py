"""Why the SS2D projections cost what they cost: the x_proj einsum ("bdhw,kcd->bhwkc", x (B, D, H, W) against
(4, R + 2N, D)), its backward's two einsums, and the dt projection, at DermoMamba's two large SS2D shapes
(batch 48 = 16 images x 3 branches), fp16 and fp32, with R + 2N as the model has it (33) and padded to a
multiple of 8 (40: tensor-core friendly leading dimensions). CUDA events, median of 20 after 5 warm-ups.

  python benchmarks/bench_projection.py
"""

from __future__ import annotations

import statistics

import torch

SHAPES = [(48, 8, 192, 256), (48, 16, 96, 128)]
DSTATE, RANK = 16, 1


def time_ms(fn, warmup=5, repeats=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    print(f"GPU {torch.cuda.get_device_name()}")
    print("| B, D, H, W | dtype | R+2N | x_dbl MB | x_proj fwd ms | GB/s (x_dbl written) | dx einsum ms | dW einsum ms "
          "| dt proj fwd ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch, dim, height, width in SHAPES:
        for dtype in (torch.float16, torch.float32):
            for channels in (RANK + 2 * DSTATE, 40):
                x = torch.randn(batch, dim, height, width, device="cuda", dtype=dtype)
                w = torch.randn(4, channels, dim, device="cuda", dtype=dtype)
                w_dt = torch.randn(4, dim, RANK, device="cuda", dtype=dtype)
                x_dbl = torch.einsum("bdhw,kcd->bhwkc", x, w)
                grad = torch.randn_like(x_dbl)
                fwd = time_ms(lambda: torch.einsum("bdhw,kcd->bhwkc", x, w))
                dx = time_ms(lambda: torch.einsum("bhwkc,kcd->bdhw", grad, w))
                dw = time_ms(lambda: torch.einsum("bhwkc,bdhw->kcd", grad, x))
                dts = x_dbl[..., :RANK]
                dt = time_ms(lambda: torch.einsum("bhwkr,kdr->bkdhw", dts, w_dt))
                megabytes = x_dbl.numel() * x_dbl.element_size() / 1e6
                print(f"| {batch}, {dim}, {height}, {width} | {str(dtype)[6:]} | {channels} | {megabytes:.0f} | "
                      f"{fwd:.3f} | {megabytes / fwd:.0f} | {dx:.3f} | {dw:.3f} | {dt:.3f} |", flush=True)
                del x, w, x_dbl, grad
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
