"""``predict.py``: a FashionAI test CSV -> one submission CSV (every garment type in one run), or a folder
/ list of photos of one garment type -> points with scores (CSV and JSON) and drawn images."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fashionkp.config import as_list, register_resolvers
from fashionkp.data.fashionai import read_csv
from fashionkp.data.images import load_image
from fashionkp.data.keypoints import ALL, CATEGORIES, CATEGORY_KEYPOINTS, KEYPOINT_NAMES
from fashionkp.data.submission import write_submission
from fashionkp.draw import draw_keypoints, grid_sheet, save_image
from fashionkp.errors import ConfigError
from fashionkp.inference.predictor import KeypointPredictor, predictor_from_cfg, run_on_files

log = logging.getLogger(__name__)
register_resolvers()
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(spec: str | Sequence[str]) -> list[Path]:
    """Image files of a folder (recursively), a file, or a list of either."""
    items = as_list(spec)
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)  # missing files are reported by the prediction loop
    if not paths:
        raise ConfigError("images", items, "no image files found", f"looked for {', '.join(IMAGE_SUFFIXES)}")
    return paths


def draw_predictions(paths, categories, points, out_dir: Path, limit: int) -> Path | None:
    """Draw ``limit`` predictions spread evenly over the run (so every garment type of a test list shows)."""
    drawn = []
    for i in sorted(set(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int))):
        if categories[i] is None or np.isnan(points[i, list(CATEGORY_KEYPOINTS[categories[i]]), 0]).any():
            continue
        image = draw_keypoints(load_image(paths[i]), points[i, :, :2], categories[i], label=categories[i])
        save_image(out_dir / "drawn" / f"{Path(paths[i]).stem}.jpg", image)
        drawn.append(image)
    return save_image(out_dir / "predictions_sheet.jpg", grid_sheet(drawn, 4)) if drawn else None


def predict_test_csv(cfg: DictConfig, predictor: KeypointPredictor) -> tuple[dict, list, list, np.ndarray]:
    """A FashionAI test list -> a submission with a row for every image: a photo that cannot be read gets
    its garment type's mean shape (counted and named), since the scorer rejects a file with holes."""
    records = read_csv(cfg.test_csv, image_root=cfg.get("image_root"), missing_images="ignore")
    unsupported = sorted({r.category for r in records} - set(predictor.categories))
    if unsupported:
        raise ConfigError(
            "test_csv", str(cfg.test_csv), f"has garment types {unsupported} that no checkpoint was trained for"
        )
    paths, categories = [r.image_path for r in records], [r.category for r in records]
    points, failures, *_ = run_on_files(predictor, paths, categories, cfg.batch_size, cfg.num_workers)
    failed = np.isnan(points[:, :, 0]).all(1)
    written = points[:, :, :2].copy()
    for i in np.flatnonzero(failed):
        written[i] = predictor.fallback_points(categories[i])
    sub = write_submission(cfg.submission, [r.image_id for r in records], categories, written)
    summary = {"submission": str(sub), "images": int((~failed).sum()), "failed": len(failures),
               "mean_shape_rows": int(failed.sum()), "failures": failures}  # fmt: skip
    if failed.any():
        log.warning("%d unreadable images got their garment type's mean shape in the submission", failed.sum())
    return summary, paths, categories, points


def predict_photos(cfg: DictConfig, predictor: KeypointPredictor) -> tuple[dict, list, list, np.ndarray]:
    """Photos -> points.csv and points.json (x, y, score per named point): of the garment type given
    (clothes=...), or each of the type the model tells."""
    clothes = (cfg.get("clothes") or {}).get("name")
    if clothes == ALL or (not clothes and not predictor.identifies_types):
        raise ConfigError(
            "clothes", clothes, "give the garment type of the photos (only a clothes=all model with a type head "
            "tells it)", CATEGORIES,
        )  # fmt: skip
    if clothes:
        predictor.members_for(clothes)  # a model for this garment type, before any photo is read
    else:
        log.info("garment types: told by the model (give clothes=... to set them)")
    paths = list_images(cfg.images)
    points, failures, _, categories, probabilities = run_on_files(
        predictor, paths, [clothes] * len(paths), cfg.batch_size, cfg.num_workers
    )
    rows = []
    for i, (path, pts, category) in enumerate(zip(paths, points, categories, strict=True)):
        if category is None or np.isnan(pts[list(CATEGORY_KEYPOINTS[category]), 0]).any():
            continue  # unreadable, reported above
        row = {"image": str(path), "category": category, "category_given": bool(clothes)}
        if probabilities is not None:
            row["category_probability"] = float(probabilities[i, CATEGORIES.index(category)])
        row["keypoints"] = {KEYPOINT_NAMES[k]: [float(v) for v in pts[k]] for k in CATEGORY_KEYPOINTS[category]}
        rows.append(row)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "points.json").write_text(json.dumps(rows, indent=1))
    # one column per named point: a garment type's photos leave the others' columns empty
    used = [k for k in range(len(KEYPOINT_NAMES)) if any(k in CATEGORY_KEYPOINTS[r["category"]] for r in rows)]
    columns = [f"{KEYPOINT_NAMES[k]}_{a}" for k in used for a in ("x", "y", "score")]
    lines = [",".join(["image", "category", *columns])]
    for row in rows:
        values = []
        for k in used:
            point = row["keypoints"].get(KEYPOINT_NAMES[k])
            values += [f"{v:.2f}" for v in point] if point else ["", "", ""]
        lines.append(f"{row['image']},{row['category']}," + ",".join(values))
    (out_dir / "points.csv").write_text("\n".join(lines) + "\n")
    summary = {"points": str(out_dir / "points.csv"), "images": len(rows), "failed": len(failures),
               "failures": failures}  # fmt: skip
    return summary, paths, categories, points


def predict(cfg: DictConfig) -> dict:
    """Runs as ``cfg`` says; returns the paths it wrote and the counts."""
    if bool(cfg.test_csv) == bool(cfg.images):
        raise ConfigError(
            "test_csv/images", None, "give exactly one",
            "test_csv=FILE for a submission, or images=FOLDER_OR_LIST for your photos (with clothes=GARMENT_TYPE "
            "unless a clothes=all model tells it)",
        )  # fmt: skip
    predictor = predictor_from_cfg(cfg)
    run = predict_test_csv if cfg.test_csv else predict_photos
    summary, paths, categories, points = run(cfg, predictor)
    out_dir = Path(cfg.output_dir)
    summary = {"output_dir": str(out_dir), **summary}
    if cfg.draw:
        sheet = draw_predictions(paths, categories, points, out_dir, cfg.draw)
        summary["drawn"] = str(sheet) if sheet else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predict_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("predicted %d images (%d unreadable, named above) -> %s", summary["images"], summary["failed"], out_dir)
    return summary
