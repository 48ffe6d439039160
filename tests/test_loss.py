"""GuideFusionLoss against a direct numpy/scipy computation of the published formula.

Tolerances are measured, not chosen: the loss and its gradient (float32) must be as close to a
float64 evaluation of the formula as the same formula evaluated in float32 by torch, within a
factor 2 (plus a few float32 ulps of the value's scale, so that an exact float32 reference cannot
make the bound zero).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from dermomamba.loss import DICE_SMOOTH, GuideFusionLoss, boundary_attention
from edt_cases import blob_mask

FLOAT32_ULP = 2.0 ** -23


def scipy_attention(target, per_image):
    t = target.detach().cpu().numpy()
    if per_image:
        edt = lambda a: np.stack([ndimage.distance_transform_edt(image[0])[None] for image in a])  # noqa: E731
    else:
        edt = ndimage.distance_transform_edt  # the whole (B, 1, H, W) array, as the released code did
    return 1.0 / (1.0 + edt(t == 0) + edt(t == 1))


def numpy_loss(pred, target, mode):
    """The formula of the spec in float64 numpy, with scipy's transform."""
    x = pred.detach().cpu().double().numpy()
    t = target.detach().cpu().double().numpy()
    p = 1.0 / (1.0 + np.exp(-x))
    dice = 1.0 - (2.0 * np.sum(p * t) + DICE_SMOOTH) / (np.sum(p) + np.sum(t) + DICE_SMOOTH)
    z = x if mode == "per_image" else p
    bce = np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))
    att = scipy_attention(target, mode == "per_image")
    return float(np.mean(bce + dice * att))


def torch_literal(pred, target, mode, dtype):
    """The same formula with torch autograd in ``dtype``, the attention map from scipy."""
    x = pred.detach().to(dtype).requires_grad_()
    t = target.detach().to(dtype)
    p = torch.sigmoid(x)
    dice = 1 - (2 * (p * t).sum() + DICE_SMOOTH) / (p.sum() + t.sum() + DICE_SMOOTH)
    bce = F.binary_cross_entropy_with_logits(x if mode == "per_image" else p, t)
    att = torch.from_numpy(scipy_attention(target, mode == "per_image")).to(dtype).to(x.device)
    loss = torch.mean(bce + dice * att)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def targets(generator, shape):
    blobs = blob_mask(shape, generator).float()
    soft = blobs.clone()
    soft[..., ::3, :] *= torch.rand(soft[..., ::3, :].shape, generator=generator)  # values strictly in (0, 1)
    mixed = blobs.clone()
    mixed[0] = 1.0  # a full image next to lesions: whole-array distances cross into it
    if shape[0] > 1:
        mixed[-1] = 0.0
    return {"blobs": blobs, "soft": soft, "mixed": mixed, "empty": torch.zeros(shape), "full": torch.ones(shape),
            "random": (torch.rand(shape, generator=generator) < 0.4).float()}


def _check_against_formula(loss_fn, pred, target, mode):
    x = pred.clone().requires_grad_()
    loss = loss_fn(x, target)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    exact = numpy_loss(pred, target, mode)
    ref64_loss, ref64_grad = torch_literal(pred.cpu(), target.cpu(), mode, torch.float64)
    ref32_loss, ref32_grad = torch_literal(pred.cpu(), target.cpu(), mode, torch.float32)
    assert abs(ref64_loss.item() - exact) <= 1e-12 * max(1.0, abs(exact))  # the two float64 forms agree
    loss_bound = 2 * abs(ref32_loss.item() - exact) + 4 * FLOAT32_ULP * abs(exact)
    assert abs(loss.item() - exact) <= loss_bound, (loss.item(), exact)
    grad = x.grad.cpu().double()
    grad_scale = ref64_grad.abs().max().item()
    grad_bound = 2 * (ref32_grad.double() - ref64_grad).abs().max().item() + 4 * FLOAT32_ULP * grad_scale
    assert (grad - ref64_grad).abs().max().item() <= grad_bound


@pytest.mark.parametrize("mode", ["published", "per_image"])
def test_loss_matches_the_formula(seed, mode):
    generator = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 5, (1,), generator=generator))
    shape = (batch, 1, 21, 34)
    loss_fn = GuideFusionLoss(mode)
    for name, target in targets(generator, shape).items():
        pred = 3 * torch.randn(shape, generator=generator)
        _check_against_formula(loss_fn, pred, target, mode)


