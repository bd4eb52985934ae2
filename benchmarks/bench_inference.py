"""Inference latency and throughput of the CPN on CPU: fp32 eager vs channels_last vs onnxruntime, bf16
(PyTorch autocast, channels_last) and int8 (onnxruntime static QDQ, per-channel weights), with GFLOPs, NE
beside the recipe's model (from a `fashionkp precision` record) and "x reference forward": the time over the
reference CPN system's own forward (ResNet-50 or the same backbone, transposed-convolution RefineNet, eager
fp32) of the same input and batch, measured in the same run.

    python benchmarks/bench_inference.py [--quick] [--record model.ckpt.precision.json] [--calibration-root DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import gflops, median_seconds, print_table  # noqa: E402

from fashionkp.inference.precision import (  # noqa: E402
    calibration_photos,
    cpu_features,
    describe_choice,
    onnxruntime_bf16_error,
    quantize_int8,
    set_info,
)
from fashionkp.models import CPN, HeatmapModel, build_backbone  # noqa: E402

HEADS = {"paper": "bilinear", "reference": "deconv"}
#: (backbone, input, head width): CPN-ResNet50 at 512 as in the CPN paper, and the CPU recipe's model.
MODELS = {"resnet50@512": ("resnet50", 512, 256), "recipe": ("tf_efficientnet_lite0", 192, 64)}
PRECISION_OF = {"eager": "fp32", "channels_last": "fp32", "onnx": "fp32", "bf16": "bf16", "int8": "int8"}


def export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"images": {0: "b"}, "heatmaps": {0: "b"}}
        torch.onnx.export(model, (x[:1],), str(path), input_names=["images"], output_names=["heatmaps"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    import onnx

    proto = onnx.load(str(path))  # quantize_int8 reads the input size from fashionkp's metadata
    set_info(proto, {"input_size": x.shape[-1]})
    onnx.save(proto, str(path))
    return path


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runner(model: torch.nn.Module, mode: str, x: torch.Tensor, tmp: Path, photos: list):
    if mode == "eager":
        return lambda: model(x)
    if mode in ("channels_last", "bf16"):
        cl = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        if mode == "channels_last":
            return lambda: cl(xc)

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return cl(xc)

        return bf16
    if mode == "compile":
        compiled = torch.compile(model)
        return lambda: compiled(x)
    fp32 = export(model, x, tmp / f"m{x.shape[-1]}.onnx")
    if mode not in ("onnx", "int8"):
        raise ValueError(mode)
    path = fp32 if mode == "onnx" else quantize_int8(fp32, tmp / f"m{x.shape[-1]}.int8.onnx", photos)
    ort_session, xn = session(path), x.numpy()
    return lambda: ort_session.run(None, {"images": xn})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats")
    parser.add_argument("--models", default="resnet50@512,recipe", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--backbones", help="instead of --models: these timm backbones (head width 256) at --sizes")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--modes", default="eager,channels_last,onnx,bf16,int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--record", help="a `fashionkp precision` record of the recipe's model: its NE per precision")
    parser.add_argument("--calibration-root", help="a FashionAI split folder: int8 calibrated on its photos")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [1] if args.quick else list(map(int, args.batches.split(",")))
    repeats = 3 if args.quick else args.repeats
    record = json.loads(Path(args.record).read_text()) if args.record else None
    modes = args.modes.split(",")
    tmp = Path(tempfile.mkdtemp())
    rows = []
    models = dict(MODELS)
    if args.backbones:
        models = {f"{b}@{s}": (b, int(s), 256) for b in args.backbones.split(",") for s in args.sizes.split(",")}
    for name in models if args.backbones else args.models.split(","):
        backbone, size, width = models[name]
        photos = calibration_photos([args.calibration_root], 32) if args.calibration_root else None
        for batch in batches:
            x = torch.rand(batch, 3, size, size) * 255
            reference = None
            for head, upsample in reversed(HEADS.items()):  # the reference first: every row is compared to it
                model = HeatmapModel(
                    CPN(build_backbone(backbone), num_keypoints=24, width=width, refine_upsample=upsample)
                ).eval()
                flops = gflops(model, x[:1])
                for mode in modes if head == "paper" else ["eager"]:
                    calibration = photos if photos else _random_calibration(tmp, size)
                    with torch.inference_mode() if mode not in ("onnx", "int8") else torch.no_grad():
                        fn = runner(model, mode, x, tmp, calibration)
                        t = median_seconds(fn, repeats, warmup=2 if mode == "compile" else 1)
                    reference = t if head == "reference" else reference
                    precision = PRECISION_OF.get(mode, "fp32")
                    ne = record["figures"].get(precision, {}).get("ne") if record and name == "recipe" else None
                    rows.append({"model": name, "backbone": backbone, "input": size, "batch": batch, "head": head,
                                 "mode": mode, "precision": precision, "GFLOPs/img": f"{flops:.1f}",
                                 "ms/batch": f"{1000 * t:.0f}", "img/s": f"{batch / t:.2f}",
                                 "x reference forward": f"{t / reference:.2f}",
                                 "NE %": f"{ne:.2f}" if ne is not None else "-"})  # fmt: skip
                model.to(memory_format=torch.contiguous_format)
    features = cpu_features()
    print(f"CPN inference on CPU ({features.describe()}; torch sees {torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads, median of {repeats}; 'x reference forward' = time / the reference CPN system's "
          "eager fp32 forward (transposed-convolution RefineNet) of the same backbone, input and batch")  # fmt: skip
    if record:
        print(f"NE: the recipe's trained model on {record['validation_images']} validation photos ({args.record})")
    columns = ["model", "input", "batch", "head", "mode", "precision", "GFLOPs/img", "ms/batch", "img/s",
               "x reference forward", "NE %"]  # fmt: skip
    print_table(rows, columns)
    print(f"bf16 through onnxruntime: {onnxruntime_bf16_error() or 'runs'}; bf16 above is PyTorch autocast")
    # The default CPU path (precision=auto): the measured choice, else onnxruntime fp32 (never measured). Only
    # the recipe's model is trained here; a CPN-ResNet50 gets its own choice once `fashionkp precision` measures it.
    choice = record["choice"] if record else "fp32"
    mode = next(m for m, p in PRECISION_OF.items() if p == choice and m in ("onnx", "bf16", "int8"))
    why = f"the recipe's measured choice: {describe_choice(record)}" if record else "no measurement given"
    print(f"default CPU path, precision=auto -> {choice} ({why}); with that precision:")
    for row in [r for r in rows if r["head"] == "paper" and r["mode"] == mode] or [{"model": f"(no {mode} rows)"}]:
        print(f"  {row['model']} batch {row.get('batch', '-')}: {row.get('ms/batch', '-')} ms, "
              f"{row.get('x reference forward', '-')}x the reference system's forward")  # fmt: skip


def _random_calibration(tmp: Path, size: int) -> list[Path]:
    """A few random images on disk, for int8 calibration when no photos are given (speed does not depend on
    the ranges)."""
    import cv2

    paths = []
    rng = np.random.default_rng(0)
    for i in range(4):
        path = tmp / f"random{size}_{i}.png"
        if not path.is_file():
            cv2.imwrite(str(path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
