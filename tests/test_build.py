"""The build itself: the compiled extension is present and registers its ops.

CI sets DERMOMAMBA_REQUIRE_CUDA_EXTENSION=1 (nvcc and a CUDA build of torch are there), so a broken
CUDA build fails here instead of passing as a silent pure-Python install.
"""

import os

import pytest
import torch

import dermomamba_kernels as dk

REQUIRE_CUDA = os.environ.get("DERMOMAMBA_REQUIRE_CUDA_EXTENSION") == "1"


def test_extension_present_when_required():
    if not REQUIRE_CUDA and not dk.extension_loaded():
        pytest.skip(f"extension not built here: {dk.extension_error()}")
    assert dk.extension_loaded(), dk.extension_error()
    if REQUIRE_CUDA:
        assert dk.compiled_with_cuda(), "dermomamba_kernels._C was built without its CUDA kernels"


def test_op_schemas_registered():
    if not dk.extension_loaded():
        pytest.skip(f"extension not built here: {dk.extension_error()}")
    for name in ("selective_scan_fwd", "selective_scan_bwd", "multiaxial_scan_fwd", "multiaxial_scan_bwd"):
        assert hasattr(torch.ops.dermomamba, name), name


def test_unknown_backend_is_an_error():
    u = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="backend"):
        dk.selective_scan_fn(u, u.abs(), -torch.ones(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3),
                             backend="fastest")


def test_backend_environment_variable_is_validated(monkeypatch):
    monkeypatch.setenv(dk.BACKEND_ENV_VAR, "gpu-please")
    u = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=dk.BACKEND_ENV_VAR):
        dk.selective_scan_fn(u, u.abs(), -torch.ones(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3))


def test_cuda_backend_on_cpu_tensors_says_why():
    u = torch.randn(1, 2, 3)
    with pytest.raises(dk.BackendUnavailableError, match="cuda"):
        dk.selective_scan_fn(u, u.abs(), -torch.ones(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3),
                             backend="cuda")
