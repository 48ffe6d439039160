"""A plain, functional transcription of the published DermoMamba forward pass, for tests only.

Written from our specification of the published network (module order, formulas, quirks), NOT from
the dermomamba package: it takes a state_dict (name -> tensor) and an input and computes the output
with torch.nn.functional calls, its own selective-scan loop and VMamba v0's cross-scan built from
stack / transpose / flip. Nothing here imports dermomamba or dermomamba_kernels, so the package's
modules can be checked against it with the same weights.

Every function computes in the dtype of its inputs (no casts): running it in float64 gives the
oracle; running it in float32 gives the error that plain float32 arithmetic makes, which bounds what
our float32 model may make (tests allow about twice that).
"""

import torch
import torch.nn.functional as F

BN_EPS = 1e-5
LN_EPS = 1e-5
VSS_LN_EPS = 1e-6
LEAKY_SLOPE = 0.01


# --- VMamba v0 SS2D ------------------------------------------------------------------------------

def scan_loop(u, delta, A, B, C, D):
    """mamba's selective scan, one step per position: h = exp(delta*A) h + delta*B*u; y = C.h + D*u.

    All four directions at once: u, delta (b, K, d, L); A (K, d, n); B, C (b, K, n, L), shared by
    the d channels of their direction; D (K, d).
    """
    state = u.new_zeros(u.shape[:3] + (A.shape[-1],))
    outputs = []
    # unbind: one autograd node per tensor, so the backward stays linear in L.
    for u_t, delta_t, B_t, C_t in zip(u.unbind(-1), delta.unbind(-1), B.unbind(-1), C.unbind(-1)):
        state = torch.exp(delta_t[..., None] * A) * state + (delta_t * u_t)[..., None] * B_t[:, :, None, :]
        outputs.append((state * C_t[:, :, None, :]).sum(-1))
    return torch.stack(outputs, dim=-1) + u * D[..., None]


def ss2d_core(x, p, prefix):
    """VMamba v0's forward_corev0 on x (b, d, H, W): four directions, summed, (b, d, H*W) row-major."""
    batch, dim, height, width = x.shape
    length = height * width
    x_proj = p[prefix + "x_proj_weight"]
    dt_weight = p[prefix + "dt_projs_weight"]
    dt_bias = p[prefix + "dt_projs_bias"]
    A_logs = p[prefix + "A_logs"]
    Ds = p[prefix + "Ds"]
    rank, n_state = dt_weight.shape[2], A_logs.shape[1]

    rows = x.reshape(batch, dim, length)
    cols = torch.transpose(x, 2, 3).reshape(batch, dim, length)
    both = torch.stack([rows, cols], dim=1)
    sequences = torch.cat([both, torch.flip(both, dims=[-1])], dim=1)  # (b, 4, d, L)

    deltas, Bs, Cs = [], [], []
    for k in range(4):
        projected = torch.einsum("cd,bdl->bcl", x_proj[k], sequences[:, k])
        dt_in, B_k, C_k = torch.split(projected, [rank, n_state, n_state], dim=1)
        delta = torch.einsum("dr,brl->bdl", dt_weight[k], dt_in)
        deltas.append(F.softplus(delta + dt_bias[k][None, :, None]))
        Bs.append(B_k)
        Cs.append(C_k)
    A = -torch.exp(A_logs).reshape(4, dim, n_state)
    outputs = scan_loop(sequences, torch.stack(deltas, 1), A, torch.stack(Bs, 1), torch.stack(Cs, 1),
                        Ds.reshape(4, dim))

    row_major = outputs[:, 0]
    row_reversed = torch.flip(outputs[:, 2], dims=[-1])
    col_major = torch.transpose(outputs[:, 1].reshape(batch, dim, width, height), 2, 3).reshape(batch, dim, length)
    col_reversed = torch.transpose(torch.flip(outputs[:, 3], dims=[-1]).reshape(batch, dim, width, height),
                                   2, 3).reshape(batch, dim, length)
    # VMamba adds in this order: forward, reversed, column-major, reversed column-major.
    return row_major + row_reversed + col_major + col_reversed


