import numpy as np
import pytest
import torch
from conftest import METRIC_CHECK, needs_shared

from fashionkp.data.keypoints import KEYPOINT_INDEX as K
from fashionkp.evaluation.metric import NormalizedError, normalized_error


def _skirt(points: dict[str, tuple[float, float, int]]) -> np.ndarray:
    gt = np.tile(np.array([np.nan, np.nan, -1.0]), (24, 1))
    for name, (x, y, v) in points.items():
        gt[K[name]] = (x, y, v)
    return gt


def test_hand_computed_pooled_ne():
    # image 1: waistband 0..10 (s = 10); hemline_left visible, hemline_right occluded, crotch absent
    gt1 = _skirt({"waistband_left": (0, 0, 1), "waistband_right": (10, 0, 1),
                  "hemline_left": (0, 20, 1), "hemline_right": (10, 20, 0)})  # fmt: skip
    pred1 = np.nan_to_num(gt1[:, :2].copy(), nan=0.0)
    pred1[K["waistband_left"]] += (3, 4)  # error 5 -> 0.5
    pred1[K["hemline_right"]] += (0, 2)  # occluded still counts: 0.2
    pred1[K["crotch"]] = (500, 500)  # absent: ignored
    # image 2: s = 20, one point off by 2 -> 0.1; 4 points counted
    gt2 = _skirt({"waistband_left": (0, 0, 1), "waistband_right": (20, 0, 1),
                  "hemline_left": (0, 30, 1), "hemline_right": (20, 30, 1)})  # fmt: skip
    pred2 = np.nan_to_num(gt2[:, :2].copy(), nan=0.0)
    pred2[K["hemline_left"]] += (2, 0)
    res = normalized_error(np.stack([pred1, pred2]), np.stack([gt1, gt2]), ["skirt", "skirt"])
    assert res.counted == 8 and res.skipped == 0
    assert res.ne == pytest.approx((0.5 + 0.2 + 0.1) / 8)  # pooled over points
    assert res.per_keypoint["waistband_left"] == pytest.approx(0.25)
    assert res.per_category == {"skirt": pytest.approx(0.1)}


def test_pooled_differs_from_per_image_average():
    gt_a = _skirt({"waistband_left": (0, 0, 1), "waistband_right": (10, 0, 1)})
    gt_b = _skirt({"waistband_left": (0, 0, 1), "waistband_right": (10, 0, 1),
                   "hemline_left": (0, 9, 1), "hemline_right": (9, 9, 1)})  # fmt: skip
    pred_a = np.nan_to_num(gt_a[:, :2], nan=0.0) + [[10, 0]]  # 2 points, error 1.0 each
    pred_b = np.nan_to_num(gt_b[:, :2], nan=0.0)  # 4 points, error 0
    res = normalized_error(np.stack([pred_a, pred_b]), np.stack([gt_a, gt_b]), ["skirt", "skirt"])
    assert res.ne == pytest.approx(2 / 6)  # pooled; the per-image mean would be 0.5


def test_zero_normaliser_skips_the_image():
    gt = _skirt({"waistband_left": (5, 5, 1), "waistband_right": (5, 5, 1), "hemline_left": (0, 9, 1)})
    ok = _skirt({"waistband_left": (0, 0, 1), "waistband_right": (4, 0, 1)})
    pred = np.zeros((2, 24, 2))
    res = normalized_error(pred, np.stack([gt, ok]), ["skirt", "skirt"])
    assert res.skipped == 1 and res.counted == 2
    assert res.ne == pytest.approx((0 + 1.0) / 2)


def test_torchmetric_accumulates_like_the_function():
    rng = np.random.default_rng(0)
    gt = np.tile(np.array([np.nan, np.nan, -1.0]), (6, 24, 1))
    cats = ["blouse", "skirt", "dress", "trousers", "outwear", "skirt"]
    from fashionkp.data.keypoints import CATEGORY_KEYPOINTS

    for i, c in enumerate(cats):
        pts = list(CATEGORY_KEYPOINTS[c])
        gt[i, pts] = np.c_[rng.uniform(0, 500, (len(pts), 2)), rng.integers(0, 2, len(pts))]
    pred = np.nan_to_num(gt[..., :2], nan=0) + rng.normal(0, 10, (6, 24, 2))
    metric = NormalizedError()
    metric.update(torch.tensor(pred[:4]), torch.tensor(gt[:4]), cats[:4])
    metric.update(pred[4:], gt[4:], cats[4:])
    expected = normalized_error(pred, gt, cats)
    result = NormalizedError.summarise(metric.compute())
    assert result.ne == pytest.approx(expected.ne)
    assert result.per_category == pytest.approx(expected.per_category)
    assert result.per_keypoint == pytest.approx(expected.per_keypoint)
    assert result.as_dict()["ne"] == pytest.approx(100 * expected.ne)  # files hold percent


@needs_shared
def test_reproduces_the_real_leaderboard_score():
    from fashionkp.cli import main

    answers = METRIC_CHECK / "test_a_answers.csv"
    submission = METRIC_CHECK / "submission_xiangyu_cas_result_0309_NE23.16.csv"
    from fashionkp.data.fashionai import keypoints_array, read_csv
    from fashionkp.data.submission import read_submission

    records = read_csv(answers, missing_images="ignore")
    sub = read_submission(submission)
    res = normalized_error(np.stack([sub[r.image_id][1] for r in records]), keypoints_array(records),
                           [r.category for r in records])  # fmt: skip
    assert f"{100 * res.ne:.4f}" == "23.1629"
    assert res.counted == 98159 and res.skipped == 34
    assert main(["score", str(answers), str(submission)]) == 0
