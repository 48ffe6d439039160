"""Depthwise 2-D convolution: the spec, the dispatch point, the module drop-ins, and the Triton weight gradient.

CPU (CI): the spec against F.conv2d in fp64, the dispatcher's choices and errors, the module
helpers against nn.Conv2d; the Triton kernels through the Triton interpreter: the tests named
``test_interp_*`` run in a subprocess of this same file with TRITON_INTERPRET=1 (it must be set
before the kernels are defined and must not leak into this process or its GPU tests). GPU (marked
gpu): the compiled kernels at DermoMamba's full sizes against PyTorch's CUDA convolution, CUDA
autocast, determinism, opcheck, torch.compile(fullgraph=True) and CUDA-graph capture.

Tolerance: each of y, dx, dweight, dbias may err from an fp64 computation on the same (rounded)
inputs by at most twice the error of PyTorch's F.conv2d + autograd run in the same precision on the
same inputs, plus 2 fp32 ulps of the quantity's largest value (the result's own rounding and fp32
sums in another order; PyTorch's error on one draw can be far below that: measured 8e-7 against
our 2.7e-6 for a d bias of max ~30, i.e. 1.4 ulps; with fp16/bf16 results this floor is far below
one ulp of the result). y and dx are PyTorch's own (the same calls), so only dweight and dbias are
really judged. Measured under the interpreter (2026-11-28, the 12 model-kernel cases): fp32 d weight
error / PyTorch's at most 1.8x, fp16 and bf16 1.0x (both round the same fp32 sum). Under the
interpreter a bf16 result is rounded toward zero by the kernel's store (the GPU rounds to nearest):
there PyTorch's side is fp32 arithmetic rounded the same way (``_native_low_precision``), so the
comparison judges the kernel's arithmetic, not the emulator's rounding.
"""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_interpreter_cases
from dermomamba_kernels import BackendUnavailableError, last_backend
from dermomamba_kernels.depthwise_conv import (DepthwiseConv2d, depthwise_conv2d, depthwise_conv2d_dispatcher,
                                               depthwise_conv2d_grad_weight_ref, depthwise_conv2d_module_forward,
                                               depthwise_conv2d_ref, same_padding)

HERE = os.path.abspath(__file__)
INTERPRETER_CASES_ENV = "DERMOMAMBA_DEPTHWISE_INTERPRETER_CASES"
IN_INTERPRETER_RUN = os.environ.get(INTERPRETER_CASES_ENV) == "1"
interpreter_only = pytest.mark.skipif(
    not IN_INTERPRETER_RUN, reason="runs in the interpreter subprocess (test_triton_kernels_under_interpreter)")
