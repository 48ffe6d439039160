"""LayerNorm over a small last dim: the spec, the dispatch point, the layer, and the Triton kernels.

CPU (CI): the spec against F.layer_norm, the dispatcher's choices and errors, the layer against
nn.LayerNorm; the Triton kernels through the Triton interpreter: the tests named ``test_interp_*``
run in a subprocess of this same file with TRITON_INTERPRET=1 (it must be set before the kernels
are defined, and must not leak into this process or its GPU tests). GPU (marked gpu): the compiled
kernels at DermoMamba's full sizes against PyTorch's native CUDA kernels, autocast, determinism,
opcheck and torch.compile(fullgraph=True) of the layer.

Tolerance: each quantity's max error against an fp64 computation from the same (rounded) inputs
may be at most twice the error of PyTorch's native LayerNorm run in the same precision on the same
inputs, plus 8 fp32 ulps of the quantity's largest value (sums over rows in fp32 legitimately differ
in order; with fp16/bf16 outputs this floor is far below an output ulp). Measured under the
interpreter (6 draws per case, C in 4/8/12/64, 2026-11-27): error ratio triton / native at most
1.35 (y), 1.73 (dx), 1.34 (dweight), 2.9 (dbias: 1.4e-5 against native's 6.8e-6, floor 1.6e-5) in
fp32; at most 1.0 (y, dx) and 0.39 (dweight, dbias) in fp16; in bf16 exactly 1.0 against native
fp32 arithmetic rounded as the interpreter rounds (toward zero; see ``_native_low_precision``).
The GPU tests compare with native CUDA in the same precision, rounding to nearest on both sides.
"""

import importlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_interpreter_cases
from dermomamba_kernels import BackendUnavailableError, last_backend
from dermomamba_kernels.layer_norm import layer_norm, layer_norm_dispatcher, layer_norm_ref
from dermomamba_kernels.layers import SS2D, LayerNorm, VSSBlock

# the module (the package exports the function under the same name)
layer_norm_module = importlib.import_module("dermomamba_kernels.layer_norm")

HERE = os.path.abspath(__file__)
# Set (with TRITON_INTERPRET=1) in the subprocess that runs the test_interp_* cases.
INTERPRETER_CASES_ENV = "DERMOMAMBA_LAYER_NORM_INTERPRETER_CASES"
IN_INTERPRETER_RUN = os.environ.get(INTERPRETER_CASES_ENV) == "1"
interpreter_only = pytest.mark.skipif(not IN_INTERPRETER_RUN,
                                      reason="runs in the interpreter subprocess (test_triton_kernels_under_interpreter)")
not_in_interpreter_run = pytest.mark.skipif(IN_INTERPRETER_RUN, reason="the interpreter subprocess runs test_interp_*")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP32_ULPS_FLOOR = 8
VSS_EPS = 1e-6
# DermoMamba's norms at batch 16, 192x256 in training (three VSSBlock calls batched: 48 images).
FULL_SIZE_CASES = [(48 * 192 * 256, 4), (48 * 192 * 256, 8), (48 * 96 * 128, 16), (48 * 48 * 64, 32),
                   (48 * 24 * 32, 64), (48 * 12 * 16, 128)]


# ------------------------------------------------------------------------------------------------
# error measurement against fp64
# ------------------------------------------------------------------------------------------------

