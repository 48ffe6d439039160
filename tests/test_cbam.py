"""CBAM: the op's reference, the layer, the dispatch point, bad input, and the fused Triton and CUDA kernels.

CPU (CI): reference vs the published module's arithmetic, errors, and the Triton kernels through
the Triton interpreter (tests/cbam_interpreter_cases.py, run in a subprocess so that
TRITON_INTERPRET never leaks into this process). GPU (marked gpu): full-size parity at the five
skip shapes of the network, fp32/fp16/bf16, train and eval, channels-last, opcheck and
torch.compile(fullgraph=True), for the Triton and the CUDA C++ kernels (test_cuda_*; their outputs
and scratch start as NaN through DERMOMAMBA_CBAM_POISON).
"""

import os
import subprocess
import sys

import pytest
import torch

import dermomamba_kernels
from cbam_parity import NAMES, SUMMATION_ORDERS, Case, check_parity, judge
from conftest import skip_unless_interpreter_runs_our_kernels
from dermomamba_kernels import BackendUnavailableError, available_backends, last_backend, unavailable_reasons
from dermomamba_kernels.cbam import cbam, cbam_dispatcher, cbam_ref
from dermomamba_kernels.layers import CBAM

HERE = os.path.dirname(os.path.abspath(__file__))
# The published network's skip connections (channels, H, W) at 192x256 input.
SKIP_SHAPES = [(32, 192, 256), (64, 96, 128), (128, 48, 64), (256, 24, 32), (512, 12, 16)]
PUBLISHED_KEYS = ["ChannelGate.mlp.1.weight", "ChannelGate.mlp.1.bias", "ChannelGate.mlp.3.weight",
                  "ChannelGate.mlp.3.bias", "SpatialGate.spatial.conv.weight", "SpatialGate.spatial.bn.weight",
                  "SpatialGate.spatial.bn.bias", "SpatialGate.spatial.bn.running_mean",
                  "SpatialGate.spatial.bn.running_var", "SpatialGate.spatial.bn.num_batches_tracked"]


def _layer_params(layer):
    gate, spatial = layer.ChannelGate.mlp, layer.SpatialGate.spatial
    return [gate[1].weight, gate[1].bias, gate[3].weight, gate[3].bias, spatial.conv.weight, spatial.bn.weight,
            spatial.bn.bias]


# ------------------------------------------------------------------------------------------------
# reference and layer (CPU)
# ------------------------------------------------------------------------------------------------

def test_state_dict_keys_unchanged():
    layer = CBAM(64)
    assert list(layer.state_dict().keys()) == PUBLISHED_KEYS
    assert layer.state_dict()["ChannelGate.mlp.1.weight"].shape == (4, 64)
    assert layer.state_dict()["SpatialGate.spatial.conv.weight"].shape == (1, 2, 7, 7)
    bn = layer.SpatialGate.spatial.bn
    assert (bn.eps, bn.momentum) == (1e-5, 0.01)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_reference_is_the_submodules_arithmetic(seed, training):
    """The layer's reference path equals the published composition ChannelGate then SpatialGate."""
    layer = CBAM(32, backend="reference").double()
    twin = CBAM(32).double()
    twin.load_state_dict(layer.state_dict())
    layer.train(training)
    twin.train(training)
    x = torch.randn(3, 32, 9, 7, dtype=torch.float64, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    out = layer(x)
    published = twin.SpatialGate(twin.ChannelGate(x_twin))
    torch.testing.assert_close(out, published, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    published.backward(grad)
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-12, atol=1e-12)
    for a, b in zip(_layer_params(layer), _layer_params(twin)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer.SpatialGate.spatial.bn, name),
                                   getattr(twin.SpatialGate.spatial.bn, name), rtol=1e-12, atol=1e-12)


def test_reference_gradients_fp64(seed):
    """gradcheck of the specification itself, batch statistics included."""
    case = Case(2, 16, 3, 4, device="cpu")
    inputs = [case.x.clone().requires_grad_(True)] + [p.clone().requires_grad_(True) for p in case.params]
    assert torch.autograd.gradcheck(lambda *a: cbam_ref(*a, training=True), inputs, fast_mode=True)


def test_reference_running_stats_update(seed):
    x = torch.randn(4, 32, 6, 5, dtype=torch.float64)
    layer = CBAM(32, backend="reference").double()
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    cbam(x, *[p.detach() for p in _layer_params(layer)], rm, rv, training=True, momentum=0.25, backend="reference")
    z = layer.SpatialGate.spatial.conv(torch.cat([
        layer.ChannelGate(x).amax(1, keepdim=True), layer.ChannelGate(x).mean(1, keepdim=True)], 1))
    torch.testing.assert_close(rm, 0.25 * z.mean().reshape(1))
    torch.testing.assert_close(rv, 0.75 + 0.25 * z.var(unbiased=True).reshape(1))


def test_unfusable_configurations(seed):
    x = torch.randn(2, 32, 5, 6)
    only_avg = CBAM(32, pool_types=("avg",))
    assert only_avg(x).shape == x.shape
    no_spatial = CBAM(32, no_spatial=True, backend="reference")
    torch.testing.assert_close(no_spatial(x), no_spatial.ChannelGate(x))
    with pytest.raises(BackendUnavailableError, match="pool_types"):
        CBAM(32, pool_types=("avg",), backend="triton")(x)