not_in_interpreter_run = pytest.mark.skipif(IN_INTERPRETER_RUN, reason="the interpreter subprocess runs test_interp_*")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FP32_ULPS_FLOOR = 2
# The kernel shapes of DermoMamba's depthwise convs: AxialSpatialDW's width and height mixers and its
# 3x3 (dilations 1, 2, 3), SS2D's 3x3, PCAM's 9x9.
MODEL_KERNELS = [(1, 7), (7, 1), (3, 3), (9, 9)]
DILATIONS = [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# error measurement against fp64
# ------------------------------------------------------------------------------------------------

def _native(dilation, padding):
    return lambda a, w, b: F.conv2d(a, w, b, 1, padding, dilation, a.shape[1])


def _run(fn, x, weight, bias, grad):
    """y, dx, dweight, dbias of fn on leaf copies of the inputs (x keeps its strides)."""
    leaves = [x.detach().requires_grad_(True), weight.detach().clone().requires_grad_(True),
              bias.detach().clone().requires_grad_(True)]
    y = fn(*leaves)
    return (y,) + torch.autograd.grad(y, leaves, grad.to(y.dtype))


def _truncate_to_bf16(t):
    """fp32 -> bf16 rounding toward zero, as the Triton interpreter converts (the GPU rounds to nearest)."""
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def _native_low_precision(x, weight, bias, grad, dilation, padding, truncating):
    native = _native(dilation, padding)
    if not truncating:
        return _run(native, x, weight, bias, grad)
    y, dx, _, _ = _run(native, x, weight, bias, grad)
    _, _, dw, db = _run(native, x.float(), weight.float(), bias.float(), grad.to(x.dtype).float())
    return y, dx, _truncate_to_bf16(dw), _truncate_to_bf16(db)


def check_against_native(fn, x, weight, bias, dilation, padding, grad=None, truncating_bf16=False):
    """Asserts fn's y, dx, dweight, dbias err from fp64 by at most 2x F.conv2d's error (+ floor); returns
    fn's results and a report line."""
    if grad is None:
        shape = _native(dilation, padding)(x.detach().float(), weight.detach().float(), None).shape
        grad = torch.randn(shape, dtype=F64, device=x.device).to(x.dtype)
    got = _run(fn, x, weight, bias, grad)
    exact = _run(_native(dilation, padding), x.double(), weight.double(), bias.double(), grad.to(got[0].dtype).double())
    native = _native_low_precision(x, weight, bias, grad, dilation, padding, truncating_bf16 and x.dtype == BF16)
    lines = []
    for name, g, n, e in zip(("y", "dx", "dweight", "dbias"), got, native, exact):
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        assert g.dtype == n.dtype, f"{name}: dtype {g.dtype}, F.conv2d gives {n.dtype}"
        assert not torch.isnan(g).any(), f"{name}: NaN (an element never written?)"
        err = (g.double() - e).abs().max().item()
        native_err = (n.double() - e).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * e.abs().max().item()
        lines.append(f"{name} err {err:.3g} native {native_err:.3g} floor {floor:.2g}")
        assert err <= 2 * native_err + floor, f"{name}: error {err:.3g} > 2 x native's {native_err:.3g} + {floor:.2g}"
    return got, "; ".join(lines)


def _inputs(shape, kernel, dtype, device="cpu"):
    channels = shape[1]
    # an offset, so that sums of dy * x do not average out to ~0 and relative errors mean something
    x = (torch.randn(shape, dtype=F64, device=device) + 0.5).to(dtype)
    weight = torch.randn(channels, 1, *kernel, dtype=F64, device=device).to(dtype)
    bias = torch.randn(channels, dtype=F64, device=device).to(dtype)
    return x, weight, bias


# ------------------------------------------------------------------------------------------------
# spec, dispatcher and modules (CPU, this process)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
@pytest.mark.parametrize("kernel", MODEL_KERNELS + [(4, 2), (2, 5)], ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("dilation", [(1, 1), (2, 3), (3, 1)], ids=lambda d: f"d{d[0]}{d[1]}")
def test_spec_matches_conv2d_fp64(seed, kernel, dilation):
    x, w, b = _inputs((2, 3, 19, 22), kernel, F64)
    padding = same_padding(kernel, dilation)
    y = depthwise_conv2d_ref(x, w, b, dilation, padding)
    torch.testing.assert_close(y, F.conv2d(x, w, b, 1, "same", dilation, 3), rtol=1e-12, atol=1e-12)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    out = F.conv2d(leaves[0], leaves[1], leaves[2], 1, "same", dilation, 3)
    grad = torch.randn_like(out)
    _, dw, db = torch.autograd.grad(out, leaves, grad)
    ref_dw, ref_db = depthwise_conv2d_grad_weight_ref(grad, x.detach(), kernel, dilation, padding)
    torch.testing.assert_close(ref_dw, dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_db, db, rtol=1e-12, atol=1e-12)


@not_in_interpreter_run
def test_spec_explicit_padding_and_gradcheck(seed):
    x, w, b = _inputs((2, 3, 7, 9), (3, 5), F64)
    torch.testing.assert_close(depthwise_conv2d_ref(x, w, b, (2, 1), (4, 4, 0, 0)),
                               F.conv2d(x, w, b, 1, (4, 0), (2, 1), 3), rtol=1e-12, atol=1e-12)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: depthwise_conv2d_ref(*a, (1, 2), same_padding((3, 5), (1, 2))),
                                    leaves)


@not_in_interpreter_run
def test_auto_is_the_reference_until_measured(seed, monkeypatch):
    monkeypatch.delenv("DERMOMAMBA_DEPTHWISE_BACKEND", raising=False)
    monkeypatch.delenv("DERMOMAMBA_BACKEND", raising=False)
    assert depthwise_conv2d_dispatcher.resolve("auto", torch.device("cuda")) == "reference"
    assert depthwise_conv2d_dispatcher.resolve("auto", torch.device("cpu")) in ("cpu", "reference")
    x, w, b = _inputs((2, 4, 9, 11), (3, 3), F32)
    y = depthwise_conv2d(x, w, b, 2, "same")
    assert last_backend("depthwise_conv2d") in ("cpu", "reference")
    assert torch.equal(y, F.conv2d(x, w, b, 1, "same", 2, 4))
    assert torch.equal(depthwise_conv2d(x, w, b, 2, "same", backend="reference"), y)


@not_in_interpreter_run
def test_opting_in_names_triton(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton through the interpreter")
    x, w, b = _inputs((2, 4, 9, 11), (3, 3), F32)
    conv = nn.Conv2d(4, 4, 3, padding="same", groups=4)
    monkeypatch.setenv("DERMOMAMBA_DEPTHWISE_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable: Triton runs on CUDA"):
        depthwise_conv2d(x, w, b)
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable"):
        depthwise_conv2d_module_forward(conv, x)
    # an explicit backend wins over the environment
    assert torch.equal(depthwise_conv2d(x, w, b, backend="reference"), F.conv2d(x, w, b, 1, "same", 1, 4))
    monkeypatch.setenv("DERMOMAMBA_DEPTHWISE_BACKEND", "nope")
    with pytest.raises(ValueError, match="DERMOMAMBA_DEPTHWISE_BACKEND='nope'"):
        depthwise_conv2d(x, w, b)
    # The module helper runs "auto" unless told: DERMOMAMBA_BACKEND names the scan / CBAM / loss kernels, and
    # "cuda" (no depthwise kernel of ours) must not stop the model's convs. The function follows it, as every op.
    monkeypatch.delenv("DERMOMAMBA_DEPTHWISE_BACKEND")
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "cuda")
    assert torch.equal(depthwise_conv2d_module_forward(conv, x), conv(x))
    with pytest.raises(BackendUnavailableError, match="no 'cuda' implementation"):
        depthwise_conv2d(x, w, b)
    with pytest.raises(ValueError, match="backend='nope'"):
        depthwise_conv2d(x, w, b, backend="nope")


@not_in_interpreter_run
@pytest.mark.parametrize("call,error,message", [
    (lambda x, w, b: depthwise_conv2d([1.0], w, b), TypeError, "x: expected a tensor"),
    (lambda x, w, b: depthwise_conv2d(x[0], w, b), ValueError, r"x: expected a \(B, C, H, W\) tensor"),
    (lambda x, w, b: depthwise_conv2d(x, w[:3], b), ValueError, r"weight: expected shape \(4, 1, kh, kw\)"),
    (lambda x, w, b: depthwise_conv2d(x, w.expand(4, 2, 3, 3), b), ValueError, "weight: expected shape"),
    (lambda x, w, b: depthwise_conv2d(x, None, b), TypeError, "weight: expected a tensor"),
    (lambda x, w, b: depthwise_conv2d(x, w, b[:3]), ValueError, r"bias: expected shape \(4,\)"),
    (lambda x, w, b: depthwise_conv2d(x, w, b.to("meta")), ValueError, "bias: on meta"),
    (lambda x, w, b: depthwise_conv2d(x, w.to("meta"), b), ValueError, "weight: on meta"),
    (lambda x, w, b: depthwise_conv2d(x, w, b, dilation=0), ValueError, "dilation: expected values >= 1"),
    (lambda x, w, b: depthwise_conv2d(x, w, b, dilation=(1, 2, 3)), ValueError, "dilation: expected an int or a pair"),
    (lambda x, w, b: depthwise_conv2d(x, w, b, padding="full"), ValueError, "padding: expected 'same', 'valid'"),
    (lambda x, w, b: depthwise_conv2d(x, w, b, padding=-1), ValueError, "padding: expected values >= 0"),
    (lambda x, w, b: depthwise_conv2d(x, w, b, dilation=9, padding="valid"), ValueError,
     "weight: a 3x3 kernel at dilation .* does not fit"),
], ids=["x-type", "x-dims", "weight-channels", "weight-in", "weight-type", "bias-shape", "bias-device",
        "weight-device", "dilation-0", "dilation-3", "padding-str", "padding-negative", "too-small"])
def test_bad_input_names_the_argument(call, error, message):
    x, w, b = _inputs((2, 4, 9, 11), (3, 3), F32)
    with pytest.raises(error, match=message):
        call(x, w, b)


@not_in_interpreter_run
def test_module_helpers_are_nn_conv2d(seed):
    """Same parameters and state_dict as nn.Conv2d, and (on the default backend) the very same numbers."""
    theirs = nn.Conv2d(8, 8, (1, 7), padding="same", dilation=3, groups=8)
    ours = DepthwiseConv2d(8, (1, 7), padding="same", dilation=3)
    assert isinstance(ours, nn.Conv2d) and list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 8, 11, 13)
    grad = torch.randn(2, 8, 11, 13)
    results = []
    for fn, module in ((theirs, theirs), (ours, ours), (lambda t: depthwise_conv2d_module_forward(theirs, t), theirs)):
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(grad)
        results.append((y, leaf.grad, module.weight.grad, module.bias.grad))
    for other in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], other))
    assert "backend='auto'" in repr(ours)
    no_bias = DepthwiseConv2d(4, 3, bias=False, padding=1)
    assert no_bias.bias is None and torch.equal(no_bias(x[:, :4]), F.conv2d(x[:, :4], no_bias.weight, None, 1, 1, 1, 4))


