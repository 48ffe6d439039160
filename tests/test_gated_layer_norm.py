"""Gated LayerNorm ``LayerNorm(y) * silu(z)`` (SS2D's output gate): spec, dispatch point, Triton kernels.

CPU (CI): the spec against the published expression, the dispatcher's choices (the Triton kernel is
opt-in) and its errors; the Triton kernels through the Triton interpreter: the tests named
``test_interp_*`` run in a subprocess of this same file with TRITON_INTERPRET=1 (it must be set
before the kernels are defined and must not leak into this process or its GPU tests). GPU (marked
gpu): the compiled kernels at DermoMamba's SS2D sizes under fp16 autocast, CUDA-graph capture,
torch.compile(fullgraph=True), opcheck, determinism.

Tolerance (as tests/test_layer_norm.py): each of out, dy, dz, dweight, dbias may err from an fp64
run of the published expression on the same (rounded) inputs by at most twice the error of the
published expression run by PyTorch in the inputs' precision, plus 8 fp32 ulps of the quantity's
largest value (sums over rows legitimately differ in order). The kernels round intermediates where
PyTorch does (silu(z) to z's dtype, ds to z's dtype, ...), so both errors are dominated by the same
roundings. For a result stored in fp16 / bf16 the floor is at least half an ulp of that dtype at the
quantity's largest value: two correct computations whose fp32 values differ below that resolution can
round to neighbouring values, and with a coarse grid the max error is a draw over the few largest
elements. Seen with bf16 y and bf16 parameters (a model cast to bf16 as a whole; 1 draw in ~100):
dy at one element exact 8.958, the fp64 LayerNorm backward of the (shared) bf16 dn 8.975, the kernel
rounded that to 9.0 (correct), PyTorch's CPU bf16 backward gave 8.9375 (not the nearest to its own
input, but nearer the truth): 0.042 against 0.0205, over 2x without this floor.
Measured under the interpreter (2026-11-28, 60 draws per case, fp32 y with fp32/fp16/bf16 z and
fp16/bf16 y): err / (2 x reference + floor) at most 0.51 with fp32 y (0.5: the reference's error
exactly) and at most 0.62 (dy) with fp16 / bf16 y.
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import run_interpreter_cases
from dermomamba_kernels import BackendUnavailableError, last_backend
from dermomamba_kernels.layer_norm import (GATED_BACKEND_ENV_VAR, gated_layer_norm, gated_layer_norm_backend,
                                           gated_layer_norm_dispatcher, gated_layer_norm_ref)

gated_module = importlib.import_module("dermomamba_kernels.layer_norm.gated")
layer_norm_package = importlib.import_module("dermomamba_kernels.layer_norm")

HERE = os.path.abspath(__file__)
# Set (with TRITON_INTERPRET=1) in the subprocess that runs the test_interp_* cases.
INTERPRETER_CASES_ENV = "DERMOMAMBA_GATED_NORM_INTERPRETER_CASES"
IN_INTERPRETER_RUN = os.environ.get(INTERPRETER_CASES_ENV) == "1"
interpreter_only = pytest.mark.skipif(
    not IN_INTERPRETER_RUN, reason="runs in the interpreter subprocess (test_triton_kernels_under_interpreter)")
not_in_interpreter_run = pytest.mark.skipif(IN_INTERPRETER_RUN, reason="the interpreter subprocess runs test_interp_*")

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
FP32_ULPS_FLOOR = 8
# A result stored in fp16 / bf16 may also differ by its own final rounding (half an ulp of the largest value):
# see the module docstring.
STORED_ULPS_FLOOR = 0.5
EPS = 1e-5  # SS2D's out_norm
QUANTITIES = ("out", "dy", "dz", "dweight", "dbias")
# (rows, C) of DermoMamba's SS2D output gates at batch 16, 192x256 (the shared VSSBlock's 3 calls: 48 images).
FULL_SIZE_CASES = [(48 * 192 * 256, 8), (48 * 96 * 128, 16), (48 * 48 * 64, 32), (48 * 24 * 32, 64),
                   (48 * 12 * 16, 128)]


# ------------------------------------------------------------------------------------------------
# error measurement against fp64
# ------------------------------------------------------------------------------------------------

def _inputs(shape, y_dtype=F32, z_dtype=F32, param_dtype=F32, device="cpu"):
    channels = shape[-1]
    # y with an offset and scale (the mean matters, rows are not normalized already); z over silu's bend
    y = (torch.randn(shape, dtype=F64, device=device) * 3 + 1).to(y_dtype)
    z = (torch.randn(shape, dtype=F64, device=device) * 2).to(z_dtype)
    weight = torch.randn(channels, dtype=F64, device=device).to(param_dtype)
    bias = torch.randn(channels, dtype=F64, device=device).to(param_dtype)
    return y, z, weight, bias


def _leaf(t):
    """A leaf copy of t with t's very strides (clone() would make a channel slice contiguous)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        leaf.copy_(t)
    return leaf.requires_grad_(True)


