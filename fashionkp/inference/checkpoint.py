"""Trained models from checkpoint files, without the LightningModule: the network, its heatmap codec, the
garment type and input size it was trained for, and the training mean shape."""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate

from fashionkp.data.codec import HeatmapCodec
from fashionkp.data.keypoints import ALL, CATEGORIES, channels_for, check_category
from fashionkp.errors import UserError
from fashionkp.models import CPN, build_cpn

log = logging.getLogger(__name__)
CODEC_TARGET = f"{HeatmapCodec.__module__}.{HeatmapCodec.__qualname__}"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


#: The test scales of models saved before ``model.test_scales`` was: the one they were used at.
DEFAULT_TEST_SCALES = (1.0,)


def test_scales_of(saved: dict) -> tuple[float, ...]:
    """The test scales a checkpoint's hyper-parameters or an ONNX file's metadata hold (``test_scales``)."""
    return tuple(float(s) for s in saved.get("test_scales") or DEFAULT_TEST_SCALES)


def crop_passes_of(saved: dict) -> int:
    """The crop passes a checkpoint's hyper-parameters or an ONNX file's metadata hold (``crop_passes``); one for
    files saved before they were."""
    return int(saved.get("crop_passes") or 1)


@dataclass
class TrainedModel:
    """What inference needs of a checkpoint."""

    model: CPN
    codec: HeatmapCodec
    clothes: str
    input_size: int
    #: (5, 24, 2) training mean shape per garment type; None for checkpoints from before it was saved.
    mean_shape: np.ndarray | None
    path: str
    #: The margin of the crop pass when the model was trained to predict in two passes, else None.
    crop_margin: float | None = None
    #: The test scales the model is predicted at unless told otherwise (``model.test_scales``).
    scales: tuple[float, ...] = DEFAULT_TEST_SCALES
    #: How many crop passes follow the first (``model.crop_passes``), each around the previous one's points.
    crop_passes: int = 1


def build_codec(codec: dict[str, Any], stride: int) -> HeatmapCodec:
    """The codec a config (``heatmap``), a checkpoint or an ONNX file's metadata describes, at ``stride``."""
    values = {k: v for k, v in codec.items() if k not in ("_target_", "stride")}
    return instantiate({"_target_": codec.get("_target_", CODEC_TARGET), **values}, stride=stride)


def build_model(hparams: dict[str, Any]) -> tuple[CPN, HeatmapCodec]:
    """The network and codec a checkpoint's hyper-parameters describe (weights not loaded)."""
    clothes = check_category(hparams["clothes"], allow_all=True)
    # a garment type is only worth telling for a model that serves every type
    num_types = len(CATEGORIES) if hparams.get("type_head") and clothes == ALL else 0
    # checkpoints from before the option: no garment-type input
    num_input_types = len(CATEGORIES) if hparams.get("garment_type_input") and clothes == ALL else 0
    model = build_cpn(
        hparams["backbone"],
        len(channels_for(clothes)),
        hparams["width"],
        hparams["refine_upsample"],
        num_types,
        num_input_types,
    )
    # the stride is the network's: that of its finest feature map
    return model, build_codec(hparams["codec"], model.stride)


def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of checkpoints written before the codec was one object (``decoder`` and
    ``decode_sigma`` among the model's, the target sigma in the data config and not saved): the codec is
    rebuilt with the configs' rule, target sigma = 2 x decode sigma, which only training would use."""
    if "codec" in hparams:
        return hparams
    hparams = dict(hparams)
    decode_sigma = hparams.pop("decode_sigma", 2.0)
    hparams["codec"] = {
        "_target_": CODEC_TARGET, "sigma": 2 * decode_sigma, "global_sigma": 2 * decode_sigma,
        "decoder": hparams.pop("decoder", "dark"), "decode_sigma": decode_sigma, "include_occluded": True,
    }  # fmt: skip
    return hparams


def read_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict, its hyper-parameters upgraded; a clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or not a checkpoint): {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path}: not a fashionkp training checkpoint (no state_dict/hyper_parameters)")
    ckpt["hyper_parameters"] = upgrade_hparams(dict(ckpt["hyper_parameters"]))
    return ckpt


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> TrainedModel:
    """The trained network of a Lightning checkpoint (in eval mode), without downloading backbone weights."""
    ckpt = read_checkpoint(path, map_location)
    hparams = dict(ckpt["hyper_parameters"])
    hparams["backbone"] = {**hparams["backbone"], "pretrained": False, "weights": None}
    model, codec = build_model(hparams)
    # The LightningModule keeps the network as `model.`; torch.compile adds `_orig_mod`.
    plain = {k.replace("._orig_mod", "").replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()}
    state = {k.removeprefix("model."): v for k, v in plain.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model its hyper-parameters describe: {e}") from e
    mean_shape = np.asarray(ckpt["mean_shape"], dtype=np.float64) if "mean_shape" in ckpt else None
    crop_margin = float(hparams["crop_margin"]) if hparams.get("two_pass") else None
    return TrainedModel(model.eval(), codec, hparams["clothes"], hparams["input_size"], mean_shape, str(path),
                        crop_margin=crop_margin, scales=test_scales_of(hparams),
                        crop_passes=crop_passes_of(hparams))  # fmt: skip
