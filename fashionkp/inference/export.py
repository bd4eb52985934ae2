"""ONNX export of a trained model: raw RGB pixels (N, 3, H, W) in (and the garment types (N,) for a model told
them), RefineNet heatmaps out; batch and size dynamic (H and W multiples of 32), so multi-scale test runs through
it too."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from fashionkp.inference.checkpoint import load_checkpoint
from fashionkp.inference.precision import set_info
from fashionkp.models import HeatmapModel

#: Version of what `export_onnx` writes (2: the codec in the metadata; 3: the crop margin and the garment-type
#: output; 4: the number of crop passes); part of the cache key of exported files.
EXPORT_FORMAT = 4
DYNAMIC_AXES = {
    "images": {0: "batch", 2: "height", 3: "width"},
    "heatmaps": {0: "batch", 2: "h", 3: "w"},
    "garment_type": {0: "batch"},
    "types": {0: "batch"},
}


def export_onnx(checkpoint: Path | str, out: Path | str, opset: int = 17) -> Path:
    trained = load_checkpoint(checkpoint)
    model = HeatmapModel(trained.model).eval()
    dummy = torch.rand(1, 3, trained.input_size, trained.input_size) * 255
    inputs, args = ["images"], (dummy,)
    if trained.model.type_input is not None:  # a second input: each photo's garment type (CATEGORIES order)
        inputs, args = ["images", "types"], (dummy, torch.zeros(1, dtype=torch.int64))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a model with a garment-type head has a second output: the type probabilities
    outputs = ["heatmaps"] if trained.model.type_head is None else ["heatmaps", "garment_type"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(out), input_names=inputs, output_names=outputs,
            dynamic_axes={k: v for k, v in DYNAMIC_AXES.items() if k in inputs or k in outputs},
            opset_version=opset, dynamo=False,
        )  # fmt: skip
    import onnx

    proto = onnx.load(str(out))
    mean_shape = None if trained.mean_shape is None else np.nan_to_num(trained.mean_shape, nan=-1).tolist()
    info = {
        "format": EXPORT_FORMAT, "clothes": trained.clothes, "input_size": trained.input_size,
        "codec": trained.codec.config(),
        "backbone": trained.model.backbone.name, "checkpoint": str(checkpoint), "mean_shape": mean_shape,
        "crop_margin": trained.crop_margin, "crop_passes": trained.crop_passes, "test_scales": list(trained.scales),
        "precision": "fp32",
    }  # fmt: skip
    set_info(proto, info)
    onnx.save(proto, str(out))
    return out
