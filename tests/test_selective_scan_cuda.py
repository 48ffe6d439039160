"""GPU tests of the CUDA scan kernels (torch.ops.dermomamba.* on CUDA tensors).

Every output and gradient is compared with a float64 re-statement of the reference
(`dermomamba_kernels.selective_scan.naive`): the kernel's error ||k - ref64|| / ||ref64|| may be at
most twice the error of the float32 reference run on the same (low-precision) inputs, its results
rounded to the kernel's output dtype, plus a floor of a few float32 roundings (FP32_FLOOR) for
results whose reference error is itself at the level of one rounding. The measured errors are
appended to $DERMOMAMBA_TEST_ERROR_LOG when set (the GPU script keeps them with its logs).

All tests skip cleanly without a CUDA GPU or without the CUDA kernels compiled in.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from dermomamba_kernels.selective_scan.naive import (NUM_DIRECTIONS, direction_sequences, merge_directions,
                                                     selective_scan_ref)

pytestmark = pytest.mark.gpu


def _cuda_kernels_built():
    if not torch.cuda.is_available():
        return False
    try:
        from dermomamba_kernels import _ext
    except Exception:  # noqa: BLE001 - any import failure means "not built"
        return False
    return _ext.extension_loaded() and _ext.compiled_with_cuda()


requires_cuda_kernels = pytest.mark.skipif(not _cuda_kernels_built(),
                                           reason="needs a CUDA GPU and dermomamba_kernels._C built with CUDA")

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A few float32 roundings: results whose float32 reference error is itself ~1e-7 are allowed
# this much on top of twice that error (different but equally valid summation orders).
FP32_FLOOR = 2e-6
CHUNK = 64  # small chunks so that short test sequences still cross several chunks and splits


def ops():
    return torch.ops.dermomamba


def rel_err(x, ref):
    x = x.double()
    ref = ref.double()
    denom = ref.norm().item()
    return (x - ref).norm().item() / max(denom, 1e-30)


def log_error(name, err_kernel, err_ref):
    path = os.environ.get("DERMOMAMBA_TEST_ERROR_LOG")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"check": name, "kernel": err_kernel, "reference": err_ref}) + "\n")


def assert_close_measured(name, kernel, ref_lowp, ref64):
    """kernel and ref_lowp against ref64; kernel may be at most ~2x as far off."""
    assert kernel.shape == ref64.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (unwritten or overflowed output)"
    err_kernel = rel_err(kernel, ref64)
    err_ref = rel_err(ref_lowp.to(kernel.dtype), ref64)
    log_error(name, err_kernel, err_ref)
    bound = 2.0 * err_ref + FP32_FLOOR
    assert err_kernel <= bound, f"{name}: kernel error {err_kernel:.3e} > 2 x reference error {err_ref:.3e} + floor"


# ---- a float64 statement of the reference arithmetic (selective_scan_ref computes in float32) ----

def scan64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """selective_scan_ref's arithmetic in float64; B, C (batch, groups, N, L) or constant (dim, N)."""
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape

    def per_channel(M):
        M = M.double()
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, M.shape[1], length)
        return M.repeat_interleave(dim // M.shape[1], dim=1)

    Bf, Cf = per_channel(B), per_channel(C)
    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * Bf[..., t]
        ys.append((state * Cf[..., t]).sum(-1))
    out = torch.stack(ys, -1)
    if D is not None:
        out = out + u * D.double()[:, None]
    if z is not None:
        out = out * F.silu(z.double())
    return out, state


def directional(t):
    """(batch, 4, C, H, W) native-layout per-direction tensor -> (batch, 4, C, L) in scan order."""
    return torch.stack([direction_sequences(t[:, k])[:, k] for k in range(NUM_DIRECTIONS)], dim=1)


def multiaxial_op_ref(x, delta, A, B, C, D, delta_bias, softplus, scan):
    """What multiaxial_scan_fwd computes, from the reference's own building blocks."""
    batch, dim, height, width = x.shape
    length = height * width
    xs = direction_sequences(x).reshape(batch, NUM_DIRECTIONS * dim, length)
    ds = directional(delta).reshape(batch, NUM_DIRECTIONS * dim, length)
    out = scan(xs, ds, A, directional(B), directional(C), D=D, delta_bias=delta_bias, delta_softplus=softplus)
    if isinstance(out, tuple):
        out = out[0]
    return merge_directions(out.view(batch, NUM_DIRECTIONS, dim, length), height, width)


# ---- input builders ----

def raw_delta(*shape, softplus=True):
    """delta before bias: around softplus's knee with softplus, else already a positive step."""
    if softplus:
        return 0.5 * torch.rand(*shape, device=DEVICE) - 1.5
    return 0.05 + 0.5 * torch.rand(*shape, device=DEVICE)


def make_1d(batch, dim, length, dstate, dtype, groups=1, constant_bc=False, bc_fp32=False, with_D=True,
            with_z=True, with_bias=True, softplus=True):
    u = torch.randn(batch, dim, length, device=DEVICE).to(dtype)
    delta = raw_delta(batch, dim, length, softplus=softplus).to(dtype)
    A = -(0.5 + torch.rand(dim, dstate, device=DEVICE)) * torch.arange(1, dstate + 1, device=DEVICE) / 4
    bc_dtype = torch.float32 if bc_fp32 else dtype
    if constant_bc:
        B = torch.randn(dim, dstate, device=DEVICE)
        C = torch.randn(dim, dstate, device=DEVICE)
    else:
        B = torch.randn(batch, groups, dstate, length, device=DEVICE).to(bc_dtype)
        C = torch.randn(batch, groups, dstate, length, device=DEVICE).to(bc_dtype)
    D = torch.randn(dim, device=DEVICE) if with_D else None
    z = torch.randn(batch, dim, length, device=DEVICE).to(dtype) if with_z else None
    bias = (0.5 * torch.randn(dim, device=DEVICE) if softplus else 0.1 * torch.rand(dim, device=DEVICE)) \
        if with_bias else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)


def op_bc(M, batch, length):
    """The op's (batch, groups, N, L) view of B / C (a constant (dim, N) as a stride-0 expansion)."""
    if M.dim() == 2:
        return M[None, :, :, None].expand(batch, M.shape[0], M.shape[1], length)
    return M