# ------------------------------------------------------------------------------------------------
# bad input and dispatch (CPU)
# ------------------------------------------------------------------------------------------------

def _args(B=2, C=32, H=5, W=6, dtype=torch.float32):
    case = Case(B, C, H, W, device="cpu")
    return [case.x.to(dtype)] + [p.to(dtype) for p in case.params] + [r.to(dtype) for r in case.running]


@pytest.mark.parametrize("position,bad,message", [
    (0, torch.randn(2, 32, 5), r"x: expected a \(B, C, H, W\)"),
    (0, torch.randint(0, 3, (2, 32, 5, 6)), "x: dtype torch.int64"),
    (0, torch.randn(2, 32, 0, 6), "x: every dimension must be non-empty"),
    (1, torch.randn(2, 31), r"mlp1_w: expected \(hidden, 32\)"),
    (2, torch.randn(3), r"mlp1_b: expected shape \(2,\)"),
    (3, torch.randn(2, 32), r"mlp2_w: expected shape \(32, 2\)"),
    (4, torch.randn(31), r"mlp2_b: expected shape \(32,\)"),
    (5, torch.randn(1, 2, 6, 6), "conv_w: the kernel size must be odd"),
    (5, torch.randn(1, 3, 7, 7), r"conv_w: expected shape \(1, 2, 7, 7\)"),
    (6, torch.randn(2), r"bn_weight: expected shape \(1,\)"),
    (7, torch.randint(0, 2, (1,)), "bn_bias: expected a floating tensor"),
    (8, torch.randn(2), r"running_mean: expected shape \(1,\)"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_names_the_argument(position, bad, message):
    args = _args()
    args[position] = bad
    with pytest.raises((ValueError, TypeError), match=message):
        cbam(*args, training=True, backend="reference")


def test_bad_running_stats_and_batchnorm_mode():
    args = _args()
    with pytest.raises(ValueError, match="give both or neither"):
        cbam(*args[:8], args[8], None, training=True, backend="reference")
    with pytest.raises(ValueError, match="required when training=False"):
        cbam(*args[:8], None, None, training=False, backend="reference")
    one_pixel = _args(B=1, H=1, W=1)
    with pytest.raises(ValueError, match="more than one value per channel"):
        cbam(*one_pixel, training=True, backend="reference")


def test_device_mismatch_names_the_argument():
    args = _args()
    args[6] = torch.ones(1, device="meta")
    with pytest.raises(ValueError, match="bn_weight: on meta"):
        cbam(*args, training=True, backend="reference")


def test_triton_on_cpu_without_interpreter_is_unavailable():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton through the interpreter")
    with pytest.raises(BackendUnavailableError, match="triton"):
        cbam(*_args(), training=True, backend="triton")
    with pytest.raises(ValueError, match="backend='nope'"):
        cbam(*_args(), training=True, backend="nope")


# ------------------------------------------------------------------------------------------------
# the Triton kernels on CPU through the interpreter (subprocess)
# ------------------------------------------------------------------------------------------------

def test_triton_kernels_under_interpreter():
    skip_unless_interpreter_runs_our_kernels()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           os.path.join(HERE, "cbam_interpreter_cases.py")]
    result = subprocess.run(cmd, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"interpreter cases failed:\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"


# ------------------------------------------------------------------------------------------------
# the Triton kernels on the GPU at full size
# ------------------------------------------------------------------------------------------------

GPU_BATCH = 16
GPU_CASES = ([(shape, True, dtype) for shape in SKIP_SHAPES for dtype in (torch.float32, torch.float16,
                                                                          torch.bfloat16)]
             + [(shape, False, torch.float32) for shape in SKIP_SHAPES]
             + [(SKIP_SHAPES[0], False, torch.bfloat16), (SKIP_SHAPES[4], False, torch.float16)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,training,dtype", GPU_CASES,
                         ids=["x".join(map(str, s)) + ("-train-" if t else "-eval-") + str(d)[6:]
                              for s, t, d in GPU_CASES])
def test_gpu_parity_skip_shapes(seed, shape, training, dtype):
    print(check_parity(Case(GPU_BATCH, *shape, device="cuda"), "triton", dtype, training))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,training,dtype", [
    ((3, 48, 37, 53), True, torch.float32),    # odd sizes everywhere
    ((1, 64, 45, 31), True, torch.bfloat16),   # batch 1
    ((1, 64, 45, 31), False, torch.float16),
    ((16, 32, 192, 256), True, torch.float16),  # channels-last at the largest skip
    ((16, 512, 12, 16), True, torch.bfloat16),
], ids=["odd", "batch1-train", "batch1-eval", "nhwc-32", "nhwc-512"])
def test_gpu_parity_odd_and_channels_last(seed, shape, training, dtype):
    channels_last = shape[0] == 16
    print(check_parity(Case(*shape, device="cuda"), "triton", dtype, training, channels_last=channels_last))


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_opcheck(seed, training):
    from dermomamba_kernels.cbam import triton_ops  # noqa: F401

    case = Case(2, 32, 13, 19, device="cuda")
    x = case.x.float().requires_grad_(True)
    params = [p.float().requires_grad_(True) for p in case.params]
    args = (x, *params, *[r.float() for r in case.running], training, 1e-5)
    torch.library.opcheck(torch.ops.dermomamba_cbam.cbam_forward.default, args)
    outs = torch.ops.dermomamba_cbam.cbam_forward(*args)
    bwd_args = (torch.randn_like(x), x.detach(), *[p.detach() for p in params], *[o.detach() for o in outs[1:]],
                training)
    torch.library.opcheck(torch.ops.dermomamba_cbam.cbam_backward.default, bwd_args)
    torch.library.opcheck(torch.ops.dermomamba_cbam.update_running_stats.default,
                          (case.running[0].float(), case.running[1].float(), outs[4].detach(), 0.1))


@pytest.mark.gpu
def test_gpu_compile_fullgraph(seed):
    fused = CBAM(64, backend="triton").cuda()
    ref = CBAM(64, backend="reference").cuda()
    ref.load_state_dict(fused.state_dict())
    compiled = torch.compile(fused, fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 64, 24, 40, device="cuda")
        xc, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_c, out_r = compiled(xc), ref(xr)
        torch.testing.assert_close(out_c, out_r, rtol=1e-4, atol=1e-5)
        out_c.square().sum().backward()
        out_r.square().sum().backward()
        torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(fused.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_autocast_layer(seed, backend):
    """fp16 autocast training (the published recipe): fp32 parameters, fp16 activations, grads in fp32."""
    if backend == "cuda":
        _require_cuda_backend()
    fused = CBAM(128, backend=backend).cuda()
    ref = CBAM(128, backend="reference").cuda()
    exact = CBAM(128, backend="reference").cuda().double()
    ref.load_state_dict(fused.state_dict())
    exact.load_state_dict(fused.state_dict())
    x = torch.randn(8, 128, 48, 64, device="cuda").half()
    runs = []
    for layer, dtype in ((fused, None), (ref, None), (exact, torch.float64)):
        xi = (x.double() if dtype else x.clone()).requires_grad_(True)
        if dtype:
            out = layer(xi)
        else:
            with torch.autocast("cuda", dtype=torch.float16):
                out = layer(xi)
        out.float().square().sum().backward()
        runs.append([out.double(), xi.grad.double()] + [p.grad.double() for p in _layer_params(layer)])
    assert all(p.grad.dtype == torch.float32 for p in _layer_params(fused))
    names = ["out", "x.grad"] + [f"param {i}.grad" for i in range(7)]
    for name, k, r, e in zip(names, *runs):
        err_k = ((k - e).norm() / e.norm()).item()
        err_r = ((r - e).norm() / e.norm()).item()
        assert err_k <= 2 * err_r + 1e-5, f"{name}: {backend} {err_k:.3e} vs autocast reference {err_r:.3e}"


@pytest.mark.parametrize("order", SUMMATION_ORDERS[1:],
                         ids=["-".join(n for n, on in zip(("batch", "width", "height"), o) if on) for o in SUMMATION_ORDERS[1:]])
def test_summation_orders_are_exact_symmetries(seed, order):
    """The parity tolerance takes the reference's error over these orders: each must be the same problem."""
    case = Case(3, 16, 5, 9, device="cpu", ksize=7)
    plain = case.run("reference", torch.float64, True)
    moved = case.run("reference", torch.float64, True, variant=order)
    for name, a, b in zip(NAMES, plain, moved):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


# ------------------------------------------------------------------------------------------------
# the CUDA C++ kernels (torch.ops.dermomamba.cbam_*): schemas and dispatch on CPU, parity on the GPU
# ------------------------------------------------------------------------------------------------

CUDA_OPS = {
    "cbam_fwd": "cbam_fwd(Tensor x, Tensor mlp1_w, Tensor mlp1_b, Tensor mlp2_w, Tensor mlp2_b, Tensor conv_w, "
                "Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, Tensor? running_var, bool use_batch_stats, "
                "float eps) -> (Tensor out, Tensor cs, Tensor chan, Tensor pix, Tensor stats)",
    "cbam_bwd": "cbam_bwd(Tensor grad_out, Tensor x, Tensor mlp1_w, Tensor mlp1_b, Tensor mlp2_w, Tensor mlp2_b, "
                "Tensor conv_w, Tensor bn_weight, Tensor bn_bias, Tensor cs, Tensor chan, Tensor pix, Tensor stats, "
                "bool use_batch_stats) -> (Tensor dx, Tensor d_mlp1_w, Tensor d_mlp1_b, Tensor d_mlp2_w, "
                "Tensor d_mlp2_b, Tensor d_conv_w, Tensor d_bn_weight, Tensor d_bn_bias)",
    "cbam_update_running_stats": "cbam_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
                                 "Tensor stats, float momentum) -> ()",
}


@pytest.mark.skipif(not dermomamba_kernels.extension_loaded(), reason="dermomamba_kernels._C is not built")
def test_cuda_op_schemas_registered():
    """The schemas exist in every build (CPU-only too); their fakes and autograd come from cuda_ops."""
    from dermomamba_kernels.cbam import cuda_ops

    assert cuda_ops.ops_registered(), "torch.ops.dermomamba has no CBAM ops: rebuild the extension"
    for name, schema in CUDA_OPS.items():
        assert str(getattr(torch.ops.dermomamba, name).default._schema) == "dermomamba::" + schema, name


def test_cuda_backend_on_cpu_tensors_is_unavailable():
    with pytest.raises(BackendUnavailableError, match="backend='cuda' is unavailable: the CUDA kernels take CUDA"):
        cbam(*_args(), training=True, backend="cuda")
    assert "cuda" in unavailable_reasons("cbam", "cpu")
    assert "cuda" not in available_backends("cbam", "cpu")


def _require_cuda_backend():
    reason = cbam_dispatcher.unavailable_reason("cuda", torch.device("cuda"))
    assert reason is None, f"backend='cuda' cannot run on this GPU machine: {reason}"


@pytest.fixture
def cuda_poisoned(monkeypatch):
    """The CUDA backend ready, and its outputs and scratch filled with NaN before the kernels run."""
    _require_cuda_backend()
    monkeypatch.setenv("DERMOMAMBA_CBAM_POISON", "1")


# The CUDA backend has two kernel sets (csrc/cuda/cbam_cuda.cpp): the pass structure ("passes", any shape) and
# the small-shape path ("small": one cooperative kernel per direction). The variable forces one; a forced
# "small" raises where it cannot run, so a test of it never falls back to the passes unnoticed.
CUDA_PATH_VARIABLE = "DERMOMAMBA_CBAM_CUDA_PATH"
CUDA_PATHS = ("passes", "small")
# Hard limits of the small path (kCbamSmallMaxStagedValues values of x staged per block; all blocks resident
# at once) on the lead's GPUs (H100 SXM / H200: 132 SMs, at least one block of <= 227 KB per SM).
SMALL_STAGED_VALUES = 24 * 1024
SMALL_RESIDENT_BLOCKS = 132
SMALL_MAX_PIXELS = 4096


def small_path_fits(B, C, H, W):
    """True where the small path can run (B, C, H, W) on the lead's GPUs: the shapes its tests cover."""
    groups = -(-C * H * W // SMALL_STAGED_VALUES)
    return H * W <= SMALL_MAX_PIXELS and B * groups <= SMALL_RESIDENT_BLOCKS


def with_paths(cases, shape_of):
    """cases x CUDA_PATHS, the small path only where it fits (the largest skips are beyond its design)."""
    return [case + (path,) for case in cases for path in CUDA_PATHS
            if path == "passes" or small_path_fits(*shape_of(case))]


@pytest.fixture
def cuda_path(request, monkeypatch):
    """Forces the CUDA path named by the test's parameter (indirect parametrization)."""
    monkeypatch.setenv(CUDA_PATH_VARIABLE, request.param)
    return request.param


CUDA_CHANNELS_LAST_CASES = [((16, 32, 192, 256), True, torch.float16), ((16, 128, 48, 64), False, torch.float32),
                            ((16, 512, 12, 16), True, torch.bfloat16), ((16, 64, 96, 128), True, torch.float32),
                            ((16, 256, 24, 32), False, torch.float16)]
CUDA_SKIP_CASES = with_paths(GPU_CASES, lambda case: (GPU_BATCH,) + case[0])
CUDA_NHWC_CASES = with_paths(CUDA_CHANNELS_LAST_CASES, lambda case: case[0])
CUDA_ODD_CASES = with_paths([
    ((3, 48, 37, 53), True, torch.float32, 7, "odd"),          # odd sizes everywhere
    ((2, 100, 29, 67), True, torch.float16, 7, "c100-fp16"),   # C not a multiple of any chunk, hidden 6
    ((2, 3, 17, 19), True, torch.float32, 7, "c3"),            # fewer channels than a block's channel groups
    ((1, 64, 45, 31), True, torch.bfloat16, 7, "batch1-train"),
    ((1, 64, 45, 31), False, torch.float16, 7, "batch1-eval"),
    ((1, 16, 1, 300), True, torch.float32, 7, "one-row"),      # the conv sees only its middle row
    ((4, 32, 29, 41), True, torch.float32, 3, "k3-train"),     # kernel size 3
    ((4, 32, 29, 41), False, torch.bfloat16, 3, "k3-eval-bf16"),
    ((4, 8, 1, 1), True, torch.float32, 7, "one-pixel"),       # 1x1 images: the conv's centre tap alone
    ((2, 1100, 3, 5), True, torch.float32, 7, "c1100"),        # more channels per group than threads
], lambda case: case[0])


def _ids(cases, describe):
    return [describe(case[:-1]) + "-" + case[-1] for case in cases]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,training,dtype,cuda_path", CUDA_SKIP_CASES, indirect=["cuda_path"],
                         ids=_ids(CUDA_SKIP_CASES, lambda c: "x".join(map(str, c[0])) + ("-train-" if c[1] else "-eval-")
                                  + str(c[2])[6:]))
def test_cuda_parity_skip_shapes(seed, cuda_poisoned, shape, training, dtype, cuda_path):
    print(check_parity(Case(GPU_BATCH, *shape, device="cuda"), "cuda", dtype, training))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,training,dtype,cuda_path", CUDA_NHWC_CASES, indirect=["cuda_path"],
                         ids=_ids(CUDA_NHWC_CASES, lambda c: "nhwc-" + "x".join(map(str, c[0]))
                                  + ("-train-" if c[1] else "-eval-") + str(c[2])[6:]))
def test_cuda_parity_channels_last(seed, cuda_poisoned, shape, training, dtype, cuda_path):
    print(check_parity(Case(*shape, device="cuda"), "cuda", dtype, training, channels_last=True))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,training,dtype,ksize,label,cuda_path", CUDA_ODD_CASES, indirect=["cuda_path"],
                         ids=_ids(CUDA_ODD_CASES, lambda c: c[4]))
def test_cuda_parity_odd_shapes(seed, cuda_poisoned, shape, training, dtype, ksize, label, cuda_path):
    print(check_parity(Case(*shape, device="cuda", ksize=ksize), "cuda", dtype, training))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_path", CUDA_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_ties_split_like_amax(seed, cuda_poisoned, dtype, cuda_path):
    """Quantised, ReLU'd x: tied maxima over HW and over C (whole pixels of zeros); split like torch.amax."""
    case = Case(4, 64, 23, 29, device="cuda")
    case.x = torch.relu(torch.round(case.x * 2) / 2)
    print(check_parity(case, "cuda", dtype, True))


def _cuda_run(x, params, grad, backward=None):
    """Output and gradients of x (as a leaf or a view of one) and of the params; ``backward`` runs the backward."""
    leaf = x if x.is_leaf else x._base
    out = cbam(x, *params, training=True, backend="cuda")
    if backward is None:
        out.backward(grad)
    else:
        backward(out)
    return [out.detach(), leaf.grad] + [p.grad for p in params]


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_path", CUDA_PATHS, indirect=True)
def test_cuda_strides_do_not_change_results(seed, cuda_poisoned, cuda_path):
    """x read in place as a channel slice of a larger tensor with grad_out channels-last, and a grad_out with
    all strides 0 (out.sum()): bit for bit the results of the same values dense (strides change no summation
    order). The dense results themselves are held to the reference by the parity tests."""
    case = Case(2, 32, 26, 33, device="cuda")
    x, grad = case.x.float(), case.grad.float()

    def params():
        return [p.float().requires_grad_(True) for p in case.params]

    dense = _cuda_run(x.clone().requires_grad_(True), params(), grad)
    base = torch.randn(2, 40, 26, 33, device="cuda")
    base[:, 4:36] = x
    base.requires_grad_(True)
    sliced = _cuda_run(base[:, 4:36], params(), grad.contiguous(memory_format=torch.channels_last))
    d_base = sliced[1]
    assert torch.equal(d_base[:, :4], torch.zeros_like(d_base[:, :4])) and torch.equal(
        d_base[:, 36:], torch.zeros_like(d_base[:, 36:])), "gradient leaked outside the slice"
    sliced[1] = d_base[:, 4:36]
    ones = _cuda_run(x.clone().requires_grad_(True), params(), torch.ones_like(grad))
    expanded = _cuda_run(x.clone().requires_grad_(True), params(), None, backward=lambda out: out.sum().backward())
    for label, got, want in (("channel slice", sliced, dense), ("stride-0 grad_out", expanded, ones)):
        for name, a, b in zip(NAMES, got, want):
            assert torch.equal(a, b), f"{label}: {name} differs from the dense run by up to {(a - b).abs().max():.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_path", CUDA_PATHS, indirect=True)
