from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import FASHIONAI_TRAIN, needs_shared

from fashionkp.data.fashionai import HEADER, FashionAIFormatError, read_csv, read_splits

ABSENT = ",".join(["-1_-1_-1"] * 24)


def _write(tmp_path: Path, rows: list[str], header: str = ",".join(HEADER), image: str = "Images/blouse/a.jpg") -> Path:
    split = tmp_path / "split"
    (split / "Annotations").mkdir(parents=True)
    (split / Path(image).parent).mkdir(parents=True, exist_ok=True)
    (split / image).write_bytes(b"x")
    csv = split / "Annotations" / "annotations.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    return split


def _row(image="Images/blouse/a.jpg", category="blouse", first="10_20_1", second="30_40_0"):
    return f"{image},{category},{first},{second}," + ",".join(["-1_-1_-1"] * 22)


def test_reads_visible_occluded_and_absent(tmp_path):
    records = read_splits(_write(tmp_path, [_row()]))
    kp = records[0].keypoints
    assert kp.shape == (24, 3)
    assert tuple(kp[0]) == (10, 20, 1) and tuple(kp[1]) == (30, 40, 0)
    assert kp[2, 2] == -1 and np.isnan(kp[2, :2]).all()
    assert records[0].image_path == tmp_path / "split" / "Images/blouse/a.jpg"


@pytest.mark.parametrize(
    "row, message",
    [
        (_row(first="10_x_1"), "annotations.csv:2, column neckline_left: malformed keypoint cell '10_x_1'"),
        (_row(first="10_20"), "malformed keypoint cell"),
        (_row(second="1_2_3"), "column neckline_right: invalid keypoint cell"),
        (_row(category="hat"), "annotations.csv:2, column image_category: unknown category 'hat'"),
        ("Images/blouse/a.jpg,blouse,1_1_1", "3 columns"),
    ],
)
def test_bad_rows_name_file_line_and_column(tmp_path, row, message):
    with pytest.raises(FashionAIFormatError, match=message) as e:
        read_splits(_write(tmp_path, [row]))
    assert "annotations.csv" in str(e.value)


def test_duplicate_ids_empty_csv_and_missing_images(tmp_path):
    with pytest.raises(FashionAIFormatError, match=r"annotations.csv:3: duplicate image_id .* \(first on line 2\)"):
        read_splits(_write(tmp_path / "d", [_row(), _row()]))
    with pytest.raises(FashionAIFormatError, match="no records"):
        read_splits(_write(tmp_path / "e", []))
    split = _write(tmp_path / "m", [_row(), _row(image="Images/blouse/missing.jpg")])
    with pytest.raises(FileNotFoundError, match="annotations.csv:3: image file not found.*missing.jpg"):
        read_splits(split)
    kept = read_splits(split, missing_images="skip")
    assert [r.image_id for r in kept] == ["Images/blouse/a.jpg"]
    with pytest.raises(FileNotFoundError, match="no annotation CSV"):
        read_splits(tmp_path)


def test_test_list_and_category_filter(tmp_path):
    split = _write(tmp_path, ["Images/blouse/a.jpg,blouse"], header="image_id,image_category")
    (r,) = read_splits(split)
    assert r.keypoints is None and r.category == "blouse"
    with pytest.raises(FashionAIFormatError, match="no records for categories"):
        read_splits(split, categories=["skirt"])


@needs_shared
def test_reads_the_real_training_split():
    records = read_splits(FASHIONAI_TRAIN)
    assert len(records) == 3261
    assert Counter(r.category for r in records) == {
        "blouse": 731, "dress": 597, "outwear": 526, "skirt": 726, "trousers": 681,
    }  # fmt: skip
    assert all(r.image_path.is_file() for r in records[:50])
    # only the category's own points are ever annotated
    from fashionkp.data.keypoints import category_mask

    for r in records:
        assert (r.keypoints[~category_mask(r.category), 2] == -1).all()
    skirt = read_csv(FASHIONAI_TRAIN / "Annotations" / "annotations.csv", categories=["skirt"])
    assert len(skirt) == 726
