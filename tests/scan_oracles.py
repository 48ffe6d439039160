"""Independent float64 formulations of the selective scans, for the scan tests.

They share no code with dermomamba_kernels: the 1-D scan is evaluated in closed form (every output
as an explicit weighted sum over earlier positions, O(L^2)), and the four SS2D directions come from
index lists built position by position, not from transposes and flips.
"""

import torch
import torch.nn.functional as F


def closed_form_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """y_t = sum_{s<=t} C_t . (exp(sum_{s<r<=t} dt_r A) * dt_s u_s B_s) + D u_t, gated by silu(z).

    Shapes as selective_scan_ref. Computes in float64 and returns (y, last_state) in float64.
    """
    u, delta, A = u.double(), delta.double(), A.double()
    batch, dim, length = u.shape
    dstate = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    dt = F.softplus(delta) if delta_softplus else delta

    def full(M):
        M = M.double()
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, dstate, length)
        if M.dim() == 3:
            M = M[:, None]
        groups = M.shape[1]
        index = torch.tensor([d * groups // dim for d in range(dim)])
        return M[:, index]

    B_full, C_full = full(B), full(C)
    # log decay accumulated up to each position: S[b, d, n, t] = sum_{r<=t} dt_r A_n
    S = torch.cumsum(dt[:, :, None, :] * A[None, :, :, None], dim=-1)
    diff = S[..., :, None] - S[..., None, :]  # [.., t, s] = S_t - S_s
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()
    inputs = (dt * u)[:, :, None, :] * B_full  # (b, d, n, s)
    states = torch.einsum("bdnts,bdns->bdnt", weights, inputs)
    y = (states * C_full).sum(2)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, states[..., -1]


def direction_index(height, width):
    """(4, H*W) plane positions (h * W + w) visited by each SS2D direction, step by step."""
    row_major = [h * width + w for h in range(height) for w in range(width)]
    column_major = [h * width + w for w in range(width) for h in range(height)]
    return torch.tensor([row_major, column_major, row_major[::-1], column_major[::-1]])


def closed_form_multiaxial(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """SS2D's four-direction scan in float64: per-direction gathers, projections and closed-form scan.

    Returns (batch, D, H, W) float64.
    """
    batch, dim, height, width = x.shape
    dt_rank = dt_projs_weight.shape[2]
    dstate = A_logs.shape[1]
    flat = x.double().reshape(batch, dim, height * width)
    index = direction_index(height, width)
    total = torch.zeros(batch, dim, height * width, dtype=torch.float64)
    for k in range(4):
        seq = flat[:, :, index[k]]  # (b, d, L) in direction k's order
        proj = torch.einsum("cd,bdl->bcl", x_proj_weight[k].double(), seq)
        dts, Bk, Ck = proj[:, :dt_rank], proj[:, dt_rank:dt_rank + dstate], proj[:, dt_rank + dstate:]
        delta = torch.einsum("dr,brl->bdl", dt_projs_weight[k].double(), dts)
        channels = slice(k * dim, (k + 1) * dim)
        y, _ = closed_form_scan(seq, delta, -torch.exp(A_logs[channels].double()), Bk, Ck, D=Ds[channels],
                                delta_bias=dt_projs_bias[k], delta_softplus=True)
        total = total.index_add(2, index[k], y)
    return total.view(batch, dim, height, width)
