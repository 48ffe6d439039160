"""Segmentation metrics: hand-computed cases, the ISIC scorer's conventions and edge cases, HD95
against a direct scipy/numpy computation of its definition, and (when installed) the official
scorer, isic-challenge-scoring 5.6.0, itself.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from dermomamba.metrics import (SegmentationMetricAccumulator, binarize, confusion_counts, hd95, per_image_metrics,
                                segmentation_metrics)
from edt_cases import blob_mask

# HD95 from float32 distances: each distance is the float32 rounding of the float64 one (relative
# error <= 2**-24); a linear interpolation between two of them keeps that bound, and its float64
# arithmetic adds ~1e-16.
HD95_RTOL = 2.0 ** -23


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# --- hand-computed ---------------------------------------------------------------------------------

def test_hand_computed_confusion_and_ratios():
    truth = _mask([[1, 1, 1, 0],
                   [1, 1, 1, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
    pred = _mask([[0, 1, 1, 1],
                  [0, 1, 1, 1],
                  [0, 0, 0, 0],
                  [0, 0, 0, 1]])
    # TP = 4, FP = 3, FN = 2, TN = 7
    assert confusion_counts(pred[None], truth[None]).tolist() == [[4, 3, 2, 7]]
    m = per_image_metrics(pred, truth, with_hd95=False)
    assert m["dice"].item() == pytest.approx(8 / 13, abs=1e-15)
    assert m["jaccard"].item() == pytest.approx(4 / 9, abs=1e-15)
    assert m["threshold_jaccard"].item() == 0.0  # 0.444 < 0.65
    assert m["precision"].item() == pytest.approx(4 / 7, abs=1e-15)
    assert m["sensitivity"].item() == pytest.approx(4 / 6, abs=1e-15)
    assert m["specificity"].item() == pytest.approx(7 / 10, abs=1e-15)
    assert m["accuracy"].item() == pytest.approx(11 / 16, abs=1e-15)


def test_per_image_mean_and_pooled_differ_as_computed_by_hand():
    # Image A: TP 1, FP 0, FN 3, TN 12. Image B: TP 8, FP 0, FN 0, TN 8.
    truth = torch.zeros(2, 4, 4, dtype=torch.bool)
    pred = torch.zeros(2, 4, 4, dtype=torch.bool)
    truth[0, 0, :4] = True
    pred[0, 0, 0] = True
    truth[1, :2] = True
    pred[1, :2] = True
    table = segmentation_metrics(pred, truth, with_hd95=False)
    assert table["jaccard_per_image"] == pytest.approx((1 / 4 + 1) / 2, abs=1e-15)
    assert table["jaccard_pooled"] == pytest.approx(9 / 12, abs=1e-15)
    assert table["dice_per_image"] == pytest.approx((2 / 5 + 1) / 2, abs=1e-15)
    assert table["dice_pooled"] == pytest.approx(18 / 21, abs=1e-15)
    assert table["threshold_jaccard_per_image"] == pytest.approx((0 + 1) / 2, abs=1e-15)
    assert table["sensitivity_pooled"] == pytest.approx(9 / 12, abs=1e-15)
    assert table["specificity_pooled"] == 1.0
    assert table["accuracy_pooled"] == pytest.approx(29 / 32, abs=1e-15)
    assert table["num_images"] == 2


def test_threshold_jaccard_boundary():
    # Jaccard exactly 0.65 (13 / 20) counts; one pixel less of overlap (12 / 21) does not.
    truth = torch.zeros(1, 5, 5, dtype=torch.bool)
    pred = torch.zeros(1, 5, 5, dtype=torch.bool)
    truth.view(-1)[:20] = True
    pred.view(-1)[:13] = True
    m = per_image_metrics(pred, truth, with_hd95=False)
    assert m["jaccard"].item() == 13 / 20 and m["threshold_jaccard"].item() == 13 / 20
    truth.view(-1)[20] = True
    pred.view(-1)[12] = False
    m = per_image_metrics(pred, truth, with_hd95=False)
    assert m["threshold_jaccard"].item() == 0.0


# --- the scorer's conventions ----------------------------------------------------------------------

def test_binarisation_conventions():
    assert binarize(torch.tensor([0, 128, 129, 255], dtype=torch.uint8)).tolist() == [False, False, True, True]
    assert binarize(torch.tensor([0.0, 0.5, 0.51, 1.0])).tolist() == [False, False, True, True]
    assert binarize(torch.tensor([0, 1, 255])).tolist() == [False, True, True]
    assert binarize(torch.tensor([True, False])).tolist() == [True, False]
    assert binarize(torch.tensor([0, 1, 2], dtype=torch.uint8), threshold=0).tolist() == [False, True, True]
    assert binarize(np.array([0, 200], dtype=np.uint8)).tolist() == [False, True]
    with pytest.raises(TypeError, match="mask: expected a real or bool mask"):
        binarize(torch.zeros(2, dtype=torch.complex64))


def test_empty_union_scores_one():
    empty = torch.zeros(1, 6, 7, dtype=torch.uint8)
    m = per_image_metrics(empty, empty)
    for key in ("dice", "jaccard", "threshold_jaccard", "precision", "sensitivity", "specificity", "accuracy"):
        assert m[key].item() == 1.0, key
    assert m["hd95"].item() == 0.0


def test_empty_prediction_of_a_lesion():
    truth = torch.zeros(1, 6, 7, dtype=torch.bool)
    truth[0, 2:4, 2:5] = True
    m = per_image_metrics(torch.zeros_like(truth), truth)
    assert m["precision"].item() == 1.0  # no predicted positives: the scorer's PPV convention
    assert m["sensitivity"].item() == 0.0
    assert m["dice"].item() == 0.0 and m["jaccard"].item() == 0.0
    assert np.isnan(m["hd95"].item())


def test_prediction_on_an_empty_truth_and_full_masks():
    pred = torch.zeros(1, 6, 7, dtype=torch.bool)
    pred[0, 1, 1] = True
    m = per_image_metrics(pred, torch.zeros_like(pred))
    assert m["sensitivity"].item() == 1.0  # no truth positives
    assert m["precision"].item() == 0.0 and m["jaccard"].item() == 0.0
    full = torch.ones(1, 6, 7, dtype=torch.bool)
    m = per_image_metrics(full, full)
    assert m["specificity"].item() == 1.0  # no truth negatives
    assert m["hd95"].item() == 0.0


def test_hd95_undefined_images_are_counted_not_averaged(seed):
    generator = torch.Generator().manual_seed(seed)
    truth = blob_mask((3, 1, 20, 24), generator)[:, 0]
    pred = blob_mask((3, 1, 20, 24), generator)[:, 0]
    pred[1] = False
    table = segmentation_metrics(pred, truth)
    values = per_image_metrics(pred, truth)["hd95"]
    assert table["hd95_undefined"] == 1
    assert table["hd95_per_image"] == pytest.approx((values[0].item() + values[2].item()) / 2, rel=1e-15)


# --- HD95 against its definition ------------------------------------------------------------------

def numpy_hd95(pred, truth, sampling=None):
    """medpy's definition, written out: surfaces by 4-connected erosion, distances both ways, p95."""
    cross = ndimage.generate_binary_structure(2, 1)
    pred_surface = pred & ~ndimage.binary_erosion(pred, structure=cross, border_value=0)
    truth_surface = truth & ~ndimage.binary_erosion(truth, structure=cross, border_value=0)
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[truth_surface]
    return np.percentile(np.hstack([to_truth, to_pred]), 95)