def ss2d(x, p, prefix):
    """SS2D on channels-last x (b, H, W, C) with the weights p[prefix + name]."""
    batch, height, width, _ = x.shape
    xz = F.linear(x, p[prefix + "in_proj.weight"], p.get(prefix + "in_proj.bias"))
    inner, gate = xz.chunk(2, dim=-1)
    d_inner = inner.shape[-1]
    conv_w = p[prefix + "conv2d.weight"]
    inner = F.conv2d(inner.permute(0, 3, 1, 2), conv_w, p.get(prefix + "conv2d.bias"),
                     padding=(conv_w.shape[-1] - 1) // 2, groups=d_inner)
    inner = F.silu(inner)
    y = ss2d_core(inner, p, prefix)
    y = torch.transpose(y, 1, 2).reshape(batch, height, width, d_inner)
    y = F.layer_norm(y, (d_inner,), p[prefix + "out_norm.weight"], p[prefix + "out_norm.bias"], LN_EPS)
    y = y * F.silu(gate)
    return F.linear(y, p[prefix + "out_proj.weight"], p.get(prefix + "out_proj.bias"))


def vss_block(x, p, prefix):
    """x + SS2D(LayerNorm_eps1e-6(x)), channels-last."""
    normed = F.layer_norm(x, (x.shape[-1],), p[prefix + "ln_1.weight"], p[prefix + "ln_1.bias"], VSS_LN_EPS)
    return x + ss2d(normed, p, prefix + "self_attention.")


# --- DermoMamba blocks ---------------------------------------------------------------------------

def batch_norm_eval(x, p, prefix, eps=BN_EPS):
    return F.batch_norm(x, p[prefix + "running_mean"], p[prefix + "running_var"], p[prefix + "weight"],
                        p[prefix + "bias"], training=False, eps=eps)


def conv_same(x, p, prefix, groups=1, dilation=1):
    return F.conv2d(x, p[prefix + "weight"], p[prefix + "bias"], padding="same", dilation=dilation, groups=groups)


def axial_dw(x, p, prefix, dilation):
    channels = x.shape[1]
    y = conv_same(x, p, prefix + "mixer_w.", groups=channels, dilation=dilation)
    y = conv_same(y, p, prefix + "mixer_h.", groups=channels, dilation=dilation)
    y = conv_same(y, p, prefix + "conv.", groups=channels, dilation=dilation)
    return y + x


def cross_scale(x, p, prefix):
    quarters = torch.chunk(x, 4, dim=1)
    parts = []
    for i, dilation in enumerate((1, 2, 3)):
        mixed = axial_dw(quarters[i], p, f"{prefix}dw{i + 1}.", dilation)
        parts.append(vss_block(mixed.permute(0, 2, 3, 1), p, prefix + "vss.").permute(0, 3, 1, 2))
    parts.append(quarters[3])
    return F.relu(batch_norm_eval(torch.cat(parts, dim=1), p, prefix + "bn."))


def res_mamba(x, p, prefix):
    y = cross_scale(x, p, prefix + "block.")
    conv = conv_same(y, p, prefix + "conv.")
    normed = F.instance_norm(conv, weight=p[prefix + "ins_norm.weight"], bias=p[prefix + "ins_norm.bias"],
                             eps=BN_EPS)
    return F.leaky_relu(normed, LEAKY_SLOPE) + y * p[prefix + "scale"]


def encoder(x, p, prefix):
    x = res_mamba(x, p, prefix + "resmamba.")
    skip = F.relu(batch_norm_eval(conv_same(x, p, prefix + "pw."), p, prefix + "bn."))
    return F.max_pool2d(skip, 2), skip


def cbam(x, p, prefix):
    def mlp(v):
        hidden = F.relu(F.linear(v, p[prefix + "ChannelGate.mlp.1.weight"], p[prefix + "ChannelGate.mlp.1.bias"]))
        return F.linear(hidden, p[prefix + "ChannelGate.mlp.3.weight"], p[prefix + "ChannelGate.mlp.3.bias"])

    x = x * torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))[:, :, None, None]
    pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
    spatial = F.conv2d(pooled, p[prefix + "SpatialGate.spatial.conv.weight"], padding=3)
    spatial = batch_norm_eval(spatial, p, prefix + "SpatialGate.spatial.bn.")
    return x * torch.sigmoid(spatial)


