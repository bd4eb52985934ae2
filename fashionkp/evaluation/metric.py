"""The official FashionAI normalized error (NE), as a NumPy function and as a torchmetrics Metric.

Per image the normaliser s is the ground-truth distance armpit_left-armpit_right (blouse, dress,
outwear) or waistband_left-waistband_right (skirt, trousers). Every ground-truth point with v in
{0, 1} counts with error ||pred - gt|| / s; NE is the mean over all counted points of all images
(pooled, not averaged per image). Images whose normaliser is 0 (or undefined) are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

from fashionkp.data.fashionai import FashionAIFormatError, keypoints_array, read_csv
from fashionkp.data.keypoints import CATEGORIES, CATEGORY_ID, KEYPOINT_NAMES, NUM_KEYPOINTS, normaliser_indices
from fashionkp.data.submission import read_submission


def point_errors(
    pred: np.ndarray, gt: np.ndarray, categories: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised error of every point.

    pred: (N, 24, 2) predicted x, y (any value where not predicted); gt: (N, 24, 3) x, y, v.
    Returns (errors (N, 24), counted (N, 24) bool, skipped (N,) bool: zero normaliser).
    """
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape[:2] != gt.shape[:2] or gt.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"shape mismatch: pred {pred.shape}, gt {gt.shape}; expected (N, 24, 2) and (N, 24, 3)")
    if len(categories) != len(gt):
        raise ValueError(f"{len(categories)} categories for {len(gt)} images")
    pairs = np.array([normaliser_indices(c) for c in categories], dtype=np.int64).reshape(-1, 2)
    rows = np.arange(len(gt))
    # The official scorer measures the normaliser on the raw cells, where an absent point reads as
    # (-1, -1); reproducing the leaderboard (98,159 points, 34 skipped on test A) needs the same.
    raw = np.where(gt[..., 2:3] >= 0, gt[..., :2], -1.0)
    a, b = raw[rows, pairs[:, 0]], raw[rows, pairs[:, 1]]
    norm = np.hypot(a[:, 0] - b[:, 0], a[:, 1] - b[:, 1])
    skipped = ~(norm > 0)
    counted = (gt[..., 2] >= 0) & ~skipped[:, None]
    dist = np.hypot(pred[..., 0] - gt[..., 0], pred[..., 1] - gt[..., 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        errors = np.where(counted, dist / np.where(skipped, 1.0, norm)[:, None], 0.0)
    if np.isnan(errors[counted]).any():
        bad = np.argwhere(counted & np.isnan(errors))[0]
        raise ValueError(f"prediction missing (NaN) for image {bad[0]}, keypoint {KEYPOINT_NAMES[bad[1]]}")
    return errors, counted, skipped


@dataclass
class NEResult:
    """NE pooled overall, per category and per keypoint.

    The attributes are fractions (the metric's own definition); everything printed or written to a file
    (``table``, ``as_dict``, logs, the progress bar) is in percent.
    """

    ne: float
    counted: int
    skipped: int
    per_category: dict[str, float] = field(default_factory=dict)
    per_keypoint: dict[str, float] = field(default_factory=dict)
    counted_per_category: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The breakdown as written to files: NE values in percent, like everything fashionkp shows."""
        return {
            "unit": "%", "ne": 100 * self.ne, "counted": self.counted, "skipped": self.skipped,
            "per_category": {k: 100 * v for k, v in self.per_category.items()},
            "per_keypoint": {k: 100 * v for k, v in self.per_keypoint.items()},
            "counted_per_category": self.counted_per_category,
        }  # fmt: skip

    def table(self) -> str:
        """Human-readable summary in percent."""
        lines = [f"NE {100 * self.ne:.4f}%  ({self.counted:,} points, {self.skipped} images skipped)"]
        lines.append(f"{'category':<10} {'NE %':>9} {'points':>8}")
        for c, v in self.per_category.items():
            lines.append(f"{c:<10} {100 * v:>9.4f} {self.counted_per_category[c]:>8,}")
        return "\n".join(lines)


def _summarise(err_sum: np.ndarray, count: np.ndarray, skipped: int) -> NEResult:
    """err_sum, count: (5 categories, 24 keypoints) pooled sums."""
    total = count.sum()
    cat_counts = count.sum(1)
    kp_counts = count.sum(0)
    return NEResult(
        ne=float(err_sum.sum() / total) if total else float("nan"),
        counted=int(total),
        skipped=int(skipped),
        per_category={c: float(err_sum[i].sum() / cat_counts[i]) for i, c in enumerate(CATEGORIES) if cat_counts[i]},
        per_keypoint={
            k: float(err_sum[:, j].sum() / kp_counts[j]) for j, k in enumerate(KEYPOINT_NAMES) if kp_counts[j]
        },
        counted_per_category={c: int(cat_counts[i]) for i, c in enumerate(CATEGORIES) if cat_counts[i]},
    )


def _pooled_sums(pred, gt, categories) -> tuple[np.ndarray, np.ndarray, int]:
    errors, counted, skipped = point_errors(pred, gt, categories)
    err_sum = np.zeros((len(CATEGORIES), NUM_KEYPOINTS))
    count = np.zeros((len(CATEGORIES), NUM_KEYPOINTS))
    cat_ids = np.array([CATEGORY_ID[c] for c in categories], dtype=np.int64)
    np.add.at(err_sum, cat_ids, errors)
    np.add.at(count, cat_ids, counted.astype(np.float64))
    return err_sum, count, int(skipped.sum())


def normalized_error(pred: np.ndarray, gt: np.ndarray, categories: Sequence[str]) -> NEResult:
    """The official NE of predictions ``pred`` (N, 24, 2) against ground truth ``gt`` (N, 24, 3)."""
    return _summarise(*_pooled_sums(pred, gt, categories))


class NormalizedError(Metric):
    """Official NE accumulated over batches; its sums reduce across processes (DDP-safe)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        shape = (len(CATEGORIES), NUM_KEYPOINTS)
        self.add_state("err_sum", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, categories: Sequence[str]) -> None:
        pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else pred
        gt = gt.detach().cpu().numpy() if isinstance(gt, torch.Tensor) else gt
        err_sum, count, skipped = _pooled_sums(pred, gt, categories)
        self.err_sum += torch.as_tensor(err_sum, device=self.err_sum.device)
        self.count += torch.as_tensor(count, device=self.count.device)
        self.skipped += skipped

    def compute(self) -> dict[str, torch.Tensor]:
        """The pooled sums over every process; :meth:`summarise` turns them into the NE breakdown.

        The sums, not the NE alone, leave ``compute``: torchmetrics syncs states across processes only
        inside it and restores each process's own shard afterwards, so a breakdown read from the metric's
        states after ``compute`` would cover one shard under DDP.
        """
        return {"err_sum": self.err_sum.clone(), "count": self.count.clone(), "skipped": self.skipped.clone()}

    @staticmethod
    def summarise(sums: dict[str, torch.Tensor]) -> NEResult:
        return _summarise(sums["err_sum"].cpu().numpy(), sums["count"].cpu().numpy(), int(sums["skipped"].item()))


def garment_type_report(confusion: np.ndarray) -> dict:
    """Accuracy (percent) and counts of a type head from its (5, 5) confusion matrix (rows: the true type,
    columns: the type told, ``CATEGORIES`` order): ``{"accuracy", "images", "confusion": {true: {told: n}}}``."""
    confusion = np.asarray(confusion, dtype=np.int64)
    total = int(confusion.sum())
    return {
        "accuracy": 100 * int(np.trace(confusion)) / max(1, total),
        "images": total,
        "confusion": {
            t: dict(zip(CATEGORIES, map(int, row), strict=True)) for t, row in zip(CATEGORIES, confusion, strict=True)
        },
    }


def score_submission(answers: Path | str, submission: Path | str) -> NEResult:
    """The official NE of a submission file against an answer CSV (``fashionkp score``); every answered image
    needs a prediction of the same garment type."""
    records = read_csv(answers, missing_images="ignore")
    predicted = read_submission(submission)
    missing = [r.image_id for r in records if r.image_id not in predicted]
    if missing:
        raise FashionAIFormatError(
            f"{submission}: no prediction for {len(missing)} images of {answers} (first: {missing[0]})"
        )
    for r in records:
        if predicted[r.image_id][0] != r.category:
            raise FashionAIFormatError(
                f"{submission}: {r.image_id} has category {predicted[r.image_id][0]}, the answers say {r.category}"
            )
    pred = np.stack([predicted[r.image_id][1] for r in records])
    return normalized_error(pred, keypoints_array(records), [r.category for r in records])