def make_multiaxial(batch, dim, height, width, dstate, dtype, fp32_params=False, permuted=False, softplus=True):
    def rand(*shape):
        if permuted:  # a channels-last style view: (.., H, W) strides not row-major
            base = torch.randn(*shape[:-3], shape[-2], shape[-1], shape[-3], device=DEVICE)
            return base.movedim(-1, -3)
        return torch.randn(*shape, device=DEVICE)

    proj_dtype = torch.float32 if fp32_params else dtype
    x = rand(batch, dim, height, width).to(dtype)
    delta = rand(batch, NUM_DIRECTIONS, dim, height, width)
    delta = ((0.5 * delta - 1.5) if softplus else (0.05 + 0.5 * delta.abs())).to(proj_dtype)
    B = rand(batch, NUM_DIRECTIONS, dstate, height, width).to(proj_dtype)
    C = rand(batch, NUM_DIRECTIONS, dstate, height, width).to(proj_dtype)
    A = -(0.5 + torch.rand(NUM_DIRECTIONS * dim, dstate, device=DEVICE)) * torch.arange(1, dstate + 1,
                                                                                         device=DEVICE) / 4
    D = torch.randn(NUM_DIRECTIONS * dim, device=DEVICE)
    bias = (0.5 * torch.randn(NUM_DIRECTIONS * dim, device=DEVICE) if softplus
            else 0.1 * torch.rand(NUM_DIRECTIONS * dim, device=DEVICE))
    return dict(x=x, delta=delta, A=A, B=B, C=C, D=D, delta_bias=bias)


def poison_(t):
    if t.numel():
        t.fill_(float("nan"))
    return t


# ---- 1-D scan ----

def run_1d_op(inp, softplus, chunk=CHUNK, deterministic=False, dout=None):
    u, delta, A, B, C = (inp[k] for k in ("u", "delta", "A", "B", "C"))
    batch, _, length = u.shape
    out, last, states = ops().selective_scan_fwd(u, delta, A, op_bc(B, batch, length), op_bc(C, batch, length),
                                                 inp["D"], inp["z"], inp["delta_bias"], softplus, chunk)
    grads = None
    if dout is not None:
        grads = ops().selective_scan_bwd(dout, u, delta, A, op_bc(B, batch, length), op_bc(C, batch, length),
                                         inp["D"], inp["z"], inp["delta_bias"], softplus, states, chunk,
                                         deterministic)
    return out, last, states, grads


GRAD_NAMES_1D = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def kernel_grads_1d(grads, inp):
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    named = {"u": du, "delta": ddelta, "A": dA, "D": dD, "z": dz, "delta_bias": dbias}
    for key, g in (("B", dB), ("C", dC)):
        # A constant (dim, N) B receives its (batch, dim, N, L) expansion's gradient.
        named[key] = g.float().sum((0, 3)) if inp[key].dim() == 2 else g
    return named


def reference_grads(fn, inputs, dout):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out = fn(**{k: leaves.get(k) for k in inputs})
    out = out[0] if isinstance(out, tuple) else out
    out.backward(dout.to(out.dtype))
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def check_1d(inp, softplus, tag, chunk=CHUNK):
    batch, dim, length = inp["u"].shape
    dout = torch.randn(batch, dim, length, device=DEVICE).to(inp["u"].dtype)
    out, last, states, grads = run_1d_op(inp, softplus, chunk=chunk, dout=dout)

    def ref_lowp(**kw):
        return selective_scan_ref(**kw, delta_softplus=softplus)

    def ref_hi(**kw):
        return scan64(**kw, delta_softplus=softplus)[0]

    ref_out, ref_g = reference_grads(ref_lowp, inp, dout)
    hi_out, hi_g = reference_grads(ref_hi, {k: (v.double() if v is not None else None) for k, v in inp.items()},
                                   dout.double())
    assert_close_measured(f"{tag}/out", out, ref_out, hi_out)
    _, ref_last = selective_scan_ref(**inp, delta_softplus=softplus, return_last_state=True)
    _, hi_last = scan64(**{k: (v.double() if v is not None else None) for k, v in inp.items()},
                        delta_softplus=softplus)
    assert_close_measured(f"{tag}/last_state", last, ref_last, hi_last)
    assert states.shape == (batch, dim, -(-length // min(chunk, length)), inp["A"].shape[1])
    assert torch.equal(states[:, :, 0], torch.zeros_like(states[:, :, 0])), "chunk 0 must enter with a zero state"
    named = kernel_grads_1d(grads, inp)
    for key in GRAD_NAMES_1D:
        if inp[key] is None:
            assert named[key].numel() == 0, f"{tag}: d{key} must be empty when {key} is None"
            continue
        assert named[key].dtype == inp[key].dtype or inp[key].dim() == 2, f"{tag}: d{key} dtype"
        assert_close_measured(f"{tag}/d{key}", named[key], ref_g[key], hi_g[key])


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [1, 37, 301])
def test_selective_scan_parity(seed, dtype, length):
    inp = make_1d(2, 8, length, 16, dtype, groups=2)
    check_1d(inp, softplus=True, tag=f"1d/{dtype}/L{length}")


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", ["plain", "no_softplus", "constant_bc", "fp32_bc", "groups_4", "batch_1_N7",
                                    "dim_odd"])
def test_selective_scan_options(seed, dtype, option):
    kwargs = dict(batch=2, dim=8, length=150, dstate=16, dtype=dtype)
    softplus = True
    if option == "plain":
        kwargs.update(with_D=False, with_z=False, with_bias=False)
    elif option == "no_softplus":
        softplus = False
        kwargs.update(softplus=False)
    elif option == "constant_bc":
        kwargs.update(constant_bc=True)
    elif option == "fp32_bc":
        kwargs.update(bc_fp32=True)
    elif option == "groups_4":
        kwargs.update(groups=4)
    elif option == "batch_1_N7":
        kwargs.update(batch=1, dstate=7)
    elif option == "dim_odd":
        kwargs.update(dim=6, groups=3)
    inp = make_1d(**kwargs)
    check_1d(inp, softplus=softplus, tag=f"1d/{dtype}/{option}")


