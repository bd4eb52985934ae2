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

from fashionkp.data.keypoints import flip_permutation

#: Grey fill of letterbox padding and of pixels rotated in from outside the image.
FILL_VALUE = (124, 116, 104)


def _to3x3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def letterbox_matrix(height: int, width: int, size: int) -> np.ndarray:
    """Scale the long side to ``size`` and place the image at the top-left of a square input.

    Top-left placement makes the letterbox frame the same square [0, max(h, w)) at every input size,
    so heatmaps of models with different input sizes (ensembles, multi-scale test) align exactly.
    """
    s = size / max(height, width)
    return np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5]])


def augment_matrix(
    height: int,
    width: int,
    size: int,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    translate: tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
) -> np.ndarray:
    """Image centre to input centre, scaled to fit, rotated, rescaled, shifted (fraction of size), flipped."""
    s = scale * size / max(height, width)
    a = math.radians(rotation_deg)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * s
    src_c = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(self.scale))


def random_matrix(
    rng: np.random.Generator, height: int, width: int, size: int, cfg: Augmentation
) -> tuple[np.ndarray, bool]:
    flip = bool(rng.random() < cfg.flip)
    m = augment_matrix(
        height, width, size,
        rotation_deg=float(rng.uniform(-cfg.rotation, cfg.rotation)) if cfg.rotation else 0.0,
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
