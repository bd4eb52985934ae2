"""A short training run on real FashionAI photos: the loss falls and the NE beats the mean shape."""

import numpy as np
import pandas as pd
import pytest
from conftest import FASHIONAI_TRAIN, compose_train, needs_shared

from fashionkp.data.fashionai import keypoints_array, read_splits
from fashionkp.data.split import split_records
from fashionkp.evaluation.metric import normalized_error


def mean_shape_ne(train, val) -> float:
    """Every point at its category's mean position relative to the image size (the baseline)."""
    from PIL import Image

    def rel(records):
        sizes = np.array([Image.open(r.image_path).size for r in records], dtype=float)  # (w, h)
        return keypoints_array(records)[..., :2] / sizes[:, None, :], sizes

    tr, _ = rel(train)
    mean = np.nanmean(tr, axis=0)
    _, val_sizes = rel(val)
    pred = mean[None] * val_sizes[:, None, :]
    return normalized_error(np.nan_to_num(pred, nan=-1), keypoints_array(val), [r.category for r in val]).ne


@pytest.mark.slow
@needs_shared
def test_short_real_run_learns_skirts(tmp_path):
    from fashionkp.training.train import train

    cfg = compose_train([
        "clothes=skirt", "backbone=efficientnet_lite0", "resolution=192", "model.width=64", "logger=csv",
        f"data.root={FASHIONAI_TRAIN}", "data.num_workers=1", "data.batch_size=12", "trainer.max_epochs=4",
        "trainer.accelerator=cpu", "model.scheduler.warmup_steps=20", "callbacks.progress_bar.refresh_rate=0",
        "validate_best=false",
    ], tmp_path)  # fmt: skip
    result = train(cfg)
    records = read_splits(FASHIONAI_TRAIN, ["skirt"])
    train_records, val_records = split_records(records, 0.2, "fashionkp")
    baseline = mean_shape_ne(train_records, val_records)
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    losses = metrics["train/loss"].dropna().to_numpy()
    assert result["global_step"] >= 190
    assert losses[-5:].mean() < 0.6 * losses[:3].mean()
    print(f"skirt: val NE {result['val_ne']:.2f}% vs mean shape {100 * baseline:.2f}%")
    assert result["val_ne"] < 100 * baseline  # val_ne in percent