@requires_cuda_kernels
@pytest.mark.parametrize("chunk", [1, 33, 256, 1000])
def test_selective_scan_chunk_sizes(seed, chunk):
    inp = make_1d(1, 4, 300, 16, torch.float32)
    if chunk > 256:
        with pytest.raises(RuntimeError, match="chunk_size"):
            run_1d_op(inp, True, chunk=chunk)
        return
    check_1d(inp, softplus=True, tag=f"1d/chunk{chunk}", chunk=chunk)


@requires_cuda_kernels
def test_selective_scan_outputs_fully_written(seed):
    """Run twice into a caching allocator filled with NaN: a skipped element would surface."""
    inp = make_1d(2, 16, 200, 16, torch.float32)
    poison = torch.full((64 << 20,), float("nan"), device=DEVICE)
    del poison  # the freed NaN block is what the next allocations reuse
    dout = torch.randn_like(inp["u"])
    out, last, states, grads = run_1d_op(inp, True, dout=dout)
    for t in (out, last, states) + tuple(grads):
        assert torch.isfinite(t).all()


# ---- multiaxial scan ----

GRAD_NAMES_MA = ("x", "delta", "A", "B", "C", "D", "delta_bias")


def run_multiaxial_op(inp, softplus, chunk=CHUNK, deterministic=False, dy=None):
    y, states = ops().multiaxial_scan_fwd(inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"],
                                          inp["delta_bias"], softplus, chunk)
    grads = None
    if dy is not None:
        grads = ops().multiaxial_scan_bwd(dy, inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"],
                                          inp["delta_bias"], softplus, states, chunk, deterministic)
    return y, states, grads


def check_multiaxial(inp, softplus, tag, chunk=CHUNK, deterministic=False):
    batch, dim, height, width = inp["x"].shape
    dy = torch.randn(batch, dim, height, width, device=DEVICE)
    y, states, grads = run_multiaxial_op(inp, softplus, chunk=chunk, dy=dy, deterministic=deterministic)
    assert y.dtype == torch.float32 and y.is_contiguous()

    def ref_lowp(**kw):
        # the published path casts the scan's inputs to float32: so does the low-precision reference
        return multiaxial_op_ref(scan=selective_scan_ref, softplus=softplus,
                                 **{k: v.float() for k, v in kw.items()})

    def ref_hi(**kw):
        return multiaxial_op_ref(scan=scan64, softplus=softplus, **kw)

    ref_y, ref_g = reference_grads(ref_lowp, inp, dy)
    hi_y, hi_g = reference_grads(ref_hi, {k: v.double() for k, v in inp.items()}, dy.double())
    assert_close_measured(f"{tag}/y", y, ref_y, hi_y)
    for key, g in zip(GRAD_NAMES_MA, grads):
        assert g.dtype == inp[key].dtype, f"{tag}: d{key} has dtype {g.dtype}, expected {inp[key].dtype}"
        assert g.shape == inp[key].shape
        assert_close_measured(f"{tag}/d{key}", g, ref_g[key], hi_g[key])


# The multiaxial forward has four kernels (csrc/cuda/selective_scan_cuda.cpp reads
# DERMOMAMBA_SCAN_FWD_KERNEL on every call): "warp" (v2), "lane" (scan v3: a lane per
# state), "lane4" (v3 with 4 lanes x 4 states per sequence, N <= 16) and "staged" (scan v4: tiles
# staged in shared memory, one launch with a decoupled look-back, N <= 32; the default where it
# applies, else warp: test_multiaxial_default_forward_kernel) and "regs" (scan v5: the staged skeleton with
# several states of one channel in each thread's registers, N <= 32) and "flat" (scan v6: all N <= 16 states of
# one sequence in one thread, a line segment per thread, three launches). All must write the same y
# and chunk_states, and the one backward must give the reference's gradients from any one's
# chunk_states, so the multiaxial parity tests run once per forward kernel.
FWD_KERNEL_VARIABLE = "DERMOMAMBA_SCAN_FWD_KERNEL"
FWD_KERNELS = ["warp", "lane", "lane4", "staged", "regs", "flat"]
LANE4_MAX_STATES = 16
FLAT_MAX_STATES = 16
# Forward kernels limited to N <= 16, with the name their error message uses.
SIXTEEN_STATE_KERNELS = {"lane4": LANE4_MAX_STATES, "flat": FLAT_MAX_STATES}


@pytest.fixture(params=FWD_KERNELS)
def fwd_kernel(request, monkeypatch):
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, request.param)
    return request.param


# The multiaxial backward has three kernels, chosen by DERMOMAMBA_SCAN_BWD_KERNEL on every call:
# "warp" (the default), "lane" (scan v3 backward: a lane per (sequence, state), N <= 32) and "staged"
# (scan v4 backward: tiles staged in shared memory, one launch with a reverse look-back, N <= 32) and "regs"
# (scan v5 backward: the staged skeleton with several states per thread, N <= 32). All
# read any forward kernel's chunk_states, so the parity tests run over every (forward, backward) pair.
BWD_KERNEL_VARIABLE = "DERMOMAMBA_SCAN_BWD_KERNEL"
BWD_KERNELS = ["warp", "lane", "staged", "regs"]
LANE_BWD_MAX_STATES = 32
STAGED_BWD_MAX_STATES = 32


@pytest.fixture(params=BWD_KERNELS)
def bwd_kernel(request, monkeypatch):
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, request.param)
    return request.param


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", [(5, 7), (9, 4), (1, 13), (12, 11)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_multiaxial_parity(seed, dtype, hw, fwd_kernel, bwd_kernel):
    inp = make_multiaxial(2, 8, hw[0], hw[1], 16, dtype)
    check_multiaxial(inp, softplus=True, tag=f"ma/{dtype}/{hw[0]}x{hw[1]}", chunk=16)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multiaxial_backward_in_batch_slices(seed, dtype, monkeypatch):
    """The recomputing backward run one image at a time (its memory bound, forced down): same gradients."""
    from dermomamba_kernels.selective_scan import extension
    monkeypatch.setattr(extension, "BACKWARD_SLICE_PROJECTION_ELEMENTS", 1)
    inp = make_multiaxial(3, 8, 7, 5, 16, dtype)
    check_multiaxial(inp, softplus=True, tag=f"ma/{dtype}/sliced", chunk=16)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_multiaxial_fp32_projections(seed, dtype, fwd_kernel, bwd_kernel):
    inp = make_multiaxial(1, 4, 6, 9, 16, dtype, fp32_params=True)
    check_multiaxial(inp, softplus=True, tag=f"ma/{dtype}/fp32proj", chunk=16)


