import numpy as np
import pytest
import torch

from fashionkp.data.codec import decode, flip_back, gaussian_targets, heatmap_to_input, input_to_heatmap


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
    coords, scores = decode(_maps(centres, sigma), "dark", sigma / 2)
    err = np.hypot(*(coords[0].numpy() - centres).T)
    assert err.mean() < 0.05 and err.max() < 0.1
    # the score is the sampled peak: exp(-d^2 / 2 sigma^2) with d <= sqrt(0.5)
    assert (scores > np.exp(-0.25 / sigma**2) - 1e-6).all() and (scores <= 1).all()


def test_decoders_ranked_on_noisy_gaussians(centres):
    torch.manual_seed(0)
    maps = (_maps(centres) + 0.05 * torch.randn(1, len(centres), 48, 48)).clamp_min(0)
    errs = {m: np.hypot(*(decode(maps, m, 1.0)[0][0].numpy() - centres).T).mean() for m in ("dark", "seed", "argmax")}
    assert errs["dark"] < errs["seed"] < errs["argmax"]
    assert errs["dark"] < 0.1
    with pytest.raises(ValueError, match="unknown decoder"):
        decode(maps, "soft")


def test_seed_rule_is_quarter_step_plus_shift():
    hm = torch.zeros(1, 1, 9, 9)
    hm[0, 0, 4, 4], hm[0, 0, 4, 5] = 1.0, 0.9
    ((x, y),) = decode(hm, "seed")[0][0].tolist()
    assert x == pytest.approx(4.25 + 0.125) and y == pytest.approx(4.125)


def test_flip_back_undoes_a_mirrored_input():
    centres = np.array([[5.3, 6.0], [20.7, 9.2]])
    maps = _maps(centres, size=32)
    mirrored = _maps(np.c_[31 - centres[:, 0], centres[:, 1]][::-1].copy(), size=32)  # channels swapped
    back = flip_back(mirrored, [1, 0])
    assert torch.allclose(back, maps, atol=1e-5)
