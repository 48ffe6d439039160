"""benchmarks/bench_layers.py on the CPU: the quick mode runs both sides of every row on the cpu /
reference backends, they compute the same layer, and the table comes out complete."""

import json
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

import bench_layers  # noqa: E402
import layer_baselines  # noqa: E402
import dermomamba_kernels as dk  # noqa: E402
from dermomamba_kernels.layers import Mamba  # noqa: E402

# Both sides of a quick row run the same fp32 layer (ours on the cpu / reference scan, the baseline
# on the published layouts around selective_scan_ref): they differ by float32 summation order only.
SAME_LAYER_RTOL = 1e-5
QUICK_ROWS = [("VM-UNet", "VSSBlock"), ("VM-UNet", "SS2D"), ("UltraLight-VM-UNet", "PVM quick")]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_quick_run_writes_the_tables(seed, tmp_path, capsys, backend):
    if backend not in dk.available_backends("selective_scan", "cpu"):
        pytest.skip(dk.unavailable_reasons("selective_scan", "cpu")[backend])
    markdown, results_json = tmp_path / "layers.md", tmp_path / "layers.json"
    assert bench_layers.main(["--quick", "--backend", backend, "--markdown", markdown,
                              "--json", results_json]) == 0
    text = markdown.read_text()
    assert text in capsys.readouterr().out
    results = json.loads(results_json.read_text())

    rows = results["rows"]
    assert [(r["model"], r["layer"], r["mode"]) for r in rows] == \
        [(model, layer, mode) for model, layer in QUICK_ROWS for mode in bench_layers.MODES]
    for row in rows:
        assert row["precision"] == "fp32" and row["ours_backend"] == backend
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ours_ms"])
        assert row["rel_diff"] < SAME_LAYER_RTOL, row

    info = results["info"]
    assert not info["baseline_is_mamba_ssm"] and info["ours_backends"] == [backend]
    assert "NOT mamba-ssm" in text and info["commit"] in text
    assert f"`python benchmarks/bench_layers.py --quick --backend {backend}" in text
    header = "| " + " | ".join(c.replace("mamba-ssm", "baseline") for c in bench_layers.COLUMNS) + " |"
    table = [line for line in text.splitlines() if line.startswith("| ") and "model" not in line]
    summary_rows = len(QUICK_ROWS) * len(bench_layers.MODES)  # one per (layer, pass) at one precision
    assert header in text and len(table) == len(rows) + summary_rows
    for line in table[:len(rows)]:
        assert len(line.strip("|").split("|")) == len(bench_layers.COLUMNS), line


def test_stage_shapes_are_the_networks():
    assert layer_baselines.VMUNET_SS2D_STAGES == [(96, 64, 64), (192, 32, 32), (384, 16, 16), (768, 8, 8)]
    # UltraLight-VM-UNet's c_list [8, 16, 24, 32, 48, 64]: PVM layers from c2 at 1/8 of the input down to
    # c5 at 1/32 and back.
    assert [stage[1:] for stage in layer_baselines.ULTRALIGHT_PVM_STAGES] == [
        (24, 32, 32, 32), (32, 48, 16, 16), (48, 64, 8, 8), (64, 48, 8, 8), (48, 32, 16, 16), (32, 24, 32, 32)]


def test_pvm_layer(seed):
    layer = layer_baselines.PVMLayer(8, 12, Mamba, backend="reference")
    names = {k for k in layer.state_dict() if not k.startswith("mamba.")}
    assert names == {"norm.weight", "norm.bias", "proj.weight", "proj.bias", "skip_scale"}
    assert layer.mamba.d_model == 2
    x = torch.randn(2, 8, 3, 5)
    out = layer(x)
    assert out.shape == (2, 12, 3, 5)
    # fp16 input is taken to fp32 first, as the original does
    torch.testing.assert_close(layer(x.half()), layer(x.half().float()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="input_dim"):
        layer_baselines.PVMLayer(6, 8, Mamba)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        layer(torch.randn(2, 3, 5, 8))


def test_baseline_choices():
    with pytest.raises(dk.BackendUnavailableError, match="baseline='mamba'"):
        bench_layers.baseline_parts("mamba", torch.device("cpu"))
    with pytest.raises(ValueError, match="baseline"):
        bench_layers.baseline_parts("fast", torch.device("cpu"))
    *_, label, is_mamba = bench_layers.baseline_parts("auto", torch.device("cpu"))
    assert not is_mamba and "reference" in label


def test_published_core_needs_its_state_size():
    from dermomamba_kernels.layers import SS2D

    with pytest.raises(ValueError, match="d_state"):
        layer_baselines.use_published_core(SS2D(8, d_state=8), dk.selective_scan_ref)


def test_unpacks_split_prebuilt(tmp_path):
    import gzip

    prebuilt, target = tmp_path / "prebuilt", tmp_path / "unpacked"
    prebuilt.mkdir()
    payload = os.urandom(3000)
    packed = gzip.compress(payload)
    (prebuilt / "selective_scan_cuda.so.gz.partaa").write_bytes(packed[:1000])
    (prebuilt / "selective_scan_cuda.so.gz.partab").write_bytes(packed[1000:])
    folder = layer_baselines.unpack_prebuilt(str(prebuilt), str(target))
    assert os.path.dirname(folder) == str(target)
    assert open(os.path.join(folder, "selective_scan_cuda.so"), "rb").read() == payload
    assert layer_baselines.unpack_prebuilt(str(prebuilt), str(target)) == folder  # unpacked once
    # an unpacked .so in the prebuilt folder itself is used as it is
    (prebuilt / "selective_scan_cuda.so").write_bytes(payload)
    assert layer_baselines.unpack_prebuilt(str(prebuilt), str(target)) == str(prebuilt)
    assert layer_baselines.unpack_prebuilt(str(tmp_path / "nothing"), str(target)) is None
