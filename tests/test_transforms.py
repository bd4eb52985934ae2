from dataclasses import replace

import numpy as np
import torch

from fashionkp.data.codec import HeatmapCodec
from fashionkp.data.dataset import KeypointDataset
from fashionkp.data.fashionai import read_splits
from fashionkp.data.images import load_image
from fashionkp.data.transforms import (
    Augmentation,
    apply_affine,
    augment_matrix,
    crop_frame,
    erase_rectangle,
    invert_affine,
    letterbox_matrix,
    random_matrix,
    transform_keypoints,
    warp_image,
)


def test_letterbox_maps_the_image_frame_onto_the_input():
    m = letterbox_matrix(300, 600, 256)
    # image edges (-0.5 .. W-0.5) land on input edges (-0.5 .. 255.5)
    assert np.allclose(apply_affine(np.array([[-0.5, -0.5], [599.5, 299.5]]), m), [[-0.5, -0.5], [255.5, 127.5]])


def test_flipped_rotated_sample_round_trips_to_the_original_points():
    rng = np.random.default_rng(3)
    kp = np.zeros((24, 3))
    kp[:, :2] = rng.uniform(50, 250, (24, 2))
    kp[:, 2] = 1
    m = augment_matrix(300, 280, 256, rotation_deg=25, scale=0.9, translate=(0.03, -0.02), flip=True)
    out = transform_keypoints(kp, m, True, "all", 256)
    from fashionkp.data.keypoints import FLIP_INDEX

    flip = list(FLIP_INDEX)
    back = apply_affine(out[:, :2], invert_affine(m))[flip]
    assert np.allclose(back, kp[:, :2], atol=1e-9)
    # the left point lies left of its right twin again after flipping an upright garment
    upright = np.zeros((24, 3))
    upright[:, 2] = 1
    upright[:, 0] = [100 if "left" in n else 200 if "right" in n else 150 for n in _names()]
    upright[:, 1] = 150
    flipped = transform_keypoints(upright, augment_matrix(300, 300, 256, flip=True), True, "all", 256)
    for i, n in enumerate(_names()):
        if "left" in n:
            assert flipped[i, 0] < 128 - 1e-6 < flipped[list(FLIP_INDEX)[i], 0]


def _names():
    from fashionkp.data.keypoints import KEYPOINT_NAMES

    return KEYPOINT_NAMES


def test_warp_and_points_stay_aligned():
    ys, xs = np.mgrid[0:120, 0:160]
    blob = 255 * np.exp(-((xs - 40.3) ** 2 + (ys - 60.7) ** 2) / (2 * 4.0**2))  # a smooth blob at (40.3, 60.7)
    image = np.repeat(blob[:, :, None], 3, axis=2).round().astype(np.uint8)
    m = augment_matrix(120, 160, 128, rotation_deg=30, scale=1.0)
    out = warp_image(image, m, 128).astype(float)[..., 0] - warp_image(0 * image, m, 128).astype(float)[..., 0]
    ys, xs = np.mgrid[0:128, 0:128]
    centroid = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
    assert np.allclose(centroid, apply_affine(np.array([40.3, 60.7]), m), atol=0.05)


def test_points_pushed_outside_lose_their_weight():
    kp = np.array([[10.0, 10.0, 1.0], [150.0, 100.0, 0.0]] + [[np.nan, np.nan, -1.0]] * 2)
    m = augment_matrix(200, 200, 64, translate=(-0.45, 0.0))
    out = transform_keypoints(kp, m, False, "skirt", 64)
    assert out[0, 2] == -1 and np.isnan(out[0, 0]) and out[1, 2] == 0


def test_random_matrices_are_reproducible():
    cfg = Augmentation(
        rotation=30.0,
        scale=(0.75, 1.25),
        translate=0.05,
        flip=0.5,
        color=True,
        crop=0.0,
        crop_margin=(0.05, 0.3),
        crop_jitter=0.05,
        erase=0.0,
        erase_area=(0.02, 0.2),
    )
    a = random_matrix(np.random.default_rng(5), 100, 80, 64, cfg)
    b = random_matrix(np.random.default_rng(5), 100, 80, 64, cfg)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_a_crop_sample_frames_the_garment_with_its_margin():
    """Crop samples (augmentation.crop) fit the box of the annotated points, grown by the drawn margin, to the
    input: the points then span (1 / (1 + 2 * margin)) of the input, around its centre."""
    cfg = Augmentation(rotation=0.0, scale=(1.0, 1.0), translate=0.0, flip=0.0, color=False, crop=1.0,
                       crop_margin=(0.25, 0.25), crop_jitter=0.0, erase=0.0, erase_area=(0.02, 0.2))  # fmt: skip
    points = np.array([[100.0, 50.0], [140.0, 130.0], [np.nan, np.nan]])  # an 80-px tall box
    m, flipped = random_matrix(np.random.default_rng(0), 400, 300, 64, cfg, points)
    inside = apply_affine(points[:2], m)
    assert not flipped
    np.testing.assert_allclose(np.ptp(inside, axis=0).max(), 64 / 1.5)
    np.testing.assert_allclose(inside.mean(axis=0), (63 / 2, 63 / 2))
    # without annotated points, or with crop=0, a sample shows the whole photo (the letterbox fit)
    for pts, rate in ((np.full((3, 2), np.nan), 1.0), (points, 0.0)):
        whole, _ = random_matrix(np.random.default_rng(0), 400, 300, 64, replace(cfg, crop=rate), pts)
        np.testing.assert_allclose(whole[0, 0], 64 / 400)


