"""The layers of issue 8 on mamba-ssm, for bench_layers.py and tests/test_mamba_ssm_parity.py.

  import_mamba_ssm_layers()  mamba-ssm's selective_scan_fn and its ``Mamba`` module (mamba_simple), from
                             .bench-deps/ as benchmarks/common.py finds it; the prebuilt
                             selective_scan_cuda .so is unpacked from its gzipped parts when needed.
  use_published_core(m, fn)  reroute every SS2D in ``m`` through VM-UNet's forward_corev0 around ``fn``
                             (common.published_core: direction copies, einsums, fp32 casts, merge).
  PVMLayer                   UltraLight-VM-UNet's parallel vision Mamba layer around any Mamba class.
  VMUNET_SS2D_STAGES, ULTRALIGHT_PVM_STAGES   the layers' shapes at a 256x256 input.

Importing this needs neither the compiled extension nor mamba-ssm.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

from common import DSTATE as PUBLISHED_CORE_DSTATE, MAMBA_SSM_DIRS, import_mamba_ssm, published_core  # noqa: E402

# VM-UNet (JCruan519/VM-UNet, models/vmunet/vmamba.py): a 4x4 patch embedding, then VSSLayers of
# VSSBlocks (nn.LayerNorm pre-norm, SS2D v0 with d_state 16, d_conv 3, expand 2, dt_rank "auto")
# at dims 96, 192, 384, 768. (d_model, H, W) at a 256x256 input:
VMUNET_IMAGE = 256
VMUNET_PATCH = 4
VMUNET_DIMS = (96, 192, 384, 768)
VMUNET_SS2D_STAGES = [(dim, VMUNET_IMAGE // VMUNET_PATCH // 2 ** i, VMUNET_IMAGE // VMUNET_PATCH // 2 ** i)
                      for i, dim in enumerate(VMUNET_DIMS)]
VMUNET_D_STATE = 16

# UltraLight-VM-UNet (wurenkai/UltraLight-VM-UNet, models/UltraLight_VM_UNet.py), c_list
# [8, 16, 24, 32, 48, 64]: PVM layers at encoder 4-6 and decoder 1-3, after 3, 4, 5 max-pools.
# (name, input_dim, output_dim, H, W) at a 256x256 input:
ULTRALIGHT_IMAGE = 256
ULTRALIGHT_PVM_STAGES = [
    ("encoder4", 24, 32, ULTRALIGHT_IMAGE // 8, ULTRALIGHT_IMAGE // 8),
    ("encoder5", 32, 48, ULTRALIGHT_IMAGE // 16, ULTRALIGHT_IMAGE // 16),
    ("encoder6", 48, 64, ULTRALIGHT_IMAGE // 32, ULTRALIGHT_IMAGE // 32),
    ("decoder1", 64, 48, ULTRALIGHT_IMAGE // 32, ULTRALIGHT_IMAGE // 32),
    ("decoder2", 48, 32, ULTRALIGHT_IMAGE // 16, ULTRALIGHT_IMAGE // 16),
    ("decoder3", 32, 24, ULTRALIGHT_IMAGE // 8, ULTRALIGHT_IMAGE // 8),
]
# The PVM layer splits its channels into this many chunks, all through one shared Mamba.
PVM_CHUNKS = 4

PREBUILT_DIR = MAMBA_SSM_DIRS[0]
# Where the gzipped parts of the prebuilt .so are unpacked (never into the checkout).
UNPACK_DIR = os.path.join(tempfile.gettempdir(), "dermomamba-mamba-ssm-prebuilt")


@dataclass
class MambaSSM:
    """What of mamba-ssm imports: each entry None with the reason in the matching ``*_error``."""

    selective_scan_fn: Optional[Callable]
    scan_error: Optional[str]
    Mamba: Optional[type]
    mamba_error: Optional[str]


def unpack_prebuilt(prebuilt_dir: str = PREBUILT_DIR, target_dir: str = UNPACK_DIR) -> Optional[str]:
    """The folder holding selective_scan_cuda*.so: ``prebuilt_dir`` when the .so is there, else a folder
    under ``target_dir`` named by the content of its ``.so.gz.part*`` pieces (the form in which it
    travels to the GPU machine), after joining and gunzipping them; None when there is neither."""
    if glob.glob(os.path.join(prebuilt_dir, "selective_scan_cuda*.so")):
        return prebuilt_dir
    parts = sorted(glob.glob(os.path.join(prebuilt_dir, "selective_scan_cuda*.so.gz.part*")))
    if not parts:
        return None
    so_name = os.path.basename(parts[0]).split(".gz.part")[0]
    packed = b"".join(open(part, "rb").read() for part in parts)
    # Named by content, so that a rebuilt .so never meets a stale unpacked one.
    folder = os.path.join(target_dir, hashlib.sha1(packed).hexdigest()[:16])
    target = os.path.join(folder, so_name)
    if not os.path.exists(target):
        os.makedirs(folder, exist_ok=True)
        # Several test workers may unpack at once: each writes its own file, the rename is atomic.
        handle, partial_path = tempfile.mkstemp(dir=folder, suffix=".partial")
        with os.fdopen(handle, "wb") as out:
            out.write(gzip.decompress(packed))
        os.replace(partial_path, target)
    return folder


def import_mamba_ssm_layers() -> MambaSSM:
    """mamba-ssm's selective_scan_fn and Mamba module, or why they do not import (never raises)."""
    try:
        folder = unpack_prebuilt()
    except OSError as exc:
        folder = None
        unpack_error = f"unpacking the prebuilt selective_scan_cuda failed: {exc}"
    else:
        unpack_error = None
    if folder is not None and folder not in sys.path:
        sys.path.insert(0, folder)
    scan_fn, scan_error = import_mamba_ssm()
    if scan_fn is None:
        reason = scan_error if unpack_error is None else f"{scan_error}; {unpack_error}"
        return MambaSSM(None, reason, None, "mamba_ssm's selective_scan_fn does not import")
    try:
        # Without causal-conv1d this module takes its unfused path, around selective_scan_fn.
        from mamba_ssm.modules.mamba_simple import Mamba
    except Exception as exc:  # noqa: BLE001 - reported, the caller decides
        return MambaSSM(scan_fn, None, None, f"{type(exc).__name__}: {exc}")
    return MambaSSM(scan_fn, None, Mamba, None)


