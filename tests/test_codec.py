import numpy as np
import pytest
import torch

from fashionkp.data.codec import (
    HeatmapCodec,
    decode_peaks,
    flip_back,
    gaussian_targets,
    heatmap_to_input,
    input_to_heatmap,
)
from fashionkp.data.keypoints import CATEGORY_KEYPOINTS, flip_permutation
from fashionkp.data.transforms import apply_affine, augment_matrix, invert_affine, letterbox_matrix, transform_keypoints


@pytest.fixture
def centres():
    return np.random.default_rng(0).uniform(4, 44, (64, 2))


def _maps(centres, sigma=2.0, size=48):
    return torch.from_numpy(gaussian_targets(centres, np.ones(len(centres), bool), size, size, sigma))[None]


def test_targets_peak_at_subpixel_centre():
    hm = gaussian_targets(np.array([[10.25, 7.5]]), np.array([True]), 16, 20, 1.5)
    assert hm.shape == (1, 16, 20) and hm.max() <= 1.0
    ys, xs = np.mgrid[0:16, 0:20]
    w = hm[0]  # the sampled Gaussian's centroid is its centre (sigma >= 1: no aliasing)
    assert (w * xs).sum() / w.sum() == pytest.approx(10.25, abs=1e-3)
    assert (w * ys).sum() / w.sum() == pytest.approx(7.5, abs=1e-3)
    assert not gaussian_targets(np.array([[1.0, 1.0]]), np.array([False]), 8, 8, 1.0).any()


def test_coordinate_mapping_round_trip():
    x = np.array([0.0, 3.0, 255.0])
    assert np.allclose(heatmap_to_input(input_to_heatmap(x, 4), 4), x)
    assert input_to_heatmap(np.array([1.5]), 4)[0] == 0.0  # centre of heatmap cell 0 = input 1.5


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_dark_recovers_noise_free_centres(centres, sigma):
    coords, scores = decode_peaks(_maps(centres, sigma), "dark", sigma / 2)
    err = np.hypot(*(coords[0].numpy() - centres).T)
    assert err.mean() < 0.05 and err.max() < 0.1
    # the score is the sampled peak: exp(-d^2 / 2 sigma^2) with d <= sqrt(0.5)
    assert (scores > np.exp(-0.25 / sigma**2) - 1e-6).all() and (scores <= 1).all()


def test_decoders_ranked_on_noisy_gaussians(centres):
    torch.manual_seed(0)
    maps = (_maps(centres) + 0.05 * torch.randn(1, len(centres), 48, 48)).clamp_min(0)
    methods = ("dark", "quarter_offset", "argmax")
    errs = {m: np.hypot(*(decode_peaks(maps, m, 1.0)[0][0].numpy() - centres).T).mean() for m in methods}
    assert errs["dark"] < errs["quarter_offset"] < errs["argmax"]
    assert errs["dark"] < 0.1
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_peaks(maps, "soft", 1.0)


def test_quarter_offset_rule_is_quarter_step_plus_shift():
    hm = torch.zeros(1, 1, 9, 9)
    hm[0, 0, 4, 4], hm[0, 0, 4, 5] = 1.0, 0.9
    ((x, y),) = decode_peaks(hm, "quarter_offset", 1.0)[0][0].tolist()
    assert x == pytest.approx(4.25 + 0.125) and y == pytest.approx(4.125)


def test_flip_back_undoes_a_mirrored_input():
    centres = np.array([[5.3, 6.0], [20.7, 9.2]])
    maps = _maps(centres, size=32)
    mirrored = _maps(np.c_[31 - centres[:, 0], centres[:, 1]][::-1].copy(), size=32)  # channels swapped
    back = flip_back(mirrored, [1, 0])
    assert torch.allclose(back, maps, atol=1e-5)


def _codec(**changes) -> HeatmapCodec:
    values = dict(stride=4, sigma=2.0, global_sigma=2.0, decoder="dark", decode_sigma=1.0, include_occluded=True)
    return HeatmapCodec(**{**values, **changes})


