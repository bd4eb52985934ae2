"""Geometry and photometry of one sample: every geometric change is one 2x3 affine, applied once.

Matrices map original-image coordinates to input coordinates in the pixel-centre convention of
:mod:`fashionkp.data.fashionai`; OpenCV's ``warpAffine`` uses the same convention, so warping the image and
transforming the points with the same matrix stay aligned to sub-pixel accuracy (unbiased, UDP-style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from fashionkp.config import is_number
from fashionkp.data.keypoints import flip_permutation
from fashionkp.errors import ConfigError

#: Grey fill of letterbox padding and of pixels rotated in from outside the image.
FILL_VALUE = (124, 116, 104)


def _to3x3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def frame_matrix(frame: np.ndarray | tuple[float, float, float], size: int) -> np.ndarray:
    """Map the square ``frame`` of a photo, (left, top, side) in its pixel coordinates (a pixel's centre is
    its index, so a photo spans [-0.5, w - 0.5)), onto a ``size`` x ``size`` input."""
    left, top, side = (float(v) for v in frame)
    s = size / side
    return np.array([[s, 0.0, -s * left - 0.5], [0.0, s, -s * top - 0.5]])


def input_size_at(input_size: int, scale: float) -> int:
    """A model's input side at a test scale: the nearest multiple of 32 (at least 32)."""
    return max(32, int(round(input_size * scale / 32)) * 32)


def letterbox_frame(height: int, width: int) -> tuple[float, float, float]:
    """The square of a photo that the whole-photo input shows: its long side, from the top-left corner."""
    return (-0.5, -0.5, float(max(height, width)))


def letterbox_matrix(height: int, width: int, size: int) -> np.ndarray:
    """Scale the long side to ``size`` and place the image at the top-left of a square input.

    Top-left placement makes the letterbox frame the same square [0, max(h, w)) at every input size,
    so heatmaps of models with different input sizes (ensembles, multi-scale test) align exactly.
    """
    return frame_matrix(letterbox_frame(height, width), size)


def check_crop_margin(key: str, margin: float) -> float:
    """``margin`` as a crop pass takes it (a fraction of the box's side on each side); ConfigError naming ``key``."""
    if not is_number(margin) or not 0 <= margin <= 2:
        raise ConfigError(key, margin, "the crop margin is a fraction of the box's side, in [0, 2]")
    return float(margin)


def check_crop_passes(key: str, passes: int) -> int:
    """``passes`` as a predictor takes it (a whole number of crop passes, at least 1); ConfigError naming ``key``."""
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ConfigError(key, passes, "the number of crop passes after the first, a whole number from 1")
    return passes


def crop_frame(points: np.ndarray, margin: float, height: int, width: int) -> tuple[float, float, float]:
    """The square frame around ``points`` ((K, 2), NaN ignored) that the crop pass looks at: the points' box,
    its long side grown by ``margin`` of it on each side, centred on the box; never larger than the
    letterbox frame (no coarser than the first pass) nor smaller than a quarter of it (a collapsed box)."""
    points = points[np.isfinite(points).all(axis=1)]
    longest = float(max(height, width))
    if not len(points):
        return letterbox_frame(height, width)
    low, high = points.min(axis=0), points.max(axis=0)
    side = float(np.clip((high - low).max() * (1 + 2 * margin), longest / 4, longest))
    cx, cy = (low + high) / 2
    return (cx - side / 2, cy - side / 2, side)


def augment_matrix(
    height: int,
    width: int,
    size: int,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    translate: tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
    frame: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """Image centre to input centre, scaled to fit, rotated, rescaled, shifted (fraction of size), flipped.

    With ``frame`` (left, top, side), that square of the photo is fitted to the input instead of the photo.
    """
    if frame is None:
        src_c, side = np.array([(width - 1) / 2.0, (height - 1) / 2.0]), max(height, width)
    else:
        src_c, side = np.array([frame[0] + frame[2] / 2, frame[1] + frame[2] / 2]), frame[2]
    s = scale * size / side
    a = math.radians(rotation_deg)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * s
    dst_c = np.array([(size - 1) / 2.0, (size - 1) / 2.0]) + np.asarray(translate) * size
    m = np.hstack([rot, (dst_c - rot @ src_c)[:, None]])
    if flip:
        m = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]]) @ _to3x3(m)
    return m


def invert_affine(m: np.ndarray) -> np.ndarray:
    return np.linalg.inv(_to3x3(m))[:2]