@pytest.mark.parametrize("sampling", [None, (0.8, 1.7)])
def test_hd95_matches_its_definition(seed, sampling):
    generator = torch.Generator().manual_seed(seed)
    shape = (4, 1, 23, 37)
    pred, truth = blob_mask(shape, generator)[:, 0], blob_mask(shape, generator)[:, 0]
    noise = torch.rand(shape[:1] + shape[2:], generator=generator) < 0.02
    pred = pred ^ noise  # scattered islands and holes: many small surfaces
    got = hd95(pred, truth, sampling)
    for b in range(shape[0]):
        want = numpy_hd95(pred[b].numpy(), truth[b].numpy(), sampling)
        assert abs(got[b].item() - want) <= HD95_RTOL * want, (b, got[b].item(), want)


def test_hd95_shifted_square_by_hand():
    pred = torch.zeros(1, 9, 9, dtype=torch.bool)
    truth = torch.zeros(1, 9, 9, dtype=torch.bool)
    pred[0, 2:5, 2:5] = True
    truth[0, 2:5, 4:7] = True
    assert hd95(pred, truth).item() == 2.0


# --- lists, accumulation, devices --------------------------------------------------------------------

def test_lists_of_different_sizes_equal_per_image_results(seed):
    generator = torch.Generator().manual_seed(seed)
    preds, truths = [], []
    for h, w in [(17, 23), (32, 16), (17, 23), (9, 40)]:
        truths.append((blob_mask((1, 1, h, w), generator)[0, 0].to(torch.uint8) * 255))
        preds.append(torch.rand(h, w, generator=generator))
    together = per_image_metrics(preds, truths)
    for i, (p, t) in enumerate(zip(preds, truths)):
        alone = per_image_metrics(p, t)
        for key, value in alone.items():
            assert torch.equal(together[key][i:i + 1], value), key


