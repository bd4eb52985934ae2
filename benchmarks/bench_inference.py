"""Inference latency and throughput of the CPN: the paper's head (bilinear RefineNet) vs the reference CPN
system's (transposed convolutions, model.refine_upsample=deconv), eager fp32 vs channels_last vs torch.compile
vs onnxruntime, with GFLOPs.

    python benchmarks/bench_inference.py [--quick] [--modes eager,channels_last,compile,onnx]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import gflops, median_seconds, print_table  # noqa: E402

from fashionkp.models import CPN, build_backbone  # noqa: E402
from fashionkp.models.cpn import HeatmapModel  # noqa: E402

HEADS = {"paper": "bilinear", "reference": "deconv"}


def runner(model: torch.nn.Module, mode: str, x: torch.Tensor, tmp: Path):
    if mode == "eager":
        return lambda: model(x)
    if mode == "channels_last":
        cl = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        return lambda: cl(xc)
    if mode == "compile":
        compiled = torch.compile(model)
        return lambda: compiled(x)
    if mode == "onnx":
        import onnxruntime as ort

        path = tmp / "m.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            axes = {"images": {0: "b"}, "heatmaps": {0: "b"}}
            torch.onnx.export(model, (x[:1],), str(path), input_names=["images"], output_names=["heatmaps"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        return lambda: session.run(None, {"images": xn})
    raise ValueError(mode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="resnet50 at 512 and efficientnet_lite0 at 256, batch 1")
    parser.add_argument("--backbones", default="resnet50,tf_efficientnet_lite0")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--modes", default="eager,channels_last,onnx")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    combos = [
        (b, s, n)
        for b in args.backbones.split(",")
        for s in map(int, args.sizes.split(","))
        for n in map(int, args.batches.split(","))
    ]
    if args.quick:
        combos = [("resnet50", 512, 1), ("tf_efficientnet_lite0", 256, 1)]
        args.repeats = 3
    modes = args.modes.split(",")
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for backbone, size, batch in combos:
        x = torch.rand(batch, 3, size, size) * 255
        baseline = None
        for head, upsample in HEADS.items():
            model = HeatmapModel(
                CPN(build_backbone(backbone), num_keypoints=24, width=256, refine_upsample=upsample)
            ).eval()
            flops = gflops(model, x[:1])
            for mode in modes if head == "paper" else ["eager"]:
                with torch.inference_mode() if mode != "onnx" else torch.no_grad():
                    fn = runner(model, mode, x, tmp)
                    t = median_seconds(fn, args.repeats, warmup=2 if mode == "compile" else 1)
                baseline = t if head == "reference" else baseline
                rows.append({"backbone": backbone, "input": size, "batch": batch, "head": head, "mode": mode,
                             "GFLOPs/img": f"{flops:.1f}", "ms/batch": f"{1000 * t:.0f}",
                             "img/s": f"{batch / t:.2f}", "GFLOP/s": f"{flops * batch / t:.0f}", "_t": t})  # fmt: skip
            model.to(memory_format=torch.contiguous_format)
        for r in rows:
            if (r["backbone"], r["input"], r["batch"]) == (backbone, size, batch):
                r["vs reference eager"] = f"{r['_t'] / baseline:.2f}"
    print(
        f"CPN inference, {args.threads} threads, median of {args.repeats}; "
        "'vs reference eager' = time / reference-head eager fp32 time"
    )
    columns = ["backbone", "input", "batch", "head", "mode", "GFLOPs/img", "ms/batch", "img/s", "GFLOP/s",
               "vs reference eager"]  # fmt: skip
    print_table(rows, columns)


if __name__ == "__main__":
    main()
