"""BatchNorm over channels: the spec, the dispatch point, the BatchNorm2d layer, and the Triton kernels.

CPU (CI): the spec against F.batch_norm, the dispatcher's choices and errors, the layer against
nn.BatchNorm2d (state_dict, numbers, buffers) and the kernels compiled for sm_90 (no GPU needed:
catches what the interpreter does not, e.g. loop-carried type changes). The Triton kernels run
through the Triton interpreter: the tests named ``test_interp_*`` run in a subprocess of this same
file with TRITON_INTERPRET=1 (it must be set before the kernels are defined, and must not leak into
this process or its GPU tests). GPU (marked gpu): the compiled kernels at DermoMamba's shapes
(batch 16, 192x256) against PyTorch's CUDA BatchNorm (cuDNN), autocast, determinism, opcheck,
torch.compile(fullgraph=True) and a CUDA-graph capture of the training step.

Tolerance: every quantity (y, dx, d weight, d bias, and in training the running mean and variance)
is compared with an fp64 run from the same (rounded) inputs; its max error may be at most twice the
error of PyTorch's native BatchNorm run in the same precision on the same inputs, plus 8 fp32 ulps of
the quantity's largest value (per-channel sums over many positions legitimately differ in order).
In bf16 under the interpreter, native is fp32 arithmetic rounded toward zero as the interpreter
rounds the kernels' stores (see ``_native_low_precision``); on the GPU both round to nearest.
"""

import importlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_interpreter_cases
from dermomamba_kernels import BackendUnavailableError, last_backend
from dermomamba_kernels.batch_norm import batch_norm, batch_norm_dispatcher, batch_norm_ref
from dermomamba_kernels.layers.batch_norm import BatchNorm2d

bn_module = importlib.import_module("dermomamba_kernels.batch_norm")

HERE = os.path.abspath(__file__)
INTERPRETER_CASES_ENV = "DERMOMAMBA_BATCH_NORM_INTERPRETER_CASES"
IN_INTERPRETER_RUN = os.environ.get(INTERPRETER_CASES_ENV) == "1"
interpreter_only = pytest.mark.skipif(not IN_INTERPRETER_RUN,
                                      reason="runs in the interpreter subprocess (test_triton_kernels_under_interpreter)")
not_in_interpreter_run = pytest.mark.skipif(IN_INTERPRETER_RUN, reason="the interpreter subprocess runs test_interp_*")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FP32_ULPS_FLOOR = 8
EPS = 1e-5
MOMENTUM = 0.1
QUANTITIES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
# DermoMamba's BatchNorm2d inputs at batch 16, 192x256: (channels, H, W) (encoder skips, cross-scale blocks,
# decoder outputs, the SweepMamba bottleneck).
MODEL_SHAPES = [(16, 192, 256), (32, 192, 256), (32, 96, 128), (64, 96, 128), (64, 48, 64), (128, 48, 64),
                (128, 24, 32), (256, 24, 32), (256, 12, 16), (512, 12, 16), (512, 6, 8)]
MODEL_BATCH = 16


# ------------------------------------------------------------------------------------------------
# error measurement against fp64
# ------------------------------------------------------------------------------------------------

def _truncate_to_bf16(t):
    """fp32 -> bf16 rounding toward zero, as the Triton interpreter converts (the GPU rounds to nearest)."""
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def _clone(t):
    return None if t is None else t.detach().clone()