@requires_cuda_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_multiaxial_permuted_and_wide(seed, deterministic, fwd_kernel, bwd_kernel):
    # dim 32: four blocks share each direction's B, C, exercising the dB / dC reduction paths.
    inp = make_multiaxial(1, 32, 10, 7, 8, torch.float32, permuted=True)
    assert not inp["x"].is_contiguous()
    check_multiaxial(inp, softplus=True, tag=f"ma/permuted/det{int(deterministic)}", chunk=32,
                     deterministic=deterministic)


@requires_cuda_kernels
@pytest.mark.parametrize("column", [True, False], ids=["W1", "H1"])
def test_multiaxial_one_row_or_column_views(seed, column, fwd_kernel, bwd_kernel):
    """x a transposed view with a size-1 axis whose stride is arbitrary (torch ignores it and calls the
    view contiguous): the kernels must take positions from the other axis's stride."""
    # Made with the other shape, then transposed: (2, 8, 11, 1) -> W == 1, or (2, 8, 1, 11) -> H == 1.
    inp = make_multiaxial(2, 8, 1, 11, 16, torch.float32) if column else make_multiaxial(2, 8, 11, 1, 16,
                                                                                        torch.float32)
    for key in ("x", "delta", "B", "C"):
        inp[key] = inp[key].transpose(-2, -1)
    assert inp["x"].is_contiguous()  # what torch says; stride(size-1 axis) is not the other axis's
    check_multiaxial(inp, softplus=True, tag=f"ma/one-{'column' if column else 'row'}", chunk=4)


@requires_cuda_kernels
def test_multiaxial_no_softplus_batch1(seed, fwd_kernel, bwd_kernel):
    inp = make_multiaxial(1, 3, 8, 5, 5, torch.float32, softplus=False)
    check_multiaxial(inp, softplus=False, tag="ma/no_softplus", chunk=8)


def chunk_states_ref(inp, softplus, chunk, dtype):
    """The state entering every chunk, (batch, 4, dim, chunks, N), by the recurrence in `dtype`."""
    batch, dim, height, width = inp["x"].shape
    length = height * width
    A = inp["A"].to(dtype)
    xs = direction_sequences(inp["x"].to(dtype)).reshape(batch, NUM_DIRECTIONS * dim, length)
    delta = directional(inp["delta"].to(dtype)).reshape(batch, NUM_DIRECTIONS * dim, length)
    delta = delta + inp["delta_bias"].to(dtype)[:, None]
    if softplus:
        delta = F.softplus(delta)
    Bs = directional(inp["B"].to(dtype)).repeat_interleave(dim, dim=1)
    state = xs.new_zeros(batch, NUM_DIRECTIONS * dim, A.shape[1])
    entering = []
    for t in range(length):
        if t % chunk == 0:
            entering.append(state)
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * xs[:, :, t])[..., None] * Bs[..., t]
    return torch.stack(entering, 2).view(batch, NUM_DIRECTIONS, dim, len(entering), A.shape[1])


# The wrapper's projection rows per direction: [B (N), C (N), dt (R), zeros] padded to a multiple of 8
# (dermomamba_kernels/selective_scan/extension.py, PROJECTION_ROW_MULTIPLE), so B and C start on 16-byte
# boundaries: the flat forward's vector loads.
ALIGNED_ROW_MULTIPLE = 8