@pytest.mark.parametrize("augmented", [False, True], ids=["letterbox", "rotated-scaled-shifted-flipped"])
def test_codec_round_trip_through_the_photo_geometry(augmented):
    """Photo points -> the one affine (letterbox, or rotation+scale+shift+flip with the left/right swap) ->
    encode -> decode -> back through the inverse affine: the photo points again, within 0.1 px."""
    h, w, size, clothes = 300, 420, 256, "blouse"  # a non-square photo
    own = list(CATEGORY_KEYPOINTS[clothes])
    rng = np.random.default_rng(1)
    photo = np.full((len(own), 3), 1.0)
    photo[:, 0], photo[:, 1] = rng.uniform(0.25 * w, 0.75 * w, len(own)), rng.uniform(0.25 * h, 0.75 * h, len(own))
    if augmented:
        matrix = augment_matrix(h, w, size, rotation_deg=17.0, scale=0.9, translate=(0.03, -0.02), flip=True)
    else:
        matrix = letterbox_matrix(h, w, size)
    inputs = transform_keypoints(photo, matrix, augmented, clothes, size)
    assert (inputs[:, 2] == 1).all()  # every point stayed inside the input
    codec = _codec()
    targets = codec.encode(inputs[:, :2], inputs[:, 2], size)
    assert targets["target"].shape == (len(own), size // 4, size // 4) and targets["weight"].all()
    decoded, _ = codec.decode(torch.from_numpy(targets["target"])[None])
    decoded = decoded[0].numpy()
    if augmented:  # the channels were swapped left/right with the flip: swap them back
        decoded = decoded[list(flip_permutation(clothes))]
    back = apply_affine(decoded, invert_affine(matrix))
    assert np.abs(back - photo[:, :2]).max() < 0.1, np.abs(back - photo[:, :2]).max()


def test_flip_test_is_equivariant_on_a_symmetric_image():
    """A mirror-symmetric input whose left/right points mirror each other: a perfect model sees the same heatmaps on
    the input and on its mirror image. Mirrored back with the left/right channels swapped, they must be exactly the
    un-mirrored ones, and flip averaging must move no point; the identity permutation or an off-by-one mirror fails."""
    clothes, size = "trousers", 64
    own = list(CATEGORY_KEYPOINTS[clothes])
    perm = flip_permutation(clothes)
    rng = np.random.default_rng(3)
    points = rng.uniform(8, size - 9, (len(own), 2))
    for i, j in enumerate(perm):  # each point's partner is its mirror image (points on the axis: their own)
        if i < j:
            points[j] = (size - 1 - points[i, 0], points[i, 1])
        elif i == j:
            points[i, 0] = (size - 1) / 2
    codec = _codec()
    maps = torch.from_numpy(codec.encode(points, np.ones(len(own)), size)["target"])[None]
    on_the_mirror_image = maps  # the input is its own mirror image
    assert torch.allclose(flip_back(on_the_mirror_image, perm), maps, atol=1e-6)
    averaged = 0.5 * (maps + flip_back(on_the_mirror_image, perm))
    np.testing.assert_allclose(codec.decode(averaged)[0].numpy(), codec.decode(maps)[0].numpy(), atol=1e-4)
    # what would fail: no left/right swap, or a mirror off by one heatmap pixel
    assert not torch.allclose(flip_back(on_the_mirror_image, list(range(len(own)))), maps, atol=1e-2)
    assert not torch.allclose(torch.roll(flip_back(on_the_mirror_image, perm), 1, dims=-1), maps, atol=1e-2)


def test_codec_names_and_config():
    codec = _codec(decoder="seed")  # the old name of quarter_offset, accepted for one release
    assert codec.decoder == "quarter_offset"
    assert HeatmapCodec(**codec.config()) == codec
    with pytest.raises(ValueError, match="heatmap.decoder='drak': not a valid choice"):
        _codec(decoder="drak")
    weights = _codec(include_occluded=False).encode(np.zeros((3, 2)) + 8, np.array([1, 0, -1]), 32)["weight"]
    assert weights.tolist() == [1.0, 0.0, 0.0]
    assert _codec().encode(np.zeros((3, 2)) + 8, np.array([1, 0, -1]), 32)["weight"].tolist() == [1.0, 1.0, 0.0]