def test_crop_frames_are_clamped_between_a_quarter_and_the_whole_photo():
    left, top, side = crop_frame(np.array([[10.0, 10.0], [50.0, 30.0]]), 0.5, 400, 300)
    # a 40-px box grown to 80 < 400 / 4: a quarter of the long side, centred on the box (30, 20)
    assert (left, top, side) == (-20.0, -30.0, 100.0)
    assert crop_frame(np.array([[0.0, 0.0], [299.0, 399.0]]), 0.5, 400, 300)[2] == 400.0  # never past the photo
    assert crop_frame(np.full((2, 2), np.nan), 0.2, 400, 300) == (-0.5, -0.5, 400.0)  # nothing seen: the letterbox


def test_random_erasing_fills_one_rectangle_of_the_drawn_area_with_noise():
    image = np.full((64, 64, 3), 7, np.uint8)
    for seed in range(20):
        out = erase_rectangle(image, np.random.default_rng(seed), (0.05, 0.2))
        changed = (out != image).any(axis=2)
        rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        # one solid rectangle (noise equal to the fill by chance leaves a few of its pixels as they were)
        assert changed.sum() >= 0.95 * box
        assert 0.05 * 64 * 64 * 0.8 <= box <= 0.2 * 64 * 64 * 1.2  # sides rounded to whole pixels
        assert np.array_equal(out, erase_rectangle(image, np.random.default_rng(seed), (0.05, 0.2)))
    # an area too large for the drawn aspect ratio: a side cut to the input, the other grown to keep the area
    for seed in range(20):
        changed = (erase_rectangle(image, np.random.default_rng(seed), (0.6, 0.6)) != image).any(axis=2)
        assert 0.55 * 64 * 64 <= changed.sum() <= 0.62 * 64 * 64
    whole = erase_rectangle(np.zeros((8, 8, 3), np.uint8), np.random.default_rng(0), (1.0, 1.0))
    assert (whole != 0).any(axis=2).sum() >= 60  # the whole 8 x 8 input (a few noise pixels may be 0)


def test_an_erased_sample_keeps_its_warp_and_targets(synth_data):
    """Erasing draws after everything else: the sample is its unerased twin with one rectangle changed, the
    points under it keep their targets, and without erasing the affine is still the generator's first draw (the
    samples of earlier runs are unchanged)."""
    records = read_splits(synth_data["train"])
    codec = HeatmapCodec(stride=4, sigma=2.0, global_sigma=2.0, decoder="dark", decode_sigma=1.0, include_occluded=True)
    plain = Augmentation(rotation=30.0, scale=(0.75, 1.25), translate=0.05, flip=0.5, color=True, crop=0.5,
                         crop_margin=(0.05, 0.3), crop_jitter=0.05, erase=0.0, erase_area=(0.1, 0.1))  # fmt: skip
    twins = [KeypointDataset(records, "all", 64, codec, cfg, seed=3) for cfg in (plain, replace(plain, erase=1.0))]
    for index in range(4):
        a, b = (dataset[(index, 2)] for dataset in twins)
        for key in ("target", "weight"):
            assert torch.equal(a[key], b[key])
        changed = (a["image"] != b["image"]).any(dim=0)
        assert 0.08 * 64 * 64 <= changed.sum() <= 0.12 * 64 * 64
        keypoints = records[index].keypoints
        annotated = np.where(keypoints[:, 2:] >= 0, keypoints[:, :2], np.nan)
        h, w = load_image(records[index].image_path).shape[:2]
        m, flipped = random_matrix(np.random.default_rng((3, 2, index)), h, w, 64, plain, annotated)
        by_hand = transform_keypoints(keypoints, m, flipped, "all", 64)
        expected = codec.encode(by_hand[:, :2], by_hand[:, 2], 64)["target"]
        assert torch.equal(a["target"], torch.from_numpy(expected))
