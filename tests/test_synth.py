import hashlib

import numpy as np

from fashionkp.data.fashionai import read_csv, read_splits
from fashionkp.data.images import load_image
from fashionkp.data.keypoints import CATEGORY_KEYPOINTS, FLIP_INDEX, KEYPOINT_NAMES, category_mask
from fashionkp.data.synth import generate, render


def _digest(folder):
    return hashlib.md5(b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def test_deterministic_from_the_seed(tmp_path):
    a = generate(tmp_path / "a", 2, 1, seed=3, progress=False)
    b = generate(tmp_path / "b", 2, 1, seed=3, progress=False)
    c = generate(tmp_path / "c", 2, 1, seed=4, progress=False)
    assert _digest(a["train"]) == _digest(b["train"]) != _digest(c["train"])


def test_csv_is_a_valid_release_split(synth_data):
    records = read_splits(synth_data["train"])
    assert len(records) == 50 and {r.category for r in records} == set(CATEGORY_KEYPOINTS)
    for r in records:
        own = category_mask(r.category)
        assert (r.keypoints[own, 2] >= 0).all() and (r.keypoints[~own, 2] == -1).all()
        h, w = load_image(r.image_path).shape[:2]
        assert (r.keypoints[own, 0] >= 0).all() and (r.keypoints[own, 0] <= w - 1).all()
        assert (r.keypoints[own, 1] >= 0).all() and (r.keypoints[own, 1] <= h - 1).all()
    tests = read_csv(synth_data["test_csv"])
    answers = read_csv(synth_data["answers"])
    assert all(t.keypoints is None for t in tests) and [t.image_id for t in tests] == [a.image_id for a in answers]


def test_left_points_lie_left_of_their_twins_and_occlusions_are_marked():
    occluded = 0
    for i in range(60):
        category = list(CATEGORY_KEYPOINTS)[i % 5]
        sample = render(np.random.default_rng(i), category, 128)
        kp = sample.keypoints
        occluded += int((kp[:, 2] == 0).sum())
        for k in CATEGORY_KEYPOINTS[category]:
            twin = FLIP_INDEX[k]
            if "left" in KEYPOINT_NAMES[k]:
                assert kp[k, 0] < kp[twin, 0], (category, KEYPOINT_NAMES[k])
    assert occluded > 0