def test_cuda_one_column_views_read_in_place(seed, cuda_poisoned, cuda_path):
    """W == 1: torch ignores the strides of size-1 dims, so (B, C, 1, H).transpose(2, 3) is is_contiguous() with
    stride(3) == H. The pixel axis is then H and stride(3) must not be used (it read pixel h at h * H, out of
    bounds). Such views of x and grad_out give bit for bit the dense run's results; the dense one-column image
    is held to the reference."""
    B, C, H = 2, 24, 77
    case = Case(B, C, H, 1, device="cuda")
    print(check_parity(case, "cuda", torch.float32, True))
    x, grad = case.x.float(), case.grad.float()

    def params():
        return [p.float().requires_grad_(True) for p in case.params]

    def column_view(t):  # t's values, stored as a (B, C, 1, H) row and viewed as (B, C, H, 1)
        return torch.empty(B, C, 1, H, device="cuda").copy_(t.transpose(2, 3)).transpose(2, 3)

    dense = _cuda_run(x.clone().requires_grad_(True), params(), grad)
    base = column_view(x)._base.requires_grad_(True)
    view = base.transpose(2, 3)
    assert view.is_contiguous() and view.stride(3) == H, "the view no longer has the hazardous strides"
    strided = _cuda_run(view, params(), column_view(grad))
    strided[1] = strided[1].transpose(2, 3)  # the leaf's gradient is (B, C, 1, H)
    for name, a, b in zip(NAMES, strided, dense):
        assert torch.equal(a, b), f"{name} differs from the dense run by up to {(a - b).abs().max():.3e}"


