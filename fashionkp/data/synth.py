"""Synthetic garments in the FashionAI release format: the embedded default data of fashionkp.

Each garment is a filled silhouette whose outline passes through the category's key points (the
points are polygon corners), with random shape, pose, scale, rotation, colour, texture and background
clutter; an occluding blob occasionally hides points, which are then recorded as occluded (v=0).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from fashionkp.data.fashionai import Record, write_annotations
from fashionkp.data.keypoints import CATEGORIES, CATEGORY_KEYPOINTS, KEYPOINT_INDEX, NUM_KEYPOINTS

# Canonical garments: x to the image right (FashionAI's "left" points lie at smaller x), y down,
# units of about half a torso width. Outlines list point names in drawing order; "@x,y" is a plain
# corner that is not a key point.
TEMPLATES: dict[str, dict[str, tuple[float, float]]] = {
    "blouse": {
        "neckline_left": (-0.25, 0.0), "neckline_right": (0.25, 0.0), "center_front": (0.0, 0.22),
        "shoulder_left": (-0.62, 0.1), "shoulder_right": (0.62, 0.1), "armpit_left": (-0.55, 0.55),
        "armpit_right": (0.55, 0.55), "cuff_left_out": (-1.15, 1.0), "cuff_left_in": (-0.9, 1.15),
        "cuff_right_out": (1.15, 1.0), "cuff_right_in": (0.9, 1.15), "top_hem_left": (-0.55, 1.4),
        "top_hem_right": (0.55, 1.4),
    },
    "outwear": {
        "neckline_left": (-0.25, 0.0), "neckline_right": (0.25, 0.0), "shoulder_left": (-0.65, 0.1),
        "shoulder_right": (0.65, 0.1), "armpit_left": (-0.6, 0.6), "armpit_right": (0.6, 0.6),
        "waistline_left": (-0.52, 1.15), "waistline_right": (0.52, 1.15), "cuff_left_out": (-1.05, 1.55),
        "cuff_left_in": (-0.8, 1.65), "cuff_right_out": (1.05, 1.55), "cuff_right_in": (0.8, 1.65),
        "top_hem_left": (-0.62, 1.85), "top_hem_right": (0.62, 1.85),
    },
    "dress": {
        "neckline_left": (-0.25, 0.0), "neckline_right": (0.25, 0.0), "center_front": (0.0, 0.25),
        "shoulder_left": (-0.55, 0.08), "shoulder_right": (0.55, 0.08), "armpit_left": (-0.5, 0.55),
        "armpit_right": (0.5, 0.55), "cuff_left_out": (-0.85, 0.5), "cuff_left_in": (-0.72, 0.7),
        "cuff_right_out": (0.85, 0.5), "cuff_right_in": (0.72, 0.7), "waistline_left": (-0.42, 1.0),
        "waistline_right": (0.42, 1.0), "hemline_left": (-0.95, 2.4), "hemline_right": (0.95, 2.4),
    },
    "skirt": {
        "waistband_left": (-0.5, 0.0), "waistband_right": (0.5, 0.0),
        "hemline_left": (-0.95, 1.3), "hemline_right": (0.95, 1.3),
    },
    "trousers": {
        "waistband_left": (-0.55, 0.0), "waistband_right": (0.55, 0.0), "crotch": (0.0, 0.75),
        "bottom_left_out": (-0.65, 2.3), "bottom_left_in": (-0.15, 2.3),
        "bottom_right_in": (0.15, 2.3), "bottom_right_out": (0.65, 2.3),
    },
}  # fmt: skip
OUTLINES: dict[str, tuple[str, ...]] = {
    "blouse": ("neckline_left", "center_front", "neckline_right", "shoulder_right", "cuff_right_out",
               "cuff_right_in", "armpit_right", "top_hem_right", "top_hem_left", "armpit_left",
               "cuff_left_in", "cuff_left_out", "shoulder_left"),
    "outwear": ("neckline_left", "@0,0.3", "neckline_right", "shoulder_right", "cuff_right_out",
                "cuff_right_in", "armpit_right", "waistline_right", "top_hem_right", "top_hem_left",
                "waistline_left", "armpit_left", "cuff_left_in", "cuff_left_out", "shoulder_left"),
    "dress": ("neckline_left", "center_front", "neckline_right", "shoulder_right", "cuff_right_out",
              "cuff_right_in", "armpit_right", "waistline_right", "hemline_right", "hemline_left",
              "waistline_left", "armpit_left", "cuff_left_in", "cuff_left_out", "shoulder_left"),
    "skirt": ("waistband_left", "waistband_right", "hemline_right", "hemline_left"),
    "trousers": ("waistband_left", "waistband_right", "bottom_right_out", "bottom_right_in", "crotch",
                 "bottom_left_in", "bottom_left_out"),
}  # fmt: skip


@dataclass
class SynthSample:
    image: np.ndarray  # (H, W, 3) RGB uint8
    category: str
    keypoints: np.ndarray  # (24, 3) x, y, v


def _shape(rng: np.random.Generator, category: str) -> dict[str, np.ndarray]:
    """Randomly deformed canonical points: width, length and per-point jitter, symmetric on average."""
    width = rng.uniform(0.8, 1.25)
    length = rng.uniform(0.8, 1.2)
    points = {}
    for name, (x, y) in TEMPLATES[category].items():
        points[name] = np.array([x * width, y * length]) + rng.normal(0.0, 0.04, 2)
    return points


def _outline(category: str, points: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    corners = []
    for name in OUTLINES[category]:
        if name.startswith("@"):
            corners.append(np.array([float(v) for v in name[1:].split(",")]) + rng.normal(0, 0.03, 2))
        else:
            corners.append(points[name])
    return np.array(corners)


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = np.array(_colour(rng, 150, 255), dtype=np.float32)
    ramp = np.linspace(-20, 20, h, dtype=np.float32)[:, None, None]
    image = np.clip(base + ramp + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(2, 7)):  # clutter: shapes that are not garments
        c = _colour(rng, 90, 240)
        kind = rng.integers(3)
        p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if kind == 0:
            cv2.circle(image, p, int(rng.integers(4, max(5, w // 8))), c, -1, cv2.LINE_AA)
        elif kind == 1:
            q = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(image, p, q, c, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            q = (p[0] + int(rng.integers(5, w // 5)), p[1] + int(rng.integers(5, h // 5)))
            cv2.rectangle(image, p, q, c, -1)
    return image


def _texture(rng: np.random.Generator, h: int, w: int, colour) -> np.ndarray:
    fill = np.empty((h, w, 3), np.uint8)
    fill[:] = colour
    kind = rng.integers(3)
    second = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-70, 70, 3), 0, 255))
    if kind == 1:  # stripes
        period = int(rng.integers(6, 18))
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = ((xx * math.cos(angle) + yy * math.sin(angle)) // (period / 2)) % 2 == 0
        fill[stripes] = second
    elif kind == 2:  # dots
        for _ in range(int(h * w / 300)):
            cv2.circle(fill, (int(rng.integers(w)), int(rng.integers(h))), 2, second, -1)
    return fill


def render(rng: np.random.Generator, category: str, max_side: int = 256) -> SynthSample:
    """Draw one garment of ``category``; every annotated point lies inside the image."""
    aspect = rng.uniform(0.75, 1.0)
    h, w = (max_side, int(max_side * aspect)) if rng.random() < 0.5 else (int(max_side * aspect), max_side)
    while True:
        points = _shape(rng, category)
        outline = _outline(category, points, rng)
        names = list(points)
        canon = np.array([points[n] for n in names] + list(outline))
        centre = (canon.min(0) + canon.max(0)) / 2
        extent = (canon.max(0) - canon.min(0)).max()
        scale = rng.uniform(0.55, 0.85) * min(h, w) / extent
        angle = math.radians(rng.uniform(-15, 15))
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) * scale
        shift = np.array([w / 2, h / 2]) + rng.uniform(-0.1, 0.1, 2) * np.array([w, h])
        placed = (canon - centre) @ rot.T + shift
        if (
            (placed[:, 0] >= 1).all()
            and (placed[:, 0] <= w - 2).all()
            and (placed[:, 1] >= 1).all()
            and (placed[:, 1] <= h - 2).all()
        ):
            break
    kp_xy = dict(zip(names, placed[: len(names)], strict=True))
    polygon = placed[len(names) :]
    image = _background(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    colour = _colour(rng, 10, 220)
    alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
    image = (image * (1 - alpha) + _texture(rng, h, w, colour) * alpha).astype(np.uint8)
    edge = tuple(int(c * 0.5) for c in colour)
    cv2.polylines(image, [np.round(polygon * 16).astype(np.int32)], True, edge, 1, cv2.LINE_AA, shift=4)
    keypoints = np.tile(np.array([np.nan, np.nan, -1.0], np.float32), (NUM_KEYPOINTS, 1))
    for name, xy in kp_xy.items():
        keypoints[KEYPOINT_INDEX[name]] = (round(xy[0]), round(xy[1]), 1.0)
    if rng.random() < 0.15:  # an occluder (a bag, a hand) over one point: still annotated, v = 0
        target = keypoints[CATEGORY_KEYPOINTS[category][rng.integers(len(CATEGORY_KEYPOINTS[category]))]]
        radius = int(rng.uniform(0.06, 0.12) * min(h, w))
        centre_o = (int(target[0] + rng.integers(-3, 4)), int(target[1] + rng.integers(-3, 4)))
        cv2.circle(image, centre_o, radius, _colour(rng, 0, 255), -1, cv2.LINE_AA)
        d = np.hypot(keypoints[:, 0] - centre_o[0], keypoints[:, 1] - centre_o[1])
        keypoints[(d < radius) & (keypoints[:, 2] >= 0), 2] = 0.0
    return SynthSample(image, category, keypoints)


def _write_split(out: Path, split: str, n_per_category: int, seed: int, max_side: int, progress: bool) -> list[Record]:
    records = []
    jobs = [(c, i) for c in CATEGORIES for i in range(n_per_category)]
    for category, i in tqdm(jobs, desc=f"synth {split}", disable=not progress, leave=False):
        # Each image has its own generator: a sample does not depend on how many others were made.
        rng = np.random.default_rng([seed, CATEGORIES.index(category), i, 0 if split == "train" else 1])
        sample = render(rng, category, max_side)
        image_id = f"Images/{category}/{hashlib.md5(f'{seed}-{split}-{category}-{i}'.encode()).hexdigest()}.jpg"
        path = out / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
        records.append(Record(path, image_id, category, sample.keypoints))
    return records


def generate(
    out_dir: Path | str,
    n_per_category: int = 100,
    n_test_per_category: int | None = None,
    seed: int = 0,
    max_side: int = 256,
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``out_dir/train`` (Annotations/annotations.csv + Images/<category>/*.jpg) and ``out_dir/test``
    (test.csv with image_id,image_category, its images, and the answers in answers.csv)."""
    out = Path(out_dir)
    if n_per_category < 1:
        raise ValueError("n_per_category must be at least 1")
    n_test = max(1, n_per_category // 5) if n_test_per_category is None else n_test_per_category
    train = _write_split(out / "train", "train", n_per_category, seed, max_side, progress)
    write_annotations(train, out / "train" / "Annotations" / "annotations.csv")
    test = _write_split(out / "test", "test", n_test, seed, max_side, progress)
    write_annotations(test, out / "test" / "answers.csv")
    with (out / "test" / "test.csv").open("w") as f:
        f.write("image_id,image_category\n")
        f.writelines(f"{r.image_id},{r.category}\n" for r in test)
    return {
        "train": out / "train",
        "test": out / "test",
        "test_csv": out / "test" / "test.csv",
        "answers": out / "test" / "answers.csv",
    }
