"""The profiling and policy tools of benchmarks/ on the CPU (tiny model): they run end to end and print what their
GPU runs are read for (the eval-forward profile, the inference columns), and the kernel-choosing environment
variables a policy row sets are restored when the run ends."""

import os
import re
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_step_policies  # noqa: E402
import profile_step  # noqa: E402

TINY = ["--model", "dermomamba_tiny", "--img-size", "32", "64"]


@pytest.mark.parametrize("graph_kernels", [False, True], ids=["eager-kernels", "graph-kernels"])
def test_profile_step_profiles_the_eval_forward(capsys, graph_kernels):
    args = TINY + ["--batches", "1", "--precision", "fp32", "--steps", "1", "--top", "8", "--inference",
                   "--device", "cpu"] + (["--graph-kernels"] if graph_kernels else [])
    assert profile_step.main(args) == 0
    out = capsys.readouterr().out
    assert "batch 1 fp32 loss none (inference)" in out
    # The forward's own ops are in the table; no backward or optimizer op is.
    assert "multiaxial_scan_fwd" in out
    assert "multiaxial_scan_bwd" not in out and "Optimizer.step" not in out


def test_profile_step_still_profiles_the_training_step(capsys):
    args = TINY + ["--batches", "1", "--precision", "fp32", "--steps", "1", "--top", "60", "--loss", "bce_dice",
                   "--device", "cpu"]
    assert profile_step.main(args) == 0
    out = capsys.readouterr().out
    assert "loss bce_dice" in out and "multiaxial_scan_bwd" in out


def test_step_policies_inference_columns_and_restored_environment(capsys, monkeypatch):
    monkeypatch.delenv("DERMOMAMBA_SCAN_FWD_KERNEL", raising=False)
    monkeypatch.setenv("DERMOMAMBA_BATCHNORM_BACKEND", "native")
    bench_step_policies.main(TINY + ["--batch", "1", "--precision", "fp32", "--repeats", "1", "--warmup", "1",
                                     "--configs", "defaults", "flat-fwd", "--inference-batch", "2",
                                     "--no-global-warmup", "--device", "cpu"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(lines) == 4, lines  # header, separator, two rows
    header, row = lines[0], lines[2]
    assert "inference b2 eager ms" in header and "inference b2 graph ms" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len([c for c in header.strip("|").split("|")])
    # eager training ms and inference eager ms are numbers; the graph columns are "-" on the CPU.
    assert re.fullmatch(r"\d+\.\d\d", cells[3]) and re.fullmatch(r"\d+\.\d\d", cells[7]), cells
    assert cells[5] == "-" and cells[8] == "-", cells
    # The flat-fwd row set the scan kernel and the rows cleared the BatchNorm choice; both are back as they were.
    assert "DERMOMAMBA_SCAN_FWD_KERNEL" not in os.environ
    assert os.environ["DERMOMAMBA_BATCHNORM_BACKEND"] == "native"


def test_step_policies_flat_row_sets_the_forward_kernel(monkeypatch):
    """The flat-fwd row names the v6 forward through the variable the C++ op reads on every call."""
    config = {c[0]: c for c in bench_step_policies.CONFIGS}["flat-fwd"]
    forced = config[4]
    assert {bench_step_policies.KERNEL_VARIABLES[k]: v for k, v in forced.items()} == {
        "DERMOMAMBA_SCAN_FWD_KERNEL": "flat"}