def _run_on(case, device):
    """Output, every gradient and the running stats of one fp32 training step of ``case`` on ``device``."""
    x = case.x.float().to(device).requires_grad_(True)
    params = [p.float().to(device).requires_grad_(True) for p in case.params]
    running = [r.float().to(device) for r in case.running]
    out = cbam(x, *params, *running, training=True, backend="cuda")
    out.backward(case.grad.float().to(device))
    return [t.detach() for t in [out, x.grad] + [p.grad for p in params] + running]


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_path", CUDA_PATHS, indirect=True)
def test_cuda_current_stream_and_device_guard(seed, cuda_poisoned, cuda_path):
    """Every launch goes to the caller's current stream on x's device: inputs made on a side stream behind a
    long sleep (a kernel on any other stream would read them before they exist), and, with two GPUs, x on
    the last GPU while cuda:0 is current (the device guard), give the default-stream results bit for bit."""
    case = Case(4, 64, 40, 52, device="cuda:0")
    want = _run_on(case, "cuda:0")
    side = torch.cuda.Stream(device=0)
    side.wait_stream(torch.cuda.current_stream(0))
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # GPU cycles, ~0.1 s
        got = _run_on(case, "cuda:0")
    torch.cuda.synchronize(0)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), f"side stream: {name} differs by up to {(a - b).abs().max():.3e}"
    if torch.cuda.device_count() > 1:
        last = torch.cuda.device_count() - 1
        assert torch.cuda.current_device() == 0
        got = [t.cpu() for t in _run_on(case, f"cuda:{last}")]
        for name, a, b in zip(NAMES, got, want):
            assert torch.equal(a, b.cpu()), f"cuda:{last}: {name} differs by up to {(a - b.cpu()).abs().max():.3e}"


