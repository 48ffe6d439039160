"""One multiaxial scan forward per kernel form (warp, lane, lane4, staged, regs) and one backward per form (warp,
lane, staged, regs) at DermoMamba's largest SS2D shape (batch 16, d_inner 8, 192x256, N 16, fp32), for Nsight Compute:

  ncu --kernel-name regex:"scan_(lane_)?(fwd|bwd)_(main|split_aggregate)|scan_(staged|regs)_(fwd|bwd)" --section ... \
      python benchmarks/ncu_scan_case.py
"""

import os

import torch

import dermomamba_kernels  # noqa: F401  (registers the ops)

ops = torch.ops.dermomamba
batch, dim, height, width, dstate, rank = 16, 8, 192, 256, 16, 1
torch.manual_seed(0)
x = torch.randn(batch, dim, height, width, device="cuda")
projection = torch.randn(batch, height, width, 4, rank + 2 * dstate, device="cuda")
B = projection[..., rank:rank + dstate].permute(0, 3, 4, 1, 2)
C = projection[..., rank + dstate:].permute(0, 3, 4, 1, 2)
delta = torch.randn(batch, 4, dim, height, width, device="cuda") - 1
A = -torch.rand(4 * dim, dstate, device="cuda") - 0.5
D, bias = torch.randn(4 * dim, device="cuda"), torch.randn(4 * dim, device="cuda")
states = None
# The regs kernels run at their own (shorter) chunk size, REGS_CHUNK (default 32).
REGS_CHUNK = int(os.environ.get("REGS_CHUNK", "32"))
chunk_of = {"regs": REGS_CHUNK}
for kernel in ("warp", "lane", "lane4", "staged", "regs"):
    os.environ["DERMOMAMBA_SCAN_FWD_KERNEL"] = kernel
    y, states = ops.multiaxial_scan_fwd(x, delta, A, B, C, D, bias, True, chunk_of.get(kernel, 128))
    if kernel == "staged":
        staged_states = states
    if kernel == "regs":
        regs_states = states
dy = torch.randn_like(y)
for kernel in ("warp", "lane", "staged", "regs"):
    os.environ["DERMOMAMBA_SCAN_BWD_KERNEL"] = kernel
    chunk = chunk_of.get(kernel, 128)
    ops.multiaxial_scan_bwd(dy, x, delta, A, B, C, D, bias, True, regs_states if kernel == "regs" else staged_states,
                            chunk, False)
torch.cuda.synchronize()
print("ncu case done")