def _truncate_to_bf16(t):
    """fp32 -> bf16 rounding toward zero, as the Triton interpreter converts (the GPU rounds to nearest)."""
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def _run(fn, x, weight, bias, grad):
    """y, dx, dweight, dbias of fn on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    y = fn(*leaves)
    return (y,) + torch.autograd.grad(y, leaves, grad.to(y.dtype))


def _exact(x, weight, bias, grad, eps):
    return _run(lambda a, w, b: F.layer_norm(a, (a.shape[-1],), w, b, eps), x.double(), weight.double(),
                bias.double(), grad.double())


def _native_low_precision(x, weight, bias, grad, eps, truncating):
    """The native op in the inputs' precision. With ``truncating`` (bf16 under the interpreter): native
    fp32 arithmetic with y and dx rounded toward zero to bf16, the rounding the interpreter applies to
    the kernels' stores, so the comparison judges the kernels' arithmetic, not the emulator's rounding."""
    if not truncating and x.dtype == weight.dtype:
        return _run(lambda a, w, b: F.layer_norm(a, (a.shape[-1],), w, b, eps), x, weight, bias, grad)
    if not truncating:
        # Low-precision x with fp32 parameters (the model's norms under autocast): PyTorch's CUDA kernel
        # refuses mixed dtypes, and autocast runs it on an fp32 copy of x. That, with y and dx rounded
        # back to x's dtype (what the op returns outside autocast), is native's precision here.
        y, dx, dw, db = _run(lambda a, w, b: F.layer_norm(a, (a.shape[-1],), w, b, eps), x.float(), weight,
                             bias, grad.to(x.dtype).float())
        return y.to(x.dtype), dx.to(x.dtype), dw, db
    y, dx, dw, db = _run(lambda a, w, b: F.layer_norm(a, (a.shape[-1],), w, b, eps), x.float(), weight.float(),
                         bias.float(), grad.to(x.dtype).float())
    return _truncate_to_bf16(y), _truncate_to_bf16(dx), dw.to(weight.dtype), db.to(bias.dtype)


def check_against_native(fn, x, weight, bias, eps, grad=None, truncating_bf16=False):
    """Asserts fn's y, dx, dweight, dbias err from fp64 by at most 2x native's error (+ floor); returns a report."""
    grad = torch.randn(x.shape, dtype=torch.float64, device=x.device).to(x.dtype) if grad is None else grad
    got = _run(fn, x, weight, bias, grad)
    exact = _exact(x, weight, bias, grad.to(got[0].dtype), eps)  # the dy the op saw, rounded as it was
    native = _native_low_precision(x, weight, bias, grad, eps, truncating_bf16 and x.dtype == BF16)
    lines = []
    for name, g, n, e in zip(("y", "dx", "dweight", "dbias"), got, native, exact):
        assert g.shape == e.shape and not torch.isnan(g).any(), f"{name}: shape {tuple(g.shape)} or NaN"
        err = (g.double() - e).abs().max().item()
        native_err = (n.double() - e).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(torch.float32).eps * e.abs().max().item()
        lines.append(f"{name} err {err:.3g} native {native_err:.3g} floor {floor:.2g}")
        assert err <= 2 * native_err + floor, f"{name}: error {err:.3g} > 2 x native's {native_err:.3g} + {floor:.2g}"
    return "; ".join(lines)


def _inputs(shape, dtype, device="cpu"):
    channels = shape[-1]
    # an offset and scale, so that the mean matters and rows are not already normalized
    x = (torch.randn(shape, dtype=torch.float64, device=device) * 3 + 1).to(dtype)
    weight = torch.randn(channels, dtype=torch.float64, device=device).to(dtype)
    bias = torch.randn(channels, dtype=torch.float64, device=device).to(dtype)
    return x, weight, bias


# ------------------------------------------------------------------------------------------------
# spec, dispatcher and layer (CPU, this process)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
@pytest.mark.parametrize("dtype", [torch.float64, F32, BF16], ids=str)
def test_spec_matches_native(seed, dtype):
    x, w, b = _inputs((3, 5, 7, 12), dtype)
    y, mean, rstd = layer_norm_ref(x, w, b, VSS_EPS)
    native_y, native_mean, native_rstd = torch.native_layer_norm(x, (12,), w, b, VSS_EPS)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    torch.testing.assert_close(y, native_y, **tol)
    # (PyTorch's CPU kernel returns the statistics of bf16 parameters in bf16: compared at that precision)
    torch.testing.assert_close(mean.to(native_mean.dtype), native_mean.squeeze(-1), **tol)
    torch.testing.assert_close(rstd.to(native_rstd.dtype), native_rstd.squeeze(-1), **tol)
    assert mean.dtype == rstd.dtype == torch.promote_types(dtype, F32)


@not_in_interpreter_run
def test_spec_gradients_fp64(seed):
    x, w, b = (t.requires_grad_(True) for t in _inputs((2, 3, 5), torch.float64))
    assert torch.autograd.gradcheck(lambda *a: layer_norm_ref(*a, VSS_EPS)[0], (x, w, b))