@pytest.mark.gpu
def test_cuda_more_than_2_31_elements(seed, cuda_poisoned):
    """x, grad_out, out and dx of 2.2 G elements (fp16, 4.4 GB each): element offsets past 2^31 need 64-bit
    index arithmetic. In eval every image is independent, and a 4096x4096 image gets the same tiling alone
    (full pixel tiles, no channel split), so the last image's out and dx must equal bit for bit those of the
    last image run alone (whose arithmetic the parity tests hold to the reference)."""
    B, C, H, W = 2, 66, 4096, 4096
    assert B * C * H * W > 2 ** 31
    free_bytes, _ = torch.cuda.mem_get_info()
    if free_bytes < 24 * 2 ** 30:  # four 4.4 GB tensors and the maps; parallel test workers share the GPU
        pytest.skip(f"needs 24 GB of free GPU memory, {free_bytes / 2 ** 30:.1f} GB free")
    hidden = C // 16
    params = [torch.randn(hidden, C) / C ** 0.5, 0.1 * torch.randn(hidden), torch.randn(C, hidden) / hidden ** 0.5,
              0.1 * torch.randn(C), 0.3 * torch.randn(1, 2, 7, 7), 0.5 + torch.rand(1), 0.2 * torch.randn(1)]
    running = [0.1 * torch.randn(1, device="cuda"), 0.5 + torch.rand(1, device="cuda")]
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.float16)
    grad = torch.randn(B, C, H, W, device="cuda", dtype=torch.float16)

    def run(x_part, grad_part):
        leaf = x_part.requires_grad_(True)
        ps = [p.cuda().requires_grad_(True) for p in params]
        out = cbam(leaf, *ps, *running, training=False, backend="cuda")
        out.backward(grad_part)
        return out.detach(), leaf.grad

    alone = run(x[-1:].clone(), grad[-1:].clone())
    whole = run(x, grad)
    del grad
    for name, a, b in (("out", whole[0][-1:], alone[0]), ("dx", whole[1][-1:], alone[1])):
        assert torch.equal(a, b), f"{name}: the last image differs from its own run at {(a != b).sum().item()} places"
    assert torch.isfinite(whole[0][0]).all() and torch.isfinite(whole[1][0]).all(), "first image: unwritten values"


