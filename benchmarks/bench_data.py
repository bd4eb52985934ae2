"""Data loading: images per second per worker for read + augment + heatmap targets at 256 and 512.

python benchmarks/bench_data.py [--quick]   (real FashionAI photos from ../shared when present)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table  # noqa: E402

from fashionkp.config import CONFIG_DIR  # noqa: E402
from fashionkp.data.codec import HeatmapCodec  # noqa: E402
from fashionkp.data.dataset import KeypointDataset  # noqa: E402
from fashionkp.data.fashionai import read_splits  # noqa: E402
from fashionkp.data.transforms import Augmentation  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashionai" / "train"
#: The training augmentation: conf/augmentation/default.yaml, as training builds it.
AUGMENTATION: Augmentation = instantiate(OmegaConf.load(Path(CONFIG_DIR) / "augmentation" / "default.yaml"))


def codec(size: int) -> HeatmapCodec:
    """The codec timed before the HeatmapCodec change: sigma = size / 128 (conf/train.yaml) and global_sigma
    left at the former TargetConfig default of 2.0, so at 512 a second (GlobalNet) target is built, which
    training (global_sigma = sigma) does not do. Only ``encode`` runs here; the decoder fields are unused."""
    sigma = size / 128
    return HeatmapCodec(
        stride=4, sigma=sigma, global_sigma=2.0, decoder="dark", decode_sigma=sigma / 2, include_occluded=True
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker = one process on one core
    if REAL.is_dir():
        records, source = read_splits(REAL), f"real FashionAI photos ({REAL})"
    else:
        from fashionkp.data.synth import generate

        tmp = Path(tempfile.mkdtemp())
        records, source = read_splits(generate(tmp, 40, progress=False)["train"]), "synthetic garments (no ../shared)"
    n = 60 if args.quick else 300
    rows = []
    for size in (256, 512):
        for clothes in ("all", "blouse"):
            subset = [r for r in records if clothes == "all" or r.category == clothes][:n]
            ds = KeypointDataset(subset, clothes, size, codec(size), AUGMENTATION, seed=0)
            rates = []
            for rep in range(3):
                start = time.perf_counter()
                for i in range(len(ds)):
                    ds[(i, rep)]
                rates.append(len(ds) / (time.perf_counter() - start))
            rows.append({"input": size, "clothes": clothes, "channels": len(ds.channels),
                         "images/s/worker": f"{statistics.median(rates):.1f}",
                         "ms/image": f"{1000 / statistics.median(rates):.2f}"})  # fmt: skip
    print(f"read + one-affine augment + colour + Gaussian targets, {source}, median of 3 passes over {n} images")
    print_table(rows, ["input", "clothes", "channels", "images/s/worker", "ms/image"])


if __name__ == "__main__":
    main()
