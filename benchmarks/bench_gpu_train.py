"""GPU training throughput at 512: fp32 vs bf16 autocast + channels_last, resnet50 and resnet152 CPNs.

python benchmarks/bench_gpu_train.py   (needs a CUDA GPU; prints images/s and the ratio)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table  # noqa: E402

from fashionkp.models import CPN, build_backbone  # noqa: E402
from fashionkp.training.losses import CPNLoss  # noqa: E402

# conf/model/cpn.yaml's loss (the defaults of the former LossConfig), so the timed step is the trained one.
LOSS = CPNLoss(pos_weight=20.0, ohkm_ratio=0.5, global_all_levels=True, global_weight=1.0, type_weight=0.1)


def images_per_second(backbone: str, fast: bool, batch: int, steps: int, size: int = 512) -> float:
    model = CPN(build_backbone(backbone), num_keypoints=24, width=256).cuda()
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, 3, size, size, device="cuda") * 255
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.rand(batch, 24, size // 4, size // 4, device="cuda")
    weight = torch.ones(batch, 24, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast):
            loss = LOSS(model(x), target, weight)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_train.py needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    rows = []
    for backbone in ("resnet50", "resnet152"):
        fp32 = images_per_second(backbone, False, args.batch, args.steps)
        fast = images_per_second(backbone, True, args.batch, args.steps)
        rows.append({"backbone": backbone, "fp32 img/s": f"{fp32:.0f}", "bf16+channels_last img/s": f"{fast:.0f}",
                     "speed-up": f"{fast / fp32:.2f}"})  # fmt: skip
    print(f"{torch.cuda.get_device_name()}: CPN training at 512x512, batch {args.batch}, {args.steps} timed steps")
    print_table(rows, ["backbone", "fp32 img/s", "bf16+channels_last img/s", "speed-up"])


if __name__ == "__main__":
    main()
