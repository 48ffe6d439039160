"""What the GPU benchmarks share: DermoMamba's scan shapes, the mamba-ssm baseline (the published SS2D
core around mamba_ssm's selective_scan_fn), the copy-bandwidth ceiling and the commit stamp.

Importing this needs neither the compiled extension nor mamba-ssm.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH = 16
DSTATE = 16
NUM_DIRECTIONS = 4
# (d_model, H, W) of DermoMamba's SS2D calls at a 192x256 input.
SHAPES = [(4, 192, 256), (8, 96, 128), (16, 48, 64), (32, 24, 32), (64, 12, 16), (64, 6, 8), (6, 8, 64), (8, 64, 6)]
# mamba-ssm 2.3.2.post1 built on the GPU machine (shared/tools/mamba-ssm-on-device.md); never committed.
MAMBA_SSM_DIRS = (os.path.join(REPO_ROOT, ".bench-deps", "prebuilt"),
                  os.path.join(REPO_ROOT, ".bench-deps", "mamba_ssm-2.3.2.post1"))
COPY_BYTES = 256 * 2 ** 20 * 4


def import_mamba_ssm():
    """(mamba_ssm's selective_scan_fn, None), or (None, why it is not importable)."""
    for path in MAMBA_SSM_DIRS:
        if os.path.isdir(path) and path not in sys.path:
            sys.path.insert(0, path)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn, None
    except Exception as exc:  # noqa: BLE001 - any failure means "baseline not available", said in the output
        return None, f"{type(exc).__name__}: {exc}"


def published_core(scan_fn):
    """VMamba v0 forward_corev0 as the published DermoMamba code runs it, around `scan_fn`: four
    materialised direction copies, two einsums, one 1-D scan of 4 * D channels, merge copies."""

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


def copy_bandwidth_gbs(time_ms):
    """Device-to-device copy rate (bytes read + written) with the caller's timer ``time_ms(fn)``."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / ms / 1e6


def git_commit():
    """The checkout's commit; on the GPU machine (a copy without .git) set DERMOMAMBA_COMMIT in the command."""
    fallback = os.environ.get("DERMOMAMBA_COMMIT", "unknown")
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip() or fallback
    except OSError:
        return fallback
