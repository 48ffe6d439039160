"""The Triton distance transform on the CPU through the Triton interpreter (small masks).

Not collected by a plain ``pytest tests`` (its name does not start with ``test_``):
tests/test_distance_transform.py runs it in a subprocess, because TRITON_INTERPRET must be set
before triton is first imported and must not leak into the other test modules.

Speed: the interpreter runs ``tl.associative_scan`` with a user combine function one element at a
time in Python (only sum and product go to numpy), which made these tests take minutes. The
fixture below hands the kernels' two combine functions (max, min) to numpy's ``accumulate``,
which computes the same scan; the kernels' code is unchanged. One test keeps the interpreter's own
scan to show both agree.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from dermomamba_kernels import distance_transform_edt, last_backend  # noqa: E402
from dermomamba_kernels.distance_transform import triton_edt  # noqa: E402
from edt_cases import assert_matches_scipy, blob_mask, edge_cases, random_mask  # noqa: E402


_interpreter_scan = interpreter.ScanOps.apply_impl
_NUMPY_SCANS = {triton_edt._maximum: np.maximum, triton_edt._minimum: np.minimum}


def _numpy_scan(self, input):
    ufunc = _NUMPY_SCANS.get(self.combine_fn)
    if ufunc is None or len(input) != 1:
        return _interpreter_scan(self, input)
    data = input[0].handle.data
    if self.reverse:
        data = np.flip(data, self.axis)
    out = ufunc.accumulate(data, axis=self.axis)
    if self.reverse:
        out = np.flip(out, self.axis)
    return [self.to_tensor(np.ascontiguousarray(out), input[0].dtype)]


@pytest.fixture(autouse=True)
def numpy_scans(monkeypatch):
    monkeypatch.setattr(interpreter.ScanOps, "apply_impl", _numpy_scan)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels get starts as NaN, so an unwritten element cannot pass."""
    monkeypatch.setattr(triton_edt, "_new_buffer",
                        lambda shape, device: torch.full(shape, float("nan"), dtype=torch.float32, device=device))


def _triton(mask, sampling=None, per_image=True):
    out = distance_transform_edt(mask, sampling, per_image, backend="triton")
    assert last_backend("distance_transform_edt") == "triton"
    return out


# Shapes with lengths below, at and above the tile sizes (scan chunk 128, min-plus tiles 32 x 64).
SHAPES = [(1, 1), (13, 8), (1, 130), (70, 1), (2, 33, 65), (1, 1, 29, 131), (3, 1, 17, 23)]
DENSITIES = (0.01, 0.3, 0.9, 0.995)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_image", [True, False])
def test_random_masks_match_scipy(seed, shape, per_image):
    generator = torch.Generator().manual_seed(seed)
    # Two of the densities per run (fresh each run) keep the interpreter's time down.
    for index in torch.randperm(len(DENSITIES), generator=generator)[:2].tolist():
        mask = random_mask(shape, DENSITIES[index], generator)
        assert_matches_scipy(_triton(mask, per_image=per_image), mask, per_image=per_image)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32, torch.float16, torch.float64])
def test_mask_dtypes(seed, dtype):
    mask = random_mask((2, 1, 19, 27), 0.7, torch.Generator().manual_seed(seed), dtype=dtype)
    assert_matches_scipy(_triton(mask), mask)


@pytest.mark.parametrize("name,mask", edge_cases(), ids=[name for name, _ in edge_cases()])
@pytest.mark.parametrize("per_image", [True, False])
def test_edge_cases(name, mask, per_image):
    assert_matches_scipy(_triton(mask, per_image=per_image), mask, per_image=per_image)


@pytest.mark.parametrize("per_image,sampling", [(True, (0.7, 1.9)), (True, (2.5, 0.3)), (False, (1.3, 0.6)),
                                                (False, (2.0, 0.75, 1.5))])
def test_sampling(seed, per_image, sampling):
    generator = torch.Generator().manual_seed(seed)
    shape = (3, 14, 21)
    for density in (0.05, 0.8, 1.0):
        mask = random_mask(shape, density, generator)
        assert_matches_scipy(_triton(mask, sampling, per_image), mask, sampling, per_image)


def test_lesion_like_batch_whole_array_mode(seed):
    mask = blob_mask((4, 1, 24, 32), torch.Generator().manual_seed(seed))
    for target in (mask, ~mask):
        assert_matches_scipy(_triton(target, per_image=False), target, per_image=False)


def test_non_contiguous_input(seed):
    base = random_mask((2, 40, 30), 0.6, torch.Generator().manual_seed(seed))
    view = base.transpose(1, 2)[:, ::2]
    assert not view.is_contiguous()
    assert_matches_scipy(_triton(view), view)


def test_custom_op_opcheck(seed):
    mask = random_mask((2, 9, 12), 0.5, torch.Generator().manual_seed(seed)).to(torch.uint8)
    op = torch.ops.dermomamba.distance_transform_edt_triton.default
    torch.library.opcheck(op, (mask, [1.0, 1.0], True))
    torch.library.opcheck(op, (mask, [1.0, 2.0, 0.5], False))
    # The op and the eager path run the same kernels.
    assert torch.equal(op(mask, [1.0, 1.0], True), _triton(mask))
    assert torch.equal(op(mask, [1.0, 2.0, 0.5], False), _triton(mask, (1.0, 2.0, 0.5), per_image=False))


def test_zero_gradient_for_float_mask_requiring_grad(seed):
    mask = random_mask((1, 7, 9), 0.5, torch.Generator().manual_seed(seed), dtype=torch.float32).requires_grad_()
    out = _triton(mask)
    assert not out.requires_grad or out.grad_fn is not None
    if out.requires_grad:
        out.sum().backward()
        assert mask.grad is None or torch.count_nonzero(mask.grad) == 0


def test_interpreter_own_scan_agrees(seed, monkeypatch):
    monkeypatch.setattr(interpreter.ScanOps, "apply_impl", _interpreter_scan)
    mask = random_mask((2, 6, 9), 0.6, torch.Generator().manual_seed(seed))
    assert_matches_scipy(_triton(mask), mask)


def test_empty_batch():
    out = _triton(torch.zeros(0, 5, 6, dtype=torch.bool))
    assert out.shape == (0, 5, 6) and out.dtype == torch.float32


def test_compiles_with_fullgraph(seed):
    from dermomamba.loss import GuideFusionLoss

    generator = torch.Generator().manual_seed(seed)
    mask = random_mask((2, 1, 9, 12), 0.5, generator)
    edt = torch.compile(lambda m: distance_transform_edt(m, backend="triton"), fullgraph=True, backend="aot_eager")
    assert torch.equal(edt(mask), distance_transform_edt(mask, backend="triton"))
    loss_fn = GuideFusionLoss("published", backend="triton")
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    pred = torch.randn(2, 1, 9, 12, generator=generator, requires_grad=True)
    assert torch.allclose(compiled(pred, mask.float()), loss_fn(pred, mask.float()), rtol=0, atol=0)