@not_in_interpreter_run
def test_auto_is_triton_on_cuda_and_native_on_the_cpu(seed):
    # Triton joined "auto" on CUDA after benchmarks/bench_small_layernorm.py (H200) showed it faster.
    cuda = torch.device("cuda")
    triton_runs = layer_norm_dispatcher.unavailable_reason("triton", cuda) is None
    assert layer_norm_dispatcher.resolve("auto", cuda) == ("triton" if triton_runs else "reference")
    assert layer_norm_dispatcher.resolve("auto", torch.device("cpu")) in ("cpu", "reference")
    x, w, b = _inputs((2, 4, 6, 8), F32)
    y = layer_norm(x, (8,), w, b, VSS_EPS)
    assert last_backend("layer_norm") in ("cpu", "reference")
    assert torch.equal(y, F.layer_norm(x, (8,), w, b, VSS_EPS))
    assert torch.equal(layer_norm(x, 8, w, b, VSS_EPS, backend="reference"), y)


@not_in_interpreter_run
def test_auto_sends_what_triton_does_not_take_to_native(seed):
    """The configurations "auto" keeps on PyTorch's kernel even on CUDA (asked by name, they raise)."""
    x, w, b = _inputs((2, 4, 8), F32)
    takes = layer_norm_module._auto_takes_triton
    assert takes(x, (8,), w, b) and takes(x.half(), (8,), w, b) and takes(x.bfloat16(), (8,), w.bfloat16(), b.bfloat16())
    assert not takes(x, (4, 8), torch.ones(4, 8), torch.zeros(4, 8))  # several normalized dims
    assert not takes(x, (8,), None, b) and not takes(x, (8,), w, None)  # no affine / no bias
    assert not takes(x.double(), (8,), w.double(), b.double())
    assert not takes(x, (8,), w, b.half())
    widest = layer_norm_module.TRITON_AUTO_MAX_CHANNELS  # wider rows: PyTorch's kernel was faster
    for channels, expected in ((widest, True), (widest + 1, False)):
        row = torch.zeros(3, channels)
        assert takes(row, (channels,), torch.ones(channels), torch.zeros(channels)) == expected


@not_in_interpreter_run
def test_triton_without_gpu_or_interpreter_is_unavailable(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton through the interpreter")
    x, w, b = _inputs((2, 3, 8), F32)
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable: Triton runs on CUDA"):
        layer_norm(x, (8,), w, b, backend="triton")
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable"):
        layer_norm(x, (8,), w, b)
    # The layer runs "auto" unless given a backend: a process-wide DERMOMAMBA_BACKEND names the scan / CBAM /
    # loss kernels, and "cuda" (no LayerNorm kernel of ours) must not stop the model's norms.
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "cuda")
    torch.testing.assert_close(LayerNorm(8)(x), F.layer_norm(x, (8,), eps=1e-5), rtol=0, atol=0)
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "auto")
    with pytest.raises(ValueError, match="backend='nope'"):
        layer_norm(x, (8,), w, b, backend="nope")
    with pytest.raises(BackendUnavailableError, match="no 'cuda' implementation"):
        layer_norm(x, (8,), w, b, backend="cuda")
    with pytest.raises(TypeError, match="x: expected a tensor"):
        layer_norm([1.0, 2.0], (2,))


