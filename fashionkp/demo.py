"""``make demo``: the whole job on the embedded default, synthetic garments, in a few CPU minutes.

Generates a FashionAI-format synthetic set, trains a small CPN (efficientnet_lite0 with offline
ImageNet weights), prints the validation NE, predicts the synthetic test split into a submission,
scores it with the official metric, and writes drawn predictions and the training curve.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from fashionkp.config import CONFIG_DIR
from fashionkp.data.synth import generate
from fashionkp.evaluation.metric import score_submission
from fashionkp.inference.predict import predict
from fashionkp.training.train import train


def run(out: Path, n_per_category: int, epochs: int, overrides: list[str]) -> dict:
    start = time.time()
    print(f"[1/4] synthetic garments -> {out / 'data'}")
    paths = generate(out / "data", n_per_category=n_per_category, n_test_per_category=max(4, n_per_category // 5))
    print("[2/4] training a CPN (efficientnet_lite0, offline ImageNet weights) on CPU")
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        train_cfg = compose("train", overrides=[
            "experiment=demo", f"data.root={paths['train']}", f"paths.output_dir={out / 'train'}",
            f"trainer.max_epochs={epochs}", *overrides,
        ])  # fmt: skip
        result = train(train_cfg)
        print(f"      validation NE {result['best_val_ne']:.2f}%  ({result['global_step']} steps)")
        print("[3/4] predicting the synthetic test split into a submission")
        pred_cfg = compose("predict", overrides=[
            f"checkpoints=[{result['best_checkpoint']}]", f"test_csv={paths['test_csv']}",
            f"output_dir={out / 'predict'}", "draw=16", "num_workers=0",
        ])  # fmt: skip
        summary = predict(pred_cfg)
    print("[4/4] scoring the submission with the official metric")
    scored = score_submission(paths["answers"], summary["submission"])
    print(scored.table())
    (out / "test_score.json").write_text(json.dumps(scored.as_dict(), indent=2))
    test_ne = 100 * scored.ne
    outputs = {
        "validation NE": f"{result['best_val_ne']:.2f}%",
        "test NE": f"{test_ne:.2f}%",
        "data": str(out / "data"),
        "checkpoint": result["best_checkpoint"],
        "training curve": str(Path(result["output_dir"]) / "curves.png"),
        "NE per epoch": str(Path(result["output_dir"]) / "val_ne.csv"),
        "submission": summary["submission"],
        "drawn predictions": summary.get("drawn"),
        "minutes": f"{(time.time() - start) / 60:.1f}",
    }
    print("\nfashionkp demo done:")
    for k, v in outputs.items():
        print(f"  {k:<18} {v}")
    (out / "demo_summary.json").write_text(json.dumps(outputs, indent=2))
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--n-per-category", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for training, e.g. resolution=192")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run(args.out, args.n_per_category, args.epochs, args.overrides)


if __name__ == "__main__":
    main()
