"""Shared test configuration.

Inputs are fresh every run: each test gets its own seed from os.urandom, printed on failure so a
failing draw can be replayed with DERMOMAMBA_TEST_SEED=<seed>.
"""

import os

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
