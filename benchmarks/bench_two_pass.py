"""Latency per photo of the two-pass predictor beside one pass, at one test scale and at the model's own
(``model.test_scales``), with one crop pass and with the model's own (``model.crop_passes``): the CPU default
path (onnxruntime, fp32), batch 1, 2 threads, flip test on, from the decoded photo to its points (warping, every
network pass, decoding), medians over the photos.

    python benchmarks/bench_two_pass.py [CHECKPOINT] [--photos DIR] [--n 40] [--quick] [--override KEY=VALUE ...]

Without a checkpoint, the CPU recipe's model (experiment=fashionai_cpu, with the training config's
``--override``s, e.g. ``model.width=64``) with untrained weights: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table  # noqa: E402

from fashionkp.data.images import load_image  # noqa: E402
from fashionkp.data.keypoints import CATEGORIES  # noqa: E402
from fashionkp.inference.precision import cpu_features  # noqa: E402
from fashionkp.inference.predictor import KeypointPredictor  # noqa: E402


def recipe_checkpoint(folder: Path, overrides: list[str]) -> Path:
    """A checkpoint of the CPU recipe's model (with ``overrides`` to its config) with untrained weights."""
    from hydra import compose, initialize_config_dir

    from fashionkp.config import CONFIG_DIR
    from fashionkp.training.train import build

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=fashionai_cpu", "backbone.pretrained=false", *overrides])
    module, _ = build(cfg)
    path = folder / "recipe.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def photos(folder: str | None, count: int) -> list[tuple[np.ndarray, str]]:
    """(photo, garment type) pairs: real FashionAI photos when a split folder is given, else grey noise."""
    if folder:
        from fashionkp.data.fashionai import read_splits

        records = read_splits([folder], None, "error")[:: max(1, 3261 // count)][:count]
        return [(load_image(r.image_path), r.category) for r in records]
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), CATEGORIES[i % 5]) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a trained checkpoint (default: the recipe's model, untrained)")
    parser.add_argument("--photos", help="a FashionAI split folder (default: 512-px noise images)")
    parser.add_argument("--n", type=int, default=40, help="photos to time")
    parser.add_argument("--quick", action="store_true", help="8 photos")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="without a checkpoint: a change to the recipe's config, e.g. model.width=64")  # fmt: skip
    args = parser.parse_args()
    if args.checkpoint and args.override:
        parser.error("--override changes the recipe's untrained model: give no checkpoint with it")
    torch.set_num_threads(2)
    print(f"CPU: {cpu_features().describe()}; 2 threads, onnxruntime fp32, batch 1, flip test")
    with tempfile.TemporaryDirectory() as tmp:
        torch.hub.set_dir(tmp)  # the ONNX exports the predictor caches go with the folder
        checkpoint = args.checkpoint or recipe_checkpoint(Path(tmp), args.override)
        images = photos(args.photos, 8 if args.quick else args.n)
        rows, one_pass = [], None
        # (two passes, test scales, crop passes): None is the model's own
        for two_pass, scales, crop_passes in ((False, [1.0], None), (True, [1.0], 1), (True, None, 1),
                                              (True, None, None)):  # fmt: skip
            predictor = KeypointPredictor([checkpoint], device="cpu", backend="onnx", onnx_threads=2,
                                          precision="fp32", two_pass=two_pass, scales=scales,
                                          crop_passes=crop_passes)  # fmt: skip
            predictor.predict(*images[0])  # warm-up: the export to the cache, first-call allocations
            times = []
            for image, category in images:
                start = time.perf_counter()
                predictor.predict(image, category)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            one_pass = one_pass or median
            passes = predictor.crop_passes
            name = f"whole photo + {passes} crop pass{'es' if passes > 1 else ''}" if two_pass else "one pass"
            whose = " (the model's)" if scales is None else ""
            name += " (the model's)" if two_pass and crop_passes is None else ""
            rows.append({"predictor": f"{name}, test scales {'/'.join(map(str, predictor.scales))}{whose}",
                         "ms per photo (median)": f"{1000 * median:.1f}",
                         "x one pass": f"{median / one_pass:.2f}"})  # fmt: skip
    print_table(rows, ["predictor", "ms per photo (median)", "x one pass"])


if __name__ == "__main__":
    main()
