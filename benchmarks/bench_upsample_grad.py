"""Seconds per CPU training step of the CPU recipe's model (efficientnet_lite0, 192 px, head width 128, three stages
frozen, bf16 with fp32 depthwise convolutions, channels_last) with the gradient of every bilinear upsampling made
contiguous in channels_last (fashionkp.models.cpn.upsample_to), against plain F.interpolate, whose CPU backward
takes the channel slices that torch.cat's backward hands RefineNet's upsampled maps. The two alternate step by
step, so a machine that changes speed slows both alike.

python benchmarks/bench_upsample_grad.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import LOSS, build_cpn  # noqa: E402
from common import print_table  # noqa: E402

from fashionkp.inference.precision import cpu_features  # noqa: E402
from fashionkp.models import cpn  # noqa: E402

BACKBONE, SIZE, WIDTH, FROZEN, BATCH = "tf_efficientnet_lite0", 192, 128, 3, 16


def plain_upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def make_step(upsample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], float]:
    """One training step (forward, loss, backward, AdamW) of a fresh seeded model that upsamples with ``upsample``."""
    model = build_cpn(BACKBONE, WIDTH, channels_last=True, depthwise_fp32=True, frozen_stages=FROZEN)
    x = (torch.rand(BATCH, 3, SIZE, SIZE) * 255).contiguous(memory_format=torch.channels_last)
    target, weight = torch.rand(BATCH, 24, SIZE // 4, SIZE // 4), torch.ones(BATCH, 24)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
        loss = LOSS(output, target, weight)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def timed() -> float:
        kept, cpn.upsample_to = cpn.upsample_to, upsample
        try:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start
        finally:
            cpn.upsample_to = kept

    return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {
        "plain F.interpolate": make_step(plain_upsample_to),
        "channels_last gradient": make_step(cpn.upsample_to),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps + 2):
        for name, timed in variants.items():
            seconds = timed()
            if i >= 2:  # the first two steps of each warm oneDNN's caches
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    plain = medians["plain F.interpolate"]
    rows = [
        {"upsampling backward": name, "s/step": f"{seconds:.3f}", "speed-up": f"{plain / seconds:.2f}x"}
        for name, seconds in medians.items()
    ]
    print(f"CPU training step ({cpu_features().describe()}), batch {BATCH}, {args.threads} threads, "
          f"median of {args.steps} alternating steps")  # fmt: skip
    print_table(rows, ["upsampling backward", "s/step", "speed-up"])


if __name__ == "__main__":
    main()