def _run(fn, y, z, weight, bias, grad):
    """out, dy, dz, dweight, dbias of fn on leaf copies of the inputs (in the inputs' layouts)."""
    leaves = [_leaf(t) for t in (y, z, weight, bias)]
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, grad.to(out.dtype))


def published(norm_fp32=False, out_dtype=None, eps=EPS):
    """The published expression with PyTorch's ops; ``norm_fp32`` runs the norm as CUDA autocast does
    (inputs cast to fp32, fp32 output), ``out_dtype`` adds the cast out_proj makes under autocast."""

    def fn(y, z, weight, bias):
        if norm_fp32:
            y, weight, bias = y.float(), weight.float(), bias.float()
        out = F.layer_norm(y, (y.shape[-1],), weight, bias, eps) * F.silu(z)
        return out if out_dtype is None else out.to(out_dtype)

    return fn


def check_against_reference(fn, y, z, weight, bias, grad=None, norm_fp32=False, out_dtype=None):
    """Asserts fn's out, dy, dz, dweight, dbias err from fp64 by at most 2x the published expression's
    error in the same precision (+ floor); returns a report line."""
    reference = published(norm_fp32, out_dtype)
    if grad is None:
        grad = torch.randn(y.shape, dtype=F64, device=y.device)
    got = _run(fn, y, z, weight, bias, grad)
    assert got[0].dtype == reference(y, z, weight, bias).dtype, "result dtype differs from the published one"
    ref = _run(reference, y, z, weight, bias, grad)
    grad_seen = grad.to(got[0].dtype).double()  # the gradient the op saw, rounded as it was
    exact = _run(published(), y.double(), z.double(), weight.double(), bias.double(), grad_seen)
    lines = []
    for name, g, r, e in zip(QUANTITIES, got, ref, exact):
        assert g.shape == e.shape and g.dtype == r.dtype, f"{name}: {tuple(g.shape)} {g.dtype} vs {r.dtype}"
        assert not torch.isnan(g).any(), f"{name}: NaN (an element never written?)"
        err = (g.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        floor = max(FP32_ULPS_FLOOR * torch.finfo(F32).eps, STORED_ULPS_FLOOR * torch.finfo(g.dtype).eps) \
            * e.abs().max().item()
        lines.append(f"{name} err {err:.3g} ref {ref_err:.3g}")
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x reference's {ref_err:.3g} + {floor:.2g}"
    return "; ".join(lines)


# ------------------------------------------------------------------------------------------------
# spec, dispatcher and argument checks (CPU, this process)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
@pytest.mark.parametrize("y_dtype,z_dtype", [(F64, F64), (F32, F32), (F32, F16), (F32, BF16), (BF16, BF16)],
                         ids=lambda d: str(d)[6:])
def test_spec_is_the_published_expression(seed, y_dtype, z_dtype):
    """The spelled-out spec gives the published expression's dtypes and, within the measured tolerance,
    its values and gradients (its statistics are summed in another order than PyTorch's kernel)."""
    y, z, w, b = _inputs((2, 5, 7, 12), y_dtype, z_dtype, param_dtype=y_dtype)
    print(check_against_reference(lambda *a: gated_layer_norm_ref(*a, EPS)[0], y, z, w, b))
    out16, _, _ = gated_layer_norm_ref(y, z, w, b, EPS, norm_dtype=F32, out_dtype=F16)
    assert out16.dtype == F16
    torch.testing.assert_close(out16, published(True, F16)(y, z, w, b))


@not_in_interpreter_run
def test_spec_gradients_fp64(seed):
    args = tuple(t.requires_grad_(True) for t in _inputs((2, 3, 5), F64, F64, F64))
    assert torch.autograd.gradcheck(lambda *a: gated_layer_norm_ref(*a, EPS)[0], args)


@not_in_interpreter_run
def test_reference_backend_and_out_dtype(seed):
    y, z, w, b = _inputs((2, 4, 6, 8), F32, F16)
    out = gated_layer_norm(y, z, w, b, EPS)
    assert last_backend("gated_layer_norm") in ("cpu", "reference")
    assert out.dtype == F32 and torch.equal(out, published()(y, z, w, b))
    half = gated_layer_norm(y, z, w, b, EPS, out_dtype=F16, backend="reference")
    assert half.dtype == F16 and torch.equal(half, out.to(F16))
    assert last_backend("gated_layer_norm") == "reference"
    # without parameters, as F.layer_norm (the reference backends only)
    torch.testing.assert_close(gated_layer_norm(y, z, None, None, backend="reference"),
                               F.layer_norm(y, (8,)) * F.silu(z), rtol=0, atol=0)


@not_in_interpreter_run
def test_auto_is_the_reference_unless_opted_in(seed, monkeypatch):
    """The Triton kernel joins "auto" (CUDA, few channels) only with DERMOMAMBA_GATED_NORM_BACKEND=triton."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    y, z, w, b = _inputs((2, 3, 8), F32, F16)
    takes = gated_module._auto_takes_triton
    monkeypatch.delenv(GATED_BACKEND_ENV_VAR, raising=False)
    assert not takes(cuda, y, z, w, b, None)
    monkeypatch.setenv(GATED_BACKEND_ENV_VAR, "triton")
    assert takes(cuda, y, z, w, b, None) and takes(cuda, y, z, w, b, F16)
    assert not takes(cpu, y, z, w, b, None)
    widest = layer_norm_package.TRITON_AUTO_MAX_CHANNELS
    for channels, expected in ((widest, True), (widest + 1, False)):
        row = torch.zeros(3, channels)
        assert takes(cuda, row, row, torch.ones(channels), torch.zeros(channels), None) == expected
    assert not takes(cuda, y.double(), z, w, b, None) and not takes(cuda, y, z.double(), w, b, None)
    assert not takes(cuda, y, z, w, b, F64) and not takes(cuda, y, z, None, b, None)
    assert not takes(cuda, y, z, w, b.half(), None)
    # on this (CPU) device "auto" stays on PyTorch's ops even when opted in
    assert gated_layer_norm_backend(y, z, w, b, backend="auto") in ("cpu", "reference")
    assert gated_layer_norm_backend(y, z, w, b, backend="reference") == "reference"
    assert gated_layer_norm_dispatcher.resolve("auto", cpu) in ("cpu", "reference")


@not_in_interpreter_run
def test_triton_without_gpu_or_interpreter_is_unavailable(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton through the interpreter")
    y, z, w, b = _inputs((2, 3, 8))
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable: Triton runs on CUDA"):
        gated_layer_norm(y, z, w, b, backend="triton")
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable"):
        gated_layer_norm_backend(y, z, w, b, backend="triton")
    with pytest.raises(BackendUnavailableError, match="no 'cuda' implementation"):
        gated_layer_norm(y, z, w, b, backend="cuda")
    with pytest.raises(ValueError, match="backend='nope'"):
        gated_layer_norm(y, z, w, b, backend="nope")
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable"):
        gated_layer_norm(y, z, w, b)


BAD_COMMON_INPUTS = [
    (lambda a: {**a, "y": [1.0, 2.0]}, TypeError, "y: expected a tensor"),
    (lambda a: {**a, "z": a["z"].long()}, TypeError, "z: expected a floating-point tensor"),
    (lambda a: {**a, "y": torch.tensor(1.0), "z": torch.tensor(1.0)}, ValueError, "y: expected a tensor of shape"),
    (lambda a: {**a, "z": torch.randn(2, 3, 9)}, ValueError, r"z: shape \(2, 3, 9\) does not match y's \(2, 3, 8\)"),
    (lambda a: {**a, "z": torch.randn(3, 2, 8)}, ValueError, "z: shape"),
    (lambda a: {**a, "z": torch.randn(2, 3, 8, device="meta")}, ValueError, "z: on meta, but y is on cpu"),
    (lambda a: {**a, "weight": torch.randn(7)}, ValueError, r"weight: expected shape \(8,\), got \(7,\)"),
    (lambda a: {**a, "bias": torch.randn(2, 4)}, ValueError, r"bias: expected shape \(8,\)"),
    (lambda a: {**a, "weight": [1.0] * 8}, ValueError, "weight: expected shape .* got list"),
    (lambda a: {**a, "bias": torch.randn(8, device="meta")}, ValueError, "bias: on meta"),
    (lambda a: {**a, "out_dtype": torch.int32}, TypeError, "out_dtype: expected a floating-point"),
]
BAD_COMMON_IDS = ["y-type", "z-dtype", "0-d", "z-width", "z-shape", "z-device", "weight", "bias", "weight-type",
                  "bias-device", "out-dtype"]


def _call_with(args, backend):
    return gated_layer_norm(args["y"], args["z"], args["weight"], args["bias"], args["eps"],
                            out_dtype=args["out_dtype"], backend=backend)


def _good_args():
    return {"y": torch.randn(2, 3, 8), "z": torch.randn(2, 3, 8), "weight": torch.randn(8), "bias": torch.randn(8),
            "eps": EPS, "out_dtype": None}


@not_in_interpreter_run
@pytest.mark.parametrize("change,error,message", BAD_COMMON_INPUTS, ids=BAD_COMMON_IDS)
def test_bad_input_names_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        _call_with(change(_good_args()), "reference")


# ------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (run in a subprocess by the test below)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
def test_triton_kernels_under_interpreter():
    run_interpreter_cases(HERE, INTERPRETER_CASES_ENV, unset=(GATED_BACKEND_ENV_VAR,))


@pytest.fixture
def poisoned(monkeypatch):
    """Every output and scratch buffer of the Triton ops starts as NaN (an element never written shows)."""
    from dermomamba_kernels.layer_norm import gated_triton_ops

    monkeypatch.setattr(gated_triton_ops, "POISON_OUTPUTS", True)


@pytest.fixture
def emulated_cuda_autocast(monkeypatch):
    """Makes the op treat CPU autocast as CUDA's (layer_norm in fp32): the SS2D case, on this machine."""
    monkeypatch.setattr(layer_norm_package, "AUTOCAST_FP32_DEVICE_TYPES", ("cpu",))


def _few_backward_programs(monkeypatch):
    """At most 3 backward programs: each walks several tiles (the loop and the partial-sum rows the GPU
    sizes exercise), and the last one runs past the end of the rows."""
    from dermomamba_kernels.layer_norm import triton_kernels  # the grid cap the gated backward shares

    monkeypatch.setattr(triton_kernels, "BACKWARD_PROGRAMS", 3)


def TRITON(y, z, w, b, out_dtype=None):
    return gated_layer_norm(y, z, w, b, EPS, out_dtype=out_dtype, backend="triton")


# (rows, C): never a multiple of the tiles (C=4: 512 rows forward, 256 backward; C=128: 16 / 8), several
# tiles each way; about 5,000 elements each (the interpreter's pace).
ROWS_OF_CHANNELS = {4: 1100, 8: 600, 12: 300, 16: 300, 64: 75, 128: 37}
INTERPRETER_CASES = [(c, zd, i % 2 == 1) for i, (c, zd) in enumerate(
    (c, zd) for c in ROWS_OF_CHANNELS for zd in (F32, F16, BF16))]


@interpreter_only
@pytest.mark.parametrize("channels,z_dtype,looping", INTERPRETER_CASES,
                         ids=[f"C{c}-z{str(d)[6:]}-{'looping' if lp else 'one-tile-each'}"
                              for c, d, lp in INTERPRETER_CASES])
def test_interp_parity(seed, poisoned, monkeypatch, channels, z_dtype, looping):
    if looping:
        _few_backward_programs(monkeypatch)
    y, z, w, b = _inputs((ROWS_OF_CHANNELS[channels], channels), F32, z_dtype)
    print(check_against_reference(TRITON, y, z, w, b))
    assert last_backend("gated_layer_norm") == "triton"


@interpreter_only
@pytest.mark.parametrize("y_dtype,z_dtype", [(F16, F16), (BF16, BF16), (F16, F32), (BF16, F16)],
                         ids=lambda d: str(d)[6:])
def test_interp_low_precision_y(seed, poisoned, y_dtype, z_dtype):
    """A model cast to half / bf16 as a whole: y, parameters (or fp32 parameters) in low precision;
    the norm's output rounds to y's dtype and the product to the promotion."""
    y, z, w, b = _inputs((1, 9, 23, 12), y_dtype, z_dtype, param_dtype=y_dtype)
    print(check_against_reference(TRITON, y, z, w, b))
    if y_dtype == F16:  # fp32 parameters with a half y, as F.layer_norm allows
        y, z, w, b = _inputs((1, 7, 13, 12), y_dtype, z_dtype, param_dtype=F32)
        print(check_against_reference(TRITON, y, z, w, b))


@interpreter_only
@pytest.mark.parametrize("channels,out_dtype", [(8, F16), (16, F32), (64, BF16)], ids=str)
def test_interp_under_cuda_autocast(seed, poisoned, emulated_cuda_autocast, channels, out_dtype):
    """SS2D under autocast: y fp32, z in the autocast dtype, the norm in fp32, the result fp32 by default
    or (as SS2D asks) directly in the dtype out_proj casts to."""
    z_dtype = BF16 if out_dtype == BF16 else F16
    y, z, w, b = _inputs((ROWS_OF_CHANNELS[channels] // 2, channels), F32, z_dtype)
    with torch.autocast("cpu", dtype=z_dtype):
        print(check_against_reference(TRITON, y, z, w, b, norm_fp32=True))
        print(check_against_reference(lambda *a: TRITON(*a, out_dtype=out_dtype), y, z, w, b, norm_fp32=True,
                                      out_dtype=out_dtype))
    # a half y under autocast is normalized in fp32 too (and its gradient comes back in half)
    y16, z16, w16, b16 = _inputs((3, 5, 7, channels), F16, F16, param_dtype=F16)
    with torch.autocast("cpu", dtype=F16):
        print(check_against_reference(TRITON, y16, z16, w16, b16, norm_fp32=True))


@interpreter_only
def test_interp_cpu_autocast_as_published(seed, poisoned):
    """CPU autocast leaves layer_norm, silu and mul alone: the result dtype and values are the published
    expression's under it."""
    y, z, w, b = _inputs((2, 7, 9, 8), BF16, BF16, param_dtype=F32)
    with torch.autocast("cpu", dtype=BF16):
        expected = published()(y, z, w, b)
        got = TRITON(y, z, w, b)
        assert got.dtype == expected.dtype == BF16
        print(check_against_reference(TRITON, y, z, w, b))


@interpreter_only
def test_interp_strided_inputs(seed, poisoned, monkeypatch):
    """Read in place: y a channels-last map permuted to (B, H, W, C), z a channel slice (row stride 2C,
    the gate half of in_proj's output), batch 1. Copied: a permuted NCHW map (last dim strided). The
    incoming gradient non-dense too. Every result must be right."""
    from dermomamba_kernels.layer_norm.triton_kernels import rows_view

    _few_backward_programs(monkeypatch)
    channels = 8
    _, _, w, b = _inputs((channels,))
    nchw = torch.randn(1, channels, 9, 14, dtype=F64).mul(3).add(1).float()
    gate_halves = torch.randn(1, 9, 14, 2 * channels).mul(2).half()
    cases = {
        "channels-last y, sliced z": (nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1),
                                      gate_halves[..., channels:], True),
        "NCHW-permuted y (copied)": (nchw.permute(0, 2, 3, 1), gate_halves[..., :channels], False),
    }
    for name, (y, z, y_in_place) in cases.items():
        rows = rows_view(y)
        assert (rows.data_ptr() == y.data_ptr() and rows.stride(1) == 1) == y_in_place, name
        assert rows_view(z).data_ptr() == z.data_ptr(), name
        grad = torch.randn(*y.shape[:-1], 2 * channels, dtype=F64)[..., :channels]
        print(name, check_against_reference(TRITON, y, z, w, b, grad=grad))
        # strided reads give the very numbers of dense ones
        assert torch.equal(TRITON(y, z, w, b), TRITON(y.contiguous(), z.contiguous(), w, b)), name


@interpreter_only
def test_interp_backward_op_reads_strided_grad(seed, poisoned):
    from dermomamba_kernels.layer_norm.gated_triton_ops import gated_backward_op, gated_forward_op

    y, z, w, b = _inputs((3, 5, 7, 12), F32, F16)
    _, mean, rstd = gated_forward_op(y, z, w, b, EPS, F32, F32)
    wide = torch.randn(3, 5, 7, 24)
    strided = gated_backward_op(wide[..., 12:], y, z, w, b, mean, rstd, F32)
    dense = gated_backward_op(wide[..., 12:].contiguous(), y, z, w, b, mean, rstd, F32)
    assert all(torch.equal(p, q) for p, q in zip(strided, dense))
    dy, dz, dw, db = strided
    assert dy.is_contiguous() and dy.dtype == F32 and dz.dtype == F16 and dw.shape == db.shape == (12,)


@interpreter_only
def test_interp_statistics(seed, poisoned):
    from dermomamba_kernels.layer_norm.gated_triton_ops import gated_forward_op

    y, z, w, b = _inputs((2, 11, 13, 12), F32, F16)
    _, mean, rstd = gated_forward_op(y, z, w, b, EPS, F32, F32)
    _, exact_mean, exact_rstd = gated_layer_norm_ref(y.double(), z.double(), None, None, EPS)
    _, ref_mean, ref_rstd = torch.native_layer_norm(y, (12,), w, b, EPS)
    assert mean.shape == rstd.shape == y.shape[:-1] and mean.dtype == rstd.dtype == F32
    for name, got, ref, exact in (("mean", mean, ref_mean.squeeze(-1), exact_mean),
                                  ("rstd", rstd, ref_rstd.squeeze(-1), exact_rstd)):
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * exact.abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name}: {err:.3g} vs reference {ref_err:.3g}"


def _check_kernel_rounding(device):
    from dermomamba_kernels.layer_norm.gated_triton_kernels import round_as_kernels

    random_bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (3000,), dtype=torch.int32)
    ties = (torch.randn(1000).to(BF16).float().view(torch.int32) | 0x8000)  # exactly half a bf16 ulp above
    edge = torch.tensor([0.0, -0.0, 1.0, 3.3895313892515355e38, 3.4028234663852886e38, float("inf"),
                         float("-inf"), float("nan"), 1e-40, -1e-40, 65519.0, 65520.0, 6e-8])
    x = torch.cat([random_bits.view(F32), ties.view(F32), edge]).to(device)
    for dtype in (BF16, F16, F32):
        out = round_as_kernels(x, dtype)
        expected = x.to(dtype).float()
        same = (out.view(torch.int32) == expected.view(torch.int32)) | (out.isnan() & expected.isnan())
        assert same.all(), f"{dtype}: {(~same).sum()} differ, e.g. {x[~same][:4].tolist()} -> {out[~same][:4].tolist()}"


