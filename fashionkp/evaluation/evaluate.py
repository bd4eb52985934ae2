"""``evaluate.py``: checkpoints (one or an ensemble) + a labelled split -> the official NE overall, per
category and per keypoint (table, JSON, bar chart), the predictions as a submission, and drawings of the
worst predictions beside their ground truth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fashionkp.checks import check_data_root, choice
from fashionkp.config import as_list, register_resolvers
from fashionkp.data.fashionai import Record, as_submitted, keypoints_array, read_splits, write_annotations
from fashionkp.data.images import load_image
from fashionkp.data.keypoints import CATEGORIES
from fashionkp.data.split import split_records
from fashionkp.data.submission import write_submission
from fashionkp.draw import draw_keypoints, grid_sheet, plot_bars, save_image, side_by_side
from fashionkp.errors import ConfigError
from fashionkp.evaluation.metric import NEResult, garment_type_report, normalized_error, point_errors
from fashionkp.inference.predictor import predictor_from_cfg, run_on_files

log = logging.getLogger(__name__)
register_resolvers()


def evaluation_records(cfg: DictConfig, categories: list[str]) -> list[Record]:
    """The labelled images to score: the validation part of ``data.root`` (training's rule) or all of it."""
    root = as_list(cfg.data.root)
    records = read_splits(root, categories, cfg.data.missing_images)
    if cfg.split == "val":
        records = split_records(records, cfg.data.val_fraction, cfg.data.val_salt)[1]
    if not records:
        raise ConfigError("data.root", root, f"no images to evaluate (split={cfg.split})")
    return records


def score(records: list[Record], points: np.ndarray, round_points: bool) -> tuple[list[Record], np.ndarray, NEResult]:
    """The official NE of ``points`` (N, 24, 3) on the records that were read; returns those records, the
    scored (N', 24, 2) points (whole pixels when ``round_points``, as a submission holds them) and the result."""
    read = ~np.isnan(points[:, :, 0]).all(1)
    records = [r for r, ok in zip(records, read, strict=True) if ok]
    pred = as_submitted(points[read, :, :2]) if round_points else points[read, :, :2]
    result = normalized_error(np.nan_to_num(pred, nan=-1.0), keypoints_array(records), [r.category for r in records])
    return records, pred, result


def type_report(records: list[Record], probabilities: np.ndarray | None) -> dict | None:
    """The type heads' accuracy and confusion matrix on ``records`` (photos no head saw left out), or None when
    no model has a head."""
    if probabilities is None:
        return None
    seen = np.isfinite(probabilities).all(axis=1)
    confusion = np.zeros((len(CATEGORIES), len(CATEGORIES)), np.int64)
    true = [CATEGORIES.index(r.category) for r, ok in zip(records, seen, strict=True) if ok]
    np.add.at(confusion, (true, probabilities[seen].argmax(axis=1)), 1)
    return garment_type_report(confusion)


def write_outputs(cfg: DictConfig, out_dir: Path, records: list[Record], pred: np.ndarray, result: NEResult,
                  failures: list[str], setup: dict, types: dict | None) -> None:  # fmt: skip
    """metrics.json (with ``setup``: how the predictor ran), the per-keypoint bar chart, the predictions as a
    submission, the split as a test list with its answers, and drawings of the worst images."""
    cats = [r.category for r in records]
    fine = as_list(cfg.get("fine_checkpoints")) or None
    payload = {"checkpoints": as_list(cfg.checkpoints), "fine_checkpoints": fine, "split": cfg.split,
               "root": as_list(cfg.data.root),
               "images": len(records), "failed": failures, "flip_test": cfg.flip_test, **setup,
               "rounded": bool(cfg.round), "given_types": bool(cfg.given_types),
               **result.as_dict(), **({"garment_types": types} if types else {})}  # fmt: skip
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2))
    plot_bars(result.per_keypoint, out_dir / "ne_per_keypoint.png", f"NE per keypoint (overall {100 * result.ne:.2f}%)")
    write_submission(out_dir / "predictions.csv", [r.image_id for r in records], cats, pred)
    # The evaluated images as a FashionAI test list and its answers: predict.py test_csv=... image_root=<split>
    # then `fashionkp score answers.csv submission.csv` checks a whole prediction run on held-out data.
    write_annotations(records, out_dir / "answers.csv")
    (out_dir / "test.csv").write_text(
        "image_id,image_category\n" + "".join(f"{r.image_id},{r.category}\n" for r in records)
    )
    if cfg.draw_worst:
        draw_worst(records, pred, cfg.draw_worst, out_dir / "worst.jpg")


def draw_worst(records: list[Record], pred: np.ndarray, count: int, path: Path) -> None:
    """The ``count`` images with the largest NE, prediction beside ground truth, on one sheet."""
    cats = [r.category for r in records]
    errors, counted, _ = point_errors(np.nan_to_num(pred, nan=-1.0), keypoints_array(records), cats)
    per_image = errors.sum(1) / np.maximum(counted.sum(1), 1)
    tiles = []
    for i in np.argsort(-per_image)[:count]:
        image = load_image(records[i].image_path)
        tiles.append(side_by_side(
            draw_keypoints(image, pred[i], cats[i], label=f"pred NE {100 * per_image[i]:.1f}%"),
            draw_keypoints(image, records[i].keypoints, cats[i], label="ground truth"),
        ))  # fmt: skip
    save_image(path, grid_sheet(tiles, 2, 800))


def evaluate(cfg: DictConfig) -> NEResult:
    """Predict the labelled split with the configured models and score it; writes the outputs listed in
    :func:`write_outputs` to ``cfg.output_dir``."""
    choice(cfg, "split", ("val", "all"))
    check_data_root(as_list(cfg.data.root))  # before any model is loaded: a typo costs seconds
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = predictor_from_cfg(cfg)
    records = evaluation_records(cfg, as_list(cfg.get("categories")) or predictor.categories)
    if not cfg.given_types and not predictor.identifies_types:
        raise ConfigError("given_types", False, "none of the models tells garment types (no type head)")
    # given_types=false: the model tells each photo's type, and points of a wrong type count as missed
    given = [r.category if cfg.given_types else None for r in records]
    run = run_on_files(predictor, [r.image_path for r in records], given, cfg.batch_size, cfg.num_workers)
    points = run.points
    if not cfg.given_types:
        points = np.where(np.isnan(points), -1.0, points)  # a point of the true type the told type lacks: missed
        points[[c is None for c in run.categories]] = np.nan  # unreadable
    types = type_report(records, run.type_probabilities)
    records, pred, result = score(records, points, cfg.round)
    print(result.table())
    if types:
        print(f"garment types told by the model: {types['accuracy']:.2f}% right on {types['images']} images "
              f"({'given to the predictor' if cfg.given_types else 'used for the points'})")  # fmt: skip
    print("per keypoint: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in result.per_keypoint.items()))
    two_pass = predictor.crop_margin is not None
    setup = {
        "decoders": sorted({predictor.codec_of(m).decoder for m in [*predictor.members, *predictor.fine_members]}),
        "scales": list(predictor.scales),
        "crop_scales": list(predictor.crop_scales) if two_pass else None,
        "crop_passes": predictor.crop_passes,
    }
    write_outputs(cfg, out_dir, records, pred, result, run.failures, setup, types)
    log.info("NE %.4f%% on %d images -> %s", 100 * result.ne, len(records), out_dir)
    return result