def apply_affine(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Transform (..., 2) points by a 2x3 matrix (NaN stays NaN)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ m[:, :2].T + m[:, 2]


def warp_image(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(
        image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=FILL_VALUE
    )


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) network input of a photo: the letterbox placement of :func:`letterbox_matrix`."""
    return warp_image(image, letterbox_matrix(*image.shape[:2], size), size)


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random affine and of the colour changes of training samples (``conf/augmentation``)."""

    #: Rotation drawn from +-``rotation`` degrees.
    rotation: float
    #: Scale factor drawn from [low, high] on top of the letterbox fit.
    scale: tuple[float, float]
    #: Shift drawn from +-``translate`` of the input side, in x and y.
    translate: float
    #: Probability of a horizontal flip (left/right points swap).
    flip: float
    #: Colour jitter, grey and blur/noise.
    color: bool
    #: Fraction of samples centred on the box of their annotated points (what the crop pass of the two-pass
    #: predictor sees); the others show the whole photo.
    crop: float
    #: Margin of a crop sample drawn from [low, high], a fraction of the box's long side on each side.
    crop_margin: tuple[float, float]
    #: Shift of a crop sample's centre drawn from +-``crop_jitter`` of its side, in x and y: the predictor's
    #: box comes from its own first pass, never exactly the annotated one.
    crop_jitter: float
    #: Probability that a sample has one rectangle of its input erased (filled with noise); the points under it
    #: keep their targets.
    erase: float
    #: Area of that rectangle drawn from [low, high], a fraction of the input.
    erase_area: tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))
        object.__setattr__(self, "crop_margin", tuple(self.crop_margin))
        object.__setattr__(self, "erase_area", tuple(self.erase_area))


def random_matrix(
    rng: np.random.Generator,
    height: int,
    width: int,
    size: int,
    cfg: Augmentation,
    points: np.ndarray | None = None,
) -> tuple[np.ndarray, bool]:
    """One random affine of a sample; ``points`` ((K, 2) in photo pixels, NaN where not annotated) place the
    crop samples (``cfg.crop``)."""
    flip = bool(rng.random() < cfg.flip)
    rotation = float(rng.uniform(-cfg.rotation, cfg.rotation)) if cfg.rotation else 0.0
    if cfg.crop and points is not None and np.isfinite(points).all(axis=1).any() and rng.random() < cfg.crop:
        left, top, side = crop_frame(points, float(rng.uniform(*cfg.crop_margin)), height, width)
        shift = rng.uniform(-cfg.crop_jitter, cfg.crop_jitter, 2) * side if cfg.crop_jitter else np.zeros(2)
        frame = (left + shift[0], top + shift[1], side)
        return augment_matrix(height, width, size, rotation_deg=rotation, flip=flip, frame=frame), flip
    m = augment_matrix(
        height, width, size,
        rotation_deg=rotation,
        scale=float(rng.uniform(*cfg.scale)),
        translate=tuple(rng.uniform(-cfg.translate, cfg.translate, 2)) if cfg.translate else (0.0, 0.0),
        flip=flip,
    )  # fmt: skip
    return m, flip


def transform_keypoints(keypoints: np.ndarray, m: np.ndarray, flipped: bool, clothes: str, size: int) -> np.ndarray:
    """Map a model's (K, 3) x, y, v keypoints into the input; flipped samples swap left/right channels.

    Points pushed outside the input get v = -1 so that they carry no weight.
    """
    out = keypoints.copy()
    out[:, :2] = apply_affine(keypoints[:, :2], m)
    if flipped:
        out = out[list(flip_permutation(clothes))]
    outside = (out[:, 0] < -0.5) | (out[:, 1] < -0.5) | (out[:, 0] > size - 0.5) | (out[:, 1] > size - 0.5)
    out[outside & (out[:, 2] >= 0)] = (np.nan, np.nan, -1.0)
    return out


def erase_rectangle(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float]) -> np.ndarray:
    """Random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020): one rectangle of an (S, S, 3)
    input, its area a fraction drawn from ``area``, its aspect ratio log-uniform in [0.3, 1 / 0.3], filled with uniform
    noise. Its points keep their targets, so the network learns to place hidden points from the garment around
    them, as FashionAI's occluded points (v=0, counted by the metric) ask of it."""
    size = image.shape[0]
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
    pixels = rng.uniform(*area) * size * size
    h, w = math.sqrt(pixels * aspect), math.sqrt(pixels / aspect)
    # a side longer than the input is cut to it and the other grown, so that the area stays the one drawn
    if h > size:
        h, w = size, pixels / size
    elif w > size:
        h, w = pixels / size, size
    h, w = max(1, round(h)), max(1, round(w))
    top, left = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
    out = image.copy()
    out[top : top + h, left : left + w] = rng.integers(0, 256, (h, w, image.shape[2]), dtype=np.uint8)
    return out


def photometric(enabled: bool) -> A.Compose | None:
    """Colour augmentation only; geometry never goes through albumentations (one affine, see above)."""
    if not enabled:
        return None
    return A.Compose(
        [
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.8),
            A.ToGray(p=0.05),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.06))], p=0.2),
        ]
    )