@pytest.mark.gpu
@pytest.mark.parametrize("shape,cuda_path", [((16, 64, 96, 128), "passes"), ((16, 256, 24, 32), "small")],
                         indirect=["cuda_path"], ids=["passes", "small"])
def test_cuda_deterministic(seed, cuda_poisoned, shape, cuda_path):
    """No float atomics: two runs agree bit for bit (output, every gradient, running stats)."""
    case = Case(*shape, device="cuda")
    first = case.run("cuda", torch.float32, True)
    second = case.run("cuda", torch.float32, True)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name}: two runs differ by up to {(a - b).abs().max().item():.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_path", CUDA_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_agrees_with_triton(seed, cuda_poisoned, dtype, cuda_path):
    """Both fused backends on quantised, ReLU'd x (ties over HW and over C): the same tie decisions (max over
    HW and both 1/ties maps bit for bit), the other saved maps equal up to fp32 summation order, and both
    within the parity tolerance for the output, every gradient and the running stats."""
    from cbam_parity import FP32_NOISE, relative_error, unit_roundoff
    from dermomamba_kernels.cbam import triton_ops  # noqa: F401  (registers torch.ops.dermomamba_cbam)

    case = Case(8, 64, 48, 64, device="cuda")
    case.x = torch.relu(torch.round(case.x * 4) / 4)  # exact in bf16 too
    args = ([case.x.to(dtype)] + [p.float() for p in case.params] + [r.float() for r in case.running]
            + [True, 1e-5])
    out_c, cs_c, chan_c, pix_c, stats_c = torch.ops.dermomamba.cbam_fwd(*args)
    out_t, cs_t, chan_t, pix_t, stats_t = torch.ops.dermomamba_cbam.cbam_forward(*args)
    for name, a, b in (("max over HW", chan_c[:, 1], chan_t[:, 1]), ("1/ties over HW", chan_c[:, 2], chan_t[:, 2]),
                       ("1/ties over C", pix_c[:, 2], pix_t[:, 2])):
        assert torch.equal(a, b), f"{name}: cuda and triton differ at {(a != b).sum().item()} of {a.numel()} places"
    out_tol = FP32_NOISE if dtype == torch.float32 else unit_roundoff(dtype)  # one final rounding may flip
    for name, a, b, tol in (("out", out_c, out_t, out_tol), ("cs", cs_c, cs_t, FP32_NOISE),
                            ("avg over HW", chan_c[:, 0], chan_t[:, 0], FP32_NOISE),
                            ("max / mean over C", pix_c[:, :2], pix_t[:, :2], FP32_NOISE),
                            ("conv output", pix_c[:, 3], pix_t[:, 3], FP32_NOISE),
                            ("stats", stats_c, stats_t, FP32_NOISE)):
        diff = relative_error(a.double(), b.double())
        assert diff <= tol, f"{name}: cuda vs triton relative difference {diff:.3e} > {tol:.1e}"
    print(check_parity(case, "cuda", dtype, True))
    print(check_parity(case, "triton", dtype, True))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_path", CUDA_PATHS, indirect=True)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_opcheck(seed, cuda_poisoned, training, cuda_path):
    case = Case(2, 32, 13, 19, device="cuda")
    x = case.x.float().requires_grad_(True)
    params = [p.float().requires_grad_(True) for p in case.params]
    args = (x, *params, *[r.float() for r in case.running], training, 1e-5)
    torch.library.opcheck(torch.ops.dermomamba.cbam_fwd.default, args)
    outs = torch.ops.dermomamba.cbam_fwd(*args)
    bwd_args = (torch.randn_like(x), x.detach(), *[p.detach() for p in params], *[o.detach() for o in outs[1:]],
                training)
    torch.library.opcheck(torch.ops.dermomamba.cbam_bwd.default, bwd_args)
    torch.library.opcheck(torch.ops.dermomamba.cbam_update_running_stats.default,
                          (case.running[0].float(), case.running[1].float(), outs[4].detach(), 0.1))
    # channels-last x: the fake implementation must give the output the real strides
    x_nhwc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.dermomamba.cbam_fwd.default, (x_nhwc,) + args[1:])


