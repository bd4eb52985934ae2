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


def test_flip_pairs_swap_left_and_right_names():
    perm = np.array(FLIP_INDEX)
    assert np.array_equal(perm[perm], np.arange(24))  # involution
    for i, j in enumerate(FLIP_INDEX):
        a, b = KEYPOINT_NAMES[i], KEYPOINT_NAMES[j]
        if "left" in a:
            assert b == a.replace("left", "right")
        elif "right" in a:
            assert b == a.replace("right", "left")
        else:
            assert i == j and a in ("center_front", "crotch")


def test_flip_permutation_within_each_category_is_an_involution():
    for clothes in (*CATEGORY_KEYPOINTS, "all"):
        perm = np.array(flip_permutation(clothes))
        assert sorted(perm) == list(range(len(channels_for(clothes))))
        assert np.array_equal(perm[perm], np.arange(len(perm)))
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