def wrapper_layout(inp, rank=1, aligned=False):
    """B, C as the wrapper passes them: (batch, 4, N, H, W) views of one channel-last
    (batch, H, W, 4, rows) projection (state stride 1, position strides 4 * rows). rows = R + 2N with B after
    the R dt values (an older layout, B and C unaligned), or with ``aligned`` as the wrapper lays it out now:
    B, C, dt, zeros up to a multiple of ALIGNED_ROW_MULTIPLE."""
    batch, _, dstate, height, width = inp["B"].shape
    rows = rank + 2 * dstate
    if aligned:
        rows = -(-rows // ALIGNED_ROW_MULTIPLE) * ALIGNED_ROW_MULTIPLE
    first = 0 if aligned else rank
    x_dbl = torch.randn(batch, height, width, NUM_DIRECTIONS, rows, device=DEVICE).to(inp["B"].dtype)
    x_dbl[..., first:first + dstate] = inp["B"].permute(0, 3, 4, 1, 2)
    x_dbl[..., first + dstate:first + 2 * dstate] = inp["C"].permute(0, 3, 4, 1, 2)
    out = dict(inp)
    out["B"] = x_dbl[..., first:first + dstate].permute(0, 3, 4, 1, 2)
    out["C"] = x_dbl[..., first + dstate:first + 2 * dstate].permute(0, 3, 4, 1, 2)
    return out


def apply_bc_layout(inp, wrapper_bc):
    """wrapper_bc: False (the inputs' own layout), True (the unaligned channel-last layout) or "aligned"."""
    return wrapper_layout(inp, aligned=wrapper_bc == "aligned") if wrapper_bc else inp


# (batch, dim, H, W, N, chunk, wrapper's B / C layout): shapes the lane kernel treats specially:
# N below its 16-lane group (idle lanes) with an odd dim (idle groups), N above 16 (32-lane groups),
# a chunk shorter than a position block, chunk_size >= L, and a long L cut into many splits.
def lane_case_id(case):
    batch, dim, height, width, dstate, chunk, wrapper_bc = case
    suffix = {False: "", True: "_wrapperBC", "aligned": "_alignedBC"}[wrapper_bc]
    return f"b{batch}d{dim}_{height}x{width}_N{dstate}_chunk{chunk}" + suffix


# The last two: lines longer than the flat kernel's 64-position segments and more than one warp of lines (H and
# W above 32), a chunk that is not a multiple of the segment, and the wrapper's aligned rows (its vector loads).
LANE_CASES = [
    (1, 3, 8, 5, 5, 8, False),
    (2, 5, 7, 9, 20, 16, False),
    (1, 2, 6, 5, 32, 1000, False),
    (2, 8, 9, 11, 16, 5, True),
    (1, 8, 24, 40, 16, 64, True),
    (1, 4, 30, 20, 16, 128, True),
    (1, 5, 33, 67, 16, 50, "aligned"),
    (2, 4, 70, 41, 16, 128, "aligned"),
]


@requires_cuda_kernels
@pytest.mark.parametrize("case", LANE_CASES, ids=lane_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multiaxial_forward_y_and_chunk_states(seed, case, dtype, fwd_kernel, bwd_kernel):
    """y and every chunk state against float64, each forward kernel, then the gradients through the
    backward reading that kernel's chunk_states."""
    batch, dim, height, width, dstate, chunk, wrapper_bc = case
    inp = apply_bc_layout(make_multiaxial(batch, dim, height, width, dstate, dtype), wrapper_bc)
    if dstate > SIXTEEN_STATE_KERNELS.get(fwd_kernel, dstate):
        with pytest.raises(RuntimeError, match=rf"{fwd_kernel}\) supports a state size N up to 16"):
            run_multiaxial_op(inp, True, chunk=chunk)
        return
    # Outputs land in a caching allocator just filled with NaN: an unwritten element would surface.
    poison = torch.full((64 << 20,), float("nan"), device=DEVICE)
    del poison
    y, states, _ = run_multiaxial_op(inp, True, chunk=chunk)
    length = height * width
    assert states.shape == (batch, NUM_DIRECTIONS, dim, -(-length // min(chunk, length)), dstate)
    assert torch.isfinite(y).all() and torch.isfinite(states).all(), "unwritten or non-finite output"
    assert torch.equal(states[:, :, :, 0], torch.zeros_like(states[:, :, :, 0])), "chunk 0 must enter with zero"
    tag = f"ma-{fwd_kernel}/{dtype}/{'x'.join(map(str, case[:6]))}"
    states_lowp = chunk_states_ref(inp, True, min(chunk, length), torch.float32)
    states_hi = chunk_states_ref(inp, True, min(chunk, length), torch.float64)
    assert_close_measured(f"{tag}/chunk_states", states, states_lowp, states_hi)
    check_multiaxial(inp, softplus=True, tag=tag, chunk=chunk)


@requires_cuda_kernels
def test_multiaxial_forward_kernel_choice_errors(seed, monkeypatch):
    m = make_multiaxial(1, 4, 5, 6, 8, torch.float32)
    args = (m["x"], m["delta"], m["A"], m["B"], m["C"], m["D"], m["delta_bias"], True, 16)
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, "lanes")
    with pytest.raises(RuntimeError, match=f"{FWD_KERNEL_VARIABLE} must be 'warp', 'lane' or 'lane4'"):
        ops().multiaxial_scan_fwd(*args)
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, "lane")
    big = make_multiaxial(1, 4, 5, 6, 33, torch.float32)
    with pytest.raises(RuntimeError, match=r"lane kernel .*=lane\) supports a state size N up to 32"):
        ops().multiaxial_scan_fwd(big["x"], big["delta"], big["A"], big["B"], big["C"], big["D"], big["delta_bias"],
                                  True, 16)
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, "lane4")
    wide = make_multiaxial(1, 4, 5, 6, LANE4_MAX_STATES + 1, torch.float32)
    with pytest.raises(RuntimeError, match=r"=lane4\) supports a state size N up to 16"):
        ops().multiaxial_scan_fwd(wide["x"], wide["delta"], wide["A"], wide["B"], wide["C"], wide["D"],
                                  wide["delta_bias"], True, 16)
    for tiled in ("staged", "regs"):
        monkeypatch.setenv(FWD_KERNEL_VARIABLE, tiled)
        with pytest.raises(RuntimeError, match=rf"={tiled}\) supports a state size N up to 32"):
            ops().multiaxial_scan_fwd(big["x"], big["delta"], big["A"], big["B"], big["C"], big["D"],
                                      big["delta_bias"], True, 16)
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, "flat")
    with pytest.raises(RuntimeError, match=rf"=flat\) supports a state size N up to {FLAT_MAX_STATES}"):
        ops().multiaxial_scan_fwd(wide["x"], wide["delta"], wide["A"], wide["B"], wide["C"], wide["D"],
                                  wide["delta_bias"], True, 16)
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, "warp")
    ops().multiaxial_scan_fwd(big["x"], big["delta"], big["A"], big["B"], big["C"], big["D"], big["delta_bias"],
                              True, 16)


@requires_cuda_kernels
def test_multiaxial_default_forward_kernel(seed, monkeypatch):
    """Unset, the forward is the staged kernel where it applies (its chunk_states are schedule-independent,
    so bit-identical to an explicit staged run) and the warp kernel for N > 32 (no error); the backward
    likewise."""
    monkeypatch.delenv(FWD_KERNEL_VARIABLE, raising=False)
    monkeypatch.delenv(BWD_KERNEL_VARIABLE, raising=False)
    for dstate, explicit in ((16, "staged"), (33, "warp")):
        m = make_multiaxial(2, 5, 9, 14, dstate, torch.float32)
        args = (m["x"], m["delta"], m["A"], m["B"], m["C"], m["D"], m["delta_bias"], True, 16)
        y_default, states_default = ops().multiaxial_scan_fwd(*args)
        monkeypatch.setenv(FWD_KERNEL_VARIABLE, explicit)
        y_explicit, states_explicit = ops().multiaxial_scan_fwd(*args)
        monkeypatch.delenv(FWD_KERNEL_VARIABLE)
        if explicit == "staged":
            assert torch.equal(states_default, states_explicit)
        else:  # the warp kernel's split carries are summed in a launch-dependent order
            torch.testing.assert_close(states_default, states_explicit)
        # y: the four directions meet in float atomics, whose order varies between runs
        torch.testing.assert_close(y_default, y_explicit)
        # The backward's default is the same rule ("staged" where it applies, else "warp"): in the
        # deterministic mode its gradients are bit-identical to the named kernel's.
        dy = torch.randn_like(y_default)
        grads_default = ops().multiaxial_scan_bwd(dy, *args[:8], states_default, 16, True)
        monkeypatch.setenv(BWD_KERNEL_VARIABLE, explicit)
        grads_explicit = ops().multiaxial_scan_bwd(dy, *args[:8], states_default, 16, True)
        monkeypatch.delenv(BWD_KERNEL_VARIABLE)
        for got, want in zip(grads_default, grads_explicit):
            assert torch.equal(got, want)


