import numpy as np

from fashionkp.data.keypoints import (
    CATEGORY_KEYPOINTS,
    FLIP_INDEX,
    KEYPOINT_NAMES,
    NUM_KEYPOINTS,
    channels_for,
    flip_permutation,
    normaliser_indices,
    skeleton_for,
)


def test_schema_matches_the_fashionai_release():
    assert NUM_KEYPOINTS == 24
    assert KEYPOINT_NAMES[0] == "neckline_left" and KEYPOINT_NAMES[-1] == "bottom_right_out"
    sizes = {c: len(p) for c, p in CATEGORY_KEYPOINTS.items()}
    assert sizes == {"blouse": 13, "outwear": 14, "dress": 15, "skirt": 4, "trousers": 7}
    assert CATEGORY_KEYPOINTS["dress"] == (*range(13), 17, 18)


def test_flip_pairs_against_a_hand_written_table():
    # Written out by hand from the FashionAI point list, not derived with the code's own name rule.
    pairs = [
        ("neckline_left", "neckline_right"), ("shoulder_left", "shoulder_right"), ("armpit_left", "armpit_right"),
        ("waistline_left", "waistline_right"), ("cuff_left_in", "cuff_right_in"), ("cuff_left_out", "cuff_right_out"),
        ("top_hem_left", "top_hem_right"), ("waistband_left", "waistband_right"), ("hemline_left", "hemline_right"),
        ("bottom_left_in", "bottom_right_in"), ("bottom_left_out", "bottom_right_out"),
    ]  # fmt: skip
    expected = {"center_front": "center_front", "crotch": "crotch"}
    for a, b in pairs:
        expected[a], expected[b] = b, a
    assert {KEYPOINT_NAMES[i]: KEYPOINT_NAMES[j] for i, j in enumerate(FLIP_INDEX)} == expected
    assert FLIP_INDEX == (1, 0, 2, 4, 3, 6, 5, 8, 7, 11, 12, 9, 10, 14, 13, 16, 15, 18, 17, 19, 22, 23, 20, 21)


def test_flip_permutation_within_each_category():
    # channel order of each model: skirt (waistband L/R, hemline L/R), trousers (waistband L/R, crotch,
    # bottom_left_in/out, bottom_right_in/out)
    assert flip_permutation("skirt") == (1, 0, 3, 2)
    assert flip_permutation("trousers") == (1, 0, 2, 5, 6, 3, 4)
    assert flip_permutation("all") == FLIP_INDEX
    for clothes in (*CATEGORY_KEYPOINTS, "all"):
        perm = np.array(flip_permutation(clothes))
        assert sorted(perm) == list(range(len(channels_for(clothes))))
        channels = channels_for(clothes)
        assert all(FLIP_INDEX[channels[k]] == channels[perm[k]] for k in range(len(perm)))


def test_normalisers_and_skeleton():
    assert [KEYPOINT_NAMES[i] for i in normaliser_indices("dress")] == ["armpit_left", "armpit_right"]
    assert [KEYPOINT_NAMES[i] for i in normaliser_indices("skirt")] == ["waistband_left", "waistband_right"]
    for c, points in CATEGORY_KEYPOINTS.items():
        edges = skeleton_for(c)
        assert edges and all(a in points and b in points for a, b in edges)
        # every point of a category is reachable when drawing
        assert set(points) <= {p for e in edges for p in e}