def test_accumulator_equals_one_shot(seed):
    generator = torch.Generator().manual_seed(seed)
    truth = blob_mask((6, 1, 24, 30), generator)
    pred = blob_mask((6, 1, 24, 30), generator)
    accumulator = SegmentationMetricAccumulator()
    for start in range(0, 6, 4):
        accumulator.update(pred[start:start + 4], truth[start:start + 4])
    assert len(accumulator) == 6
    assert accumulator.compute() == segmentation_metrics(pred, truth)
    accumulator.reset()
    with pytest.raises(RuntimeError, match="update"):
        accumulator.compute()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="pred, truth: shapes"):
        segmentation_metrics(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="pred: expected shape"):
        segmentation_metrics(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="2 predictions for 1 truth"):
        segmentation_metrics([torch.zeros(4, 4)] * 2, [torch.zeros(4, 4)])
    with pytest.raises(TypeError, match="two lists"):
        segmentation_metrics([torch.zeros(4, 4)], torch.zeros(4, 4))


@pytest.mark.gpu
def test_gpu_metrics_equal_cpu(seed):
    generator = torch.Generator().manual_seed(seed)
    truth = blob_mask((8, 1, 192, 256), generator)
    pred = blob_mask((8, 1, 192, 256), generator)
    pred[3] = False
    on_gpu = per_image_metrics(pred.cuda(), truth.cuda())
    on_cpu = per_image_metrics(pred, truth)
    for key, value in on_cpu.items():
        assert on_gpu[key].is_cuda
        assert torch.allclose(on_gpu[key].cpu(), value, rtol=HD95_RTOL, atol=0, equal_nan=True), key


# --- the official scorer ------------------------------------------------------------------------------

def test_matches_isic_challenge_scoring(seed):
    scorer = pytest.importorskip("isic_challenge_scoring.segmentation")
    generator = torch.Generator().manual_seed(seed)
    shape = (8, 1, 30, 41)
    truth = blob_mask(shape, generator)[:, 0].to(torch.uint8) * 255
    pred = torch.randint(0, 256, (8, 30, 41), generator=generator, dtype=torch.uint8)
    pred[0] = 128  # exactly at the threshold: background
    pred[1] = 0
    truth[1] = 0  # empty union
    pred[2] = 255
    truth[2] = 255  # no truth negatives
    pred[3] = truth[3]  # perfect
    pred[4] = 0  # missed lesion
    pairs = [SimpleNamespace(truth_image=truth[i].numpy(), prediction_image=pred[i].numpy(),
                             image_id=f"ISIC_{i:07d}") for i in range(8)]
    official = scorer.SegmentationScore(pairs).macro_average
    ours = segmentation_metrics(pred, truth, with_hd95=False)
    for key in ("accuracy", "sensitivity", "specificity", "jaccard", "threshold_jaccard", "dice"):
        assert ours[f"{key}_per_image"] == pytest.approx(float(official[key]), rel=1e-12, abs=1e-15), key