@not_in_interpreter_run
@pytest.mark.parametrize("conv,message", [
    (nn.Conv2d(4, 8, 3, groups=4), "not depthwise"),
    (nn.Conv2d(4, 4, 3), "not depthwise"),
    (nn.Conv2d(4, 4, 3, stride=2, groups=4), "stride 1 only"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=4), "zero padding only"),
], ids=["multiplier", "dense", "stride", "reflect"])
def test_module_helper_refuses_what_it_does_not_compute(conv, message):
    with pytest.raises(ValueError, match=message):
        depthwise_conv2d_module_forward(conv, torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="conv: expected an nn.Conv2d"):
        depthwise_conv2d_module_forward(nn.Linear(4, 4), torch.randn(1, 4, 8, 8))


# ------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (run in a subprocess by the test below)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
def test_triton_kernels_under_interpreter():
    run_interpreter_cases(HERE, INTERPRETER_CASES_ENV, unset=("DERMOMAMBA_DEPTHWISE_BACKEND",))


@pytest.fixture
def poisoned(monkeypatch):
    """Every output and scratch buffer of the Triton kernels starts as NaN (an element never written shows)."""
    from dermomamba_kernels.depthwise_conv import triton_ops

    monkeypatch.setattr(triton_ops, "POISON_OUTPUTS", True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 elements at most 8 wide, and few programs: each program walks several row tiles and
    column blocks, samples share a tile when the map is small, and the last tile of each runs past the map;
    the reduction kernel walks several blocks of slots."""
    from dermomamba_kernels.depthwise_conv import triton_kernels

    monkeypatch.setattr(triton_kernels, "MAX_TILE_ELEMENTS", 32)
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK_W", 8)
    monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", 4)
    monkeypatch.setattr(triton_kernels, "SUM_TILE_ELEMENTS", 32)


@pytest.fixture
def per_tap_reduction(monkeypatch):
    """The per-tap cross-tile reduction (what 9x9 uses) for every kernel, with small tiles."""
    from dermomamba_kernels.depthwise_conv import triton_kernels

    monkeypatch.setattr(triton_kernels, "ACC_REGISTERS", 0)
    monkeypatch.setattr(triton_kernels, "REDUCE_TILE_ELEMENTS", 32)
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK_W", 8)
    monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", 4)


def TRITON(dilation, padding):
    return lambda x, w, b: depthwise_conv2d(x, w, b, dilation, padding, backend="triton")


# (kernel, dilation, shape, dtype): every kernel shape of the model at dilations 1-3, H != W, sizes that are
# no multiple of any tile, batch 1, each dtype.
INTERPRETER_CASES = [
    ((1, 7), 1, (2, 3, 9, 13), F32), ((1, 7), 2, (1, 4, 7, 19), F16), ((1, 7), 3, (2, 2, 5, 23), BF16),
    ((7, 1), 1, (2, 3, 13, 9), F16), ((7, 1), 2, (1, 3, 17, 6), BF16), ((7, 1), 3, (2, 2, 21, 5), F32),
    ((3, 3), 1, (3, 4, 10, 11), BF16), ((3, 3), 2, (2, 3, 9, 14), F32), ((3, 3), 3, (1, 5, 11, 8), F16),
    ((9, 9), 1, (4, 4, 6, 8), F32), ((9, 9), 2, (2, 3, 9, 12), F16), ((9, 9), 3, (1, 2, 10, 9), BF16),
]
# The same with small tiles (each program loops; the interpreter is slow per iteration and tap, hence fewer).
SMALL_TILE_CASES = [
    ((1, 7), 2, (2, 3, 9, 13), F16), ((7, 1), 3, (1, 2, 13, 9), BF16), ((3, 3), 1, (2, 3, 10, 11), F32),
    ((9, 9), 1, (1, 2, 5, 6), F32),
]


def _case_id(case):
    (kh, kw), d, shape, dtype = case
    return f"{kh}x{kw}-d{d}-{'x'.join(map(str, shape))}-{str(dtype)[6:]}"


@interpreter_only
@pytest.mark.parametrize("tiles,case", [("default", c) for c in INTERPRETER_CASES]
                         + [("small", c) for c in SMALL_TILE_CASES] + [("per-tap", c) for c in SMALL_TILE_CASES[:2]],
                         ids=[f"default-{_case_id(c)}" for c in INTERPRETER_CASES]
                         + [f"small-{_case_id(c)}" for c in SMALL_TILE_CASES]
                         + [f"per-tap-{_case_id(c)}" for c in SMALL_TILE_CASES[:2]])
def test_interp_parity(seed, poisoned, request, case, tiles):
    if tiles == "small":
        request.getfixturevalue("small_tiles")
    elif tiles == "per-tap":
        request.getfixturevalue("per_tap_reduction")
    kernel, dilation, shape, dtype = case
    x, w, b = _inputs(shape, kernel, dtype)
    _, report = check_against_native(TRITON(dilation, "same"), x, w, b, dilation, "same", truncating_bf16=True)
    print(report)
    assert last_backend("depthwise_conv2d") == "triton"


@interpreter_only
@pytest.mark.parametrize("kernel,dilation,padding", [
    ((4, 2), (2, 1), "same"), ((2, 2), (1, 1), "same"), ((3, 3), (1, 1), (2, 0)), ((3, 5), (1, 2), "valid"),
    ((3, 3), (2, 2), 5), ((5, 1), (1, 1), (0, 3)),
], ids=["even-same-dilated", "even-same", "pad-2-0", "valid", "pad-beyond-halo", "pad-0-3"])
def test_interp_even_kernels_and_explicit_padding(seed, poisoned, small_tiles, kernel, dilation, padding):
    x, w, b = _inputs((2, 3, 9, 10), kernel, F32)
    _, report = check_against_native(TRITON(dilation, padding), x, w, b, dilation, padding)
    print(report)


@interpreter_only
def test_interp_strided_inputs(seed, poisoned):
    """Channels-last x, a channel slice of a wider map (what torch.chunk gives AxialSpatialDW), a
    non-contiguous dy, batch 1: every result right, and d weight / d bias the same bits as from dense copies
    (the kernel reads the same values in the same order)."""
    channels, kernel, dilation = 4, (3, 3), 2
    _, w, b = _inputs((1, channels, 1, 1), kernel, F32)
    views = {
        "channels-last": torch.randn(2, channels, 7, 9).contiguous(memory_format=torch.channels_last),
        "channel slice": torch.randn(2, 3 * channels, 7, 9).chunk(3, dim=1)[1],
        "batch 1, rows strided": torch.randn(1, channels, 14, 9)[:, :, ::2],
    }
    for name, x in views.items():
        grad = torch.randn(x.shape[0], 2 * channels, *x.shape[2:])[:, channels:]
        got, report = check_against_native(TRITON(dilation, "same"), x, w, b, dilation, "same", grad=grad)
        dense, _ = check_against_native(TRITON(dilation, "same"), x.contiguous(), w, b, dilation, "same",
                                        grad=grad.contiguous())
        assert torch.equal(got[2], dense[2]) and torch.equal(got[3], dense[3]), name
        print(name, report)


@interpreter_only
def test_interp_grad_weight_op_against_spec(seed, poisoned, small_tiles):
    """The raw op against the fp64 spec, and with tiles spanning several samples of a small map."""
    from dermomamba_kernels.depthwise_conv.triton_ops import grad_weight_op

    for shape, kernel, dilation in (((5, 3, 3, 2), (3, 3), (1, 1)), ((2, 2, 4, 3), (9, 9), (1, 1)),
                                    ((2, 3, 8, 5), (1, 7), (1, 3))):
        x, _, _ = _inputs(shape, kernel, F32)
        padding = same_padding(kernel, dilation)
        dy = torch.randn(shape)
        dw, db = grad_weight_op(dy, x, list(kernel), list(dilation), list(padding))
        ref_dw, ref_db = depthwise_conv2d_grad_weight_ref(dy.double(), x.double(), kernel, dilation, padding)
        torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db.double(), ref_db, rtol=1e-5, atol=1e-5)


@interpreter_only
def test_interp_deterministic(seed):
    x, w, b = _inputs((2, 3, 7, 11), (3, 3), F32)
    grad = torch.randn(x.shape)
    first = _run(TRITON(1, "same"), x, w, b, grad)
    second = _run(TRITON(1, "same"), x, w, b, grad)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@interpreter_only
def test_interp_needs_input_grad_and_no_bias(seed, poisoned):
    x, w, _ = _inputs((2, 3, 7, 9), (3, 3), F32)
    weight = w.clone().requires_grad_(True)
    y = depthwise_conv2d(x, weight, None, 1, "same", backend="triton")
    (dw,) = torch.autograd.grad(y, weight, torch.ones_like(y))
    leaf = w.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.conv2d(x, leaf, None, 1, "same", 1, 3), leaf, torch.ones_like(y))
    torch.testing.assert_close(dw, expected)
    xl = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(depthwise_conv2d(xl, w, None, 1, "same", backend="triton"), xl, torch.ones_like(y))
    assert torch.equal(dx, torch.autograd.grad(F.conv2d(xl, w, None, 1, "same", 1, 3), xl, torch.ones_like(y))[0])


@interpreter_only
def test_interp_empty_batch(poisoned):
    x = torch.randn(0, 3, 6, 7, requires_grad=True)
    w, b = torch.randn(3, 1, 3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    y = depthwise_conv2d(x, w, b, 1, "same", backend="triton")
    assert y.shape == x.shape
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn(0, 3, 6, 7))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros(3))


@interpreter_only
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_interp_autocast_matches_conv2d(seed, poisoned, dtype):
    """Under (CPU) autocast the triton path casts x, weight and bias as autocast casts F.conv2d's: the same
    output bits and dtype, gradients to the fp32 master weight and bias in fp32, to x in x's dtype."""
    x = torch.randn(2, 4, 9, 10)
    conv = DepthwiseConv2d(4, (3, 3), dilation=2, backend="triton")
    twin = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4)
    twin.load_state_dict(conv.state_dict())
    leaf, twin_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y, y_twin = conv(leaf), twin(twin_leaf)
    assert y.dtype == y_twin.dtype == dtype and torch.equal(y, y_twin)
    grad = torch.randn(y.shape).to(dtype)
    y.backward(grad)
    y_twin.backward(grad)
    assert leaf.grad.dtype == F32 and conv.weight.grad.dtype == F32 and conv.bias.grad.dtype == F32
    assert torch.equal(leaf.grad, twin_leaf.grad)
    # d weight judged against fp64 arithmetic on the cast inputs, next to PyTorch's own error
    xc, wc = x.to(dtype), conv.weight.detach().to(dtype)
    exact_dw, exact_db = depthwise_conv2d_grad_weight_ref(grad.double(), xc.double(), (3, 3), (2, 2),
                                                          same_padding((3, 3), (2, 2)))
    _, _, native_dw, native_db = _native_low_precision(xc, wc, conv.bias.detach().to(dtype), grad, (2, 2), "same",
                                                       truncating=dtype == BF16)
    for name, got, native, exact in (("dweight", conv.weight.grad, native_dw, exact_dw),
                                     ("dbias", conv.bias.grad, native_db, exact_db)):
        err = (got.double() - exact).abs().max().item()
        native_err = (native.double() - exact).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * exact.abs().max().item()
        assert err <= 2 * native_err + floor, f"{name}: {err:.3g} vs native {native_err:.3g}"


