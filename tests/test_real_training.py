"""A short training run on real FashionAI photos: the loss falls and the NE beats the mean shape."""

import numpy as np
import pandas as pd
import pytest
from conftest import FASHIONAI_TRAIN, compose_train, needs_shared

from fashionkp.data.fashionai import keypoints_array, read_splits
from fashionkp.data.split import split_records
from fashionkp.evaluation.metric import normalized_error

#: Stated tolerances of int8 against fp32. With the padding arithmetic in fp32 (precision.fp32_nodes) int8 cost the
#: recipe's model 0.02 NE points of its 8.00 and moved its median point by 0.2 input pixels (0.5 photo pixels; a
#: heatmap pixel is about 10.7); before, quantized padding amounts cost 2.1 points. A broken calibration or layout
#: moves points by tens of pixels, toward the mean shape's NE (about 60%). The NE tolerance is a share of fp32's:
#: int8 moved the short skirt run's weak model (about 35% NE, many of its points far off) by 1.1 points of 34.6
#: (int8 the lower), more than a fixed 1-point tolerance allows, and the recipe's model by 0.02 of 8.00.
INT8_NE_SHARE = 0.05
INT8_MEDIAN_PX = 4.0


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


@pytest.fixture(scope="module")
def skirt_run(tmp_path_factory) -> tuple[dict, object]:
    """A 4-epoch skirt model trained on the real photos (about 4 minutes on 2 cores)."""
    from fashionkp.training.train import train

    tmp_path = tmp_path_factory.mktemp("skirt")
    cfg = compose_train([
        "clothes=skirt", "backbone=efficientnet_lite0", "resolution=192", "model.width=64", "logger=csv",
        f"data.root={FASHIONAI_TRAIN}", "data.num_workers=1", "data.batch_size=12", "trainer.max_epochs=4",
        "trainer.accelerator=cpu", "model.scheduler.warmup_steps=20", "callbacks.progress_bar.refresh_rate=0",
        "validate_best=false",
    ], tmp_path)  # fmt: skip
    return train(cfg), tmp_path


@pytest.mark.slow
@needs_shared
def test_short_real_run_learns_skirts(skirt_run):
    result, tmp_path = skirt_run
    records = read_splits(FASHIONAI_TRAIN, ["skirt"])
    train_records, val_records = split_records(records, 0.2, "fashionkp")
    baseline = mean_shape_ne(train_records, val_records)
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    losses = metrics["train/loss"].dropna().to_numpy()
    assert result["global_step"] >= 190
    assert losses[-5:].mean() < 0.6 * losses[:3].mean()
    print(f"skirt: val NE {result['val_ne']:.2f}% vs mean shape {100 * baseline:.2f}%")
    assert result["val_ne"] < 100 * baseline  # val_ne in percent


@pytest.mark.slow
@needs_shared
def test_int8_agrees_with_fp32_on_real_photos(skirt_run):
    """int8 (QDQ, per-channel weights, calibrated on 64 training photos) against fp32 on the real validation photos,
    in points: NE within INT8_NE_SHARE of fp32's, and the median point within INT8_MEDIAN_PX photo pixels of
    fp32's."""
    from fashionkp.data.images import load_image
    from fashionkp.evaluation.choose_precision import measure_precisions
    from fashionkp.inference.predictor import KeypointPredictor

    result, _ = skirt_run
    checkpoint = result["last_checkpoint"]
    record = measure_precisions(checkpoint, [FASHIONAI_TRAIN], calibration_images=64)
    fp32_ne, int8_ne = record["figures"]["fp32"]["ne"], record["figures"]["int8"]["ne"]
    print(f"skirt model: NE fp32 {fp32_ne:.2f}%, int8 {int8_ne:.2f}%; record {record}")
    val = split_records(read_splits(FASHIONAI_TRAIN, ["skirt"]), 0.2, "fashionkp")[1][:40]
    images = [load_image(r.image_path) for r in val]
    fp32 = KeypointPredictor([checkpoint], device="cpu", precision="fp32").predict_batch(images, ["skirt"] * len(val))
    int8 = KeypointPredictor([checkpoint], device="cpu", precision="int8").predict_batch(images, ["skirt"] * len(val))
    moved = np.hypot(*(fp32[..., :2] - int8[..., :2]).reshape(-1, 2).T)
    moved = moved[np.isfinite(moved)]
    print(f"int8 vs fp32 on {len(val)} photos: median {np.median(moved):.2f} px, 90th percentile "
          f"{np.percentile(moved, 90):.2f} px")  # fmt: skip
    assert abs(int8_ne - fp32_ne) < INT8_NE_SHARE * fp32_ne
    assert np.median(moved) < INT8_MEDIAN_PX
