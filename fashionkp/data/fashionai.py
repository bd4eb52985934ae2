"""FashionAI annotation files -> typed records.

Coordinate convention (used everywhere in fashionkp): an integer coordinate is the *centre* of a
pixel, so pixel (0, 0) covers [-0.5, 0.5] x [-0.5, 0.5] and an image of width W spans [-0.5, W - 0.5].
FashionAI stores integer pixel indices, which read directly in this convention. Absent points
(``-1_-1_-1``) are stored as ``(nan, nan, -1)``; visible ``v=1``, occluded ``v=0``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionkp.data.keypoints import CATEGORIES, KEYPOINT_NAMES, NUM_KEYPOINTS
from fashionkp.errors import UserError

log = logging.getLogger(__name__)

HEADER: tuple[str, ...] = ("image_id", "image_category", *KEYPOINT_NAMES)
#: Where the annotation CSV of a split folder may live, in order of preference.
CSV_CANDIDATES: tuple[str, ...] = (
    "Annotations/annotations.csv",
    "Annotations/train.csv",
    "Annotations/test.csv",
    "test.csv",
)
ABSENT = (np.nan, np.nan, -1.0)


class FashionAIFormatError(UserError, ValueError):
    """A FashionAI file that cannot be read; the message names the file, line and column."""


@dataclass(frozen=True)
class Record:
    """One annotated (or test) image."""

    image_path: Path
    image_id: str
    category: str
    #: (24, 3) float32 array of x, y, v in original pixels; None for a test CSV without annotations.
    keypoints: np.ndarray | None


def find_annotation_csv(split: Path) -> Path:
    """The annotation CSV of a split folder (or ``split`` itself when it is a CSV file)."""
    split = Path(split)
    if split.is_file():
        return split
    if not split.is_dir():
        raise FileNotFoundError(f"FashionAI split folder not found: {split}")
    for candidate in CSV_CANDIDATES:
        if (split / candidate).is_file():
            return split / candidate
    raise FileNotFoundError(f"no annotation CSV in {split}; looked for {', '.join(CSV_CANDIDATES)}")


def parse_cell(cell: str, where: str) -> tuple[float, float, float]:
    """Parse one ``x_y_v`` cell; ``where`` names file, line and column for the error message."""
    parts = cell.strip().split("_")
    try:
        x, y, v = (int(p) for p in parts)
    except ValueError:
        raise FashionAIFormatError(f"{where}: malformed keypoint cell {cell!r} (expected x_y_v integers)") from None
    if v == -1:
        return ABSENT
    if v not in (0, 1) or x < 0 or y < 0:
        raise FashionAIFormatError(f"{where}: invalid keypoint cell {cell!r} (v must be -1, 0 or 1; x, y >= 0)")
    return float(x), float(y), float(v)


#: Accepted values of ``missing_images``; checked before the file is opened so a typo fails fast.
MISSING_IMAGE_MODES: tuple[str, ...] = ("error", "skip", "ignore")


def _default_image_root(csv_path: Path) -> Path:
    """The split folder: ``image_id`` paths are relative to it, and the CSV may sit in ``Annotations/``."""
    return csv_path.parent.parent if csv_path.parent.name == "Annotations" else csv_path.parent


def _check_header(header: list[str] | None, csv_path: Path) -> None:
    """Only the first two columns are checked: a test list has no keypoint columns."""
    if header is None:
        raise FashionAIFormatError(f"{csv_path}: empty CSV (no header)")
    if [h.strip() for h in header[:2]] != ["image_id", "image_category"]:
        raise FashionAIFormatError(f"{csv_path}:1: header must start with image_id,image_category, got {header[:2]}")


def _data_rows(csv_path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, row)`` for each non-blank data row; line numbers count the header as line 1."""
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        _check_header(next(reader, None), csv_path)
        for line, row in enumerate(reader, start=2):
            # Blank lines (often a trailing one) are not records.
            if row and any(c.strip() for c in row):
                yield line, row


def _row_identity(row: list[str], csv_path: Path, line: int) -> tuple[str, str]:
    """Check the row's width and category; return its ``(image_id, category)``."""
    if len(row) not in (2, len(HEADER)):
        raise FashionAIFormatError(f"{csv_path}:{line}: {len(row)} columns, expected 2 (test list) or {len(HEADER)}")
    image_id, category = row[0].strip(), row[1].strip()
    if category not in CATEGORIES:
        raise FashionAIFormatError(
            f"{csv_path}:{line}, column image_category: unknown category {category!r}"
            f" (expected one of {', '.join(CATEGORIES)})"
        )
    return image_id, category


