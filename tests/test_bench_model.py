"""benchmarks/bench_model.py on the CPU: the published path computes the same network as ours, and one
quick run of both paths gives every column of the issue-9 table.

The published path (bench_scan's published cross-scan around our reference 1-D loop, bench_cbam's
unfused CBAM) and our model are both judged against the float64 run of the independent transcription
of the published network (tests/published_transcription.py): each may be off by at most
ERROR_FACTOR times what the transcription itself makes in float32, plus a few float32 ulps.
"""

import os
import sys

import pytest
import torch

import published_transcription as plain

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import bench_model  # noqa: E402
from bench_cbam import PublishedCBAM  # noqa: E402
from dermomamba.benchmark import bce_dice_loss, count_launches, make_train_step, random_batch  # noqa: E402
from dermomamba.models import create_model  # noqa: E402
from dermomamba_kernels import BackendUnavailableError  # noqa: E402
from dermomamba_kernels.layers import CBAM  # noqa: E402

ERROR_FACTOR = 2.0
FLOOR = 4 * torch.finfo(torch.float32).eps
# Bottleneck 1x2: H != W everywhere, and the smallest size the model takes.
SMALL = (32, 64)
# Batch 1 trains here (bottleneck 2x2: BatchNorm sees more than one value per channel).
TRAIN_SIZE = (64, 64)


def as_float64(state):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in state.items()}


def test_published_path_matches_ours_to_float32_rounding(seed):
    paths, info = bench_model.build_paths("dermomamba_tiny", SMALL, torch.device("cpu"), "reference")
    assert not info["published_scan_is_mamba_ssm"] and "NOT mamba-ssm" in info["published_scan"]
    ours, published = paths["ours"][0], paths["published"][0]
    state = plain.perturbed(ours.state_dict())
    ours.load_state_dict(state)
    published.load_state_dict(state)
    # The swap happened: no fused CBAM left, every SS2D core rerouted.
    assert not any(isinstance(m, CBAM) for m in published.modules())
    assert sum(isinstance(m, PublishedCBAM) for m in published.modules()) == 5
    assert all("scan" in vars(m) for m in published.modules() if type(m).__name__ == "SS2D")
    assert not any("scan" in vars(m) for m in ours.modules() if type(m).__name__ == "SS2D")

    x = torch.randn(2, 3, *SMALL)
    with torch.no_grad():
        out_ours, out_published = ours.eval()(x), published.eval()(x)
    oracle = plain.dermomamba(x.double(), as_float64(state))
    baseline = plain.relative_error(plain.dermomamba(x, state), oracle)
    for name, out in (("ours", out_ours), ("published", out_published)):
        assert torch.isfinite(out).all(), name
        error = plain.relative_error(out, oracle)
        assert error <= ERROR_FACTOR * baseline + FLOOR, (name, error, baseline)


def test_one_quick_run_fills_every_column(seed):
    results = bench_model.run("dermomamba_tiny", TRAIN_SIZE, "cpu", train_batches=(1,), infer_batches=(1,),
                              precisions=("fp32", "fp16"), losses=("gfl", "bce_dice"), warmup=0, repeats=1,
                              published_scan="reference", launches=False, log=lambda line: None)
    assert [(r["batch"], r["precision"], r["loss"]) for r in results["train"]] == [(1, "fp32", "gfl"),
                                                                                     (1, "fp32", "bce_dice")]
    for row in results["train"] + results["infer"]:
        for path in bench_model.PATHS:
            assert row[path]["ms"] > 0 and row[path]["peak_bytes"] is None
        assert row["speedup"] == pytest.approx(row["published"]["ms"] / row["ours"]["ms"])
    assert results["infer"][0]["ours"]["images_per_second"] > 0

    results["info"].update(date="2026-01-01 00:00 UTC", commit="abc1234", command="python benchmarks/bench_model.py")
    text = bench_model.to_markdown(results)
    assert "not the mamba-ssm baseline" in text and "abc1234" in text and "`python benchmarks/bench_model.py`" in text
    tables = [line for line in text.splitlines() if line.startswith("| batch")]
    assert tables == ["| " + " | ".join(bench_model.TRAIN_COLUMNS) + " |",
                      "| " + " | ".join(bench_model.INFER_COLUMNS) + " |"]
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| batch"):
            columns = bench_model.TRAIN_COLUMNS if "Guide Fusion" in line or "BCE+Dice" in line \
                else bench_model.INFER_COLUMNS
            assert len(line.strip("|").split("|")) == len(columns), line


