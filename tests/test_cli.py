"""End to end on the CPU: the `dermomamba` command trains, resumes, evaluates and predicts on small generated
folders in each layout; bad data gets errors that name the file; a two-process DDP run (gloo)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dermomamba.cli import main
from dermomamba.config import DEMO_OVERRIDES, TrainConfig, resolve_config
from dermomamba.data import SegmentationDataset, discover, write_synthetic_dataset
from dermomamba.train import TRAIN_STATE_JSON, TRAIN_STATE_TENSORS

import dermomamba

# Where the dermomamba under test was imported from (the tree with PYTHONPATH, else the installed package):
# torchrun's worker processes must import the same one, with its compiled extension.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(dermomamba.__file__)))
# Small and fast: the tiny model at 32x64, 8 images of assorted sizes, 2 training steps per epoch.
IMG = ["--img-size", "32", "64"]
SIZES = [(41, 57), (30, 66), (64, 48), (35, 35)]
# The CPU on every machine, GPU machines included: these tests pin down behaviour (exact resume, gloo DDP)
# that only the CPU's deterministic kernels guarantee bit for bit.
FAST = ["--device", "cpu", "--model", "dermomamba_tiny", *IMG, "--batch-size", "2", "--eval-batch-size", "4", "--workers", "0",
        "--no-progress", "--lr", "1e-3", "--split", "random", "--val-fraction", "0.25", "--test-fraction", "0.25"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors this small gain nothing from a second thread, and on a busy 2-core machine OpenMP threads that
    # wait for each other make every convolution many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(args, debug=True):
    """main(args) with tracebacks for unexpected errors (DERMOMAMBA_DEBUG re-raises instead of exit 1)."""
    previous = os.environ.get("DERMOMAMBA_DEBUG")
    if debug:
        os.environ["DERMOMAMBA_DEBUG"] = "1"
    else:
        os.environ.pop("DERMOMAMBA_DEBUG", None)
    try:
        return main([str(a) for a in args])
    finally:
        if previous is None:
            os.environ.pop("DERMOMAMBA_DEBUG", None)
        else:
            os.environ["DERMOMAMBA_DEBUG"] = previous


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Synthetic data in all three layouts, images of assorted sizes (the seed varies per session)."""
    root = tmp_path_factory.mktemp("data")
    seed = int.from_bytes(os.urandom(2), "little")
    write_synthetic_dataset(root / "isic", 8, "isic2018", sizes=SIZES, seed=seed)
    write_synthetic_dataset(root / "ph2", 3, "ph2", sizes=SIZES[1:], seed=seed + 1)
    write_synthetic_dataset(root / "plain", 3, "folder", sizes=SIZES[:3], seed=seed + 2)
    return root


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A 2-epoch run on the ISIC layout, uninterrupted (the reference for the resume test)."""
    out = tmp_path_factory.mktemp("runs")
    run_dir = out / "straight"
    assert run(["train", "--data", data_root / "isic", *FAST, "--epochs", 2, "--cache-dir", out / "cache",
                "-o", run_dir, "--predict-samples", 0]) == 0
    return run_dir


def test_train_writes_a_complete_run(trained):
    names = set(os.listdir(trained))
    assert {"config.yaml", "split.json", "metrics.csv", "curves.png", "tensorboard", "checkpoints",
            "test_metrics.json", "test_metrics.csv", "test_metrics_per_image.csv"} <= names
    rows = read_rows(trained / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert np.isfinite(float(row["train_loss"])) and 0 <= float(row["val_dice"]) <= 1
    assert Image.open(trained / "curves.png").format == "PNG"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(trained / "tensorboard"))
    split = json.load(open(trained / "split.json"))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (4, 2, 2)
    assert not set(split["train"]) & set(split["val"] + split["test"])
    best = json.load(open(trained / "checkpoints" / "best" / "metrics.json"))
    assert best["val_dice"] == max(float(r["val_dice"]) for r in rows)
    last = trained / "checkpoints" / "last"
    assert {"config.json", "model.safetensors", TRAIN_STATE_JSON, TRAIN_STATE_TENSORS} <= set(os.listdir(last))
    state = json.load(open(last / TRAIN_STATE_JSON))
    assert state["epoch"] == 2 and state["global_step"] == 4
    # Nothing half-written is left behind.
    assert not [n for n in os.listdir(trained / "checkpoints") if n not in ("best", "last")]
    test = json.load(open(trained / "test_metrics.json"))
    assert test["summary"]["num_images"] == 2 and test["resolution"] == "original"


def test_resume_after_a_kill_is_exact(trained, data_root, tmp_path):
    run_dir = tmp_path / "killed"
    common = ["--data", data_root / "isic", *FAST, "--epochs", 2, "--cache-dir", trained.parent / "cache",
              "--predict-samples", 0]
    # Killed one step into the second epoch: only epoch 1 was checkpointed.
    assert run(["train", *common, "-o", run_dir, "--max-steps", 3]) == 0
    assert json.load(open(run_dir / "checkpoints" / "last" / TRAIN_STATE_JSON))["epoch"] == 1
    assert len(read_rows(run_dir / "metrics.csv")) == 1
    assert "max_steps: null" in (run_dir / "config.yaml").read_text()
    # A kill between the two renames of a checkpoint swap leaves only last.old: resume must find it.
    os.rename(run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "last.old")
    assert run(["train", "--resume", run_dir, "--no-progress"]) == 0
    straight = load_file(trained / "checkpoints" / "last" / "model.safetensors")
    resumed = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    straight_state = load_file(trained / "checkpoints" / "last" / TRAIN_STATE_TENSORS)
    resumed_state = load_file(run_dir / "checkpoints" / "last" / TRAIN_STATE_TENSORS)
    for key in straight_state:
        assert torch.equal(straight_state[key], resumed_state[key]), key
    columns = ("epoch", "lr", "train_loss", "train_dice", "val_loss", "val_dice", "val_iou")
    assert [[r[c] for c in columns] for r in read_rows(run_dir / "metrics.csv")] == \
           [[r[c] for c in columns] for r in read_rows(trained / "metrics.csv")]
    # A finished run refuses a fresh start in the same folder.
    assert run(["train", *common, "-o", run_dir], debug=False) == 1


def test_predict_writes_scorer_ready_masks(trained, data_root, tmp_path):
    inputs = [data_root / "plain" / "images", data_root / "ph2" / "PH2 Dataset images" / "IMD002" /
              "IMD002_Dermoscopic_Image" / "IMD002.bmp"]
    out = tmp_path / "pred"
    assert run(["predict", "-c", trained, *inputs, "-o", out, "--overlay", "--batch-size", 2, "--workers", 0,
                "--no-progress"]) == 0
    expected = {"case0000", "case0001", "case0002", "IMD002"}
    assert set(os.listdir(out)) == {f"{i}_segmentation.png" for i in expected} | {"overlays"}
    assert set(os.listdir(out / "overlays")) == {f"{i}_overlay.jpg" for i in expected}
    sources = {p.stem: p for p in (data_root / "plain" / "images").iterdir()}
    sources["IMD002"] = inputs[1]
    from dermomamba.predict import load_model, upsample_probabilities
    model = load_model(str(trained), "cpu")
    for sample_id in expected:
        mask = Image.open(out / f"{sample_id}_segmentation.png")
        original = Image.open(sources[sample_id])
        assert mask.mode == "L" and mask.size == original.size
        assert Image.open(out / "overlays" / f"{sample_id}_overlay.jpg").size == original.size
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        # The mask is the model's probability map resized to the original size and thresholded at 0.5.
        image = np.asarray(original.convert("RGB").resize((64, 32), Image.BILINEAR))
        with torch.no_grad():
            logits = model(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255)
        expected_mask = upsample_probabilities(logits[0], (original.height, original.width)) > 0.5
        np.testing.assert_array_equal(values == 255, expected_mask.numpy())


def test_evaluate_checkpoint_and_prediction_folder_agree(trained, data_root, tmp_path, capsys):
    for layout in ("ph2", "plain"):
        out = tmp_path / layout
        assert run(["evaluate", "-c", trained, "--data", data_root / layout, "-o", out, "--no-progress",
                    "--workers", 0, "--model-resolution"]) == 0
        printed = capsys.readouterr().out
        assert "threshold_jaccard" in printed and "per-image mean" in printed and "model" in printed
        report = json.load(open(out / "metrics.json"))
        assert report["summary"]["num_images"] == 3 and report["resolution"] == "original"
        table = read_rows(out / "metrics.csv")
        assert [r["metric"] for r in table][:3] == ["dice", "jaccard", "threshold_jaccard"]
        assert len(read_rows(out / "metrics_per_image.csv")) == 3
        assert os.path.isfile(out / "metrics_model_resolution.json")
        # The same numbers from masks written by `predict` and scored as files.
        images = [s.image for s in discover(data_root / layout)]
        assert run(["predict", "-c", trained, *images, "-o", out / "masks", "--workers", 0, "--no-progress"]) == 0
        assert run(["evaluate", "--predictions", out / "masks", "--truth", data_root / layout, "-o", out / "files",
                    "--no-progress"]) == 0
        from_files = json.load(open(out / "files" / "metrics.json"))["summary"]
        for key, value in report["summary"].items():
            if value is None or from_files[key] is None:
                assert value == from_files[key], key
            else:
                assert from_files[key] == pytest.approx(value, abs=1e-12), key
    # Ground truth scored against itself is perfect; a missing prediction is named.
    truth_dir = data_root / "plain" / "masks"
    assert run(["evaluate", "--predictions", truth_dir, "--truth", truth_dir, "-o", tmp_path / "self",
                "--no-progress"]) == 0
    summary = json.load(open(tmp_path / "self" / "metrics.json"))["summary"]
    assert summary["dice_per_image"] == 1 and summary["threshold_jaccard_per_image"] == 1
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "plain" / "masks", partial)
    os.remove(partial / "case0001_segmentation.png")
    capsys.readouterr()
    assert run(["evaluate", "--predictions", partial, "--truth", data_root / "plain", "-o", tmp_path / "x",
                "--no-progress"], debug=False) == 1
    err = capsys.readouterr().err
    assert "no prediction for ground truth" in err and "case0001" in err


def test_evaluate_a_run_on_its_own_test_split(trained, tmp_path):
    assert run(["evaluate", "-c", trained, "-o", tmp_path, "--no-progress", "--workers", 0]) == 0
    ours = json.load(open(tmp_path / "metrics.json"))
    theirs = json.load(open(trained / "test_metrics.json"))
    assert [r["id"] for r in ours["per_image"]] == json.load(open(trained / "split.json"))["test"]
    assert ours["summary"] == theirs["summary"]


def test_bad_data_errors_name_the_file(data_root, tmp_path, capsys):
    def train_on(folder):
        capsys.readouterr()
        code = run(["train", "--data", folder, *FAST, "--epochs", 1, "-o", tmp_path / f"run-{folder.name}",
                    "--cache-dir", tmp_path / "cache"], debug=False)
        return code, capsys.readouterr().err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(data_root / "plain", corrupt)
    (corrupt / "images" / "case0001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    code, err = train_on(corrupt)
    assert code == 1 and "cannot read image file" in err and "case0001.png" in err

    missing = tmp_path / "missing"
    shutil.copytree(data_root / "isic", missing)
    os.remove(missing / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000005_segmentation.png")
    code, err = train_on(missing)
    assert code == 1 and "missing mask for image" in err and "ISIC_0000005.jpg" in err

    orphan = tmp_path / "orphan"
    shutil.copytree(data_root / "plain", orphan)
    os.remove(orphan / "images" / "case0002.png")
    code, err = train_on(orphan)
    assert code == 1 and "mask without its image" in err and "case0002.png" in err

    mismatch = tmp_path / "mismatch"
    shutil.copytree(data_root / "plain", mismatch)
    Image.new("L", (7, 9)).save(mismatch / "masks" / "case0000.png")
    code, err = train_on(mismatch)
    assert code == 1 and "size mismatch" in err and "case0000.png" in err


def test_config_defaults_yaml_and_flags(tmp_path):
    recipe = resolve_config({"data": "/data/isic2018"})
    assert (recipe.lr, recipe.lr_factor, recipe.lr_patience, recipe.epochs, recipe.batch_size) == (1e-4, 0.5, 5, 200, 4)
    assert (recipe.precision, recipe.img_size, recipe.loss, recipe.model) == ("fp16", (192, 256), "published", "dermomamba")
    assert recipe.split == "auto" and recipe.augment
    demo = resolve_config({})
    assert demo.synthetic and all(getattr(demo, k) == (tuple(v) if k == "img_size" else v)
                                  for k, v in DEMO_OVERRIDES.items())
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 7\nlr: 0.002\nimg-size: [64, 96]\ndata: /somewhere\n")
    cfg = resolve_config({"epochs": 9}, str(config))
    assert (cfg.epochs, cfg.lr, cfg.img_size, cfg.data, cfg.batch_size) == (9, 0.002, (64, 96), "/somewhere", 4)
    config.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config keys .*learning_rate"):
        resolve_config({}, str(config))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")


def test_demo_train_with_no_data(tmp_path, monkeypatch):
    # `dermomamba train` with no data, shrunk by flags: trains on the synthetic set and predicts a few masks.
    monkeypatch.chdir(tmp_path)
    assert run(["train", *IMG, "--synthetic-train", 4, "--synthetic-val", 2, "--synthetic-test", 2, "--epochs", 1,
                "--batch-size", 2, "--no-progress", "--no-tensorboard", "-o", "demo"]) == 0
    config = (tmp_path / "demo" / "config.yaml").read_text()
    assert "dermomamba_tiny" in config and "data: null" in config
    masks = sorted(os.listdir(tmp_path / "demo" / "predictions" / "masks"))
    assert masks == [f"synthetic_{i:07d}_segmentation.png" for i in (6, 7)]
    assert Image.open(tmp_path / "demo" / "predictions" / "masks" / masks[0]).size == (64, 32)
    assert len(os.listdir(tmp_path / "demo" / "predictions" / "overlays")) == 2


def test_synthetic_data_with_the_full_recipe_uses_a_cache(tmp_path):
    # "--data synthetic" keeps the recipe's defaults (only what is given here changes) and renders once.
    assert run(["train", "--data", "synthetic", *FAST, "--synthetic-train", 4, "--synthetic-val", 2,
                "--synthetic-test", 0, "--epochs", 1, "--cache-dir", tmp_path / "cache", "-o", tmp_path / "run",
                "--no-tensorboard"]) == 0
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / "cache")) == ["synthetic", "synthetic"]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "data: synthetic" in config and "lr_patience: 5" in config and "predict_samples: 0" in config
    assert not os.path.exists(tmp_path / "run" / "test_metrics.json")  # no test images asked for


@pytest.mark.slow
def test_full_demo_command(tmp_path, monkeypatch, request):
    """The README's first command exactly (one to four minutes on a 2-core CPU, depending on its load).

    Opt-in: DERMOMAMBA_SLOW_TESTS=1, or `pytest -m slow`.
    """
    if os.environ.get("DERMOMAMBA_SLOW_TESTS") != "1" and request.config.getoption("markexpr") != "slow":
        pytest.skip("slow (minutes): set DERMOMAMBA_SLOW_TESTS=1 or run pytest -m slow")
    monkeypatch.chdir(tmp_path)
    assert run(["train", "--no-progress"]) == 0
    (run_dir,) = os.listdir(tmp_path / "runs")
    rows = read_rows(tmp_path / "runs" / run_dir / "metrics.csv")
    assert len(rows) == DEMO_OVERRIDES["epochs"]
    # Recorded on a 2-core CPU: validation Dice 0.96 after the 6 epochs; 0.8 leaves room for other machines' rounding.
    assert float(rows[-1]["val_dice"]) > 0.8
    assert len(os.listdir(tmp_path / "runs" / run_dir / "predictions" / "masks")) == DEMO_OVERRIDES["predict_samples"]


def test_info_and_benchmark(capsys):
    assert run(["benchmark", "--model", "dermomamba_tiny", *IMG, "--batch-size", 1, "--steps", 1, "--warmup", 0,
                "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["forward_ms_median"] > 0 and result["train_step_images_per_second"] > 0
    pytest.importorskip("dermomamba.flops")
    assert run(["info", "--model", "dermomamba_tiny", *IMG]) == 0
    assert "parameters: " in capsys.readouterr().out


def test_two_process_ddp_gloo(data_root, tmp_path):
    """torchrun with two CPU processes: metrics all-reduced over disjoint shards, one writer."""
    run_dir = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "dermomamba.cli", "train", "--data", str(data_root / "isic"), *map(str, FAST),
               "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "-o", str(run_dir), "--no-tensorboard",
               # 3 validation images, batch 1: the ranks' validation shards differ in length (2 and 1).
               "--val-fraction", "0.375", "--test-fraction", "0.125", "--eval-batch-size", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x 2 processes" in result.stderr
    (row,) = read_rows(run_dir / "metrics.csv")
    state = json.load(open(run_dir / "checkpoints" / "last" / TRAIN_STATE_JSON))
    # 4 training images, batch 2 per process, 2 processes: one step per epoch.
    assert state["global_step"] == 1 and state["world_size"] == 2 and len(state["rng"]) == 2
    # The all-reduced validation Dice equals a single-process evaluation of the same weights on the whole split.
    from dermomamba.evaluate import evaluate_dataset
    from dermomamba.predict import load_model
    split = json.load(open(run_dir / "split.json"))
    assert len(split["val"]) == 3
    samples = [s for s in discover(data_root / "isic") if s.id in set(split["val"])]
    model = load_model(str(run_dir / "checkpoints" / "last"), "cpu")
    report = evaluate_dataset(model, SegmentationDataset(samples, (32, 64)), "cpu", batch_size=4, progress=False,
                              model_resolution=True, with_hd95=False)
    assert float(row["val_dice"]) == pytest.approx(report["model_resolution"]["summary"]["dice_per_image"], abs=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_ddp_nccl_and_resume(data_root, tmp_path):
    """torchrun on two GPUs (NCCL, fp16 autocast): one writer, all-reduced metrics; then --resume continues."""
    run_dir = tmp_path / "ddp-gpu"
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    gpu_args = [a for a in map(str, FAST)]
    gpu_args[gpu_args.index("--device") + 1] = "cuda"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "dermomamba.cli", "train", "--data", str(data_root / "isic"), *gpu_args, "--precision", "fp16",
            "--cache-dir", str(tmp_path / "cache"), "--no-tensorboard", "--val-fraction", "0.375",
            "--test-fraction", "0.125", "--eval-batch-size", "1"]
    result = subprocess.run(base + ["--epochs", "1", "-o", str(run_dir)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x 2 processes" in result.stderr
    state = json.load(open(run_dir / "checkpoints" / "last" / TRAIN_STATE_JSON))
    assert state["epoch"] == 1 and state["world_size"] == 2 and len(state["rng"]) == 2
    resumed = subprocess.run(base + ["--epochs", "2", "--resume", str(run_dir)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = read_rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_cuda_graphs_need_one_cuda_device(data_root, tmp_path):
    """--cuda-graphs on the CPU: a clear error naming the option, before any training."""
    with pytest.raises(ValueError, match=r"cuda_graphs: .*one CUDA device.*got device cpu"):
        run(["train", "--data", data_root / "isic", *FAST, "--epochs", 1, "--cache-dir", tmp_path / "cache",
             "-o", tmp_path / "graphs-on-cpu", "--cuda-graphs"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_train_with_cuda_graphs_and_resume(data_root, tmp_path, precision):
    """`dermomamba train --cuda-graphs` on the GPU: three eager warm-up steps, then the recorded step replayed;
    the learning rate halves after every epoch (patience 0 on a synthetic set that stops improving) and the
    state is saved with it as a number; a run killed in its third epoch resumes, records its step again and
    finishes. The recorded step's arithmetic is tested in tests/test_compile.py (test_graphed_train_step_*)."""
    gpu_args = [a for a in map(str, FAST)]
    gpu_args[gpu_args.index("--device") + 1] = "cuda"
    run_dir = tmp_path / f"graphs-{precision}"
    common = ["--data", data_root / "isic", *gpu_args, "--precision", precision, "--cache-dir", tmp_path / "cache",
              "--predict-samples", 0, "--cuda-graphs", "--lr-patience", 0, "--no-tensorboard"]
    # 2 steps per epoch: steps 1-3 eager, step 4 recorded; killed after step 5 (epoch 3's first).
    assert run(["train", *common, "--epochs", 3, "-o", run_dir, "--max-steps", 5]) == 0
    state = json.load(open(run_dir / "checkpoints" / "last" / TRAIN_STATE_JSON))
    assert state["epoch"] == 2 and state["global_step"] == 4
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    assert run(["train", "--resume", run_dir, "--no-progress"]) == 0
    rows = read_rows(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(float(row["train_loss"])) and 0 <= float(row["val_dice"]) <= 1
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and all(b <= a for a, b in zip(lrs, lrs[1:]))
    state = json.load(open(run_dir / "checkpoints" / "last" / TRAIN_STATE_JSON))
    assert state["epoch"] == 3 and state["global_step"] == 6
    weights = load_file(run_dir / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_split_choices(tmp_path, monkeypatch):
    from dermomamba.data import Sample
    from dermomamba.data.splits import published_split
    from dermomamba.train import build_datasets

    # ISIC 2018's own folders.
    for subset, count in (("Training", 4), ("Validation", 2), ("Test", 3)):
        write_synthetic_dataset(tmp_path / "isic", count, "isic2018", sizes=[(32, 40)], subset=subset)
    cfg = TrainConfig(data=str(tmp_path / "isic"), split="official", img_size=(32, 64), cache_dir=None)
    datasets, split = build_datasets(cfg)
    assert [len(datasets[k]) for k in ("train", "val", "test")] == [4, 2, 3]
    assert split["method"] == "official" and split["test"] == [f"ISIC_{i:07d}" for i in range(3)]
    # "auto" on ISIC 2018 is the published split (decided without decoding 2,594 images here).
    ids = [f"ISIC_{i:07d}" for i in range(600)]
    monkeypatch.setattr("dermomamba.train.discover", lambda *a, **k: [Sample(i, i + ".jpg", i + ".png") for i in ids])
    monkeypatch.setattr("dermomamba.train.SegmentationDataset", lambda samples, *a, **k: list(samples))
    datasets, split = build_datasets(TrainConfig(data=str(tmp_path / "isic"), cache_dir=None))
    assert split == published_split(ids)
    assert [s.id for s in datasets["val"]] == split["val"] and len(datasets["train"]) == 80
    saved = tmp_path / "split.json"
    saved.write_text(json.dumps({"train": ids[:5], "val": ids[5:7], "test": []}))
    datasets, split = build_datasets(TrainConfig(data=str(tmp_path / "isic"), split=str(saved), cache_dir=None))
    assert [s.id for s in datasets["train"]] == ids[:5] and len(datasets["test"]) == 0


def test_prediction_folder_scores_like_the_official_isic_scorer(trained, data_root, tmp_path):
    scoring = pytest.importorskip("isic_challenge_scoring")
    import pathlib

    out = tmp_path / "pred"
    assert run(["predict", "-c", trained, data_root / "isic" / "ISIC2018_Task1-2_Training_Input", "-o", out,
                "--workers", 0, "--no-progress"]) == 0
    truth = data_root / "isic" / "ISIC2018_Task1_Training_GroundTruth"
    assert run(["evaluate", "--predictions", out, "--truth", truth, "-o", tmp_path / "ours", "--no-progress",
                "--no-hd95"]) == 0
    ours = json.load(open(tmp_path / "ours" / "metrics.json"))["summary"]
    official = scoring.SegmentationScore.from_dir(pathlib.Path(truth), pathlib.Path(out)).macro_average
    assert ours["num_images"] == 8
    for name in ("accuracy", "sensitivity", "specificity", "jaccard", "threshold_jaccard", "dice"):
        assert ours[f"{name}_per_image"] == pytest.approx(float(official[name]), abs=1e-9), name
