"""Which layers int8 may quantize: the model quantized with one group of nodes kept in fp32 at a time, its points
on real validation photos against fp32's (decoded from the network's own heatmaps, the photo's garment-type
points only, input pixels), and its time per image (onnxruntime, batch 1, 2 threads, median).

    python benchmarks/bench_int8_layers.py CHECKPOINT --photos /data/fashionai/train [--n 80] [--calibration 64]

"fp32_nodes" is what `fashionkp export --precision int8` and `precision=int8` keep in fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table  # noqa: E402

from fashionkp.data.fashionai import read_splits  # noqa: E402
from fashionkp.data.keypoints import CATEGORY_ID, CATEGORY_KEYPOINTS  # noqa: E402
from fashionkp.data.split import split_records  # noqa: E402
from fashionkp.inference.checkpoint import load_checkpoint  # noqa: E402
from fashionkp.inference.precision import (  # noqa: E402
    calibration_photos,
    fp32_nodes,
    letterboxed,
    quantize_int8,
    type_head_nodes,
)
from fashionkp.inference.predictor import cached_onnx  # noqa: E402


def node_groups(graph) -> dict[str, list[str]]:
    """Groups of nodes to keep in fp32, by what they compute (names as torch.onnx.export gives them)."""
    nodes = list(graph.node)

    def named(*parts: str) -> list[str]:
        return [n.name for n in nodes if any(p in n.name for p in parts)]

    head = type_head_nodes(graph)
    return {
        "all int8 (type head fp32)": head,
        "fp32_nodes (what int8 keeps)": fp32_nodes(graph),
        "Pad nodes only": head + [n.name for n in nodes if n.op_type == "Pad"],
        "depthwise convolutions": head + [n.name for n in nodes if n.op_type == "Conv" and "conv_dw" in n.name],
        "backbone stages 2-3": head + named("blocks.2/", "blocks.3/"),
        "GlobalNet and RefineNet": head + named("global_net", "refine_net"),
    }


def main() -> None:
    from onnxruntime import InferenceSession, SessionOptions
    from onnxruntime.quantization.shape_inference import quant_pre_process

    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--photos", required=True, help="a FashionAI split folder the checkpoint was trained on")
    parser.add_argument("--n", type=int, default=80, help="validation photos compared")
    parser.add_argument("--calibration", type=int, default=64, help="training photos that calibrate int8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    trained = load_checkpoint(args.checkpoint)
    size, codec = trained.input_size, trained.codec
    val = split_records(read_splits([args.photos], None, "skip"), 0.2, "fashionkp")[1]
    val = [val[i] for i in np.linspace(0, len(val) - 1, min(args.n, len(val))).astype(int)]
    inputs = np.concatenate([letterboxed(r.image_path, size) for r in val])
    types = np.array([CATEGORY_ID[r.category] for r in val], dtype=np.int64)
    own = torch.zeros(len(val), 24, dtype=torch.bool)
    for i, record in enumerate(val):
        own[i, list(CATEGORY_KEYPOINTS[record.category])] = True
    calibration = calibration_photos([args.photos], args.calibration)

    def run(path: Path) -> tuple[torch.Tensor, float]:
        options = SessionOptions()
        options.intra_op_num_threads = args.threads
        session = InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        told = "types" in [i.name for i in session.get_inputs()]  # a model told each photo's garment type

        def feed(rows: slice) -> dict:
            return {"images": inputs[rows], **({"types": types[rows]} if told else {})}

        batches = range(0, len(inputs), 8)
        heatmaps = np.concatenate([session.run(None, feed(slice(i, i + 8)))[0] for i in batches])
        times = []
        for _ in range(20):
            start = time.perf_counter()
            session.run(None, feed(slice(0, 1)))
            times.append(time.perf_counter() - start)
        return codec.decode(torch.from_numpy(heatmaps))[0], 1000 * float(np.median(times))

    fp32 = cached_onnx(args.checkpoint)
    reference, fp32_ms = run(fp32)
    rows = [{"kept in fp32": "everything (fp32)", "nodes": "all", "median shift px": "0", "mean shift px": "0",
             "points moved > 1 px": "0%", "ms/image": f"{fp32_ms:.1f}"}]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        for name, keep in node_groups(onnx.load(str(prepared)).graph).items():
            out = quantize_int8(fp32, Path(tmp) / "int8.onnx", calibration, keep_fp32=lambda graph, keep=keep: keep)
            points, ms = run(out)
            shift = (points - reference).norm(dim=-1)[own]
            moved = 100 * (shift > 1).float().mean()
            rows.append({"kept in fp32": name, "nodes": str(len(keep)), "median shift px": f"{shift.median():.2f}",
                         "mean shift px": f"{shift.mean():.2f}", "points moved > 1 px": f"{moved:.1f}%",
                         "ms/image": f"{ms:.1f}"})  # fmt: skip
            print(f"{name}: median shift {shift.median():.2f} px, {ms:.1f} ms/image", flush=True)
    print(f"\n{Path(args.checkpoint).name}, {len(val)} validation photos at {size} px, {args.calibration} calibration"
          f" photos, {args.threads} threads; shifts of int8's points from fp32's in input pixels")  # fmt: skip
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