def test_cli_options_and_plot(tmp_path, monkeypatch):
    parser = bench_model.build_parser()
    args = parser.parse_args([])
    assert (args.train_batches, args.infer_batches, args.precisions) == ([4, 16], [1, 16, 64], ["fp32", "fp16"])
    assert tuple(args.img_size) == (192, 256) and args.model == "dermomamba"

    row = {"ms": 2.0, "peak_bytes": None}
    results = {"info": {"model": "dermomamba_tiny", "img_size": [64, 64], "device": "cpu", "commit": "x",
                        "date": "d"},
               "train": [{"batch": b, "precision": "fp32", "loss": "gfl", "ours": dict(row),
                          "published": {"ms": 10.0 * b, "peak_bytes": None}} for b in (1, 2)]}
    target = tmp_path / "steps.png"
    bench_model.plot(results, str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_counts_operators_of_a_step_on_the_cpu(seed):
    model = create_model("dermomamba_tiny", img_size=TRAIN_SIZE)
    images, masks = random_batch(1, TRAIN_SIZE, torch.device("cpu"))
    count, what = count_launches(make_train_step(model, images, masks, bce_dice_loss), torch.device("cpu"))
    assert what == "ATen ops" and count > 100


def test_mamba_scan_required_but_missing_is_an_error():
    with pytest.raises(BackendUnavailableError, match="published_scan='mamba'"):
        bench_model.published_scan_fn("mamba", torch.device("cpu"))
    with pytest.raises(ValueError, match="published_scan"):
        bench_model.published_scan_fn("fast", torch.device("cpu"))


def test_cli_compare_published_on_the_cpu_prints_both_paths(seed, capsys):
    """``dermomamba benchmark --compare-published`` from the package: the CPU's quick settings (fp32 only,
    no launch counts, the reference loop in the published layout) unless a flag says otherwise."""
    from dermomamba.cli import main

    # One loss and one inference batch keep the published path's loop scan to a few seconds.
    assert main(["benchmark", "--compare-published", "--model", "dermomamba_tiny", "--img-size", 64, 64,
                 "--device", "cpu", "--losses", "bce_dice", "--infer-batches", 1, "--warmup", 0, "--steps", 1]) == 0
    out = capsys.readouterr().out
    assert "ours vs the published code path (dermomamba_tiny, 64x64)" in out
    assert "NOT mamba-ssm" in out and "`dermomamba benchmark --compare-published" in out
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("| batch")] == [
        "| " + " | ".join(bench_model.TRAIN_COLUMNS) + " |", "| " + " | ".join(bench_model.INFER_COLUMNS) + " |"]
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| 1 ")]
    assert len(rows) == 2, out
    train, infer = ([cell.strip() for cell in row] for row in rows)
    assert train[:3] == ["1", "fp32", "BCE+Dice"] and infer[:2] == ["1", "fp32"]
    # Both paths measured: positive times on each side, and no launch counts on the CPU by default.
    for row, (ours, published) in ((train, (3, 4)), (infer, (2, 3))):
        assert float(row[ours].replace(",", "")) > 0 and float(row[published].replace(",", "")) > 0
        assert row[-2:] == ["-", "-"]


def test_cli_compare_only_flags_need_compare_published(capsys):
    from dermomamba.cli import main

    assert main(["benchmark", "--device", "cpu", "--published-scan", "reference", "--losses", "gfl"]) == 1
    assert "--losses, --published-scan only go with --compare-published" in capsys.readouterr().err
