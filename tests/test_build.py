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


def test_compiled_cuda_archs_are_the_requested_ones():
    """The extension reports the architectures setup.py compiled (DERMOMAMBA_CUDA_ARCHS, default 8.0;9.0)."""
    if not dk.compiled_with_cuda():
        if REQUIRE_CUDA:
            pytest.fail("dermomamba_kernels._C was built without its CUDA kernels")
        assert dk._ext.compiled_cuda_archs() == ""
        return
    requested = os.environ.get("DERMOMAMBA_CUDA_ARCHS", "8.0;9.0")
    expected = []
    for arch in requested.replace(",", ";").split(";"):
        if arch.strip():
            expected.append("sm_" + arch.strip().replace("+PTX", "").replace(".", ""))
    expected += ["compute_" + a.strip().replace("+PTX", "").replace(".", "")
                 for a in requested.replace(",", ";").split(";") if a.strip().endswith("+PTX")]
    assert dk._ext.compiled_cuda_archs() == " ".join(expected)


@pytest.mark.parametrize("capability,archs,runs", [
    ((8, 0), "sm_80 sm_90", True), ((8, 6), "sm_80 sm_90", True), ((8, 9), "sm_80 sm_90", True),
    ((9, 0), "sm_80 sm_90", True), ((7, 5), "sm_80 sm_90", False), ((10, 0), "sm_80 sm_90", False),
    ((12, 0), "sm_80 sm_90", False), ((12, 0), "sm_80 sm_90 compute_90", True), ((8, 6), "sm_90 compute_90", False),
    ((7, 0), "sm_80 compute_80", False), ((9, 0), "", True),  # an unknown build is not second-guessed
])
def test_kernel_image_rules(capability, archs, runs):
    problem = dk._ext.missing_kernel_image(capability, archs)
    assert (problem is None) == runs, problem
    if not runs:
        assert f"{capability[0]}.{capability[1]}" in problem and "DERMOMAMBA_CUDA_ARCHS" in problem


def test_auto_skips_cuda_kernels_without_code_for_the_gpu(monkeypatch):
    """A GPU the build has no code for: "auto" takes Triton, backend="cuda" raises and says why."""
    from dermomamba_kernels import _dispatch, _ext
    from dermomamba_kernels.selective_scan import selective_scan_dispatcher

    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_ext, "extension_loaded", lambda: True)
    monkeypatch.setattr(_ext, "compiled_with_cuda", lambda: True)
    monkeypatch.setattr(_ext, "_COMPILED_CUDA_ARCHS", "sm_80 sm_90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    _dispatch._missing_kernel_image.cache_clear()
    try:
        gpu = torch.device("cuda", 0)
        assert selective_scan_dispatcher.resolve("auto", gpu) == "triton"
        with pytest.raises(dk.BackendUnavailableError, match=r"compute capability 12\.0"):
            selective_scan_dispatcher.resolve("cuda", gpu)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
        _dispatch._missing_kernel_image.cache_clear()
        assert selective_scan_dispatcher.resolve("auto", gpu) == "cuda"
    finally:
        _dispatch._missing_kernel_image.cache_clear()
