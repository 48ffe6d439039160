"""Executable specification of the selective scans: plain fp32 loops, short and readable.

Every fast backend (C++ CPU, CUDA, Triton) is tested against these two functions. They are slow on
purpose: one Python step per sequence position, nothing fused, nothing clever.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Scan orders of the VMamba SS2D core over an (H, W) plane, in the published order.
NUM_DIRECTIONS = 4


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Selective scan with mamba_ssm's signature and semantics (real A).

    Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C either constant (dim, N) or variable
    (batch, N, L) / (batch, groups, N, L) with dim divisible by groups; D, delta_bias (dim,).
    The state is fp32 whatever the input dtype; the output has u's dtype.

        h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
        y_t = C_t . h_t + D * u_t,          y_t *= silu(z_t) when z is given

    Example:
        >>> u = torch.randn(2, 8, 33); delta = torch.rand(2, 8, 33)
        >>> A = -torch.rand(8, 16); B = torch.randn(2, 16, 33); C = torch.randn(2, 16, 33)
        >>> selective_scan_ref(u, delta, A, B, C).shape
        torch.Size([2, 8, 33])
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    dstate = A.shape[1]
    A = A.float()

    def per_channel(M):
        """(dim, N) constant or (batch, [groups,] N, L) variable -> (batch, dim, N, L)."""
        M = M.float()
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, dstate, length)
        if M.dim() == 3:
            M = M.unsqueeze(1)
        return M.repeat_interleave(dim // M.shape[1], dim=1)

    # Split the time axis once: indexing [..., t] inside the loop would make every step's backward
    # scatter into a whole-sequence gradient (quadratic in L).
    steps = zip(delta.unbind(-1), u.unbind(-1), per_channel(B).unbind(-1), per_channel(C).unbind(-1))
    state = u.new_zeros(batch, dim, dstate)
    ys = []
    for delta_t, u_t, B_t, C_t in steps:
        state = torch.exp(delta_t[..., None] * A) * state + (delta_t * u_t)[..., None] * B_t
        ys.append((state * C_t).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, state) if return_last_state else out


def direction_sequences(x):
    """The four scan orders of x (batch, dim, H, W) as a materialised (batch, 4, dim, H*W) stack.

    k=0 row-major (h outer, w inner), k=1 column-major (w outer, h inner), k=2 and k=3 those two
    reversed. Only the reference does this copy; the fast kernels read the orders by index.
    """
    batch, dim, height, width = x.shape
    rows = x.reshape(batch, dim, height * width)
    cols = x.transpose(2, 3).reshape(batch, dim, height * width)
    forward = torch.stack([rows, cols], dim=1)
    return torch.cat([forward, forward.flip(-1)], dim=1)


def merge_directions(ys, height, width):
    """Inverse of `direction_sequences`, summed: (batch, 4, dim, H*W) -> (batch, dim, H, W)."""
    batch, _, dim, length = ys.shape
    unreversed = ys[:, 2:4].flip(-1)
    rows = ys[:, 0] + unreversed[:, 0]
    cols = ys[:, 1] + unreversed[:, 1]
    cols_as_rows = cols.view(batch, dim, width, height).transpose(2, 3)
    return rows.view(batch, dim, height, width) + cols_as_rows


def multiaxial_selective_scan_ref(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """SS2D's core (VMamba v0 ``forward_corev0``) as the published DermoMamba code computes it.

    Shapes: x (batch, D, H, W), any strides (a permuted view scans other axis orders);
    x_proj_weight (4, R + 2N, D); dt_projs_weight (4, D, R); dt_projs_bias (4, D);
    A_logs (4 * D, N); Ds (4 * D,). Returns the sum of the four directions' outputs, mapped back
    to row-major order, as float32 (batch, D, H, W).

    The projections run in x's dtype (as under autocast in the published code); everything from
    the scan on is float32.

    Example:
        >>> D, N, R = 8, 16, 1
        >>> y = multiaxial_selective_scan_ref(torch.randn(1, D, 5, 7), torch.randn(4, R + 2 * N, D),
        ...     torch.randn(4, D, R), torch.randn(4, D), torch.rand(4 * D, N), torch.ones(4 * D))
        >>> y.shape, y.dtype
        (torch.Size([1, 8, 5, 7]), torch.float32)
    """
    batch, dim, height, width = x.shape
    length = height * width
    num_dirs, proj_rows, _ = x_proj_weight.shape
    dt_rank = dt_projs_weight.shape[2]
    dstate = A_logs.shape[1]
    assert num_dirs == NUM_DIRECTIONS and proj_rows == dt_rank + 2 * dstate

    xs = direction_sequences(x)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [dt_rank, dstate, dstate], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)
    out = selective_scan_ref(
        xs.float().reshape(batch, -1, length),
        dts.float().reshape(batch, -1, length),
        -torch.exp(A_logs.float()),
        Bs.float(),
        Cs.float(),
        D=Ds.float(),
        delta_bias=dt_projs_bias.float().reshape(-1),
        delta_softplus=True,
    )
    return merge_directions(out.view(batch, num_dirs, dim, length), height, width)