# Shapes the lane backward treats specially (batch, dim, H, W, N, chunk, wrapper's B / C layout):
# several blocks per direction (dim above one block's 8 channels at N <= 16, 2 at N > 16: dB / dC
# by atomics or partials), idle lanes and groups, a chunk that is not a multiple of the 16- or
# 32-position block, the largest chunk (16 checkpoints), one chunk >= L, long L cut into many splits.
LANE_BWD_CASES = [
    (1, 20, 9, 13, 16, 40, False),
    (2, 3, 11, 6, 5, 7, True),
    (1, 5, 17, 9, 20, 50, False),
    (1, 4, 24, 40, 16, 256, True),
    (1, 2, 30, 33, 16, 250, True),
    (2, 9, 5, 7, 16, 1000, False),
    (1, 8, 64, 48, 16, 128, True),
]


@requires_cuda_kernels
@pytest.mark.parametrize("case", LANE_BWD_CASES, ids=lane_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_multiaxial_backward_lane_shapes(seed, case, dtype, deterministic, monkeypatch):
    """Every gradient of the lane backward against float64, from the lane forward's chunk_states."""
    check_backward_kernel_shape("lane", case, dtype, deterministic, monkeypatch)


def check_backward_kernel_shape(kernel, case, dtype, deterministic, monkeypatch):
    """check_multiaxial with ``kernel`` as both the forward and the backward, on outputs poisoned first."""
    batch, dim, height, width, dstate, chunk, wrapper_bc = case
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, kernel)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, kernel)
    inp = apply_bc_layout(make_multiaxial(batch, dim, height, width, dstate, dtype), wrapper_bc)
    # Outputs land in a caching allocator just filled with NaN: an unwritten element would surface.
    poison = torch.full((64 << 20,), float("nan"), device=DEVICE)
    del poison
    check_multiaxial(inp, softplus=True, tag=f"ma-{kernel}-bwd/{dtype}/{'x'.join(map(str, case[:6]))}", chunk=chunk,
                     deterministic=deterministic)


# Shapes the staged backward treats specially (batch, dim, H, W, N, chunk, wrapper's B / C layout): many
# tiles (the reverse look-back crosses milestones every 8 tiles: 27 tiles at 70x73 / chunk 16, 14 at
# 48x53), several channel blocks per direction (dim 40 at N 16, dim 9 at N 20: dB / dC by atomics or
# partials), idle slots and lanes, chunks shorter than a position block and >= L, the wrapper's layout.
STAGED_BWD_CASES = [
    (1, 8, 70, 73, 16, 16, False),
    (1, 8, 48, 53, 16, 16, True),
    (1, 40, 20, 30, 16, 32, False),
    (2, 9, 17, 9, 20, 50, False),
    (2, 3, 11, 6, 5, 7, True),
    (2, 9, 5, 7, 16, 1000, False),
    (1, 8, 64, 48, 16, 128, True),
]


# The staged backward's variants (csrc/cuda/scan_staged_layout.h, DERMOMAMBA_STAGED_BWD_VARIANT): "v4" (the
# default) and the "lean" / "lean80" forms with fewer registers per lane (more warps per SM).
STAGED_BWD_VARIANT_VARIABLE = "DERMOMAMBA_STAGED_BWD_VARIANT"
STAGED_BWD_VARIANTS = ["v4", "lean", "lean80"]


@requires_cuda_kernels
@pytest.mark.parametrize("variant", STAGED_BWD_VARIANTS)
@pytest.mark.parametrize("case", STAGED_BWD_CASES, ids=lane_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_multiaxial_backward_staged_shapes(seed, case, dtype, deterministic, variant, monkeypatch):
    """Every gradient of the staged backward (each variant) against float64, from the staged forward's
    chunk_states."""
    monkeypatch.setenv(STAGED_BWD_VARIANT_VARIABLE, variant)
    check_backward_kernel_shape("staged", case, dtype, deterministic, monkeypatch)


@requires_cuda_kernels
def test_staged_backward_variant_name_is_checked(seed, monkeypatch):
    m = make_multiaxial(1, 4, 5, 6, 8, torch.float32)
    _, states, _ = run_multiaxial_op(m, True, chunk=16)
    dy = torch.randn_like(m["x"], dtype=torch.float32)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "staged")
    monkeypatch.setenv(STAGED_BWD_VARIANT_VARIABLE, "leaner")
    with pytest.raises(RuntimeError, match=STAGED_BWD_VARIANT_VARIABLE):
        ops().multiaxial_scan_bwd(dy, m["x"], m["delta"], m["A"], m["B"], m["C"], m["D"], m["delta_bias"], True,
                                  states, 16, False)


@requires_cuda_kernels
@pytest.mark.parametrize("case", STAGED_BWD_CASES, ids=lane_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_multiaxial_backward_regs_shapes(seed, case, dtype, deterministic, monkeypatch):
    """Every gradient of the regs (v5) backward against float64, from the regs forward's chunk_states, at the
    staged backward's special shapes (many tiles, several channel blocks, idle lanes, odd chunks)."""
    check_backward_kernel_shape("regs", case, dtype, deterministic, monkeypatch)


@requires_cuda_kernels
@pytest.mark.parametrize("other", ["staged", "regs"])
def test_multiaxial_backward_tiled_matches_warp(seed, other, monkeypatch):
    """The staged / regs and warp backwards on the same chunk_states: equal up to fp32 summation order."""
    inp = make_multiaxial(2, 16, 40, 36, 16, torch.float32)
    dy = torch.randn(2, 16, 40, 36, device=DEVICE)
    _, states, _ = run_multiaxial_op(inp, True, chunk=64)
    args = (dy, inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"], True, states, 64,
            True)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "warp")
    warp = ops().multiaxial_scan_bwd(*args)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, other)
    tiled = ops().multiaxial_scan_bwd(*args)
    for name, a, b in zip(GRAD_NAMES_MA, tiled, warp):
        assert rel_err(a, b) <= FP32_FLOOR, f"d{name}: {other} vs warp backward differ by {rel_err(a, b):.2e}"


