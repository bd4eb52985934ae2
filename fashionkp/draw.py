"""Pictures people look at: key points and skeletons on images, grid sheets, curves and bar charts."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from fashionkp.data.keypoints import CATEGORY_KEYPOINTS, KEYPOINT_NAMES, NUM_KEYPOINTS, skeleton_for


def _palette() -> list[tuple[int, int, int]]:
    colours = []
    for i in range(NUM_KEYPOINTS):
        r, g, b = colorsys.hsv_to_rgb(i / NUM_KEYPOINTS, 0.85, 1.0)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


PALETTE = _palette()


def draw_keypoints(
    image: np.ndarray, keypoints: np.ndarray, category: str, radius: int | None = None, label: str | None = None
) -> np.ndarray:
    """Draw a category's (24, 2+) points (x, y[, v]) and skeleton on a copy of an RGB image.

    Visible points are filled discs, occluded (v = 0) hollow circles; absent or NaN points are skipped.
    """
    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    radius = radius or max(2, round(max(h, w) / 120))
    pts = np.asarray(keypoints, dtype=np.float64)
    vis = pts[:, 2] if pts.shape[1] > 2 else np.ones(len(pts))
    ok = np.isfinite(pts[:, :2]).all(1) & (vis >= 0)

    def at(i: int) -> tuple[int, int]:
        return int(round(pts[i, 0])), int(round(pts[i, 1]))

    for a, b in skeleton_for(category):
        if ok[a] and ok[b]:
            cv2.line(out, at(a), at(b), (255, 255, 255), max(1, radius // 2 + 1), cv2.LINE_AA)
            cv2.line(out, at(a), at(b), PALETTE[a], max(1, radius // 2), cv2.LINE_AA)
    for i in CATEGORY_KEYPOINTS[category]:
        if ok[i]:
            cv2.circle(out, at(i), radius + 1, (0, 0, 0), -1 if vis[i] >= 1 else 2, cv2.LINE_AA)
            cv2.circle(out, at(i), radius, PALETTE[i], -1 if vis[i] >= 1 else 2, cv2.LINE_AA)
    if label:
        cv2.putText(out, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def grid_sheet(images: Sequence[np.ndarray], columns: int = 4, tile: int = 256) -> np.ndarray:
    """Fit each image into a cell ``tile`` pixels wide and lay the cells out in rows of ``columns``.

    Cells are square unless every image is wider than tall (e.g. side-by-side pairs): then they are as
    tall as the tallest image needs, so no sheet is mostly white space.
    """
    if not images:
        raise ValueError("no images for a grid sheet")
    cell_h = round(tile * min(1.0, max(img.shape[0] / img.shape[1] for img in images)))
    rows = -(-len(images) // columns)
    sheet = np.full((rows * cell_h, columns * tile, 3), 255, np.uint8)
    for n, img in enumerate(images):
        s = min(tile / img.shape[1], cell_h / img.shape[0])
        size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
        small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        r, c = divmod(n, columns)
        sheet[r * cell_h : r * cell_h + small.shape[0], c * tile : c * tile + small.shape[1]] = small
    return sheet


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    h = max(left.shape[0], right.shape[0])
    pad = [np.pad(x, ((0, h - x.shape[0]), (0, 0), (0, 0)), constant_values=255) for x in (left, right)]
    return np.hstack([pad[0], np.full((h, 4, 3), 255, np.uint8), pad[1]])


def save_image(path: Path | str, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write image {path}")
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path | str) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(losses: Sequence[tuple[int, float]], val_ne: Sequence[tuple[int, float]], path: Path | str) -> Path:
    """Training loss per step (left axis, log scale) and validation NE in percent (right axis)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        s, v = zip(*losses, strict=True)
        ax.plot(s, v, color="tab:blue", lw=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    if val_ne:
        ax2 = ax.twinx()
        s, v = zip(*val_ne, strict=True)
        ax2.plot(s, [100 * x for x in v], "o-", color="tab:red", label="val NE")
        ax2.set_ylabel("validation NE (%)", color="tab:red")
    ax.set_title("fashionkp training")
    return save_figure(plt, fig, path)


def plot_bars(values: dict[str, float], path: Path | str, title: str, ylabel: str = "NE (%)") -> Path:
    """A bar chart (values in fractions, drawn in percent), e.g. NE per keypoint."""
    plt = pyplot()
    names = [n for n in KEYPOINT_NAMES if n in values] + [n for n in values if n not in KEYPOINT_NAMES]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(names) + 2), 4))
    ax.bar(range(len(names)), [100 * values[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(plt, fig, path)