@interpreter_only
def test_interp_opcheck(seed):
    from dermomamba_kernels.depthwise_conv.triton_ops import forward_op, grad_weight_op

    x, w, b = _inputs((2, 2, 4, 5), (3, 3), F32)
    torch.library.opcheck(forward_op, (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True),
                                       [2, 2], [2, 2, 2, 2]))
    torch.library.opcheck(forward_op, (x.detach().contiguous(memory_format=torch.channels_last),
                                       w.detach().requires_grad_(True), None, [1, 1], [0, 1, 0, 1]))
    torch.library.opcheck(grad_weight_op, (torch.randn(2, 2, 4, 5, dtype=F16), x.detach().half(), [1, 7], [1, 3],
                                           [0, 0, 9, 9]))


@interpreter_only
def test_interp_module_compiles_fullgraph(seed):
    """Dynamo traces the helper, the checks, the autocast query and the custom ops (fake and autograd) in
    one graph; aot_eager keeps the CPU run short (inductor on the GPU: test_gpu_compile_fullgraph)."""
    conv = DepthwiseConv2d(4, (7, 1), dilation=3, backend="triton")
    x = torch.randn(2, 4, 11, 9, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    y, y_eager = compiled(x), conv(x)
    assert torch.equal(y, y_eager)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), grad)
    expected = torch.autograd.grad(y_eager, (x, conv.weight, conv.bias), grad)
    assert all(torch.equal(p, q) for p, q in zip(got, expected))
    with torch.autocast("cpu", dtype=BF16):
        assert compiled(x).dtype == BF16