def _run(fn, x, weight, bias, running_mean, running_var, training, grad):
    """y, dx, d weight, d bias and the running statistics after one call of fn on copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    rm, rv = _clone(running_mean), _clone(running_var)
    y = fn(leaves[0], rm, rv, leaves[1], leaves[2], training)
    dx, dw, db = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    return {"y": y, "dx": dx, "dweight": dw, "dbias": db, "running_mean": rm, "running_var": rv}


def _native(x, rm, rv, w, b, training):
    return F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)


def _exact(x, weight, bias, running_mean, running_var, training, grad):
    return _run(_native, x.double(), weight.double(), bias.double(), running_mean.double(), running_var.double(),
                training, grad.double())


def _native_low_precision(x, weight, bias, running_mean, running_var, training, grad, truncating):
    """The native op in the inputs' precision (fp32 parameters with a low-precision x, as the model's norms
    under autocast). With ``truncating`` (bf16 under the interpreter): native fp32 arithmetic with y and dx
    rounded toward zero to bf16, the rounding the interpreter applies to the kernels' stores, so the
    comparison judges the kernels' arithmetic, not the emulator's rounding."""
    if not truncating:
        return _run(_native, x, weight, bias, running_mean, running_var, training, grad)
    out = _run(_native, x.float(), weight, bias, running_mean, running_var, training, grad.to(x.dtype).float())
    out["y"], out["dx"] = _truncate_to_bf16(out["y"]), _truncate_to_bf16(out["dx"])
    return out


def check_against_native(fn, x, weight, bias, running_mean, running_var, training, grad=None, truncating_bf16=False):
    """Asserts that fn's outputs err from fp64 by at most 2x native's error (+ floor); returns a report."""
    grad = torch.randn(x.shape, dtype=F64, device=x.device).to(x.dtype) if grad is None else grad
    got = _run(fn, x, weight, bias, running_mean, running_var, training, grad)
    exact = _exact(x, weight, bias, running_mean, running_var, training, grad.to(got["y"].dtype))
    native = _native_low_precision(x, weight, bias, running_mean, running_var, training, grad,
                                   truncating_bf16 and x.dtype == BF16)
    assert got["y"].dtype == got["dx"].dtype == x.dtype
    assert got["dweight"].dtype == weight.dtype and got["dbias"].dtype == bias.dtype
    lines = []
    for name in QUANTITIES:
        g, n, e = got[name], native[name], exact[name]
        if not training and name.startswith("running"):
            # eval reads the running statistics and must leave them as they were
            assert torch.equal(g, running_mean if name == "running_mean" else running_var), name
            continue
        assert g.shape == e.shape and not torch.isnan(g).any(), f"{name}: shape {tuple(g.shape)} or NaN"
        err = (g.double() - e).abs().max().item()
        native_err = (n.double() - e).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * e.abs().max().item()
        lines.append(f"{name} err {err:.3g} native {native_err:.3g} floor {floor:.2g}")
        assert err <= 2 * native_err + floor, f"{name}: error {err:.3g} > 2 x native's {native_err:.3g} + {floor:.2g}"
    return "; ".join(lines)


def _inputs(shape, dtype, device="cpu", channels_last=False, offset=1.0):
    """x (with a per-channel offset and scale, so that the mean matters and x is not already normalised),
    fp32 weight and bias, fp32 running statistics away from (0, 1)."""
    channels = shape[1]
    centre = offset * torch.randn(channels, dtype=F64, device=device).view(1, channels, *([1] * (len(shape) - 2)))
    x = (torch.randn(shape, dtype=F64, device=device) * 3 + centre).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device)
    running_mean = torch.randn(channels, device=device)
    running_var = torch.rand(channels, device=device) + 0.5
    return x, weight, bias, running_mean, running_var


def TRITON(x, rm, rv, w, b, training):
    return batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS, backend="triton")


# ------------------------------------------------------------------------------------------------
# spec, dispatcher and layer (CPU, this process)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_spec_matches_native(seed, dtype, training):
    x, w, b, rm, rv = (t.to(dtype) for t in _inputs((3, 5, 7, 6), F64))
    rm_native, rv_native = rm.clone(), rv.clone()
    y, mean, invstd = batch_norm_ref(x, rm, rv, w, b, training, MOMENTUM, EPS)
    native = F.batch_norm(x, rm_native, rv_native, w, b, training, MOMENTUM, EPS)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == F64 else {}
    torch.testing.assert_close(y, native, **tol)
    torch.testing.assert_close(rm, rm_native, **tol)
    torch.testing.assert_close(rv, rv_native, **tol)
    assert mean.dtype == invstd.dtype == torch.promote_types(dtype, F32) and mean.shape == (5,)


@not_in_interpreter_run
def test_spec_cumulative_average_matches_nn(seed):
    """momentum=None: the running statistics are the plain average over the batches so far."""
    ours, theirs = BatchNorm2d(4, momentum=None, backend="reference"), nn.BatchNorm2d(4, momentum=None)
    for _ in range(3):
        x = torch.randn(2, 4, 5, 3)
        batch_norm_ref(x, ours.running_mean, ours.running_var, training=True, momentum=None,
                       num_batches_tracked=theirs.num_batches_tracked + 1)
        theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@not_in_interpreter_run
def test_spec_gradients_fp64(seed):
    x, w, b, _, _ = _inputs((2, 3, 4, 5), F64)
    x, w, b = (t.double().requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: batch_norm_ref(a[0], None, None, a[1], a[2], True)[0], (x, w, b))


@not_in_interpreter_run
def test_auto_stays_native_unless_opted_in(seed, monkeypatch):
    monkeypatch.delenv(bn_module.AUTO_ENV_VAR, raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert batch_norm_dispatcher.resolve("auto", cuda) == "reference"
    assert batch_norm_dispatcher.resolve("auto", cpu) in ("cpu", "reference")
    assert not bn_module._auto_prefers_triton(cuda)
    monkeypatch.setenv(bn_module.AUTO_ENV_VAR, "triton")
    triton_runs = batch_norm_dispatcher.unavailable_reason("triton", cuda) is None
    assert bn_module._auto_prefers_triton(cuda) == triton_runs
    assert not bn_module._auto_prefers_triton(cpu)  # the CPU keeps PyTorch's kernel
    x, w, b, rm, rv = _inputs((2, 4, 6, 5), F32)
    y = batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    assert last_backend("batch_norm") in ("cpu", "reference")
    assert torch.equal(y, F.batch_norm(x, rm.clone(), rv.clone(), w, b, True))
    monkeypatch.setenv(bn_module.AUTO_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{bn_module.AUTO_ENV_VAR}='fastest'"):
        bn_module._auto_prefers_triton(cuda)


@not_in_interpreter_run
def test_auto_sends_what_triton_does_not_take_to_native():
    x, w, b, rm, rv = _inputs((2, 4, 3, 5), F32)
    takes = bn_module._triton_takes
    assert takes(x, rm, rv, w, b) and takes(x.half(), rm, rv, w, b) and takes(x.bfloat16(), None, None, None, None)
    assert not takes(x.double(), rm.double(), rv.double(), w.double(), b.double())
    assert not takes(x, rm, rv, w.half(), b)  # fp16 parameters with an fp32 x
    assert not takes(x, torch.zeros(8)[::2], rv, w, b)  # running_mean not contiguous (updated in place)
    assert not takes(x[0, 0, 0], None, None, None, None)


@not_in_interpreter_run
def test_triton_without_gpu_or_interpreter_is_unavailable(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton through the interpreter")
    x, w, b, rm, rv = _inputs((2, 3, 4, 5), F32)
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable: Triton runs on CUDA"):
        batch_norm(x, rm, rv, w, b, True, backend="triton")
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="backend='triton' is unavailable"):
        batch_norm(x, rm, rv, w, b, True)
    # the layer runs "auto" unless given a backend: a process-wide DERMOMAMBA_BACKEND names other ops' kernels
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "cuda")
    layer = BatchNorm2d(3)
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True), rtol=0, atol=0)
    monkeypatch.setenv("DERMOMAMBA_BACKEND", "auto")
    with pytest.raises(ValueError, match="backend='nope'"):
        batch_norm(x, rm, rv, w, b, backend="nope")
    with pytest.raises(BackendUnavailableError, match="no 'cuda' implementation"):
        batch_norm(x, rm, rv, w, b, backend="cuda")
    with pytest.raises(TypeError, match="x: expected a tensor"):
        batch_norm([1.0, 2.0], rm, rv)


def _twins(momentum=MOMENTUM, affine=True, track_running_stats=True, backend=None, channels=6):
    ours = BatchNorm2d(channels, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
                       backend=backend)
    theirs = nn.BatchNorm2d(channels, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
    if affine:
        with torch.no_grad():
            theirs.weight.normal_()
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _step_both(ours, theirs, x, grad=None):
    """One forward + backward of both layers on the same x (and dy); returns (ours, theirs) of y and dx."""
    a, b = x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    y_ours, y_theirs = ours(a), theirs(b)
    grad = torch.randn(y_ours.shape, device=x.device).to(y_ours.dtype) if grad is None else grad
    y_ours.backward(grad)
    y_theirs.backward(grad)
    return (y_ours, a.grad), (y_theirs, b.grad)


@not_in_interpreter_run
@pytest.mark.parametrize("config", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "no-running-stats"])
def test_layer_is_nn_batchnorm2d(seed, config):
    """Same parameters, buffers, state_dict and (on the default backend) the very same numbers as nn.BatchNorm2d."""
    ours, theirs = _twins(**config)
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for _ in range(3):
        (y, dx), (y_twin, dx_twin) = _step_both(ours, theirs, torch.randn(2, 6, 5, 7) * 2 + 1)
        assert torch.equal(y, y_twin) and torch.equal(dx, dx_twin)
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    if config.get("affine", True):
        assert torch.equal(ours.weight.grad, theirs.weight.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)
    ours.eval()
    theirs.eval()
    x = torch.randn(3, 6, 4, 4)
    assert torch.equal(ours(x), theirs(x))
    assert "backend='auto'" in repr(ours)


@not_in_interpreter_run
def test_layer_on_the_default_backend_compiles_fullgraph(seed):
    """The model's norms as they run by default ("auto": PyTorch's kernel) trace into one graph, the counter
    and running statistics updated as in eager. (momentum=None reads the counter on the host there, as
    nn.BatchNorm2d does, and compiles with fullgraph=True on neither; the triton backend reads it on the device.)"""
    layer, twin = _twins()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for training in (True, True, False):
        layer.train(training)
        twin.train(training)
        x = torch.randn(2, 6, 5, 7, requires_grad=True)
        y, y_twin = compiled(x), twin(x)
        torch.testing.assert_close(y, y_twin, rtol=0, atol=0)
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, rtol=0, atol=0)


@not_in_interpreter_run
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the gpu tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    """Every kernel variant lowers to sm_90 machine code (Triton's own compiler, no GPU): the interpreter
    runs Python semantics and misses what only the compiler checks (types that change in a loop, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError

    from dermomamba_kernels.batch_norm import triton_kernels as k

    def compile_kernel(fn, types, constexprs):
        signature = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}
        source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
        try:
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": k.WARPS})
        except CompilationError:
            raise
        except Exception as exc:  # no CUDA backend / ptxas in this install: nothing to check here
            pytest.skip(f"cannot compile for sm_90 here: {exc!r}"[:300])

    fp32 = "*fp32"
    for x_type, index64 in (("*fp16", False), ("*fp16", True), ("*bf16", False)):
        tiles = dict(BLOCK_C=4, BLOCK_P=1024, INDEX64=index64)
        compile_kernel(k._stats_partials_kernel, {"x_ptr": x_type, "part_ptr": fp32}, tiles)
        compile_kernel(k._backward_partials_kernel, {"dy_ptr": x_type, "x_ptr": x_type, "mean_ptr": fp32,
                                                     "part_ptr": fp32}, tiles)
        for running in (False, True):
            compile_kernel(k._normalize_kernel, {"x_ptr": x_type, "y_ptr": x_type, "mean_ptr": fp32,
                                                 "invstd_ptr": fp32, "w_ptr": fp32, "b_ptr": fp32, "rm_ptr": fp32,
                                                 "rv_ptr": fp32, "eps": "fp32"},
                           dict(HAS_WEIGHT=running, HAS_BIAS=True, USE_RUNNING=running, **tiles))
            compile_kernel(k._backward_dx_kernel, {"dy_ptr": x_type, "x_ptr": x_type, "dx_ptr": x_type,
                                                   "mean_ptr": fp32, "invstd_ptr": fp32, "w_ptr": fp32,
                                                   "dweight_ptr": fp32, "dbias_ptr": fp32, "count": "fp32"},
                           dict(HAS_WEIGHT=True, TRAINING=not running, **tiles))
    for combine in (dict(BLOCK_C=4, BLOCK_PARTS=1024), dict(BLOCK_C=256, BLOCK_PARTS=16)):
        compile_kernel(k._stats_combine_kernel, {"part_ptr": fp32, "x_ptr": "*fp16", "count": "fp32", "eps": "fp32",
                                                 "mean_ptr": fp32, "invstd_ptr": fp32, "var_ptr": fp32}, combine)
        compile_kernel(k._backward_combine_kernel, {"part_ptr": fp32, "invstd_ptr": fp32, "dweight_ptr": fp32,
                                                    "dbias_ptr": fp32}, combine)
    for buffer_type in ("*fp32", "*bf16"):
        for cumulative in (False, True):
            compile_kernel(k._update_running_kernel, {"rm_ptr": buffer_type, "rv_ptr": buffer_type, "mean_ptr": fp32,
                                                      "var_ptr": fp32, "nbt_ptr": "*i64", "momentum": "fp32"},
                           dict(CUMULATIVE=cumulative, BLOCK_C=k.UPDATE_BLOCK_C))


# ------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (run in a subprocess by the test below)
# ------------------------------------------------------------------------------------------------

@not_in_interpreter_run
def test_triton_kernels_under_interpreter():
    run_interpreter_cases(HERE, INTERPRETER_CASES_ENV)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output and scratch buffer of the Triton ops starts as NaN (an element never written shows)."""
    from dermomamba_kernels.batch_norm import triton_ops

    monkeypatch.setattr(triton_ops, "POISON_OUTPUTS", True)


def _few_programs(monkeypatch):
    from dermomamba_kernels.batch_norm import triton_kernels

    monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", 3)
    # combine tiles of 2 channels x 2 partials: the combine kernels loop and split the channels too
    monkeypatch.setattr(triton_kernels, "MAX_COMBINE_BLOCK_PARTS", 2)
    monkeypatch.setattr(triton_kernels, "COMBINE_TILE_ELEMENTS", 4)


@pytest.fixture
def few_programs(monkeypatch):
    """Reduction grids of about 3 programs: each walks several tiles (the loop the GPU sizes exercise), and
    the last one runs past the end of the tiles; the combine kernels walk their partials in steps of 2."""
    _few_programs(monkeypatch)


# (shape, dtype, channels_last): sizes not multiples of the tiles, H != W, batch 1, S = 1 (the positions run
# over N), two channel blocks of channel-major tiles (C = 70 > 64), a pixel-major row longer than one tile.
INTERPRETER_CASES = [
    ((3, 5, 7, 9), F32, False), ((1, 6, 9, 13), F16, False), ((2, 3, 11, 5), BF16, False),
    ((2, 12, 5, 7), F32, True), ((3, 8, 6, 5), F16, True), ((2, 70, 3, 5), BF16, True),
    ((5, 6, 1, 1), F32, False), ((2, 3, 37, 41), F32, False),
]


def _case_id(shape, dtype, channels_last):
    return f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}{'-cl' if channels_last else ''}"


@interpreter_only
@pytest.mark.parametrize("shape,dtype,channels_last", INTERPRETER_CASES,
                         ids=[_case_id(*case) for case in INTERPRETER_CASES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("programs", ["one-tile-each", "looping"])
def test_interp_parity(seed, poisoned, monkeypatch, shape, dtype, channels_last, training, programs):
    if programs == "looping":
        _few_programs(monkeypatch)
    x, w, b, rm, rv = _inputs(shape, dtype, channels_last=channels_last)
    print(check_against_native(TRITON, x, w, b, rm, rv, training, truncating_bf16=True))
    assert last_backend("batch_norm") == "triton"
    y = TRITON(x, rm.clone(), rv.clone(), w, b, training)
    assert y.stride() == x.stride(), "y is not in x's memory format"


@interpreter_only
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_interp_statistics_against_fp64(seed, poisoned, few_programs, dtype):
    """mean and invstd of the forward op, with a mean far from 0 (|mean| / std = 100), where E[x^2] - E[x]^2
    in fp32 would lose most of the variance's digits: the error of each must be within 2x native's."""
    from dermomamba_kernels.batch_norm.triton_ops import forward_op

    shape = (2, 4, 13, 11)
    x = (torch.randn(shape, dtype=F64) + 100 * torch.randn(1, 4, 1, 1, dtype=F64).sign()).to(dtype)
    y, mean, invstd, var = forward_op(x, None, None, None, None, True, EPS)
    x64 = x.double()
    exact_var, exact_mean = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
    exact = {"mean": exact_mean, "invstd": 1 / torch.sqrt(exact_var + EPS), "var": exact_var * (286 / 285)}
    _, native_mean, native_invstd = torch.native_batch_norm(x, None, None, None, None, True, MOMENTUM, EPS)
    rm, rv = torch.zeros(4), torch.ones(4)
    F.batch_norm(x, rm, rv, None, None, True, 1.0, EPS)  # momentum 1: the running var is the batch's unbiased var
    native = {"mean": native_mean, "invstd": native_invstd, "var": rv}
    assert mean.dtype == invstd.dtype == var.dtype == F32 and mean.shape == invstd.shape == var.shape == (4,)
    for name, got in (("mean", mean), ("invstd", invstd), ("var", var)):
        err = (got.double() - exact[name]).abs().max().item()
        native_err = (native[name].double() - exact[name]).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * exact[name].abs().max().item()
        print(f"{name} err {err:.3g} native {native_err:.3g} floor {floor:.2g}")
        assert err <= 2 * native_err + floor, f"{name}: {err:.3g} vs native {native_err:.3g}"


@interpreter_only
@pytest.mark.parametrize("dtype,momentum", [(F32, MOMENTUM), (F16, MOMENTUM), (F32, None)],
                         ids=["fp32", "fp16", "cumulative"])
def test_interp_running_statistics_over_steps(seed, poisoned, dtype, momentum):
    """Four training steps (fresh x each) of the layer on the triton backend and of nn.BatchNorm2d in the same
    precision and in fp64: running_mean / running_var within 2x native's error, num_batches_tracked equal,
    then an eval step from those statistics."""
    ours, theirs = _twins(momentum=momentum, backend="triton", channels=5)
    exact = nn.BatchNorm2d(5, momentum=momentum).double()
    exact.load_state_dict(theirs.state_dict())
    for _ in range(4):
        x = (torch.randn(2, 5, 6, 7, dtype=F64) * 2 + 3).to(dtype)
        ours(x)
        theirs(x)
        exact(x.double())
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 4
    for name in ("running_mean", "running_var"):
        got, native, want = (getattr(m, name) for m in (ours, theirs, exact))
        err, native_err = (got.double() - want).abs().max().item(), (native.double() - want).abs().max().item()
        floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * want.abs().max().item()
        assert err <= 2 * native_err + floor, f"{name}: {err:.3g} vs native {native_err:.3g}"
    ours.eval()
    theirs.eval()
    x, w, b, _, _ = _inputs((2, 5, 4, 3), dtype)
    (y, dx), (y_twin, dx_twin) = _step_both(ours, theirs, x)
    torch.testing.assert_close(y, y_twin)
    torch.testing.assert_close(dx, dx_twin)
    assert int(ours.num_batches_tracked) == 4  # eval does not count


@interpreter_only
@pytest.mark.parametrize("config", [{"affine": False}, {"track_running_stats": False}],
                         ids=["no-affine", "no-running-stats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_interp_layer_configurations(seed, poisoned, config, training):
    ours, theirs = _twins(backend="triton", channels=5, **config)
    ours.train(training)
    theirs.train(training)
    (y, dx), (y_twin, dx_twin) = _step_both(ours, theirs, torch.randn(2, 5, 6, 7) * 2 + 1)
    torch.testing.assert_close(y, y_twin)
    torch.testing.assert_close(dx, dx_twin)
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value)


@interpreter_only
def test_interp_eval_without_parameter_gradients(seed, poisoned):
    """Eval with frozen parameters: the backward is dy * w * invstd alone (no reduction pass)."""
    from dermomamba_kernels.batch_norm.triton_ops import backward_op, forward_op

    x, w, b, rm, rv = _inputs((2, 4, 5, 6), F32)
    _, mean, invstd, var = forward_op(x, w, b, rm, rv, False, EPS)
    assert var.shape == (0,)
    torch.testing.assert_close(mean, rm)
    torch.testing.assert_close(invstd, 1 / torch.sqrt(rv + EPS))
    dy = torch.randn_like(x)
    dx, dweight, dbias = backward_op(dy, x, w, mean, invstd, False, False)
    assert dweight.shape == dbias.shape == (0,)
    torch.testing.assert_close(dx, dy * (w * invstd).view(1, 4, 1, 1))
    frozen = x.detach().clone().requires_grad_(True)
    y = TRITON(frozen, rm, rv, w, b, False)
    (dx_layer,) = torch.autograd.grad(y, frozen, dy)
    torch.testing.assert_close(dx_layer, dx, rtol=0, atol=0)


@interpreter_only
def test_interp_saves_only_channel_statistics(seed):
    """The graph keeps x itself (no copy), the weight and per-channel statistics: nothing else of x's size."""
    x, w, b, rm, rv = _inputs((2, 4, 5, 6), F16, channels_last=True)
    leaf, w = x.clone().requires_grad_(True), w.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        TRITON(leaf, rm, rv, w, b, True)
    assert saved
    for t in saved:
        assert t.numel() <= 4 or t.data_ptr() == leaf.data_ptr(), f"saved a {tuple(t.shape)} tensor"


@interpreter_only
def test_interp_deterministic(seed, few_programs):
    x, w, b, rm, rv = _inputs((2, 3, 13, 29), F32)
    grad = torch.randn(x.shape)
    first = _run(TRITON, x, w, b, rm, rv, True, grad)
    second = _run(TRITON, x, w, b, rm, rv, True, grad)
    assert all(torch.equal(first[k], second[k]) for k in QUANTITIES)


@interpreter_only
def test_interp_strided_inputs(seed, poisoned):
    """Read in place: a channel slice of an NCHW map and of a channels-last one (its images and positions
    still one axis), every other column (a position stride of 2). Copied: H and W transposed, every other
    row (H and W no longer one axis). dy laid out unlike x. All right."""
    from dermomamba_kernels.batch_norm.triton_kernels import flat3

    channels = 5
    _, w, b, rm, rv = _inputs((1, channels), F32)
    big = torch.randn(2, 10, 7, 9) * 2 + 1
    views = {
        "channel slice": (big[:, 2:7], True),
        "channels-last channel slice": (big.contiguous(memory_format=torch.channels_last)[:, 2:7], True),
        "H and W transposed": (big[:, :channels].transpose(2, 3), False),
        "every other column": (torch.randn(2, channels, 7, 18)[..., ::2], True),  # positions of stride 2
        "every other row": (torch.randn(2, channels, 14, 9)[:, :, ::2], False),
    }
    for name, (x, in_place) in views.items():
        assert (flat3(x) is not None) == in_place, name
        for training in (True, False):
            print(name, check_against_native(TRITON, x, w, b, rm, rv, training))
    x = big[:, :channels].contiguous(memory_format=torch.channels_last)
    print("dy NCHW, x channels-last", check_against_native(TRITON, x, w, b, rm, rv, True,
                                                           grad=torch.randn(x.shape)))
    leaf = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(TRITON(leaf, rm.clone(), rv.clone(), w, b, True), leaf, torch.randn(x.shape))
    assert dx.stride() == x.stride(), "dx is not in x's memory format"


@interpreter_only
def test_interp_empty_batch(poisoned):
    """N = 0: an empty output, untouched running statistics (as PyTorch), a counted batch (as nn.BatchNorm2d)."""
    layer = BatchNorm2d(3, backend="triton")
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    assert int(layer.num_batches_tracked) == 1
    (dx,) = torch.autograd.grad(y, x, torch.randn(0, 3, 4, 5))
    assert dx.shape == x.shape


@interpreter_only
def test_interp_opcheck(seed):
    from dermomamba_kernels.batch_norm.triton_ops import backward_op, forward_op, update_running_stats_op

    x, w, b, rm, rv = _inputs((2, 5, 7, 3), F16)
    for training in (True, False):
        args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), rm, rv, training, EPS)
        torch.library.opcheck(forward_op, args)
        torch.library.opcheck(forward_op, (x.detach(), None, None, rm, rv, training, EPS))
        _, mean, invstd, _ = forward_op(*args)
        for param_grads in (True, False):
            torch.library.opcheck(backward_op, (torch.randn_like(x), x.detach(), w.detach(), mean.detach(),
                                                invstd.detach(), training, param_grads))
    _, mean, _, var = forward_op(x.detach(), w.detach(), b.detach(), None, None, True, EPS)
    torch.library.opcheck(update_running_stats_op, (rm.clone(), rv.clone(), mean, var, MOMENTUM, None))
    torch.library.opcheck(update_running_stats_op, (rm.clone(), rv.clone(), mean, var, 0.0,
                                                    torch.tensor(3, dtype=torch.long)))


