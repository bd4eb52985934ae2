"""Seconds per CPU training step (batch 16, forward + backward + AdamW) of the CPN: fp32 eager, fp32
channels_last, bf16 autocast (trainer.precision=bf16-mixed) with channels_last, and the same with the depthwise
convolutions in fp32 ("fp32-dw": model.train_depthwise_in_fp32, the default), and that with the backbone's stem and
first two or three stages frozen ("frozen 2", "frozen 3": model.frozen_backbone_stages; the CPU recipe freezes three,
with head width 128).

python benchmarks/bench_train_step.py [--quick] [--backbones resnet50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, print_table  # noqa: E402

from fashionkp.inference.precision import cpu_features  # noqa: E402
from fashionkp.models import CPN, build_backbone, make_depthwise_train_in_fp32  # noqa: E402
from fashionkp.training.losses import CPNLoss  # noqa: E402

#: the "fp32-dw" step with the stem and this many backbone stages frozen (model.frozen_backbone_stages)
FROZEN = (2, 3)

# conf/model/cpn.yaml's loss (the defaults of the former LossConfig) on every row, as before, so the figures
# compare with BENCHMARKS.md; the CPU recipe (experiment=fashionai_cpu) trains with ohkm_ratio 1.0 instead.
LOSS = CPNLoss(pos_weight=20.0, ohkm_ratio=0.5, global_all_levels=True, global_weight=1.0, type_weight=0.1)


def build_cpn(backbone: str, width: int, channels_last: bool, depthwise_fp32: bool, frozen_stages: int) -> CPN:
    """The CPN a training step runs, as CPNModule sets it up (seeded, so every row times the same weights)."""
    torch.manual_seed(0)
    model = CPN(build_backbone(backbone), num_keypoints=24, width=width)
    if depthwise_fp32:
        make_depthwise_train_in_fp32(model)
    model.backbone.freeze_stages(frozen_stages)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def step_seconds(
    backbone: str,
    size: int,
    width: int,
    channels_last: bool,
    batch: int,
    repeats: int,
    bf16: bool = False,
    depthwise_fp32: bool = False,
    frozen_stages: int = 0,
) -> float:
    model = build_cpn(backbone, width, channels_last, depthwise_fp32, frozen_stages)
    x = torch.rand(batch, 3, size, size) * 255
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.rand(batch, 24, size // 4, size // 4)
    weight = torch.ones(batch, 24)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as Lightning's bf16-mixed
            output = model(x)
        loss = LOSS(output, target, weight)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backbones", help="only the rows of these backbones (comma-separated), e.g. resnet50")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lite0 = "tf_efficientnet_lite0"
    # the first two: the CPU recipe's model (head width 128) and the 8.43% recipe's (64)
    combos = [(lite0, 192, 128), (lite0, 192, 64), (lite0, 256, 256), (lite0, 512, 256),
              ("resnet50", 256, 256), ("resnet50", 512, 256)]  # fmt: skip
    if args.backbones:
        unknown = set(args.backbones.split(",")) - {c[0] for c in combos}
        if unknown:
            parser.error(f"--backbones: no combination for {sorted(unknown)} (of {lite0}, resnet50)")
        combos = [c for c in combos if c[0] in args.backbones.split(",")]
    if args.quick:
        combos = combos[:2]
    repeats = 2 if args.quick else 3
    rows = []
    for backbone, size, width in combos:
        eager = step_seconds(backbone, size, width, False, args.batch, repeats)
        fast = step_seconds(backbone, size, width, True, args.batch, repeats)
        bf16 = step_seconds(backbone, size, width, True, args.batch, repeats, bf16=True)
        mixed = step_seconds(backbone, size, width, True, args.batch, repeats, bf16=True, depthwise_fp32=True)
        row = {"backbone": backbone, "input": size, "head width": width, "eager s/step": f"{eager:.2f}",
               "channels_last s/step": f"{fast:.2f}", "ratio": f"{fast / eager:.2f}",
               "bf16 channels_last s/step": f"{bf16:.2f}", "bf16 speed-up": f"{fast / bf16:.2f}x",
               "bf16 fp32-dw s/step": f"{mixed:.2f}", "fp32-dw speed-up": f"{fast / mixed:.2f}x"}  # fmt: skip
        for stages in FROZEN:
            frozen = step_seconds(backbone, size, width, True, args.batch, repeats, True, True, frozen_stages=stages)
            row |= {f"+ frozen {stages} s/step": f"{frozen:.2f}", f"frozen {stages} speed-up": f"{fast / frozen:.2f}x"}
        rows.append(row)
    print(f"CPU training step ({cpu_features().describe()}), batch {args.batch}, {args.threads} threads, "
          f"median of {repeats}; speed-up = fp32 channels_last time / the column's time")  # fmt: skip
    columns = ["backbone", "input", "head width", "eager s/step", "channels_last s/step", "ratio",
               "bf16 channels_last s/step", "bf16 speed-up", "bf16 fp32-dw s/step", "fp32-dw speed-up",
               *(c for n in FROZEN for c in (f"+ frozen {n} s/step", f"frozen {n} speed-up"))]  # fmt: skip
    print_table(rows, columns)


if __name__ == "__main__":
    main()