@interpreter_only
@pytest.mark.parametrize("change,error,message", [
    (lambda a: {**a, "x": a["x"].double(), "w": a["w"].double(), "b": a["b"].double()}, TypeError,
     "x: dtype torch.float64 is not supported by the triton backend"),
    (lambda a: {**a, "w": a["w"].half()}, TypeError, "weight: dtype torch.float16 differs from x's torch.float32"),
    (lambda a: {**a, "b": a["b"].bfloat16()}, TypeError, "bias: dtype torch.bfloat16 differs"),
], ids=["fp64", "weight-dtype", "bias-dtype"])
def test_interp_bad_input_names_the_argument(change, error, message):
    args = change({"x": torch.randn(2, 3, 8, 9), "w": torch.randn(3, 1, 3, 3), "b": torch.randn(3)})
    with pytest.raises(error, match=message):
        depthwise_conv2d(args["x"], args["w"], args["b"], backend="triton")


# ------------------------------------------------------------------------------------------------
# the compiled kernels on the GPU at full size
# ------------------------------------------------------------------------------------------------

# (batch, channels, H, W, kernel, dilation): the model's convs at batch 16, 192x256 (SS2D's three
# branches stacked: batch 48), and PCAM at the bottleneck.
FULL_SIZE_CASES = [(16, 4, 192, 256, (1, 7), 1), (16, 4, 192, 256, (7, 1), 3), (16, 4, 192, 256, (3, 3), 2),
                   (48, 8, 192, 256, (3, 3), 1), (16, 8, 96, 128, (7, 1), 2), (48, 32, 48, 64, (3, 3), 1),
                   (16, 512, 6, 8, (9, 9), 1), (1, 16, 97, 131, (1, 7), 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FULL_SIZE_CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_gpu_full_size_against_native(seed, poisoned, float32_without_tf32, case, dtype):
    batch, channels, height, width, kernel, dilation = case
    x, w, b = _inputs((batch, channels, height, width), kernel, dtype, device="cuda")
    _, report = check_against_native(TRITON(dilation, "same"), x, w, b, dilation, "same")
    print(report)


@pytest.mark.gpu
def test_gpu_strided_inputs(seed, poisoned, float32_without_tf32):
    channels = 8
    _, w, b = _inputs((1, channels, 1, 1), (3, 3), F16, device="cuda")
    for x in (torch.randn(16, channels, 192, 256, device="cuda", dtype=F16).contiguous(
            memory_format=torch.channels_last),
              torch.randn(16, 4 * channels, 192, 256, device="cuda", dtype=F16).chunk(4, dim=1)[2]):
        grad = torch.randn(16, 2 * channels, 192, 256, device="cuda", dtype=F16)[:, channels:]
        got, report = check_against_native(TRITON(2, "same"), x, w, b, 2, "same", grad=grad)
        dense, _ = check_against_native(TRITON(2, "same"), x.contiguous(), w, b, 2, "same", grad=grad.contiguous())
        assert torch.equal(got[2], dense[2]) and torch.equal(got[3], dense[3])
        print(report)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_gpu_autocast_matches_conv2d(seed, poisoned, dtype):
    x = torch.randn(16, 8, 192, 256, device="cuda")
    conv = DepthwiseConv2d(8, (7, 1), dilation=2, backend="triton").cuda()
    twin = nn.Conv2d(8, 8, (7, 1), padding="same", dilation=2, groups=8).cuda()
    twin.load_state_dict(conv.state_dict())
    leaf, twin_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        y, y_twin = conv(leaf), twin(twin_leaf)
    assert y.dtype == y_twin.dtype == dtype and torch.equal(y, y_twin)
    grad = torch.randn(y.shape, device="cuda").to(dtype)
    y.backward(grad)
    y_twin.backward(grad)
    assert conv.weight.grad.dtype == F32 and leaf.grad.dtype == F32
    assert torch.equal(leaf.grad, twin_leaf.grad)
    xc = x.to(dtype)
    exact_dw, exact_db = depthwise_conv2d_grad_weight_ref(grad.double(), xc.double(), (7, 1), (2, 2),
                                                          same_padding((7, 1), (2, 2)))
    for name, got, native, exact in (("dweight", conv.weight.grad, twin.weight.grad, exact_dw),
                                     ("dbias", conv.bias.grad, twin.bias.grad, exact_db)):
        err = (got.double() - exact).abs().max().item()
        native_err = (native.double() - exact).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * exact.abs().max().item()
        assert err <= 2 * native_err + floor, f"{name}: {err:.3g} vs native {native_err:.3g}"


@pytest.mark.gpu
def test_gpu_deterministic(seed):
    x, w, b = _inputs((48, 8, 192, 256), (3, 3), F16, device="cuda")
    grad = torch.randn(x.shape, device="cuda", dtype=F16)
    first = _run(TRITON(1, "same"), x, w, b, grad)
    second = _run(TRITON(1, "same"), x, w, b, grad)
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


@pytest.mark.gpu
def test_gpu_opcheck(seed):
    from dermomamba_kernels.depthwise_conv.triton_ops import forward_op, grad_weight_op

    x, w, b = _inputs((4, 8, 33, 17), (3, 3), F16, device="cuda")
    torch.library.opcheck(forward_op, (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True),
                                       [2, 2], [2, 2, 2, 2]))
    torch.library.opcheck(grad_weight_op, (torch.randn_like(x), x.detach(), [3, 3], [2, 2], [2, 2, 2, 2]))


@pytest.mark.gpu
def test_gpu_compile_fullgraph(seed, float32_without_tf32):
    conv = DepthwiseConv2d(8, (1, 7), dilation=3, backend="triton").cuda()
    x = torch.randn(4, 8, 48, 64, device="cuda", requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(conv, fullgraph=True)
    y, y_eager = compiled(x), conv(x)
    torch.testing.assert_close(y, y_eager)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, conv.weight, conv.bias), grad)
    expected = torch.autograd.grad(y_eager, (x, conv.weight, conv.bias), grad)
    for p, q in zip(got, expected):
        torch.testing.assert_close(p, q)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(seed, float32_without_tf32):
    """Forward and backward captured in a CUDA graph (no host syncs) and replayed on new inputs."""
    conv = DepthwiseConv2d(8, 3, dilation=2, backend="triton").cuda()
    params = (conv.weight, conv.bias)
    x = torch.randn(16, 8, 96, 128, device="cuda", requires_grad=True)
    grad = torch.randn(16, 8, 96, 128, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.autograd.grad(conv(x), (x,) + params, grad)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = conv(x)
        grads = torch.autograd.grad(y, (x,) + params, grad)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        grad.copy_(torch.randn_like(grad))
    graph.replay()
    y_eager = conv(x)
    expected = torch.autograd.grad(y_eager, (x,) + params, grad)
    assert torch.equal(y, y_eager)
    for p, q in zip(grads, expected):
        assert torch.equal(p, q)