def test_published_mode_depends_on_batch_neighbours(seed):
    # The quirk the published mode keeps: a full image's attention is measured to its neighbour.
    generator = torch.Generator().manual_seed(seed)
    target = blob_mask((2, 1, 16, 20), generator).float()
    target[1] = 1.0
    published = boundary_attention(target, per_image=False)
    per_image = boundary_attention(target, per_image=True)
    assert not torch.equal(published[1], per_image[1])


def test_attention_needs_no_gradient(seed):
    target = blob_mask((2, 1, 12, 15), torch.Generator().manual_seed(seed)).float().requires_grad_()
    att = boundary_attention(target)
    assert not att.requires_grad
    assert ((att > 0) & (att <= 1)).all()


def test_half_precision_logits_compute_in_float32(seed):
    generator = torch.Generator().manual_seed(seed)
    target = blob_mask((2, 1, 16, 24), generator).float()
    pred = torch.randn(2, 1, 16, 24, generator=generator).half()
    for mode in ("published", "per_image"):
        loss_fn = GuideFusionLoss(mode)
        assert torch.equal(loss_fn(pred, target), loss_fn(pred.float(), target))


def test_bool_and_integer_targets(seed):
    generator = torch.Generator().manual_seed(seed)
    target = blob_mask((3, 1, 14, 18), generator)
    pred = torch.randn(3, 1, 14, 18, generator=generator)
    loss_fn = GuideFusionLoss()
    want = loss_fn(pred, target.float())
    assert torch.equal(loss_fn(pred, target), want)
    assert torch.equal(loss_fn(pred, target.long()), want)


def test_three_dimensional_input(seed):
    generator = torch.Generator().manual_seed(seed)
    target = blob_mask((2, 1, 14, 18), generator).float()
    pred = torch.randn(2, 1, 14, 18, generator=generator)
    for mode in ("published", "per_image"):
        loss_fn = GuideFusionLoss(mode)
        assert torch.allclose(loss_fn(pred[:, 0], target[:, 0]), loss_fn(pred, target), rtol=0, atol=0)


@pytest.mark.parametrize("pred,target,error,words", [
    (torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 5), ValueError, "target: shape"),
    (torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), ValueError, "pred: expected shape"),
    (torch.randn(4, 4), torch.zeros(4, 4), ValueError, "pred: expected shape"),
    (torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(2, 1, 4, 4), TypeError, "pred: expected real floating"),
    ([1.0], torch.zeros(1), TypeError, "pred: expected a torch.Tensor"),
    (torch.randn(2, 1, 4, 4), np.zeros((2, 1, 4, 4)), TypeError, "target: expected a torch.Tensor"),
])
def test_bad_inputs_are_named(pred, target, error, words):
    with pytest.raises(error, match=words):
        GuideFusionLoss()(pred, target)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode: expected one of published, per_image"):
        GuideFusionLoss("paper")


# --- GPU -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["published", "per_image"])
def test_gpu_loss_matches_the_formula(seed, mode):
    generator = torch.Generator().manual_seed(seed)
    shape = (16, 1, 192, 256)
    loss_fn = GuideFusionLoss(mode)
    for name, target in targets(generator, shape).items():
        pred = 3 * torch.randn(shape, generator=generator)
        _check_against_formula(loss_fn, pred.cuda(), target.cuda(), mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["published", "per_image"])
def test_gpu_loss_never_synchronises(seed, mode):
    from dermomamba_kernels import last_backend

    generator = torch.Generator().manual_seed(seed)
    target = blob_mask((16, 1, 192, 256), generator).float().cuda()
    pred = torch.randn(16, 1, 192, 256, generator=generator).cuda().requires_grad_()
    loss_fn = GuideFusionLoss(mode)
    loss_fn(pred, target).backward()  # compile the kernels outside the checked region
    pred.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = loss_fn(pred, target)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert last_backend("distance_transform_edt") == "triton"
    assert torch.isfinite(loss).item() and torch.isfinite(pred.grad).all().item()