@not_in_interpreter_run
def test_layer_is_nn_layernorm(seed):
    """Same parameters, state_dict and (on the default backend) the very same numbers as nn.LayerNorm."""
    ours, theirs = LayerNorm(12, eps=VSS_EPS), nn.LayerNorm(12, eps=VSS_EPS)
    assert isinstance(ours, nn.LayerNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 7, 12, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    grad = torch.randn(2, 5, 7, 12)
    y, y_twin = ours(x), theirs(x_twin)
    assert torch.equal(y, y_twin)
    y.backward(grad)
    y_twin.backward(grad)
    assert torch.equal(x.grad, x_twin.grad)
    assert torch.equal(ours.weight.grad, theirs.weight.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)
    assert "backend='auto'" in repr(ours)


@not_in_interpreter_run
@pytest.mark.parametrize("kwargs,shape", [({"elementwise_affine": False}, (8,)), ({"bias": False}, (8,)),
                                          ({}, (4, 8))], ids=["no-affine", "no-bias", "two-dims"])
def test_layer_configurations_on_the_reference(seed, kwargs, shape):
    ours, theirs = LayerNorm(shape, backend="reference", **kwargs), nn.LayerNorm(shape, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 8)
    assert torch.equal(ours(x), theirs(x))


@not_in_interpreter_run
def test_model_layers_use_it():
    block = VSSBlock(hidden_dim=8)
    assert type(block.ln_1) is LayerNorm and block.ln_1.eps == VSS_EPS
    assert type(block.self_attention.out_norm) is LayerNorm and block.self_attention.out_norm.eps == 1e-5
    # SS2D's backend names the scan's backend, not the norm's
    assert SS2D(8, backend="reference").out_norm.backend == "auto"


# ------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (run in a subprocess by the test below)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
def test_triton_kernels_under_interpreter():
    run_interpreter_cases(HERE, INTERPRETER_CASES_ENV)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output and scratch buffer of the Triton ops starts as NaN (an element never written shows)."""
    from dermomamba_kernels.layer_norm import triton_ops

    monkeypatch.setattr(triton_ops, "POISON_OUTPUTS", True)


@pytest.fixture
def few_backward_programs(monkeypatch):
    """A grid of at most 3 backward programs: each walks several tiles (the loop and the partial-sum rows
    the GPU sizes exercise), and the last one runs past the end of the rows."""
    from dermomamba_kernels.layer_norm import triton_kernels

    monkeypatch.setattr(triton_kernels, "BACKWARD_PROGRAMS", 3)


TRITON = (lambda x, w, b: layer_norm(x, (x.shape[-1],), w, b, VSS_EPS, backend="triton"))
# (shape, dtype): rows never a multiple of the tile (C=4: 1024 rows forward, 512 backward; C=64: 64 / 32).
INTERPRETER_CASES = [
    ((3, 37, 11, 4), F32), ((1, 13, 29, 4), F16), ((2, 9, 23, 4), BF16),
    ((1, 13, 29, 8), F32), ((2, 9, 23, 8), F16), ((3, 17, 11, 8), BF16),
    ((2, 9, 23, 12), F32), ((1, 13, 29, 12), F16), ((2, 9, 23, 12), BF16),
    ((2, 5, 17, 64), F32), ((2, 5, 17, 64), F16), ((1, 7, 15, 64), BF16),
]


@interpreter_only
@pytest.mark.parametrize("shape,dtype", INTERPRETER_CASES, ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}"
                                                                  for s, d in INTERPRETER_CASES])
@pytest.mark.parametrize("programs", ["one-tile-each", "looping"])
def test_interp_parity(seed, poisoned, monkeypatch, shape, dtype, programs):
    if programs == "looping":
        from dermomamba_kernels.layer_norm import triton_kernels

        monkeypatch.setattr(triton_kernels, "BACKWARD_PROGRAMS", 3)
    x, w, b = _inputs(shape, dtype)
    print(check_against_native(TRITON, x, w, b, VSS_EPS, truncating_bf16=True))
    assert last_backend("layer_norm") == "triton"


@interpreter_only
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_interp_mean_and_rstd(seed, poisoned, dtype):
    from dermomamba_kernels.layer_norm.triton_ops import forward_op

    x, w, b = _inputs((2, 11, 13, 12), dtype)
    y, mean, rstd = forward_op(x, w, b, VSS_EPS, dtype)
    _, exact_mean, exact_rstd = layer_norm_ref(x.double(), None, None, VSS_EPS)
    _, native_mean, native_rstd = torch.native_layer_norm(x, (12,), w, b, VSS_EPS)
    assert mean.shape == rstd.shape == x.shape[:-1] and mean.dtype == rstd.dtype == F32
    for name, got, native, exact in (("mean", mean, native_mean.squeeze(-1), exact_mean),
                                     ("rstd", rstd, native_rstd.squeeze(-1), exact_rstd)):
        err = (got.double() - exact).abs().max().item()
        native_err = (native.double() - exact).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * exact.abs().max().item()
        assert err <= 2 * native_err + floor, f"{name}: {err:.3g} vs native {native_err:.3g}"


@interpreter_only
def test_interp_strided_inputs(seed, poisoned, few_backward_programs):
    """Read in place: a channels-last map permuted to (B, H, W, C), a channel slice (row stride 2C, like
    the halves of in_proj(x).chunk(2, -1)), batch 1. Copied: a permuted NCHW map (last dim strided)
    and a view whose leading dims do not collapse. dy non-dense too. Every result must be right."""
    from dermomamba_kernels.layer_norm.triton_kernels import rows_view

    channels = 8
    w, b = _inputs((channels,), F32)[1:]
    nchw = torch.randn(1, channels, 9, 14)
    views = {
        "channels-last permuted": (nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1), True),
        "channel slice": (torch.randn(2, 7, 9, 2 * channels)[..., channels:], True),
        "NCHW permuted": (nchw.permute(0, 2, 3, 1), False),
        "every other row": (torch.randn(2, 14, 9, channels)[:, ::2], False),
    }
    for name, (x, in_place) in views.items():
        rows = rows_view(x)
        assert (rows.data_ptr() == x.data_ptr() and rows.stride(1) == 1) == in_place, name
        grad = torch.randn(*x.shape[:-1], 2 * channels)[..., :channels]  # row stride 2C
        print(name, check_against_native(TRITON, x, w, b, VSS_EPS, grad=grad))


@interpreter_only
def test_interp_backward_op_reads_strided_grad(seed, poisoned):
    from dermomamba_kernels.layer_norm.triton_ops import backward_op, forward_op

    x, w, b = _inputs((3, 5, 7, 12), F32)
    _, mean, rstd = forward_op(x, w, b, VSS_EPS, F32)
    wide = torch.randn(3, 5, 7, 24)
    dx, dw, db = backward_op(wide[..., 12:], x, w, mean, rstd)
    dx_dense, dw_dense, db_dense = backward_op(wide[..., 12:].contiguous(), x, w,
                                                                            mean, rstd)
    assert torch.equal(dx, dx_dense) and torch.equal(dw, dw_dense) and torch.equal(db, db_dense)
    assert dx.is_contiguous() and dx.dtype == F32 and dw.shape == db.shape == (12,)


@interpreter_only
def test_interp_deterministic(seed, few_backward_programs):
    x, w, b = _inputs((2, 13, 29, 8), F32)
    grad = torch.randn(x.shape)
    first = _run(TRITON, x, w, b, grad)
    second = _run(TRITON, x, w, b, grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@interpreter_only
def test_interp_empty_rows(poisoned):
    x = torch.randn(0, 5, 8, requires_grad=True)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    y = layer_norm(x, (8,), w, b, backend="triton")
    assert y.shape == x.shape
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn(0, 5, 8))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


@interpreter_only
def test_interp_mixed_parameter_dtypes_and_autocast(seed, poisoned, monkeypatch):
    """Half/bf16 x with fp32 parameters (allowed natively); CPU autocast leaves layer_norm in x's dtype
    (as F.layer_norm); under an autocast that runs layer_norm in fp32 (CUDA's, emulated here on the CPU)
    y is fp32 and equals F.layer_norm of the upcast inputs, while dx keeps x's dtype."""
    import importlib

    # The package exports the function layer_norm under the subpackage's name; import_module returns the module.
    ln = importlib.import_module("dermomamba_kernels.layer_norm")

    x, _, _ = _inputs((2, 7, 9, 8), F16)
    w, b = torch.randn(8), torch.randn(8)
    print(check_against_native(TRITON, x, w, b, VSS_EPS))
    with torch.autocast("cpu", dtype=BF16):
        xb = x.to(BF16)
        assert TRITON(xb, w, b).dtype == F.layer_norm(xb, (8,), w, b, VSS_EPS).dtype == BF16
    monkeypatch.setattr(ln, "AUTOCAST_FP32_DEVICE_TYPES", ("cpu",))
    leaf = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=F16):
        y = TRITON(leaf, w.half(), b.half())
    assert y.dtype == F32
    torch.testing.assert_close(y, F.layer_norm(x.float(), (8,), w.half().float(), b.half().float(), VSS_EPS))
    (dx,) = torch.autograd.grad(y, leaf, torch.randn(y.shape))
    assert dx.dtype == F16


@interpreter_only
def test_interp_opcheck(seed):
    from dermomamba_kernels.layer_norm.triton_ops import backward_op, forward_op

    x, w, b = _inputs((2, 5, 7, 12), F32)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), VSS_EPS, F32)
    torch.library.opcheck(forward_op, args)
    torch.library.opcheck(forward_op,
                          (x.detach().half(), w.detach(), b.detach(), 1e-5, F32))
    _, mean, rstd = forward_op(*args)
    bwd = (torch.randn(2, 5, 7, 12), x.detach(), w.detach(), mean.detach(), rstd.detach())
    torch.library.opcheck(backward_op, bwd)