@requires_cuda_kernels
def test_multiaxial_backward_lane_matches_warp(seed, monkeypatch):
    """The two backward kernels on the same chunk_states: equal up to fp32 summation order."""
    inp = make_multiaxial(2, 16, 24, 20, 16, torch.float32)
    dy = torch.randn(2, 16, 24, 20, device=DEVICE)
    _, states, _ = run_multiaxial_op(inp, True, chunk=64)
    args = (dy, inp["x"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["delta_bias"], True, states, 64,
            True)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "warp")
    warp = ops().multiaxial_scan_bwd(*args)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "lane")
    lane = ops().multiaxial_scan_bwd(*args)
    # Measured (lane backward in the warp emulator vs the CPU op, this shape): 1.5e-7 (dx) to 4.4e-7 (dA);
    # both kernels are checked against float64 elsewhere, this checks they agree to fp32 summation order.
    for name, a, b in zip(GRAD_NAMES_MA, lane, warp):
        assert rel_err(a, b) <= FP32_FLOOR, f"d{name}: lane vs warp backward differ by {rel_err(a, b):.2e}"


@requires_cuda_kernels
def test_multiaxial_backward_kernel_choice_errors(seed, monkeypatch):
    def backward_args(m):
        _, states, _ = run_multiaxial_op(m, True, chunk=16)
        dy = torch.randn_like(m["x"], dtype=torch.float32)
        return (dy, m["x"], m["delta"], m["A"], m["B"], m["C"], m["D"], m["delta_bias"], True, states, 16, False)

    monkeypatch.setenv(FWD_KERNEL_VARIABLE, "warp")
    args = backward_args(make_multiaxial(1, 4, 5, 6, 8, torch.float32))
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "lanes")
    with pytest.raises(RuntimeError, match=f"{BWD_KERNEL_VARIABLE} must be 'warp' or 'lane'"):
        ops().multiaxial_scan_bwd(*args)
    big = backward_args(make_multiaxial(1, 4, 5, 6, LANE_BWD_MAX_STATES + 1, torch.float32))
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "lane")
    with pytest.raises(RuntimeError, match=rf"{BWD_KERNEL_VARIABLE}=lane\) supports a state size N up to 32"):
        ops().multiaxial_scan_bwd(*big)
    for tiled in ("staged", "regs"):
        monkeypatch.setenv(BWD_KERNEL_VARIABLE, tiled)
        with pytest.raises(RuntimeError, match=rf"{BWD_KERNEL_VARIABLE}={tiled}\) supports a state size N up to 32"):
            ops().multiaxial_scan_bwd(*big)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "warp")
    ops().multiaxial_scan_bwd(*big)


@requires_cuda_kernels
def test_regs_variant_variables_are_checked(seed, monkeypatch):
    """The regs kernels' benchmark variants (DERMOMAMBA_REGS_FWD_VARIANT / _BWD_VARIANT): an unknown one is an
    error that names the variable, not a silent default."""
    m = make_multiaxial(1, 4, 5, 6, 16, torch.float32)
    args = (m["x"], m["delta"], m["A"], m["B"], m["C"], m["D"], m["delta_bias"], True, 16)
    monkeypatch.setenv(FWD_KERNEL_VARIABLE, "regs")
    monkeypatch.setenv("DERMOMAMBA_REGS_FWD_VARIANT", "9")
    with pytest.raises(RuntimeError, match="DERMOMAMBA_REGS_FWD_VARIANT must be one of"):
        ops().multiaxial_scan_fwd(*args)
    monkeypatch.delenv("DERMOMAMBA_REGS_FWD_VARIANT")
    _, states = ops().multiaxial_scan_fwd(*args)
    monkeypatch.setenv(BWD_KERNEL_VARIABLE, "regs")
    monkeypatch.setenv("DERMOMAMBA_REGS_BWD_VARIANT", "s7")
    dy = torch.randn_like(m["x"])
    with pytest.raises(RuntimeError, match="DERMOMAMBA_REGS_BWD_VARIANT must name one of"):
        ops().multiaxial_scan_bwd(dy, *args[:8], states, 16, False)


# ---- determinism ----

@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_backward_bit_identical(seed, dtype, bwd_kernel):
    inp = make_multiaxial(2, 32, 16, 24, 16, dtype)
    dy = torch.randn(2, 32, 16, 24, device=DEVICE)
    first = run_multiaxial_op(inp, True, chunk=32, dy=dy, deterministic=True)[2]
    for _ in range(3):
        again = run_multiaxial_op(inp, True, chunk=32, dy=dy, deterministic=True)[2]
        for name, a, b in zip(GRAD_NAMES_MA, first, again):
            assert torch.equal(a, b), f"multiaxial d{name} differs between deterministic runs"
    inp1 = make_1d(2, 64, 700, 16, dtype, groups=1)
    dout = torch.randn_like(inp1["u"])
    first = run_1d_op(inp1, True, dout=dout, deterministic=True)[3]
    for _ in range(3):
        again = run_1d_op(inp1, True, dout=dout, deterministic=True)[3]
        for name, a, b in zip(GRAD_NAMES_1D, first, again):
            assert torch.equal(a, b), f"1-D d{name} differs between deterministic runs"


# ---- public API, opcheck, torch.compile (need the Python wrappers: extension.py) ----

def _wrappers():
    try:
        from dermomamba_kernels.selective_scan import extension  # noqa: F401  (registers fakes / autograd)
    except ImportError as exc:
        pytest.skip(f"the Python wrappers (selective_scan/extension.py) are not importable: {exc}")
    import dermomamba_kernels as dk

    return dk