def _check_unique(image_id: str, line: int, seen: dict[str, int], csv_path: Path) -> None:
    """Record ``image_id``'s line in ``seen``; a repeat would silently give one image two labels."""
    if image_id in seen:
        raise FashionAIFormatError(
            f"{csv_path}:{line}: duplicate image_id {image_id!r} (first on line {seen[image_id]})"
        )
    seen[image_id] = line


def _row_keypoints(row: list[str], csv_path: Path, line: int) -> np.ndarray | None:
    """The (24, 3) keypoints of an annotated row; None for a two-column test-list row."""
    if len(row) != len(HEADER):
        return None
    return np.array(
        [parse_cell(cell, f"{csv_path}:{line}, column {HEADER[j + 2]}") for j, cell in enumerate(row[2:])],
        dtype=np.float32,
    )


def _image_present(path: Path, csv_path: Path, line: int, missing_images: str) -> bool:
    """Whether to keep the row's record: False only in ``skip`` mode when the image is missing."""
    if missing_images == "ignore" or path.is_file():
        return True
    if missing_images == "error":
        raise FileNotFoundError(f"{csv_path}:{line}: image file not found: {path}")
    return False


def read_csv(
    csv_path: Path | str,
    image_root: Path | str | None = None,
    categories: Iterable[str] | None = None,
    missing_images: str = "error",
) -> list[Record]:
    """Read one FashionAI CSV (annotations, answers or test list) into records.

    ``image_root``: folder that ``image_id`` is relative to (default: the split folder, i.e. the CSV's
    folder, or its parent when the CSV lives in ``Annotations/``). ``missing_images``: ``"error"``,
    ``"skip"`` (warn, count and drop) or ``"ignore"`` (do not check the files).
    """
    csv_path = Path(csv_path)
    if missing_images not in MISSING_IMAGE_MODES:
        raise ValueError(f"missing_images must be error, skip or ignore, not {missing_images!r}")
    image_root = Path(image_root) if image_root is not None else _default_image_root(csv_path)
    wanted = set(categories) if categories is not None else None
    records: list[Record] = []
    seen: dict[str, int] = {}
    missing: list[str] = []
    for line, row in _data_rows(csv_path):
        image_id, category = _row_identity(row, csv_path, line)
        # Duplicates are checked across all categories, before filtering, so a file is valid or not as a whole.
        _check_unique(image_id, line, seen, csv_path)
        if wanted is not None and category not in wanted:
            continue
        keypoints = _row_keypoints(row, csv_path, line)
        path = image_root / image_id
        if not _image_present(path, csv_path, line, missing_images):
            missing.append(str(path))
            continue
        records.append(Record(path, image_id, category, keypoints))
    if missing:
        log.warning("%s: skipped %d rows whose image is missing (first: %s)", csv_path, len(missing), missing[0])
    if not records:
        raise FashionAIFormatError(f"{csv_path}: no records" + (f" for categories {sorted(wanted)}" if wanted else ""))
    return records


def read_splits(
    splits: Path | str | Sequence[Path | str],
    categories: Iterable[str] | None = None,
    missing_images: str = "error",
) -> list[Record]:
    """Read one or more FashionAI split folders (or CSV files) into one list of records."""
    if isinstance(splits, (str, Path)):
        splits = [splits]
    if not splits:
        raise ValueError("no FashionAI split folder given")
    categories = list(categories) if categories is not None else None
    records: list[Record] = []
    for split in splits:
        records.extend(read_csv(find_annotation_csv(Path(split)), categories=categories, missing_images=missing_images))
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FashionAIFormatError(f"image_id {dup!r} appears in more than one split of {list(map(str, splits))}")
    return records


def keypoints_array(records: Sequence[Record]) -> np.ndarray:
    """Stack the (24, 3) keypoints of annotated records into an (N, 24, 3) array."""
    if any(r.keypoints is None for r in records):
        raise ValueError("records without annotations (a test list) have no keypoints")
    if not records:
        return np.zeros((0, NUM_KEYPOINTS, 3), np.float32)
    return np.stack([r.keypoints for r in records])


def as_submitted(points: np.ndarray) -> np.ndarray:
    """Points as FashionAI files hold them: whole pixels, rounded half to even. Validation during training and
    ``evaluate.py`` score these, so both give the NE of the submission file."""
    return np.round(points)


def format_cell(x: float, y: float, v: int) -> str:
    """One ``x_y_v`` cell, coordinates as :func:`as_submitted` makes them."""
    x, y = as_submitted(np.array([x, y], dtype=np.float64))
    return f"{int(x)}_{int(y)}_{int(v)}"


def write_annotations(records: Sequence[Record], csv_path: Path | str) -> None:
    """Write annotated records as an official 26-column annotation CSV."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for r in records:
            cells = ["-1_-1_-1" if kp[2] < 0 else format_cell(kp[0], kp[1], int(kp[2])) for kp in r.keypoints]
            writer.writerow([r.image_id, r.category, *cells])