@interpreter_only
@pytest.mark.parametrize("momentum", [MOMENTUM, None], ids=["momentum", "cumulative"])
def test_interp_layer_compiles_fullgraph(seed, momentum):
    """Dynamo traces the layer (counter, dispatcher, checks, the custom ops with their fakes and autograd,
    the in-place running update) in one graph; aot_eager keeps the CPU run short (inductor and a CUDA graph
    on the GPU: test_gpu_compile_and_cuda_graph)."""
    layer, _ = _twins(momentum=momentum, backend="triton", channels=4)
    twin = BatchNorm2d(4, momentum=momentum, backend="triton")
    twin.load_state_dict(layer.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(2, 4, 6, 5, requires_grad=True)
        y, y_eager = compiled(x), twin(x)
        assert torch.equal(y, y_eager)
        grad = torch.randn_like(y)
        assert torch.equal(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y_eager, x, grad)[0])
    for name, value in twin.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name


def _bad(change):
    x, w, b, rm, rv = _inputs((2, 8, 3, 4), F32)
    args = change({"x": x, "running_mean": rm, "running_var": rv, "weight": w, "bias": b, "training": True,
                   "momentum": MOMENTUM, "eps": EPS})
    batch_norm(args.pop("x"), args.pop("running_mean"), args.pop("running_var"), args.pop("weight"), args.pop("bias"),
               args.pop("training"), args.pop("momentum"), args.pop("eps"), backend="triton", **args)


