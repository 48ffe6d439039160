"""Shared test configuration.

Inputs are fresh every run: each test gets its own seed from os.urandom, printed on failure so a
failing draw can be replayed with DERMOMAMBA_TEST_SEED=<seed>.
"""

import os
import subprocess
import sys

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The CBAM and distance-transform Triton kernels are checked under the interpreter of Triton 3.8 (the
# version CI installs). Triton 3.6's interpreter (the GPU machine's) stops on them inside its own launch
# code, before any of our arithmetic runs: "TypeError: only 0-dimensional arrays can be converted to Python
# scalars" (seen 2026-11-27 on the first kernel launched). There the compiled kernels are tested on the GPU.
INTERPRETER_MIN_TRITON = (3, 8)


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


def skip_unless_interpreter_runs_our_kernels():
    version = _triton_version()
    if version is None:
        pytest.skip("triton is not installed")
    if version < INTERPRETER_MIN_TRITON:
        pytest.skip(f"Triton {'.'.join(map(str, version))}'s interpreter cannot launch these kernels (needs "
                    f">= {'.'.join(map(str, INTERPRETER_MIN_TRITON))}); the compiled kernels are tested on the GPU")


def run_interpreter_cases(test_file: str, cases_env: str, unset=(), keyword: str = "test_interp_", timeout: int = 900):
    """Runs the ``keyword`` tests of ``test_file`` in a fresh process under ``TRITON_INTERPRET=1`` (the
    interpreter is chosen when Triton is first imported, so it needs its own process), with ``cases_env=1``
    telling that file it is the interpreter run, and the variables in ``unset`` removed; fails with the
    output tail if any case fails, or if none ran."""
    skip_unless_interpreter_runs_our_kernels()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(test_file)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1", **{cases_env: "1"})
    for variable in unset:
        env.pop(variable, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", test_file,
           "-k", keyword]
    result = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"interpreter cases failed:\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2], result.stdout[-3000:]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def seed(request):
    """A fresh seed per test (or DERMOMAMBA_TEST_SEED), applied to torch's global generator."""
    value = int(os.environ.get("DERMOMAMBA_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    yield value


@pytest.fixture
def float32_without_tf32():
    """cuDNN runs float32 convolutions in TF32 by default (10-bit mantissa). A graph that picks other
    convolution algorithms than eager (inductor, a CUDA-graph capture) then errs independently at TF32's
    level (seen 2026-11-27: a reduce-overhead loss 3.1e-5 from the float64 truth against eager's 1.3e-5; a
    replayed step's loss 1.8e-5 from eager's), which says nothing about the graph. Tests that judge float32
    arithmetic take this fixture and run without TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"DERMOMAMBA_TEST_SEED={value}"))


def pytest_runtest_logreport(report):
    """Append each failure to $DERMOMAMBA_FAILURE_LOG as it happens.

    On the GPU machine the suite runs under a wall-clock limit; a run cut short never prints pytest's
    summary, so failures are written out the moment their report arrives (under xdist, in the
    controller process).
    """
    path = os.environ.get("DERMOMAMBA_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
