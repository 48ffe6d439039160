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
from adam_step_check import adam_steps, assert_adam_step_applied

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


# --- CUDA-graph columns (issue 9: "make the model run under CUDA graphs") ---------------------------

def test_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="graphs: CUDA graphs need a CUDA device"):
        bench_model.run("dermomamba_tiny", TRAIN_SIZE, "cpu", graphs=True, log=lambda line: None)
    from dermomamba.benchmark import make_graphed_forward, make_graphed_train_step

    model = create_model("dermomamba_tiny", img_size=TRAIN_SIZE)
    images, masks = random_batch(1, TRAIN_SIZE, torch.device("cpu"))
    with pytest.raises(ValueError, match="images: CUDA graphs need CUDA tensors"):
        make_graphed_train_step(model, images, masks, bce_dice_loss)
    with pytest.raises(ValueError, match="images: CUDA graphs need CUDA tensors"):
        make_graphed_forward(model, images)


def test_graph_columns_and_a_failed_capture_in_the_tables():
    """A row with graph figures gets the extra columns and the ratio; a capture that failed shows its
    error in the row instead of numbers (and the other rows still have theirs)."""
    def path(ms):
        return {"ms": ms, "peak_bytes": 2 ** 30, "launches": 7}

    train = [{"batch": 4, "precision": "fp16", "loss": "gfl", "ours": path(20.0), "published": path(100.0),
              "ours_graph": {"ms": 5.0, "peak_bytes": 2 ** 29}},
             {"batch": 16, "precision": "fp16", "loss": "gfl", "ours": path(40.0), "published": path(400.0),
              "ours_graph": {"error": "RuntimeError: operation not permitted when stream is capturing"}}]
    infer = [{"batch": 1, "precision": "fp16", "ours": dict(path(2.0), images_per_second=500.0),
              "published": dict(path(8.0), images_per_second=125.0),
              "ours_graph": {"ms": 0.5, "peak_bytes": 2 ** 28, "images_per_second": 2000.0}}]
    for row in train + infer:
        bench_model.add_ratios(row)
    assert train[0]["speedup_graph"] == pytest.approx(20.0) and train[0]["memory_ratio_graph"] == pytest.approx(0.5)
    assert "speedup_graph" not in train[1]
    results = {"info": {"model": "dermomamba", "img_size": [192, 256], "device": "cuda:0 (GPU)", "torch": "x",
                        "date": "d", "commit": "c", "command": "cmd", "published_scan": "mamba-ssm",
                        "published_scan_is_mamba_ssm": True, "repeats": 10, "warmup": 3},
               "train": train, "infer": infer}
    text = bench_model.to_markdown(results)
    from dermomamba.published_path import GRAPH_INFER_COLUMNS, GRAPH_TRAIN_COLUMNS

    assert "| " + " | ".join(bench_model.TRAIN_COLUMNS + GRAPH_TRAIN_COLUMNS) + " |" in text
    assert "| " + " | ".join(bench_model.INFER_COLUMNS + GRAPH_INFER_COLUMNS) + " |" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| 4 ") or line.startswith("| 16 ") or line.startswith("| 1 ")]
    assert rows[0][-4:] == ["5.00", "**20.00x**", "0.50", "0.50"]
    assert rows[1][-4].startswith("capture failed: RuntimeError") and rows[1][-3:] == ["-", "-", "-"]
    assert rows[2][-3:] == ["0.50", "2,000.0", "**16.00x**"]


# A replay runs eager's kernels on the same data, so it may differ from eager only as much as two eager
# runs differ from each other (the scan sums its four directions with float atomics), plus a few ulps.
ULPS = 8 * torch.finfo(torch.float32).eps


def _eager_spread_bound(first, second):
    return 2 * (first - second).abs().max().item() + ULPS * first.abs().max().item()


# fp16's GradScaler starts at 2**16 and halves on every step whose gradients overflow, skipping that step:
# a handful of replays may be skipped before the scale settles (eager training does the same).
MAX_REPLAYS = 24