@interpreter_only
@pytest.mark.parametrize("change,error,message", [
    (lambda a: {**a, "x": a["x"].double()}, TypeError, "x: dtype torch.float64"),
    (lambda a: {**a, "x": torch.randn(8)}, ValueError, r"x: expected a tensor of shape \(N, C, \*\)"),
    (lambda a: {**a, "weight": torch.randn(7)}, ValueError, r"weight: expected shape \(8,\)"),
    (lambda a: {**a, "bias": torch.randn(8, device="meta")}, ValueError, "bias: on meta"),
    (lambda a: {**a, "running_mean": a["running_mean"].half()}, TypeError,
     "running_mean: dtype torch.float16 does not go with x's torch.float32"),
    (lambda a: {**a, "running_var": None}, ValueError, "running_mean, running_var: give both"),
    (lambda a: {**a, "running_mean": None, "running_var": None, "training": False}, ValueError,
     "required when training=False"),
    (lambda a: {**a, "running_mean": torch.zeros(16)[::2]}, ValueError, "running_mean: must be contiguous"),
    (lambda a: {**a, "x": torch.randn(1, 8, 1, 1)}, ValueError, "x: expected more than 1 value per channel"),
    (lambda a: {**a, "eps": -1.0}, ValueError, "eps: expected a non-negative"),
    (lambda a: {**a, "momentum": None}, ValueError, "num_batches_tracked: momentum=None"),
    (lambda a: {**a, "momentum": "0.1"}, TypeError, "momentum: expected a number"),
], ids=["fp64", "1-d", "weight-shape", "bias-device", "running-dtype", "one-running", "eval-no-running",
        "running-strided", "one-value", "eps", "no-counter", "momentum-type"])
