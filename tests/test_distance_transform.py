"""distance_transform_edt: argument checks, scipy's conventions, the Triton kernels on CPU (through
the interpreter, in a subprocess) and on the GPU at full size.

Exactness: with unit spacing the Triton result must equal scipy's rounded to float32 bit for bit
(see tests/edt_cases.py for why, and for the bound used with other spacings).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dermomamba_kernels import BackendUnavailableError, distance_transform_edt, distance_transform_edt_ref, last_backend
from conftest import skip_unless_interpreter_runs_our_kernels
from edt_cases import assert_matches_scipy, blob_mask, edge_cases, random_mask

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --- the reference and the conventions (CPU, no Triton) ---------------------------------------

def test_reference_equals_scipy_per_image_and_whole(seed):
    generator = torch.Generator().manual_seed(seed)
    mask = random_mask((3, 1, 10, 13), 0.7, generator)
    per_image = distance_transform_edt_ref(mask)
    for b in range(3):
        want = ndimage.distance_transform_edt(mask[b, 0].numpy())
        assert np.array_equal(per_image[b, 0].numpy(), want.astype(np.float32))
    whole = distance_transform_edt_ref(mask, per_image=False)
    assert np.array_equal(whole.numpy(), ndimage.distance_transform_edt(mask.numpy()).astype(np.float32))


def test_whole_array_mode_crosses_images_and_equals_the_3d_transform(seed):
    mask = torch.ones(3, 1, 6, 7, dtype=torch.bool)
    mask[0, 0, 2, 3] = False  # the only zero, in image 0
    whole = distance_transform_edt_ref(mask, per_image=False)
    assert whole[2, 0, 2, 3] == 2.0  # two images away along the batch axis
    assert_matches_scipy(whole, mask, per_image=False)  # scipy on (B, H, W): the channel axis is inert


def test_array_without_zero_measures_to_the_point_before_the_origin():
    # scipy's rule, checked in closed form: distance to (-1, 0) in the spacing's units.
    rows, cols, spacing = 5, 7, (0.5, 2.0)
    got = distance_transform_edt_ref(torch.ones(rows, cols), sampling=spacing)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    want = np.sqrt(((i + 1) * spacing[0]) ** 2 + (j * spacing[1]) ** 2)
    assert np.array_equal(got.numpy(), want.astype(np.float32))
    assert distance_transform_edt_ref(torch.zeros(rows, cols)).abs().sum() == 0


def test_sampling_conventions_of_the_whole_array_mode(seed):
    mask = random_mask((3, 1, 6, 8), 0.6, torch.Generator().manual_seed(seed))
    two = distance_transform_edt_ref(mask, sampling=(2.0, 0.5), per_image=False)
    four = distance_transform_edt_ref(mask, sampling=(1.0, 7.0, 2.0, 0.5), per_image=False)
    assert torch.equal(two, four)  # (row, column): unit spacing across the batch; the channel's is inert
    want = ndimage.distance_transform_edt(mask.numpy(), sampling=(1.0, 1.0, 2.0, 0.5)).astype(np.float32)
    assert np.array_equal(two.numpy(), want)


def test_auto_on_cpu_uses_the_reference(seed):
    mask = random_mask((2, 9, 9), 0.5, torch.Generator().manual_seed(seed))
    out = distance_transform_edt(mask)
    assert last_backend("distance_transform_edt") in ("reference", "triton")
    assert_matches_scipy(out, mask)


@pytest.mark.parametrize("bad,error,words", [
    ([[0, 1]], TypeError, "mask: expected a torch.Tensor"),
    (torch.zeros(4, 4, dtype=torch.complex64), TypeError, "mask: dtype"),
    (torch.zeros(5), ValueError, "mask: expected shape"),
    (torch.zeros(2, 3, 4, 5), ValueError, "mask: expected shape"),
    (torch.zeros(1, 1, 2, 3, 4), ValueError, "mask: expected shape"),
])
def test_bad_mask_is_named(bad, error, words):
    with pytest.raises(error, match=words):
        distance_transform_edt(bad)


@pytest.mark.parametrize("sampling,per_image,error,words", [
    ((1.0, 2.0, 3.0), True, ValueError, "sampling: expected 2 values"),
    ((1.0,), False, ValueError, "sampling: expected 2 values"),
    ((1.0, -2.0), True, ValueError, "sampling: entry 1 must be a finite positive"),
    ((0.0, 1.0), True, ValueError, "sampling: entry 0 must be a finite positive"),
    ((1.0, float("nan")), True, ValueError, "sampling: entry 1"),
    (("a", 1.0), True, TypeError, "sampling: entry 0 must be a real number"),
    (-1.0, True, ValueError, "sampling: the spacing must be a finite positive"),
    (object(), True, TypeError, "sampling: expected None, a number or a sequence"),
])
def test_bad_sampling_is_named(sampling, per_image, error, words):
    with pytest.raises(error, match=words):
        distance_transform_edt(torch.ones(2, 4, 5), sampling=sampling, per_image=per_image)


def test_bad_per_image_and_backend_are_named():
    with pytest.raises(TypeError, match="per_image"):
        distance_transform_edt(torch.ones(4, 5), per_image="yes")
    with pytest.raises(ValueError, match="backend='fast'"):
        distance_transform_edt(torch.ones(4, 5), backend="fast")
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        distance_transform_edt(torch.ones(4, 5), backend="cuda")


@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 lets Triton run on CPU tensors")
def test_triton_on_cpu_tensors_is_unavailable_without_the_interpreter():
    with pytest.raises(BackendUnavailableError, match="Triton runs on CUDA tensors"):
        distance_transform_edt(torch.ones(4, 5), backend="triton")


def test_triton_kernels_through_the_interpreter(seed):
    """tests/edt_triton_interpreted.py in a fresh interpreter with TRITON_INTERPRET=1."""
    skip_unless_interpreter_runs_our_kernels()
    env = dict(os.environ, TRITON_INTERPRET="1", DERMOMAMBA_TEST_SEED=str(seed),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                             str(TESTS / "edt_triton_interpreted.py")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# --- GPU: the Triton kernels at full size --------------------------------------------------------

gpu = pytest.mark.gpu


@pytest.fixture
def poisoned(monkeypatch):
    from dermomamba_kernels.distance_transform import triton_edt

    monkeypatch.setattr(triton_edt, "_new_buffer",
                        lambda shape, device: torch.full(shape, float("nan"), dtype=torch.float32, device=device))


def _gpu(mask, sampling=None, per_image=True):
    out = distance_transform_edt(mask.cuda(), sampling, per_image)
    assert last_backend("distance_transform_edt") == "triton"
    assert out.is_cuda
    return out


@gpu
@pytest.mark.parametrize("per_image", [True, False])
def test_gpu_training_batch_matches_scipy(seed, poisoned, per_image):
    generator = torch.Generator().manual_seed(seed)
    shape = (16, 1, 192, 256)
    blobs = blob_mask(shape, generator)
    for mask in (blobs, ~blobs, random_mask(shape, 0.5, generator), random_mask(shape, 0.9995, generator)):
        assert_matches_scipy(_gpu(mask, per_image=per_image).cpu(), mask, per_image=per_image)


@gpu
@pytest.mark.parametrize("shape", [(1, 2048, 2048), (2047, 2049), (3, 257, 129), (1, 1000, 3), (5, 1, 31, 700),
                                   (2, 1, 1, 4097)])
def test_gpu_large_and_odd_shapes_match_scipy(seed, poisoned, shape):
    generator = torch.Generator().manual_seed(seed)
    for density in (0.99999, 0.6):
        mask = random_mask(shape, density, generator)
        for per_image in (True, False):
            assert_matches_scipy(_gpu(mask, per_image=per_image).cpu(), mask, per_image=per_image)


@gpu
def test_gpu_2048_lesion_and_single_zero(seed, poisoned):
    generator = torch.Generator().manual_seed(seed)
    mask = blob_mask((1, 1, 2048, 2048), generator)
    assert_matches_scipy(_gpu(mask).cpu(), mask)
    single = torch.ones(2048, 2048, dtype=torch.bool)
    single[int(torch.randint(2048, (1,), generator=generator)), int(torch.randint(2048, (1,), generator=generator))] = 0
    assert_matches_scipy(_gpu(single).cpu(), single)


@gpu
@pytest.mark.parametrize("name,mask", edge_cases(), ids=[name for name, _ in edge_cases()])
@pytest.mark.parametrize("per_image", [True, False])
def test_gpu_edge_cases(poisoned, name, mask, per_image):
    assert_matches_scipy(_gpu(mask, per_image=per_image).cpu(), mask, per_image=per_image)


@gpu
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float32, torch.bfloat16])
def test_gpu_mask_dtypes(seed, poisoned, dtype):
    mask = random_mask((4, 1, 67, 45), 0.8, torch.Generator().manual_seed(seed), dtype=dtype)
    assert_matches_scipy(_gpu(mask).cpu(), mask)


@gpu
@pytest.mark.parametrize("per_image,sampling", [(True, (0.7, 1.9)), (False, (1.3, 0.6)), (False, (2.0, 0.75, 1.5))])
def test_gpu_sampling(seed, poisoned, per_image, sampling):
    generator = torch.Generator().manual_seed(seed)
    for density in (0.3, 0.999, 1.0):
        mask = random_mask((6, 150, 190), density, generator)
        assert_matches_scipy(_gpu(mask, sampling, per_image).cpu(), mask, sampling, per_image)


@gpu
def test_gpu_opcheck(seed):
    mask = random_mask((2, 33, 47), 0.5, torch.Generator().manual_seed(seed)).to(torch.uint8).cuda()
    op = torch.ops.dermomamba.distance_transform_edt_triton.default
    torch.library.opcheck(op, (mask, [1.0, 1.0], True))
    torch.library.opcheck(op, (mask, [1.0, 0.5, 2.0], False))
    assert torch.equal(op(mask, [1.0, 1.0], True), distance_transform_edt(mask))
    assert torch.equal(op(mask, [1.0, 0.5, 2.0], False), distance_transform_edt(mask, (1.0, 0.5, 2.0), per_image=False))


@gpu
def test_gpu_transform_never_synchronises(seed):
    mask = blob_mask((16, 1, 192, 256), torch.Generator().manual_seed(seed)).cuda()
    distance_transform_edt(mask)  # compile outside the checked region
    distance_transform_edt(mask, per_image=False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = distance_transform_edt(mask)
        b = distance_transform_edt(mask, per_image=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_scipy(a.cpu(), mask.cpu())
    assert_matches_scipy(b.cpu(), mask.cpu(), per_image=False)


@gpu
def test_gpu_other_device_index_and_stream(seed):
    mask = random_mask((3, 40, 50), 0.7, torch.Generator().manual_seed(seed)).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = distance_transform_edt(mask)
    stream.synchronize()
    assert_matches_scipy(out.cpu(), mask.cpu())