def pcam(x, p, prefix):
    before = x.mean(dim=(2, 3))
    y = conv_same(x, p, prefix + "dw.", groups=x.shape[1])
    after = y.mean(dim=(2, 3))
    rise = torch.softmax(after - before, dim=1)
    return y * torch.sigmoid(after * (1 + rise))[:, :, None, None]


def sweep_mamba(x, p, prefix):
    """The bottleneck on x (b, C, h, w). mamba2 sees the projected map permuted to (b, w, c, h) -- a
    scan over the (w, c) plane with the h rows as channels; mamba3 sees it permuted to (b, c, h, w) --
    the (c, h) plane with the w columns as channels; both results are permuted back to (b, h, w, c)."""
    channels = x.shape[1]
    t = x.permute(0, 2, 3, 1)
    skip = t
    t = F.layer_norm(t, (channels,), p[prefix + "ln.weight"], p[prefix + "ln.bias"], LN_EPS)
    t = F.linear(t, p[prefix + "proj_in.weight"], p[prefix + "proj_in.bias"])
    x1 = ss2d(t, p, prefix + "mamba1.")
    x2 = ss2d(t.permute(0, 2, 3, 1), p, prefix + "mamba2.").permute(0, 3, 1, 2)
    x3 = ss2d(t.permute(0, 3, 1, 2), p, prefix + "mamba3.").permute(0, 2, 3, 1)
    gate = F.silu(t)
    out = F.linear(gate * x1 + gate * x2 + gate * x3, p[prefix + "proj_out.weight"], p[prefix + "proj_out.bias"])
    out = out + skip * p[prefix + "scale"]
    return F.relu(batch_norm_eval(out.permute(0, 3, 1, 2), p, prefix + "bn."))


def decoder(x, skip, p, prefix):
    x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1)
    x = F.conv2d(x, p[prefix + "pw.weight"], p[prefix + "pw.bias"])
    return batch_norm_eval(F.gelu(conv_same(x, p, prefix + "pw2.")), p, prefix + "bn.")


def dermomamba(x, p):
    """The whole published network in inference mode (BatchNorm on running statistics)."""
    x = F.conv2d(x, p["pw_in.weight"], p["pw_in.bias"])
    skips = []
    for stage in range(1, 6):
        x, skip = encoder(x, p, f"e{stage}.")
        skips.append(skip)
    skips = [cbam(skip, p, f"s{stage}.") for stage, skip in enumerate(skips, start=1)]
    x = sweep_mamba(pcam(x, p, "b2.") + x, p, "b1.")
    for stage in range(5, 0, -1):
        x = decoder(x, skips[stage - 1], p, f"d{stage}.")
    return F.conv2d(x, p["conv_out.weight"], p["conv_out.bias"])


# --- test utilities --------------------------------------------------------------------------------

def perturbed(state, scale=0.2):
    """A copy of a state_dict with every entry moved off its initial value, so that no weight sits
    at a special value (ones, zeros, identity BatchNorm) that could hide a wrong formula.

    BatchNorm running variances stay positive; step counters are left as they are.
    """
    out = {}
    for name, value in state.items():
        if not value.is_floating_point():
            out[name] = value.clone()
        elif name.endswith("running_var"):
            out[name] = torch.empty_like(value).uniform_(0.5, 1.5)
        elif name.endswith("running_mean"):
            out[name] = 0.1 * torch.randn_like(value)
        else:
            magnitude = value.abs().mean() + 0.1
            out[name] = value + scale * magnitude * torch.randn_like(value)
    return out


def relative_error(value, oracle):
    """max |value - oracle| / max |oracle|, computed in float64."""
    oracle = oracle.double()
    return ((value.double() - oracle).abs().max() / oracle.abs().max().clamp_min(1e-30)).item()