@interpreter_only
def test_interp_layer(seed, poisoned):
    layer = LayerNorm(12, eps=VSS_EPS, backend="triton")
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(1, 6, 10, 12)
    torch.testing.assert_close(layer(x), F.layer_norm(x, (12,), layer.weight, layer.bias, VSS_EPS))
    for kwargs, match in (({"elementwise_affine": False}, "needs both weight and bias"),
                          ({"bias": False}, "needs both weight and bias")):
        with pytest.raises(BackendUnavailableError, match=match):
            LayerNorm(12, backend="triton", **kwargs)(x)
    with pytest.raises(BackendUnavailableError, match="last dim only"):
        LayerNorm((10, 12), backend="triton")(x)


@interpreter_only
def test_interp_layer_compiles_fullgraph(seed):
    """Dynamo traces the dispatcher, the checks and the custom op (its fake and autograd) in one graph;
    aot_eager keeps the CPU run short (inductor on the GPU: test_gpu_compile_fullgraph)."""
    layer = LayerNorm(8, eps=VSS_EPS, backend="triton")
    x = torch.randn(2, 6, 10, 8, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, y_eager = compiled(x), layer(x)
    assert torch.equal(y, y_eager)
    grad = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y_eager, x, grad)[0])


@interpreter_only
@pytest.mark.parametrize("change,error,message", [
    (lambda a: {**a, "x": a["x"].double()}, TypeError, "x: dtype torch.float64"),
    (lambda a: {**a, "normalized_shape": (7,)}, ValueError, r"normalized_shape: \(7,\) does not match"),
    (lambda a: {**a, "weight": torch.randn(7)}, ValueError, r"weight: expected shape \(8,\)"),
    (lambda a: {**a, "bias": torch.randn(2, 4)}, ValueError, r"bias: expected shape \(8,\)"),
    (lambda a: {**a, "bias": torch.randn(8, device="meta")}, ValueError, "bias: on meta"),
    (lambda a: {**a, "bias": a["bias"].half()}, TypeError, "bias: dtype torch.float16 differs"),
    (lambda a: {**a, "weight": a["weight"].half(), "bias": a["bias"].half()}, TypeError,
     "weight: dtype torch.float16 does not go with x's torch.float32"),
    (lambda a: {**a, "x": torch.randn(3, 0), "normalized_shape": (0,), "weight": torch.randn(0),
                "bias": torch.randn(0)}, ValueError, "x: the normalized dimension is empty"),
    (lambda a: {**a, "x": torch.randn(1, 8193), "normalized_shape": (8193,), "weight": torch.randn(8193),
                "bias": torch.randn(8193)}, ValueError, "exceeds the triton backend's 8192"),
    (lambda a: {**a, "eps": -1.0}, ValueError, "eps: expected a non-negative"),
], ids=["fp64", "shape", "weight", "bias", "device", "bias-dtype", "param-dtype", "empty", "too-wide", "eps"])
def test_interp_bad_input_names_the_argument(change, error, message):
    args = change({"x": torch.randn(2, 3, 8), "normalized_shape": (8,), "weight": torch.randn(8),
                   "bias": torch.randn(8), "eps": 1e-5})
    with pytest.raises(error, match=message):
        layer_norm(args["x"], args["normalized_shape"], args["weight"], args["bias"], args["eps"], backend="triton")


