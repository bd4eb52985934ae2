"""The FashionAI keypoint schema, defined once.

Everything else (flip permutations, per-category channel lists, normaliser pairs, drawing skeletons)
is derived from the tables in this module.
"""

from __future__ import annotations

from functools import cache

import numpy as np

#: The 24 key points in the column order of the FashionAI CSV files.
KEYPOINT_NAMES: tuple[str, ...] = (
    "neckline_left", "neckline_right", "center_front", "shoulder_left", "shoulder_right",
    "armpit_left", "armpit_right", "waistline_left", "waistline_right", "cuff_left_in",
    "cuff_left_out", "cuff_right_in", "cuff_right_out", "top_hem_left", "top_hem_right",
    "waistband_left", "waistband_right", "hemline_left", "hemline_right", "crotch",
    "bottom_left_in", "bottom_left_out", "bottom_right_in", "bottom_right_out",
)  # fmt: skip
NUM_KEYPOINTS = len(KEYPOINT_NAMES)
KEYPOINT_INDEX: dict[str, int] = {name: i for i, name in enumerate(KEYPOINT_NAMES)}

#: The garment types and the global indices of the points each one annotates.
CATEGORY_KEYPOINTS: dict[str, tuple[int, ...]] = {
    "blouse": (0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14),
    "outwear": (0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14),
    "dress": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 17, 18),
    "skirt": (15, 16, 17, 18),
    "trousers": (15, 16, 19, 20, 21, 22, 23),
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_KEYPOINTS)
#: A garment type's index in CATEGORIES (how batches and metric states carry it).
CATEGORY_ID: dict[str, int] = {c: i for i, c in enumerate(CATEGORIES)}
#: The pseudo garment type of a single model that predicts all 24 channels.
ALL = "all"

#: The ground-truth pair whose distance normalises the error (the official FashionAI rule).
NORMALISER_PAIR: dict[str, tuple[str, str]] = {
    "blouse": ("armpit_left", "armpit_right"),
    "outwear": ("armpit_left", "armpit_right"),
    "dress": ("armpit_left", "armpit_right"),
    "skirt": ("waistband_left", "waistband_right"),
    "trousers": ("waistband_left", "waistband_right"),
}

#: Edges for drawing, by name; an edge is drawn when both ends belong to the image's category.
SKELETON_NAMES: tuple[tuple[str, str], ...] = (
    ("neckline_left", "center_front"), ("center_front", "neckline_right"),
    ("neckline_left", "neckline_right"),
    ("neckline_left", "shoulder_left"), ("neckline_right", "shoulder_right"),
    ("shoulder_left", "cuff_left_out"), ("cuff_left_out", "cuff_left_in"), ("cuff_left_in", "armpit_left"),
    ("shoulder_right", "cuff_right_out"), ("cuff_right_out", "cuff_right_in"),
    ("cuff_right_in", "armpit_right"),
    ("armpit_left", "waistline_left"), ("armpit_right", "waistline_right"),
    ("waistline_left", "top_hem_left"), ("waistline_right", "top_hem_right"),
    ("armpit_left", "top_hem_left"), ("armpit_right", "top_hem_right"),
    ("top_hem_left", "top_hem_right"),
    ("waistline_left", "hemline_left"), ("waistline_right", "hemline_right"),
    ("hemline_left", "hemline_right"),
    ("waistband_left", "waistband_right"),
    ("waistband_left", "hemline_left"), ("waistband_right", "hemline_right"),
    ("waistband_left", "bottom_left_out"), ("bottom_left_out", "bottom_left_in"),
    ("bottom_left_in", "crotch"), ("crotch", "bottom_right_in"),
    ("bottom_right_in", "bottom_right_out"), ("bottom_right_out", "waistband_right"),
)  # fmt: skip


def _mirror_name(name: str) -> str:
    if "_left" in name:
        return name.replace("_left", "_right")
    if "_right" in name:
        return name.replace("_right", "_left")
    return name


def _build_flip_index() -> tuple[int, ...]:
    flip = tuple(KEYPOINT_INDEX[_mirror_name(name)] for name in KEYPOINT_NAMES)
    perm = np.asarray(flip)
    # A flip table must be a permutation and an involution; a wrong table silently poisons training.
    assert sorted(flip) == list(range(NUM_KEYPOINTS)), "flip index is not a permutation"
    assert np.array_equal(perm[perm], np.arange(NUM_KEYPOINTS)), "flip index is not an involution"
    return flip


#: FLIP_INDEX[i] is the global index of the mirror twin of point i (itself for centre points).
FLIP_INDEX: tuple[int, ...] = _build_flip_index()
SKELETON: tuple[tuple[int, int], ...] = tuple((KEYPOINT_INDEX[a], KEYPOINT_INDEX[b]) for a, b in SKELETON_NAMES)


def check_category(category: str, allow_all: bool = False) -> str:
    """Return ``category`` or raise a ValueError naming the known ones."""
    known = (*CATEGORIES, ALL) if allow_all else CATEGORIES
    if category not in known:
        raise ValueError(f"unknown garment category {category!r}; expected one of {', '.join(known)}")
    return category


@cache
def channels_for(clothes: str) -> tuple[int, ...]:
    """Global keypoint indices predicted by a model trained for ``clothes`` (a category or 'all')."""
    check_category(clothes, allow_all=True)
    return tuple(range(NUM_KEYPOINTS)) if clothes == ALL else CATEGORY_KEYPOINTS[clothes]


@cache
def flip_permutation(clothes: str) -> tuple[int, ...]:
    """Channel permutation that swaps left/right twins within a model's own channel list."""
    channels = channels_for(clothes)
    position = {g: i for i, g in enumerate(channels)}
    return tuple(position[FLIP_INDEX[g]] for g in channels)


def category_mask(category: str) -> np.ndarray:
    """Boolean (24,) mask of the points a garment category annotates."""
    mask = np.zeros(NUM_KEYPOINTS, dtype=bool)
    mask[list(CATEGORY_KEYPOINTS[check_category(category)])] = True
    return mask


def normaliser_indices(category: str) -> tuple[int, int]:
    a, b = NORMALISER_PAIR[check_category(category)]
    return KEYPOINT_INDEX[a], KEYPOINT_INDEX[b]


def skeleton_for(category: str) -> list[tuple[int, int]]:
    """Skeleton edges (global indices) whose two ends both belong to ``category``."""
    points = set(CATEGORY_KEYPOINTS[check_category(category)])
    return [(a, b) for a, b in SKELETON if a in points and b in points]
