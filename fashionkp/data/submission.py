"""Submission CSV files: the 26 official columns, the image's own points as ``x_y_1``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fashionkp.data.fashionai import HEADER, FashionAIFormatError, format_cell, parse_cell
from fashionkp.data.keypoints import CATEGORY_KEYPOINTS, NUM_KEYPOINTS, check_category


def write_submission(path: Path | str, image_ids: Sequence[str], categories: Sequence[str], points: np.ndarray) -> Path:
    """Write predictions ``points`` (N, 24, 2+) in original pixels; only each image's own points are written."""
    path = Path(path)
    points = np.asarray(points)
    if points.shape[:2] != (len(image_ids), NUM_KEYPOINTS) or len(categories) != len(image_ids):
        raise ValueError(f"points {points.shape} do not match {len(image_ids)} images x {NUM_KEYPOINTS} keypoints")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for image_id, category, pts in zip(image_ids, categories, points, strict=True):
            own = set(CATEGORY_KEYPOINTS[check_category(category)])
            cells = [format_cell(pts[k, 0], pts[k, 1], 1) if k in own else "-1_-1_-1" for k in range(NUM_KEYPOINTS)]
            writer.writerow([image_id, category, *cells])
    tmp.replace(path)
    return path


def read_submission(path: Path | str) -> dict[str, tuple[str, np.ndarray]]:
    """Read a submission into ``{image_id: (category, (24, 2) points)}``.

    A ``-1_-1_-1`` cell reads as the point (-1, -1), as the official scorer reads it.

    Tolerates a header that names only ``image_id,image_category`` (real submissions do this) but
    requires every data row to have all 26 values.
    """
    path = Path(path)
    out: dict[str, tuple[str, np.ndarray]] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["image_id", "image_category"]:
            raise FashionAIFormatError(f"{path}:1: header must start with image_id,image_category")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(HEADER):
                raise FashionAIFormatError(f"{path}:{line}: {len(row)} columns, a submission row needs {len(HEADER)}")
            try:
                category = check_category(row[1].strip())
            except ValueError as e:
                raise FashionAIFormatError(f"{path}:{line}, column image_category: {e}") from None
            pts = np.array(
                [parse_cell(c, f"{path}:{line}, column {HEADER[j + 2]}")[:2] for j, c in enumerate(row[2:])],
                dtype=np.float64,
            )
            pts = np.nan_to_num(pts, nan=-1.0)
            if row[0] in out:
                raise FashionAIFormatError(f"{path}:{line}: duplicate image_id {row[0]!r}")
            out[row[0].strip()] = (category, pts)
    if not out:
        raise FashionAIFormatError(f"{path}: no rows")
    return out


def concat_submissions(paths: Sequence[Path | str], out: Path | str) -> Path:
    """Join per-category submission files into one (an image may appear in one file only)."""
    merged: dict[str, tuple[str, np.ndarray]] = {}
    for p in paths:
        for image_id, value in read_submission(p).items():
            if image_id in merged:
                raise FashionAIFormatError(f"{p}: image_id {image_id!r} already given by an earlier file")
            merged[image_id] = value
    ids = list(merged)
    return write_submission(out, ids, [merged[i][0] for i in ids], np.stack([merged[i][1] for i in ids]))
