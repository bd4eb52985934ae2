"""``evaluate.py``: checkpoints (one or an ensemble) + a labelled split -> the official NE overall, per
category and per keypoint (table, JSON, bar chart), the predictions as a submission, and drawings of the
worst predictions beside their ground truth."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from fashionkp.checks import as_list, check_data_root, choice
from fashionkp.config import CONFIG_DIR, register_resolvers
from fashionkp.dataset import split_records
from fashionkp.draw import draw_keypoints, grid_sheet, plot_bars, save_image, side_by_side
from fashionkp.errors import ConfigError, report_user_errors
from fashionkp.fashionai import keypoints_array, read_splits, write_annotations
from fashionkp.images import load_image
from fashionkp.inference import predictor_from_cfg, run_on_files
from fashionkp.metric import NEResult, normalized_error, point_errors
from fashionkp.submission import write_submission

log = logging.getLogger(__name__)
register_resolvers()


def evaluate(cfg: DictConfig) -> NEResult:
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    choice(cfg, "split", ("val", "all"))
    root = as_list(cfg.data.root)
    check_data_root(root)
    predictor = predictor_from_cfg(cfg)
    categories = as_list(cfg.get("categories")) or predictor.categories
    records = read_splits(root, categories, cfg.data.missing_images)
    if cfg.split == "val":
        records = split_records(records, cfg.data.val_fraction, cfg.data.val_salt)[1]
    if not records:
        raise ConfigError("data.root", root, f"no images to evaluate (split={cfg.split})")
    cats = [r.category for r in records]
    points, failures, _ = run_on_files(
        predictor, [r.image_path for r in records], cats, cfg.batch_size, cfg.num_workers
    )
    ok = ~np.isnan(points[:, :, 0]).all(1)
    records = [r for r, k in zip(records, ok, strict=True) if k]
    cats = [r.category for r in records]
    # Submissions hold integers: rounding here makes this NE the one `fashionkp score` gives.
    pred = np.round(points[ok, :, :2]) if cfg.round else points[ok, :, :2]
    gt = keypoints_array(records)
    result = normalized_error(np.nan_to_num(pred, nan=-1.0), gt, cats)
    print(result.table())
    print("per keypoint: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in result.per_keypoint.items()))
    payload = {"checkpoints": as_list(cfg.checkpoints), "split": cfg.split, "root": root, "images": len(records),
               "failed": failures, "flip_test": cfg.flip_test, "decoder": cfg.decoder, "scales": as_list(cfg.scales),
               **result.as_dict()}  # fmt: skip
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
        errors, counted, _ = point_errors(np.nan_to_num(pred, nan=-1.0), gt, cats)
        per_image = errors.sum(1) / np.maximum(counted.sum(1), 1)
        tiles = []
        for i in np.argsort(-per_image)[: cfg.draw_worst]:
            image = load_image(records[i].image_path)
            tiles.append(side_by_side(
                draw_keypoints(image, pred[i], cats[i], label=f"pred NE {100 * per_image[i]:.1f}%"),
                draw_keypoints(image, gt[i], cats[i], label="ground truth"),
            ))  # fmt: skip
        save_image(out_dir / "worst.jpg", grid_sheet(tiles, 2, 800))
    log.info("NE %.4f%% on %d images -> %s", 100 * result.ne, len(records), out_dir)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@report_user_errors("fashionkp-evaluate")
def main(cfg: DictConfig) -> float:
    """The NE in percent (what a Hydra sweeper minimises)."""
    return 100 * evaluate(cfg).ne


if __name__ == "__main__":
    main()
