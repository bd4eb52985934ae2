"""Milliseconds per update of the moving average of the weights (model.ema_decay) on the CPU recipe's model
(efficientnet_lite0, 192 px, head width 128, three stages frozen, channels_last), over every parameter and buffer
as Lightning's WeightAveraging averages them: one tensor at a time (EMAWeightAveraging's avg_fn) against fused
(multi_avg_fn: torch._foreach_lerp_, what model.ema_decay uses), beside one training step of the same model.

python benchmarks/bench_ema.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import build_cpn, step_seconds  # noqa: E402
from common import median_seconds, print_table  # noqa: E402

from fashionkp.inference.precision import cpu_features  # noqa: E402

BACKBONE, SIZE, WIDTH, FROZEN = "tf_efficientnet_lite0", 192, 128, 3


def update_seconds(fused: bool, repeats: int) -> float:
    model = build_cpn(BACKBONE, WIDTH, channels_last=True, depthwise_fp32=True, frozen_stages=FROZEN)
    rule = {"multi_avg_fn": get_ema_multi_avg_fn(0.999)} if fused else {"avg_fn": get_ema_avg_fn(0.999)}
    average = AveragedModel(model, use_buffers=True, **rule)
    average.update_parameters(model)  # the first update copies; the timed ones average
    return median_seconds(lambda: average.update_parameters(model), repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step = step_seconds(BACKBONE, SIZE, WIDTH, True, 16, 5, bf16=True, depthwise_fp32=True, frozen_stages=FROZEN)
    rows = []
    for name, fused in (("per tensor (EMAWeightAveraging)", False), ("fused (model.ema_decay)", True)):
        seconds = update_seconds(fused, args.repeats)
        rows.append({"update": name, "ms": f"{1000 * seconds:.1f}", "share of a step": f"{100 * seconds / step:.1f}%"})
    print(
        f"EMA update ({cpu_features().describe()}), {args.threads} threads, median of {args.repeats}; "
        f"the training step (batch 16, bf16, median of 5): {step:.3f} s"
    )
    print_table(rows, ["update", "ms", "share of a step"])


if __name__ == "__main__":
    main()