@interpreter_only
def test_interp_rounding_is_to_nearest_even(seed):
    """The kernels' roundings equal PyTorch's conversions (ties, carries into the exponent, overflow to
    infinity, NaN, subnormals); bf16 by integer arithmetic, where the interpreter's conversion would truncate."""
    _check_kernel_rounding("cpu")


@pytest.mark.gpu
def test_gpu_rounding_is_to_nearest_even(seed):
    _check_kernel_rounding("cuda")


@interpreter_only
def test_interp_saves_only_inputs_and_statistics(seed):
    """For the backward autograd keeps y, z, weight, bias and the two fp32 statistics: never the norm's
    output, silu(z) or the product (the memory the fused op exists to save)."""
    y, z, w, b = (t.requires_grad_(True) for t in _inputs((2, 7, 9, 8), F32, F16))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = TRITON(y, z, w, b, out_dtype=F16)
    maps = [t for t in saved if t.shape == y.shape]
    assert len(maps) == 2 and {m.data_ptr() for m in maps} == {y.data_ptr(), z.data_ptr()}
    assert sorted(t.numel() for t in saved if t.shape != y.shape) == [8, 8, 2 * 7 * 9, 2 * 7 * 9]
    assert not any(t.data_ptr() == out.data_ptr() for t in saved)