def test_interp_bad_input_names_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        _bad(change)


# ------------------------------------------------------------------------------------------------
# the compiled kernels on the GPU at DermoMamba's sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("channels,height,width", MODEL_SHAPES, ids=[f"{c}x{h}x{w}" for c, h, w in MODEL_SHAPES])
@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_model_shapes_against_native(seed, poisoned, channels, height, width, dtype, channels_last):
    x, w, b, rm, rv = _inputs((MODEL_BATCH, channels, height, width), dtype, device="cuda",
                              channels_last=channels_last)
    for training in (True, False):
        print(check_against_native(TRITON, x, w, b, rm, rv, training))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 37, 53), (3, 70, 5, 7), (7, 16, 1, 1)], ids=str)
def test_gpu_odd_sizes_bf16_and_large_offset(seed, poisoned, shape):
    x, w, b, rm, rv = _inputs(shape, BF16, device="cuda")
    print(check_against_native(TRITON, x, w, b, rm, rv, True))
    x, w, b, rm, rv = _inputs(shape, F32, device="cuda", offset=300.0)
    print(check_against_native(TRITON, x, w, b, rm, rv, True))


def _assert_within_native(name, got, native, exact):
    err = (got.double() - exact).abs().max().item()
    native_err = (native.double() - exact).abs().max().item()
    floor = FP32_ULPS_FLOOR * torch.finfo(F32).eps * exact.abs().max().item()
    assert err <= 2 * native_err + floor, f"{name}: error {err:.3g} > 2 x native's {native_err:.3g} + {floor:.2g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_gpu_autocast_layer_matches_native(seed, poisoned, dtype):
    """Under autocast the conv outputs arrive in fp16 / bf16 with fp32 parameters and statistics: the layer
    returns x's dtype, and y, dx, the parameter gradients and (after 3 steps) the running statistics err from
    an fp64 twin by at most 2x nn.BatchNorm2d's error under the same autocast."""
    ours, theirs = _twins(backend="triton", channels=32)
    ours, theirs = ours.cuda(), theirs.cuda()
    exact = nn.BatchNorm2d(32).cuda().double()
    exact.load_state_dict(theirs.state_dict())
    conv = nn.Conv2d(16, 32, 3, padding=1).cuda()
    for _ in range(3):
        x = torch.randn(MODEL_BATCH, 16, 96, 128, device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            features = conv(x).detach()
            assert features.dtype == dtype
            grad = torch.randn(features.shape, device="cuda").to(dtype)
            (y, dx), (y_twin, dx_twin) = _step_both(ours, theirs, features, grad)
        assert y.dtype == y_twin.dtype == dx.dtype == dtype
        leaf = features.double().requires_grad_(True)
        y_exact = exact(leaf)
        (dx_exact,) = torch.autograd.grad(y_exact, leaf, grad.double())
        _assert_within_native("y", y, y_twin, y_exact)
        _assert_within_native("dx", dx, dx_twin, dx_exact)
    for name in ("running_mean", "running_var"):
        _assert_within_native(name, getattr(ours, name), getattr(theirs, name), getattr(exact, name))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3


@pytest.mark.gpu
def test_gpu_deterministic(seed):
    x, w, b, rm, rv = _inputs((MODEL_BATCH, 16, 192, 256), F16, device="cuda")
    grad = torch.randn(x.shape, device="cuda", dtype=F16)
    first = _run(TRITON, x, w, b, rm, rv, True, grad)
    second = _run(TRITON, x, w, b, rm, rv, True, grad)
    assert all(torch.equal(first[k], second[k]) for k in QUANTITIES)


@pytest.mark.gpu
def test_gpu_opcheck(seed):
    from dermomamba_kernels.batch_norm.triton_ops import backward_op, forward_op, update_running_stats_op

    x, w, b, rm, rv = _inputs((4, 32, 33, 17), F16, device="cuda", channels_last=True)
    for training in (True, False):
        args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), rm, rv, training, EPS)
        torch.library.opcheck(forward_op, args)
        _, mean, invstd, var = forward_op(*args)
        torch.library.opcheck(backward_op, (torch.randn_like(x), x.detach(), w.detach(), mean.detach(),
                                            invstd.detach(), training, True))
    _, mean, _, var = forward_op(x.detach(), w.detach(), b.detach(), None, None, True, EPS)
    torch.library.opcheck(update_running_stats_op, (rm.clone(), rv.clone(), mean, var, MOMENTUM, None))


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph(seed):
    """torch.compile(fullgraph=True) with inductor, and a CUDA graph of forward + backward + running update
    replayed twice: the same numbers and buffers as eager (no host syncs, so the capture works)."""
    layer, _ = _twins(backend="triton", channels=32, momentum=None)
    layer = layer.cuda()
    eager = BatchNorm2d(32, momentum=None, backend="triton").cuda()
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(4, 32, 48, 64, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)
    compiled = torch.compile(layer, fullgraph=True)
    y, y_eager = compiled(x), eager(x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y_eager, x, grad)[0])

    static_x = x.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: the kernels compile outside the capture
            eager(static_x).backward(grad)
    torch.cuda.current_stream().wait_stream(stream)
    graphed = BatchNorm2d(32, momentum=None, backend="triton").cuda()
    graphed.load_state_dict(eager.state_dict())
    reference = BatchNorm2d(32, momentum=None, backend="triton").cuda()
    reference.load_state_dict(eager.state_dict())
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_y = graphed(static_x)
        static_y.backward(grad)
    static_dx = static_x.grad  # written by every replay (captured as a fresh gradient, not accumulated)
    for _ in range(2):
        graph.replay()
        leaf = static_x.detach().clone().requires_grad_(True)
        y_ref = reference(leaf)
        y_ref.backward(grad)
        torch.testing.assert_close(static_y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(static_dx, leaf.grad, rtol=0, atol=0)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(graphed.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_auto_opt_in(seed, monkeypatch):
    x, w, b, rm, rv = _inputs((2, 16, 12, 10), F16, device="cuda")
    monkeypatch.delenv(bn_module.AUTO_ENV_VAR, raising=False)
    layer = BatchNorm2d(16).cuda()
    layer(x)
    assert last_backend("batch_norm") == "reference"
    monkeypatch.setenv(bn_module.AUTO_ENV_VAR, "triton")
    layer(x)
    assert last_backend("batch_norm") == "triton"
    BatchNorm2d(16).cuda().double()(x.double())  # what the Triton kernels do not take stays native
    assert last_backend("batch_norm") == "reference"