# ------------------------------------------------------------------------------------------------
# the compiled kernels on the GPU at full size
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("rows,channels", FULL_SIZE_CASES, ids=[f"{r}x{c}" for r, c in FULL_SIZE_CASES])
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_gpu_full_size_against_native(seed, poisoned, rows, channels, dtype):
    x, w, b = _inputs((rows, channels), dtype, device="cuda")
    # fp32 parameters with low-precision x, as the model's norms under autocast get them
    w, b = w.float(), b.float()
    print(check_against_native(TRITON, x, w, b, VSS_EPS))


@pytest.mark.gpu
def test_gpu_channels_last_views_and_batch_1(seed, poisoned):
    channels = 8
    _, w, b = _inputs((channels,), F32, device="cuda")
    nchw = torch.randn(1, channels, 192, 256, device="cuda")
    for x in (nchw.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1),
              torch.randn(16, 192, 256, 2 * channels, device="cuda")[..., channels:],
              nchw.permute(0, 2, 3, 1)):
        grad = torch.randn(*x.shape[:-1], 2 * channels, device="cuda")[..., :channels]
        print(check_against_native(TRITON, x, w, b, VSS_EPS, grad=grad))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_gpu_autocast_matches_native(seed, poisoned, dtype):
    x = torch.randn(16 * 192 * 256, 8, device="cuda").to(dtype).requires_grad_(True)
    layer = LayerNorm(8, eps=VSS_EPS, backend="triton").cuda()
    twin = nn.LayerNorm(8, eps=VSS_EPS).cuda()
    twin.load_state_dict(layer.state_dict())
    x_twin = x.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        y, y_twin = layer(x), twin(x_twin)
    assert y.dtype == y_twin.dtype == F32
    torch.testing.assert_close(y, y_twin)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_twin.backward(grad)
    assert x.grad.dtype == x_twin.grad.dtype == dtype
    torch.testing.assert_close(x.grad, x_twin.grad)


