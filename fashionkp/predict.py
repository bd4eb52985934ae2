"""``predict.py``: a FashionAI test CSV -> one submission CSV (every garment type in one run), or a folder
/ list of images of one garment type -> points with scores (CSV and JSON) and drawn images."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fashionkp.draw import draw_keypoints, grid_sheet, save_image
from fashionkp.fashionai import read_csv
from fashionkp.images import ImageReadError, load_image
from fashionkp.inference import KeypointPredictor
from fashionkp.keypoints import CATEGORY_KEYPOINTS, KEYPOINT_NAMES, check_category
from fashionkp.submission import write_submission

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_image(self.paths[i]), None
        except ImageReadError as e:
            return i, None, str(e)


def run_on_files(
    predictor: KeypointPredictor,
    paths: Sequence[Path],
    categories: Sequence[str],
    batch_size: int = 8,
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """Predict every image; unreadable ones are reported and skipped, never fatal.

    Returns (N, 24, 3) points (NaN rows for failed images), the failure messages and each image's (h, w).
    """
    out = np.full((len(paths), len(KEYPOINT_NAMES), 3), np.nan)
    sizes: list[tuple[int, int]] = [(0, 0)] * len(paths)
    failures: list[str] = []
    loader = DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        good = [(i, img) for i, img, err in batch if img is not None]
        failures += [err for _, _, err in batch if err is not None]
        for _, _, err in batch:
            if err:
                log.warning("skipped: %s", err)
        if good:
            idx = [i for i, _ in good]
            out[idx] = predictor.predict_batch([img for _, img in good], [categories[i] for i in idx])
            for i, img in good:
                sizes[i] = img.shape[:2]
    return out, failures, sizes


def predictor_from_cfg(cfg: DictConfig) -> KeypointPredictor:
    return KeypointPredictor(
        list(cfg.checkpoints), weights=cfg.get("weights"), device=cfg.device, flip_test=cfg.flip_test,
        scales=list(cfg.scales), decoder=cfg.decoder, channels_last=cfg.get("channels_last"),
        backend=cfg.get("backend", "auto"),
    )  # fmt: skip


def list_images(spec: str | Sequence[str]) -> list[Path]:
    items = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)  # missing files are reported by the prediction loop
    if not paths:
        raise FileNotFoundError(f"no images found in {items}")
    return paths


def draw_predictions(paths, categories, points, out_dir: Path, limit: int) -> Path | None:
    """Draw ``limit`` predictions spread evenly over the run (so every garment type of a test list shows)."""
    drawn = []
    for i in sorted(set(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int))):
        own = list(CATEGORY_KEYPOINTS[categories[i]])
        if np.isnan(points[i, own, 0]).any():
            continue
        image = draw_keypoints(load_image(paths[i]), points[i, :, :2], categories[i], label=categories[i])
        save_image(out_dir / "drawn" / f"{Path(paths[i]).stem}.jpg", image)
        drawn.append(image)
    return save_image(out_dir / "predictions_sheet.jpg", grid_sheet(drawn, 4)) if drawn else None


def predict(cfg: DictConfig) -> dict:
    """Runs as ``cfg`` says; returns the paths it wrote and the counts."""
    out_dir = Path(cfg.output_dir)
    predictor = predictor_from_cfg(cfg)
    summary: dict = {"output_dir": str(out_dir)}
    if cfg.test_csv:
        records = read_csv(cfg.test_csv, image_root=cfg.get("image_root"), missing_images="ignore")
        unsupported = sorted({r.category for r in records} - set(predictor.categories))
        if unsupported:
            raise ValueError(f"{cfg.test_csv} has garment types {unsupported} that no checkpoint was trained for")
        paths, categories = [r.image_path for r in records], [r.category for r in records]
        points, failures, _ = run_on_files(predictor, paths, categories, cfg.batch_size, cfg.num_workers)
        ok = ~np.isnan(points[:, :, 0]).all(1)
        sub = write_submission(
            cfg.submission, [r.image_id for r, k in zip(records, ok, strict=True) if k],
            [c for c, k in zip(categories, ok, strict=True) if k], points[ok, :, :2],
        )  # fmt: skip
        summary.update(submission=str(sub), images=int(ok.sum()), failed=len(failures))
    else:
        if not cfg.images or not cfg.clothes:
            raise ValueError("give either test_csv=FILE, or images=FOLDER_OR_LIST with clothes=GARMENT_TYPE")
        category = check_category(cfg.clothes)
        paths = list_images(OmegaConf.to_container(cfg.images) if OmegaConf.is_list(cfg.images) else cfg.images)
        categories = [category] * len(paths)
        points, failures, _ = run_on_files(predictor, paths, categories, cfg.batch_size, cfg.num_workers)
        own = list(CATEGORY_KEYPOINTS[category])
        rows = []
        for path, pts in zip(paths, points, strict=True):
            if np.isnan(pts[own, 0]).any():
                continue
            rows.append(
                {
                    "image": str(path),
                    "category": category,
                    "keypoints": {
                        KEYPOINT_NAMES[k]: [float(pts[k, 0]), float(pts[k, 1]), float(pts[k, 2])] for k in own
                    },
                }
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "points.json").write_text(json.dumps(rows, indent=1))
        with (out_dir / "points.csv").open("w") as f:
            f.write(
                "image,category,"
                + ",".join(f"{KEYPOINT_NAMES[k]}_{a}" for k in own for a in ("x", "y", "score"))
                + "\n"
            )
            for row in rows:
                values = [f"{v:.2f}" for k in own for v in row["keypoints"][KEYPOINT_NAMES[k]]]
                f.write(f"{row['image']},{category}," + ",".join(values) + "\n")
        summary.update(points=str(out_dir / "points.csv"), images=len(rows), failed=len(failures))
    if cfg.draw:
        sheet = draw_predictions(paths, categories, points, out_dir, cfg.draw)
        summary["drawn"] = str(sheet) if sheet else None
    if failures:
        summary["failures"] = failures
        log.warning("%d images could not be read and were skipped (first: %s)", len(failures), failures[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predict_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("predicted %d images (%d skipped) -> %s", summary["images"], len(failures), out_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