@pytest.mark.gpu
@pytest.mark.parametrize("precision,loss", [("fp32", "bce_dice"), ("fp16", "gfl")])
def test_graphed_train_step_replays_on_new_batches(seed, float32_without_tf32, precision, loss):
    """The captured step (fused capturable Adam, under fp16 the GradScaler on the device, the Guide
    Fusion Loss's GPU distance transform inside) replays on fresh batches copied into its inputs: each
    replay's loss is the eager loss at the weights the replay started from; each replay applies Adam's
    update to every weight, or (fp16, an overflow the scaler caught) to none; in fp32 every replay
    steps, in fp16 the replays after the scale has settled do."""
    from dermomamba.benchmark import make_graphed_train_step
    from dermomamba.loss import GuideFusionLoss

    device = torch.device("cuda")
    model = create_model("dermomamba_tiny", img_size=SMALL).to(device)
    criterion = GuideFusionLoss("published") if loss == "gfl" else bce_dice_loss
    images, masks = random_batch(2, SMALL, device)
    step = make_graphed_train_step(model, images, masks, criterion, precision)

    def eager_loss(state, batch_images, batch_masks, autocast=precision == "fp16"):
        check = create_model("dermomamba_tiny", img_size=SMALL).to(device).train()
        check.load_state_dict(state)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            logits = check(batch_images)
        return criterion(logits.float(), batch_masks)

    parameters = dict(model.named_parameters())
    stepped_replays = 0
    for replay in range(MAX_REPLAYS):
        fresh_images, fresh_masks = random_batch(2, SMALL, device)
        images.copy_(fresh_images)
        masks.copy_(fresh_masks)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        steps_before = adam_steps(step.optimizer)
        replayed = step().clone()
        torch.cuda.synchronize()
        if replay < 3:
            first, second = (eager_loss(before, fresh_images, fresh_masks) for _ in range(2))
            assert torch.isfinite(replayed)
            bound = _eager_spread_bound(first, second)
            if precision == "fp16":
                # Under fp16 a run-dependent float32 sum (the scan's atomics) now and then flips an fp16
                # rounding downstream: a discrete event, a few per run at this size, so two eager draws
                # may happen to agree (seen on an H100: replay 9.6e-6 off, the eager pair 7.5e-8 apart).
                # fp16's own error on this loss (eager fp16 against eager fp32) is what such flips add up
                # to at most; a replay on stale inputs is off by orders of magnitude more.
                fp16_error = (first - eager_loss(before, fresh_images, fresh_masks, autocast=False)).abs().item()
                bound = max(bound, fp16_error)
            assert (replayed - first).abs().item() <= bound, (replayed, first, second)
        # Adam's update of every weight, from its state after the step; a step GradScaler skipped (fp16
        # overflow) moves none. Whether a weight "moved" is not the test: one whose gradient is far below
        # Adam's eps stays put, one with a zero gradient and momentum moves.
        stepped = assert_adam_step_applied(step.optimizer, parameters.items(), before, steps_before)
        assert stepped in (0, len(parameters)), f"replay {replay}: {stepped} of {len(parameters)} weights stepped"
        if precision == "fp32":
            assert stepped == len(parameters), f"replay {replay}: an fp32 step was skipped"
        stepped_replays += stepped > 0
        if stepped_replays >= 3:
            break
    assert stepped_replays >= 3, f"only {stepped_replays} of {MAX_REPLAYS} replays updated the weights"
    assert all(torch.isfinite(p).all() for p in parameters.values())


@pytest.mark.gpu
def test_graphed_forward_matches_eager(seed):
    from dermomamba.benchmark import make_forward, make_graphed_forward

    device = torch.device("cuda")
    model = create_model("dermomamba_tiny", img_size=SMALL).to(device).eval()
    images, _ = random_batch(2, SMALL, device)
    forward = make_graphed_forward(model, images, "fp32")
    fresh, _ = random_batch(2, SMALL, device)
    images.copy_(fresh)
    replayed = forward().clone()
    first, second = make_forward(model, fresh, "fp32")().clone(), make_forward(model, fresh, "fp32")().clone()
    assert (replayed - first).abs().max().item() <= _eager_spread_bound(first, second)