@pytest.mark.gpu
def test_gpu_auto_runs_triton_and_native_where_triton_does_not_apply(seed):
    x = torch.randn(3, 10, 12, 8, device="cuda")
    layer = LayerNorm(8, eps=VSS_EPS).cuda()
    torch.testing.assert_close(layer(x), F.layer_norm(x, (8,), layer.weight, layer.bias, VSS_EPS))
    assert last_backend("layer_norm") == "triton"
    wide = torch.randn(3, 10, 12, 32, device="cuda")
    wide_norm = LayerNorm(32, eps=VSS_EPS).cuda()
    torch.testing.assert_close(wide_norm(wide), F.layer_norm(wide, (32,), wide_norm.weight, wide_norm.bias, VSS_EPS),
                               rtol=0, atol=0)
    assert last_backend("layer_norm") == "reference"
    for norm in (LayerNorm(8, elementwise_affine=False), LayerNorm(8, bias=False), LayerNorm((12, 8))):
        norm = norm.cuda()
        twin = nn.LayerNorm(norm.normalized_shape, elementwise_affine=norm.elementwise_affine,
                            bias=norm.bias is not None).cuda()
        twin.load_state_dict(norm.state_dict())
        torch.testing.assert_close(norm(x), twin(x), rtol=0, atol=0)
        assert last_backend("layer_norm") == "reference"


@pytest.mark.gpu
def test_gpu_backward_is_deterministic(seed):
    x, w, b = _inputs((48 * 192 * 256, 8), F16, device="cuda")
    w, b = w.float(), b.float()
    grad = torch.randn(x.shape, device="cuda", dtype=F16)
    first = _run(TRITON, x, w, b, grad)
    second = _run(TRITON, x, w, b, grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.gpu
def test_gpu_opcheck(seed):
    from dermomamba_kernels.layer_norm.triton_ops import backward_op, forward_op

    x, w, b = _inputs((4, 33, 17, 8), F16, device="cuda")
    args = (x.requires_grad_(True), w.float().requires_grad_(True), b.float().requires_grad_(True), VSS_EPS, F16)
    torch.library.opcheck(forward_op, args)
    _, mean, rstd = forward_op(*args)
    bwd = (torch.randn_like(x), x.detach(), w.float(), mean.detach(), rstd.detach())
    torch.library.opcheck(backward_op, bwd)


@pytest.mark.gpu
def test_gpu_compile_fullgraph(seed):
    layer = LayerNorm(8, eps=VSS_EPS, backend="triton").cuda()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(4, 48, 64, 8, device="cuda", requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y_eager = layer(x)
    torch.testing.assert_close(y, y_eager)
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    (dx_eager,) = torch.autograd.grad(y_eager, x, grad)
    torch.testing.assert_close(dx, dx_eager)