@interpreter_only
def test_interp_deterministic(seed, monkeypatch):
    _few_backward_programs(monkeypatch)
    y, z, w, b = _inputs((2, 13, 29, 8), F32, F16)
    grad = torch.randn(y.shape)
    first = _run(TRITON, y, z, w, b, grad)
    second = _run(TRITON, y, z, w, b, grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@interpreter_only
def test_interp_empty_rows(poisoned):
    y, z = torch.randn(0, 5, 8, requires_grad=True), torch.randn(0, 5, 8, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    out = TRITON(y, z, w, b)
    assert out.shape == y.shape
    dy, dz, dw, db = torch.autograd.grad(out, (y, z, w, b), torch.randn(0, 5, 8))
    assert dy.shape == dz.shape == y.shape and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


@interpreter_only
def test_interp_opcheck(seed):
    from dermomamba_kernels.layer_norm.gated_triton_ops import gated_backward_op, gated_forward_op

    y, z, w, b = _inputs((1, 3, 5, 12), F32, F16)  # opcheck runs the op a dozen times: small, for the interpreter
    args = tuple(t.requires_grad_(True) for t in (y, z, w, b)) + (EPS, F32, F32)
    torch.library.opcheck(gated_forward_op, args)
    torch.library.opcheck(gated_forward_op, (y.detach(), z.detach(), w.detach(), b.detach(), EPS, F32, F16))
    _, mean, rstd = gated_forward_op(*args)
    bwd = (torch.randn(1, 3, 5, 12), y.detach(), z.detach(), w.detach(), b.detach(), mean.detach(),
           rstd.detach(), F32)
    torch.library.opcheck(gated_backward_op, bwd)


@interpreter_only
def test_interp_compiles_fullgraph(seed):
    """Dynamo traces the argument checks, the opt-in rule, the dispatcher and the custom ops (fake and
    autograd) in one graph; aot_eager keeps the CPU run short (inductor on the GPU: test_gpu_compile_*)."""
    y, z, w, b = (t.requires_grad_(True) for t in _inputs((2, 6, 10, 8), F32, F16))

    def gate(y, z, w, b):
        assert gated_layer_norm_backend(y, z, w, b, backend="triton") == "triton"
        return TRITON(y, z, w, b, out_dtype=F16)

    torch._dynamo.reset()
    compiled = torch.compile(gate, fullgraph=True, backend="aot_eager")
    out, out_eager = compiled(y, z, w, b), gate(y, z, w, b)
    assert torch.equal(out, out_eager)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (y, z, w, b), grad)
    grads_eager = torch.autograd.grad(out_eager, (y, z, w, b), grad)
    assert all(torch.equal(p, q) for p, q in zip(grads, grads_eager))


@interpreter_only
@pytest.mark.parametrize("change,error,message", BAD_COMMON_INPUTS + [
    (lambda a: {**a, "y": a["y"].double(), "weight": a["weight"].double(), "bias": a["bias"].double()},
     TypeError, "y: dtype torch.float64 is not supported by the triton backend"),
    (lambda a: {**a, "z": a["z"].double()}, TypeError, "z: dtype torch.float64 is not supported"),
    (lambda a: {**a, "out_dtype": F64}, TypeError, "out_dtype: torch.float64 is not supported"),
    (lambda a: {**a, "bias": None}, BackendUnavailableError, "needs both weight and bias"),
    (lambda a: {**a, "bias": a["bias"].half()}, TypeError, "bias: dtype torch.float16 differs"),
    (lambda a: {**a, "weight": a["weight"].half(), "bias": a["bias"].half()}, TypeError,
     "weight: dtype torch.float16 does not go with y's torch.float32"),
    (lambda a: {**a, "y": torch.randn(3, 0), "z": torch.randn(3, 0), "weight": torch.randn(0),
                "bias": torch.randn(0)}, ValueError, "y: the normalized dimension is empty"),
    (lambda a: {**a, "y": torch.randn(1, 8193), "z": torch.randn(1, 8193), "weight": torch.randn(8193),
                "bias": torch.randn(8193)}, ValueError, "exceeds the triton backend's 8192"),
    (lambda a: {**a, "eps": -1.0}, ValueError, "eps: expected a non-negative"),
], ids=BAD_COMMON_IDS + ["y-fp64", "z-fp64", "out-fp64", "no-bias", "bias-dtype", "param-dtype", "empty",
                         "too-wide", "eps"])
def test_interp_bad_input_names_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        _call_with(change(_good_args()), "triton")


# ------------------------------------------------------------------------------------------------
# the compiled kernels on the GPU at full size
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("rows,channels", FULL_SIZE_CASES, ids=[f"{r}x{c}" for r, c in FULL_SIZE_CASES])
@pytest.mark.parametrize("out_dtype", [None, F16], ids=["fp32-out", "fp16-out"])
def test_gpu_full_size_under_autocast(seed, poisoned, rows, channels, out_dtype):
    """SS2D's gate at DermoMamba's sizes under fp16 autocast: y fp32, z fp16, fp32 parameters."""
    y, z, w, b = _inputs((rows, channels), F32, F16, device="cuda")
    with torch.autocast("cuda", dtype=F16):
        print(check_against_reference(lambda *a: TRITON(*a, out_dtype=out_dtype), y, z, w, b, norm_fp32=True,
                                      out_dtype=out_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("y_dtype,z_dtype", [(F32, F32), (F32, BF16), (BF16, BF16), (F16, F16)],
                         ids=lambda d: str(d)[6:])
def test_gpu_other_dtypes(seed, poisoned, y_dtype, z_dtype):
    y, z, w, b = _inputs((48 * 96 * 128 + 7, 16), y_dtype, z_dtype, param_dtype=y_dtype, device="cuda")
    print(check_against_reference(TRITON, y, z, w, b))


@pytest.mark.gpu
def test_gpu_channels_last_views(seed, poisoned):
    channels = 8
    _, _, w, b = _inputs((channels,), device="cuda")
    nchw = torch.randn(3, channels, 192, 256, device="cuda").mul_(3).add_(1)
    gate_halves = torch.randn(3, 192, 256, 2 * channels, device="cuda").mul_(2).half()
    for y in (nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1), nchw.permute(0, 2, 3, 1)):
        grad = torch.randn(*y.shape[:-1], 2 * channels, device="cuda", dtype=F64)[..., :channels]
        with torch.autocast("cuda", dtype=F16):
            print(check_against_reference(TRITON, y, gate_halves[..., channels:], w, b, grad=grad, norm_fp32=True))


@pytest.mark.gpu
def test_gpu_auto_is_opt_in(seed, monkeypatch):
    y, z, w, b = _inputs((4, 48, 64, 8), F32, F16, device="cuda")
    monkeypatch.delenv(GATED_BACKEND_ENV_VAR, raising=False)
    gated_layer_norm(y, z, w, b, backend="auto")
    assert last_backend("gated_layer_norm") == "reference"
    monkeypatch.setenv(GATED_BACKEND_ENV_VAR, "triton")
    gated_layer_norm(y, z, w, b, backend="auto")
    assert last_backend("gated_layer_norm") == "triton"
    assert gated_layer_norm_backend(y, z, w, b, backend="auto") == "triton"


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(seed):
    y, z, w, b = _inputs((48 * 192 * 256, 8), F32, F16, device="cuda")
    grad = torch.randn(y.shape, device="cuda", dtype=F16)
    fn = (lambda *a: TRITON(*a, out_dtype=F16))
    first, second = _run(fn, y, z, w, b, grad), _run(fn, y, z, w, b, grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.gpu
def test_gpu_opcheck(seed):
    from dermomamba_kernels.layer_norm.gated_triton_ops import gated_backward_op, gated_forward_op

    y, z, w, b = _inputs((4, 33, 17, 8), F32, F16, device="cuda")
    args = tuple(t.requires_grad_(True) for t in (y, z, w, b)) + (EPS, F32, F16)
    torch.library.opcheck(gated_forward_op, args)
    _, mean, rstd = gated_forward_op(*args)
    bwd = (torch.randn(y.shape, device="cuda", dtype=F16), y.detach(), z.detach(), w.detach(), b.detach(),
           mean.detach(), rstd.detach(), F32)
    torch.library.opcheck(gated_backward_op, bwd)


class _GateAndProjection(torch.nn.Module):
    """SS2D's tail with the fused gate: out_proj(gated_layer_norm(y, z)) in the autocast dtype."""

    def __init__(self, channels):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels))
        self.bias = torch.nn.Parameter(torch.randn(channels))
        self.out_proj = torch.nn.Linear(channels, channels // 2, bias=False)

    def forward(self, y, z):
        return self.out_proj(gated_layer_norm(y, z, self.weight, self.bias, EPS, out_dtype=F16, backend="triton"))


@pytest.mark.gpu
def test_gpu_compile_fullgraph(seed):
    module = _GateAndProjection(16).cuda()
    y = torch.randn(4, 48, 64, 16, device="cuda", requires_grad=True)
    z = torch.randn(4, 48, 64, 16, device="cuda", dtype=F16, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True)
    with torch.autocast("cuda", dtype=F16):
        out, out_eager = compiled(y, z), module(y, z)
    torch.testing.assert_close(out, out_eager)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (y, z, module.weight), grad)
    grads_eager = torch.autograd.grad(out_eager, (y, z, module.weight), grad)
    for g, e in zip(grads, grads_eager):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(seed):
    """Forward and backward captured in a CUDA graph (no host syncs): replays give eager's results on new data."""
    y, z, w, b = (t.requires_grad_(True) for t in _inputs((48 * 24 * 32, 64), F32, F16, device="cuda"))
    grad = torch.randn(y.shape, device="cuda", dtype=F16)

    def step():
        out = TRITON(y, z, w, b, out_dtype=F16)
        return (out,) + torch.autograd.grad(out, (y, z, w, b), grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        with torch.no_grad():
            for t in (y, z, grad):
                t.copy_(torch.randn(t.shape, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        for name, got, expected in zip(QUANTITIES, captured, step()):
            assert torch.equal(got, expected), name
