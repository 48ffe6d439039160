"""What the GPU benchmarks share: DermoMamba's scan shapes, the mamba-ssm baseline (the published SS2D
core around mamba_ssm's selective_scan_fn), the copy-bandwidth ceiling and the commit stamp.

Importing this needs neither the compiled extension nor mamba-ssm (the published core and the mamba-ssm
look-up are dermomamba.published_path's, re-exported).
"""

from __future__ import annotations

import os
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: an installed dermomamba (with its compiled _C) wins over the source tree.
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

# The published SS2D core and the mamba-ssm import live in the package (``dermomamba benchmark
# --compare-published`` uses them too); re-exported here for the scripts and tests that import them from common.
from dermomamba.benchmark import git_commit as _git_commit  # noqa: E402
from dermomamba.published_path import DSTATE, MAMBA_SSM_SUBDIRS, NUM_DIRECTIONS, published_core  # noqa: E402,F401
from dermomamba.published_path import import_mamba_ssm as _import_mamba_ssm  # noqa: E402

BATCH = 16
# (d_model, H, W) of DermoMamba's SS2D calls at a 192x256 input.
SHAPES = [(4, 192, 256), (8, 96, 128), (16, 48, 64), (32, 24, 32), (64, 12, 16), (64, 6, 8), (6, 8, 64), (8, 64, 6)]
# mamba-ssm 2.3.2.post1 built on the GPU machine (shared/tools/mamba-ssm-on-device.md); never committed.
MAMBA_SSM_DIRS = tuple(os.path.join(REPO_ROOT, sub) for sub in MAMBA_SSM_SUBDIRS)
COPY_BYTES = 256 * 2 ** 20 * 4


def import_mamba_ssm():
    """(mamba_ssm's selective_scan_fn, None), or (None, why it is not importable): importable mamba_ssm,
    else this checkout's .bench-deps/ (dermomamba.published_path.import_mamba_ssm)."""
    return _import_mamba_ssm(MAMBA_SSM_DIRS)


def copy_bandwidth_gbs(time_ms):
    """Device-to-device copy rate (bytes read + written) with the caller's timer ``time_ms(fn)``."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / ms / 1e6


def git_commit():
    """The checkout's commit; on the GPU machine (a copy without .git) set DERMOMAMBA_COMMIT in the command."""
    return _git_commit(REPO_ROOT)