def use_published_core(model: nn.Module, scan_fn: Callable) -> nn.Module:
    """Reroute every SS2D of ``model`` (in place) through VMamba v0's forward_corev0 around
    ``scan_fn`` (a function with mamba_ssm's selective_scan_fn signature); the weights and the
    rest of the forward (in_proj, conv, norm, gate, out_proj) stay as they are. Returns ``model``.

    Example:
        >>> from dermomamba_kernels import selective_scan_ref
        >>> from dermomamba_kernels.layers import SS2D
        >>> layer = use_published_core(SS2D(8), selective_scan_ref)
        >>> layer(torch.randn(1, 3, 5, 8)).shape
        torch.Size([1, 3, 5, 8])
    """
    from dermomamba_kernels.layers import SS2D

    core = published_core(scan_fn)
    for module in model.modules():
        if isinstance(module, SS2D):
            if module.d_state != PUBLISHED_CORE_DSTATE:
                raise ValueError(f"use_published_core: benchmarks/common.py's cross-scan is written for "
                                 f"d_state={PUBLISHED_CORE_DSTATE}, this SS2D has {module.d_state}")

            def scan(self, x):
                return core(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)

            module.scan = types.MethodType(scan, module)
    return model


class PVMLayer(nn.Module):
    """UltraLight-VM-UNet's PVM layer: LayerNorm over channels, the channels split into 4 chunks, each
    chunk through one shared Mamba plus a learned-scale skip, concatenated, LayerNorm (the same
    one), Linear to ``output_dim``.

    ``mamba_cls`` builds the Mamba (``mamba_ssm.Mamba`` in the original; here also
    ``dermomamba_kernels.layers.Mamba``); extra keyword arguments go to it. fp16 inputs are taken
    to fp32 first, as the original does.

    Shapes: (B, input_dim, H, W) -> (B, output_dim, H, W); input_dim divisible by 4.

    Example:
        >>> from dermomamba_kernels.layers import Mamba
        >>> layer = PVMLayer(8, 12, Mamba, backend="reference")
        >>> layer(torch.randn(2, 8, 5, 6)).shape
        torch.Size([2, 12, 5, 6])
    """

    def __init__(self, input_dim: int, output_dim: int, mamba_cls: Callable[..., nn.Module], d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, **mamba_kwargs):
        super().__init__()
        if input_dim % PVM_CHUNKS != 0:
            raise ValueError(f"input_dim must be divisible by {PVM_CHUNKS}, got {input_dim}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.norm = nn.LayerNorm(input_dim)
        self.mamba = mamba_cls(d_model=input_dim // PVM_CHUNKS, d_state=d_state, d_conv=d_conv, expand=expand,
                               **mamba_kwargs)
        self.proj = nn.Linear(input_dim, output_dim)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.input_dim:
            raise ValueError(f"PVMLayer: x must be (B, {self.input_dim}, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.float16:
            x = x.float()
        batch, _, height, width = x.shape
        tokens = self.norm(x.reshape(batch, self.input_dim, height * width).transpose(1, 2))
        mixed = [self.mamba(chunk) + self.skip_scale * chunk for chunk in tokens.chunk(PVM_CHUNKS, dim=2)]
        out = self.proj(self.norm(torch.cat(mixed, dim=2)))
        return out.transpose(1, 2).reshape(batch, self.output_dim, height, width)
