"""The Triton CBAM kernels on CPU through the Triton interpreter.

Not collected by itself (the name does not start with test_): tests/test_cbam.py runs it with
pytest in a subprocess, because TRITON_INTERPRET must be set before any Triton kernel is defined
and must not leak into the GPU tests of the same process. Sizes stay near 10^4 elements: the
interpreter is slow.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from cbam_parity import (CONV_WEIGHT, IDENTITY, NAMES, SUMMATION_ORDERS, Case, check_parity, judge,  # noqa: E402
                         variant_maps)
from dermomamba_kernels._dispatch import last_backend  # noqa: E402
from dermomamba_kernels.cbam import cbam  # noqa: E402
from dermomamba_kernels.cbam import triton_ops  # noqa: E402
from dermomamba_kernels.layers import CBAM  # noqa: E402

# every output and scratch buffer starts as NaN: an element a kernel forgets shows up
triton_ops.POISON_OUTPUTS = True

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# The interpreter runs ~10^4 elements a second or so: each shape covers a few (mode, dtype) pairs,
# and together they cover all six; the GPU tests run every combination at full size.
CASES = [
    ((2, 32, 7, 9), True, F32),     # H != W, pixel count not a multiple of any block
    ((2, 32, 7, 9), False, F16),
    ((2, 32, 7, 9), True, BF16),
    ((1, 48, 5, 11), True, F16),    # batch 1, hidden width 3
    ((1, 48, 5, 11), False, BF16),
    ((3, 16, 12, 10), False, F32),  # hidden width 1
    ((3, 16, 12, 10), True, BF16),
]


@pytest.mark.parametrize("shape,training,dtype", CASES,
                         ids=["x".join(map(str, s)) + ("-train-" if t else "-eval-") + str(d)[6:] for s, t, d in CASES])
def test_parity(seed, shape, training, dtype):
    print(check_parity(Case(*shape, device="cpu"), "triton", dtype, training))
    assert last_backend("cbam") == "triton"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parity_channels_last(seed, training):
    print(check_parity(Case(2, 32, 6, 5, device="cpu"), "triton", torch.float32, training, channels_last=True))


def test_parity_kernel_size_3(seed):
    print(check_parity(Case(2, 32, 5, 6, device="cpu", ksize=3), "triton", torch.float32, True))


def test_strided_views(seed):
    """x a channel slice of a larger tensor (not dense, read in place) and grad_out channels-last."""
    base = torch.randn(2, 40, 6, 7)
    case = Case(2, 32, 6, 7, device="cpu")
    grad = torch.randn(2, 32, 6, 7).contiguous(memory_format=torch.channels_last)

    def run(backend, dtype, variant=IDENTITY):
        move, mirror_kernel = variant_maps(variant)  # as in Case.run: the same maps take results back
        x_base = move(base.to(dtype, copy=True)).contiguous().requires_grad_(True)
        params = [p.to(dtype).clone() for p in case.params]
        params[CONV_WEIGHT] = mirror_kernel(params[CONV_WEIGHT])
        params = [p.requires_grad_(True) for p in params]
        out = cbam(x_base[:, 4:36], *params, training=True, backend=backend)
        out.backward(move(grad.to(dtype)).contiguous(memory_format=torch.channels_last))
        grads = [p.grad for p in params]
        grads[CONV_WEIGHT] = mirror_kernel(grads[CONV_WEIGHT])
        return [move(out.detach()), move(x_base.grad)] + grads

    fused = run("triton", torch.float32)
    exact = run("reference", torch.float64)
    references = [run("reference", torch.float32, order) for order in SUMMATION_ORDERS]
    names = ["out", "d_base"] + list(NAMES[2:9])
    for i, name in enumerate(names):
        judge(name, fused[i], [r[i] for r in references], exact[i])


def test_one_column_views(seed):
    """W == 1 views whose stride(3) is not the pixel stride (a transposed (B, C, 1, W) tensor counts as
    contiguous in torch): read in place, same result as a freshly laid out copy."""
    case = Case(2, 16, 1, 6, device="cpu")
    x_view = case.x.float().transpose(2, 3)  # (2, 16, 6, 1), strides (96, 6, 1, 6)
    grad_view = case.grad.float().transpose(2, 3)
    dense_x, dense_grad = torch.empty(x_view.shape).copy_(x_view), torch.empty(grad_view.shape).copy_(grad_view)
    assert x_view.stride() != dense_x.stride()
    results = []
    for x, grad in ((x_view, grad_view), (dense_x, dense_grad)):
        x = x.detach().requires_grad_(True)  # detach keeps the view's strides
        params = [p.float().requires_grad_(True) for p in case.params]
        out = cbam(x, *params, training=True, backend="triton")
        out.backward(grad)
        results.append([out.detach(), x.grad] + [p.grad for p in params])
    for name, a, b in zip(NAMES, *results):
        assert torch.equal(a, b), name


def test_expanded_grad_out(seed):
    """out.sum().backward() hands the op a grad_out with all strides 0."""
    case = Case(2, 16, 5, 6, device="cpu")
    x = case.x.to(torch.float32, copy=True).requires_grad_(True)
    params = [p.to(torch.float32).requires_grad_(True) for p in case.params]
    cbam(x, *params, training=True, backend="triton").sum().backward()
    fused = [x.grad] + [p.grad for p in params]
    # The references take the same all-ones gradient, materialised (the point here is the kernel's
    # handling of the stride-0 one), in every summation order: d_bn_weight and d_bn_bias are single
    # sums that cancel, whose float32 error is one random draw per order.
    case.grad = torch.ones_like(case.grad)
    exact = case.run("reference", torch.float64, True, inputs_dtype=torch.float32)
    references = [case.run("reference", torch.float32, True, variant=order) for order in SUMMATION_ORDERS]
    for i, (name, value) in enumerate(zip(NAMES[1:9], fused), start=1):
        judge(name, value, [r[i] for r in references], exact[i])


def test_ties_split_like_amax(seed):
    """Quantised x: many tied maxima over HW and over C; gradients split evenly like torch.amax."""
    case = Case(2, 32, 6, 6, device="cpu")
    case.x = torch.round(case.x * 2) / 2
    print(check_parity(case, "triton", torch.float32, True))


def test_layer_matches_reference_layer(seed):
    """CBAM(backend='triton') vs CBAM(backend='reference'): outputs, grads, running stats, counter.

    Both fp32 layers are judged against an fp64 twin (cbam_parity.judge).
    """
    fused, ref = CBAM(32, backend="triton"), CBAM(32, backend="reference")
    ref.load_state_dict(fused.state_dict())
    exact = CBAM(32, backend="reference").double()
    exact.load_state_dict(fused.state_dict())

    for step in range(2):
        x = torch.randn(2, 32, 5, 7)
        grads = []
        for layer, dtype in ((fused, torch.float32), (ref, torch.float32), (exact, torch.float64)):
            xx = x.to(dtype, copy=True).requires_grad_(True)
            layer(xx).square().sum().backward()
            grads.append(xx.grad)
        judge(f"x.grad (step {step})", *grads)
    for (name, a), (_, b), (_, e) in zip(fused.state_dict().items(), ref.state_dict().items(),
                                         exact.state_dict().items()):
        if a.is_floating_point():
            judge(name, a, b, e)
        else:
            assert torch.equal(a, b), name
    for (name, a), (_, b), (_, e) in zip(fused.named_parameters(), ref.named_parameters(), exact.named_parameters()):
        judge(f"{name}.grad", a.grad, b.grad, e.grad)
    assert int(fused.SpatialGate.spatial.bn.num_batches_tracked) == 2
    fused.eval()
    ref.eval()
    exact.eval()
    x = torch.randn(1, 32, 4, 9)
    judge("eval output", fused(x), ref(x), exact(x.double()))


def test_layer_cumulative_momentum(seed):
    fused, ref = CBAM(16, backend="triton"), CBAM(16, backend="reference")
    for m in (fused, ref):
        m.SpatialGate.spatial.bn.momentum = None
    ref.load_state_dict(fused.state_dict())
    for _ in range(3):
        x = torch.randn(2, 16, 4, 5)
        fused(x)
        ref(x)
    torch.testing.assert_close(fused.SpatialGate.spatial.bn.running_var, ref.SpatialGate.spatial.bn.running_var)
    torch.testing.assert_close(fused.SpatialGate.spatial.bn.running_mean, ref.SpatialGate.spatial.bn.running_mean)


def test_opcheck(seed):
    # train only here (opcheck runs the interpreted kernels a dozen times); the GPU tests opcheck both modes
    training = True
    case = Case(2, 16, 4, 5, device="cpu")
    x = case.x.float().requires_grad_(True)
    params = [p.float().requires_grad_(True) for p in case.params]
    running = [r.float() for r in case.running]
    args = (x, *params, *running, training, 1e-5)
    torch.library.opcheck(torch.ops.dermomamba_cbam.cbam_forward.default, args)
    outs = torch.ops.dermomamba_cbam.cbam_forward(*args)
    grad = torch.randn_like(x)
    bwd_args = (grad, x.detach(), *[p.detach() for p in params], *[o.detach() for o in outs[1:]], training)
    torch.library.opcheck(torch.ops.dermomamba_cbam.cbam_backward.default, bwd_args)
    torch.library.opcheck(torch.ops.dermomamba_cbam.update_running_stats.default,
                          (running[0].clone(), running[1].clone(), outs[4].detach(), 0.1))


def test_float64_is_refused_by_triton():
    case = Case(1, 16, 3, 3, device="cpu")
    with pytest.raises(TypeError, match="x: dtype torch.float64"):
        cbam(case.x, *case.params, training=True, backend="triton")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_multi_tile_paths(seed, monkeypatch, channels_last):
    """Several pixel tiles, conv programs and conv sub-steps per image, at interpreter-sized inputs."""
    from dermomamba_kernels.cbam import triton_kernels

    monkeypatch.setattr(triton_kernels, "MAX_WARPS_PIXEL_MAJOR", 1)
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK_P", 64)
    monkeypatch.setattr(triton_kernels, "CONV_BLOCK", 64)
    if hasattr(triton_kernels, "CONV_SUB"):
        monkeypatch.setattr(triton_kernels, "CONV_SUB", 32)
    print(check_parity(Case(2, 16, 9, 23, device="cpu"), "triton", torch.float32, True, channels_last=channels_last))