@pytest.mark.gpu
def test_cuda_auto_prefers_cuda(seed):
    _require_cuda_backend()
    x = torch.randn(2, 32, 8, 9, device="cuda")
    CBAM(32, backend="auto").cuda()(x)
    assert last_backend("cbam") == "cuda"


@pytest.mark.gpu
def test_cuda_bad_input_names_the_argument(seed):
    _require_cuda_backend()
    case = Case(2, 32, 9, 9, device="cuda", ksize=17)
    with pytest.raises(RuntimeError, match="conv_w's kernel size must be odd and at most 15"):
        cbam(case.x.float(), *[p.float() for p in case.params], training=True, backend="cuda")
    case = Case(2, 32, 9, 9, device="cuda")
    args = [case.x.float()] + [p.float() for p in case.params] + [None, None, True, 1e-5]
    args[3] = torch.randn(31, 2, device="cuda")
    with pytest.raises(RuntimeError, match=r"mlp2_w must have shape \[32, 2\]"):
        torch.ops.dermomamba.cbam_fwd(*args)
    with pytest.raises(TypeError, match="x: dtype torch.float64 is not supported by the cuda backend"):
        cbam(case.x, *case.params, training=True, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_path", CUDA_PATHS, indirect=True)
def test_cuda_compile_fullgraph(seed, cuda_path):
    """torch.compile(fullgraph=True) of the layer on the CUDA kernels: two steps of outputs, gradients
    and running stats, judged against an fp64 twin like the eager tests."""
    _require_cuda_backend()
    fused = CBAM(64, backend="cuda").cuda()
    ref = CBAM(64, backend="reference").cuda()
    exact = CBAM(64, backend="reference").cuda().double()
    ref.load_state_dict(fused.state_dict())
    exact.load_state_dict(fused.state_dict())
    compiled = torch.compile(fused, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 64, 24, 40, device="cuda")
        runs = []
        for layer, dtype in ((compiled, torch.float32), (ref, torch.float32), (exact, torch.float64)):
            xi = x.to(dtype, copy=True).requires_grad_(True)
            out = layer(xi)
            out.square().sum().backward()
            runs.append((out, xi.grad))
        judge(f"out (step {step})", runs[0][0], runs[1][0], runs[2][0])
        judge(f"x.grad (step {step})", runs[0][1], runs[1][1], runs[2][1])
    for (name, a), (_, b), (_, e) in zip(fused.state_dict().items(), ref.state_dict().items(),
                                         exact.state_dict().items()):
        if a.is_floating_point():
            judge(name, a, b, e)
        else:
            assert torch.equal(a, b), name
    for (name, a), (_, b), (_, e) in zip(fused.named_parameters(), ref.named_parameters(), exact.named_parameters()):
        judge(f"{name}.grad", a.grad, b.grad, e.grad)


def _cuda_kernel_names(step):
    """Names of the CUDA kernels one call of ``step`` launches."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if e.device_time_total > 0]


@pytest.mark.gpu
@pytest.mark.parametrize("request_path,shape,expected", [
    ("auto", (16, 512, 12, 16), "small"),   # H x W = 192 <= the rule's 1024 pixels
    ("auto", (16, 256, 24, 32), "small"),
    ("auto", (4, 32, 40, 40), "passes"),    # 1600 pixels: beyond the rule
    ("auto", (16, 32, 192, 256), "passes"),
    ("passes", (16, 512, 12, 16), "passes"),
    ("small", (3, 48, 37, 53), "small"),    # forced: runs where the rule would not take it
], ids=["auto-512x12x16", "auto-256x24x32", "auto-40x40", "auto-192x256", "passes", "forced-small"])
def test_cuda_path_choice(seed, monkeypatch, request_path, shape, expected):
    """Which kernels run: the cooperative small-path kernels or the pass structure (the rule of
    DERMOMAMBA_CBAM_CUDA_PATH=auto: H x W <= 1024 and every block resident)."""
    _require_cuda_backend()
    monkeypatch.setenv(CUDA_PATH_VARIABLE, request_path)
    C = shape[1]
    layer = CBAM(C, backend="cuda").cuda()
    x = torch.randn(*shape, device="cuda", requires_grad=True)

    def step():
        layer(x).sum().backward()

    names = _cuda_kernel_names(step)
    small = [n for n in names if "cbam_small::" in n]
    passes = [n for n in names if "pool_hw_kernel" in n or "bwd_apply_kernel" in n]
    if expected == "small":
        assert any("forward_kernel" in n for n in small) and any("backward_kernel" in n for n in small), names
        assert not passes, f"pass kernels ran on the small path: {passes}"
    else:
        assert len(passes) == 2 and not small, names


@pytest.mark.gpu
def test_cuda_path_errors_name_the_variable(seed, monkeypatch):
    _require_cuda_backend()
    case = Case(16, 32, 192, 256, device="cuda")
    args = [case.x.float()] + [p.float() for p in case.params]
    monkeypatch.setenv(CUDA_PATH_VARIABLE, "small")
    with pytest.raises(RuntimeError, match="DERMOMAMBA_CBAM_CUDA_PATH=small, but the small-shape kernels cannot run"):
        cbam(*args, training=True, backend="cuda")
    monkeypatch.setenv(CUDA_PATH_VARIABLE, "fastest")
    with pytest.raises(RuntimeError, match="DERMOMAMBA_CBAM_CUDA_PATH must be 'passes', 'small' or 'auto'"):
        cbam(*args, training=True, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_paths_agree(seed, cuda_poisoned, monkeypatch, training):
    """Both CUDA paths on one draw with tied maxima: the same tie decisions (max over HW, both 1/ties maps bit
    for bit; the max over C of x * cs may differ in the last bit, as cs does with the summation order), and
    both, and the small backward fed the passes' saved maps (one contract for both), within the parity
    tolerance of the fp64 reference for the output and every gradient."""
    from cbam_parity import relative_error, tolerance

    case = Case(16, 256, 24, 32, device="cuda")
    case.x = torch.relu(torch.round(case.x * 4) / 4)  # tied maxima
    args = [case.x.float()] + [p.float() for p in case.params] + [r.float() for r in case.running] + [training, 1e-5]
    grad = case.grad.float()
    runs = {}
    for path in CUDA_PATHS:
        monkeypatch.setenv(CUDA_PATH_VARIABLE, path)
        fwd = torch.ops.dermomamba.cbam_fwd(*args)
        bwd = torch.ops.dermomamba.cbam_bwd(grad, args[0], *args[1:8], *fwd[1:], training)
        runs[path] = (fwd, bwd)
    (fwd_p, bwd_p), (fwd_s, bwd_s) = runs["passes"], runs["small"]
    for name, a, b in (("max over HW", fwd_p[2][:, 1], fwd_s[2][:, 1]), ("1/ties over HW", fwd_p[2][:, 2], fwd_s[2][:, 2]),
                       ("1/ties over C", fwd_p[3][:, 2], fwd_s[3][:, 2])):
        assert torch.equal(a, b), f"{name}: the paths differ at {(a != b).sum().item()} of {a.numel()} places"
    # the small path's backward from the passes' saved maps: the maps are one contract for both paths
    monkeypatch.setenv(CUDA_PATH_VARIABLE, "small")
    crossed = torch.ops.dermomamba.cbam_bwd(grad, args[0], *args[1:8], *fwd_p[1:], training)
    exact = case.run("reference", torch.float64, training, inputs_dtype=torch.float32)
    references = [case.run("reference", torch.float32, training, variant=order) for order in SUMMATION_ORDERS]
    for label, values in (("passes", [fwd_p[0]] + list(bwd_p)), ("small", [fwd_s[0]] + list(bwd_s)),
                          ("small backward on the passes' maps", [fwd_p[0]] + list(crossed))):
        for i, (name, value) in enumerate(zip(NAMES, values)):
            assert torch.isfinite(value).all(), f"{label}: {name} has non-finite values"
            ref_err = max(relative_error(r[i], exact[i]) for r in references)
            err = relative_error(value.double(), exact[i])
            tol = tolerance(ref_err, torch.float32, exact[i].numel())
            assert err <= tol, f"{label}: {name} error {err:.3e} > tolerance {tol:.3e}"