@requires_cuda_kernels
def test_opcheck_all_ops(seed):
    _wrappers()
    inp = make_1d(2, 4, 70, 8, torch.float32, groups=2)
    b, _, L = inp["u"].shape
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"], True, 32)
    torch.library.opcheck(ops().selective_scan_fwd.default, args)
    _, _, states = ops().selective_scan_fwd(*args)
    dout = torch.randn_like(inp["u"])
    torch.library.opcheck(ops().selective_scan_bwd.default,
                          (dout,) + args[:-1] + (states, 32, True))
    m = make_multiaxial(1, 4, 5, 6, 8, torch.float32)
    margs = (m["x"], m["delta"], m["A"], m["B"], m["C"], m["D"], m["delta_bias"], True, 16)
    torch.library.opcheck(ops().multiaxial_scan_fwd.default, margs)
    _, mstates = ops().multiaxial_scan_fwd(*margs)
    dy = torch.randn(1, 4, 5, 6, device=DEVICE)
    torch.library.opcheck(ops().multiaxial_scan_bwd.default, (dy,) + margs[:-1] + (mstates, 16, True))


def multiaxial_full_ref64(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """multiaxial_selective_scan_ref's arithmetic, projections included, in float64."""
    batch, dim, height, width = x.shape
    length = height * width
    rank, dstate = dt_projs_weight.shape[2], A_logs.shape[1]
    xs = direction_sequences(x)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, x_proj_weight)
    dts, Bs, Cs = torch.split(x_dbl, [rank, dstate, dstate], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, dt_projs_weight)
    out, _ = scan64(xs.reshape(batch, -1, length), dts.reshape(batch, -1, length), -torch.exp(A_logs), Bs, Cs,
                    D=Ds, delta_bias=dt_projs_bias.reshape(-1), delta_softplus=True)
    return merge_directions(out.view(batch, NUM_DIRECTIONS, dim, length), height, width)


@requires_cuda_kernels
def test_public_multiaxial_matches_reference(seed):
    dk = _wrappers()
    dim, N, R, H, W = 8, 16, 1, 9, 14
    names = ["x", "x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds"]
    values = [torch.randn(2, dim, H, W, device=DEVICE), torch.randn(4, R + 2 * N, dim, device=DEVICE) * 0.3,
              torch.randn(4, dim, R, device=DEVICE) * 0.3, torch.randn(4, dim, device=DEVICE) - 2,
              torch.log(torch.arange(1, N + 1, device=DEVICE).float()).repeat(4 * dim, 1),
              torch.randn(4 * dim, device=DEVICE)]
    dy = torch.randn(2, dim, H, W, device=DEVICE)

    def run(backend, tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        if backend is None:
            y = multiaxial_full_ref64(*leaves)
        else:
            y = dk.multiaxial_selective_scan(*leaves, backend=backend)
        grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
        return y.detach(), grads

    y_k, g_k = run("cuda", values)
    assert dk.last_backend("multiaxial_selective_scan") == "cuda"
    y_r, g_r = run("reference", values)
    y_64, g_64 = run(None, [v.double() for v in values])
    assert_close_measured("public/y", y_k, y_r, y_64)
    for name, a, b, c in zip(names, g_k, g_r, g_64):
        assert_close_measured(f"public/d{name}", a, b, c)


@requires_cuda_kernels
def test_torch_compile_fullgraph_ss2d(seed):
    dk = _wrappers()
    dim, N, R = 8, 16, 1

    class TinySS2D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.x_proj_weight = torch.nn.Parameter(torch.randn(4, R + 2 * N, dim) * 0.2)
            self.dt_projs_weight = torch.nn.Parameter(torch.randn(4, dim, R) * 0.2)
            self.dt_projs_bias = torch.nn.Parameter(torch.randn(4, dim) - 2)
            self.A_logs = torch.nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(4 * dim, 1))
            self.Ds = torch.nn.Parameter(torch.ones(4 * dim))

        def forward(self, x):
            x = F.silu(self.conv(x))
            y = dk.multiaxial_selective_scan(x, self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias,
                                             self.A_logs, self.Ds, backend="cuda")
            return F.layer_norm(y.permute(0, 2, 3, 1), (dim,)).sum()

    model = TinySS2D().to(DEVICE)
    x = torch.randn(2, dim, 7, 10, device=DEVICE, requires_grad=True)
    eager = model(x)
    eager_grad = torch.autograd.grad(eager, x)[0]
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grad = torch.autograd.grad(out, x)[0]
    assert torch.allclose(out, eager, rtol=1e-4, atol=1e-4)
    assert torch.allclose(grad, eager_grad, rtol=1e-4, atol=1e-5)


# ---- bad input ----

@requires_cuda_kernels
def test_bad_inputs_raise_clear_errors(seed):
    inp = make_1d(1, 4, 20, 8, torch.float32)
    good = lambda **over: {**inp, **over}  # noqa: E731

    def fwd(d, chunk=CHUNK):
        b, _, L = d["u"].shape
        return ops().selective_scan_fwd(d["u"], d["delta"], d["A"], op_bc(d["B"], b, L), op_bc(d["C"], b, L),
                                        d["D"], d["z"], d["delta_bias"], True, chunk)

    with pytest.raises(RuntimeError, match="delta"):
        fwd(good(delta=inp["delta"].cpu()))
    with pytest.raises(RuntimeError, match="delta"):
        fwd(good(delta=inp["delta"][:, :, :10]))
    with pytest.raises(RuntimeError, match="u must be float32"):
        fwd(good(u=inp["u"].to(torch.int32)))
    with pytest.raises(RuntimeError, match="A must be float32"):
        fwd(good(A=inp["A"].double()))
    with pytest.raises(RuntimeError, match=r"state size N"):
        big = make_1d(1, 4, 20, 257, torch.float32)
        fwd(big)
    with pytest.raises(RuntimeError, match="chunk_size"):
        fwd(inp, chunk=0)
    with pytest.raises(RuntimeError, match="z must have"):
        fwd(good(z=inp["z"].half()))
    m = make_multiaxial(1, 4, 5, 6, 8, torch.float32)
    with pytest.raises(RuntimeError, match="B must have shape"):
        ops().multiaxial_scan_fwd(m["x"], m["delta"], m["A"], m["B"][:, :, :, :4], m["C"], m["D"],
                                  m["delta_bias"], True, 16)
    with pytest.raises(RuntimeError, match="D must have shape"):
        ops().multiaxial_scan_fwd(m["x"], m["delta"], m["A"], m["B"], m["C"], m["D"][:3], m["delta_bias"], True,
                                  16)
