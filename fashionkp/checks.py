"""Checks of a composed config before any work starts: a typo or an impossible setting is refused in
seconds with one line naming the key, the value and what would work, not five epochs into a run."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from fashionkp.config import as_list, is_number, validation_needs_photos
from fashionkp.data.codec import DECODERS
from fashionkp.data.fashionai import MISSING_IMAGE_MODES
from fashionkp.data.keypoints import CATEGORIES
from fashionkp.data.transforms import check_crop_margin, check_crop_passes, input_size_at
from fashionkp.errors import ConfigError

log = logging.getLogger(__name__)
#: Lightning's precision names, aliases included (Hydra reads `32` as an int: compared as text).
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16", "64-true", "64")
BACKENDS = ("auto", "torch", "onnx")


def choice(cfg: DictConfig, key: str, choices: Sequence) -> None:
    value = OmegaConf.select(cfg, key)
    if str(value) not in map(str, choices):
        raise ConfigError(key, value, "not a valid choice", choices)


def check_data_root(roots: Sequence, key: str = "data.root") -> None:
    if not roots:
        raise ConfigError(key, None, "no FashionAI split folder given", "set data.root=/path/to/split or FASHIONAI_DIR")
    for root in roots:
        if not Path(root).exists():
            raise ConfigError(
                key, str(root), "no such folder or CSV file",
                "give a FashionAI split folder holding Images/ and Annotations/: data.root=/path/to/split, "
                "a list data.root=[/a,/b], or set FASHIONAI_DIR",
            )  # fmt: skip


def check_train_config(cfg: DictConfig) -> None:
    """Everything ``train(cfg)`` would trip over late, checked at once."""
    choice(cfg, "clothes.name", (*CATEGORIES, "all"))
    choice(cfg, "heatmap.decoder", DECODERS)
    choice(cfg, "model.refine_upsample", ("bilinear", "deconv"))
    choice(cfg, "data.missing_images", MISSING_IMAGE_MODES)
    choice(cfg, "trainer.precision", PRECISIONS)
    resolution = cfg.resolution
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 32:
        raise ConfigError("resolution", resolution, "the input side must be a positive multiple of 32", "e.g. 192, 256")
    for key in ("heatmap.sigma", "heatmap.decode_sigma", "model.optimizer.lr", "model.backbone_lr_factor",
                "data.batch_size"):  # fmt: skip
        value = OmegaConf.select(cfg, key)
        if value is not None and (not is_number(value) or not value > 0):
            raise ConfigError(key, value, "must be positive")
    ema_decay = OmegaConf.select(cfg, "model.ema_decay")
    if ema_decay is not None and (not is_number(ema_decay) or not 0 < ema_decay < 1):
        raise ConfigError("model.ema_decay", ema_decay, "must be between 0 and 1", "or null: no average")
    test_scales = as_list(cfg.model.test_scales)
    check_scales("model.test_scales", test_scales)
    if resolution not in [input_size_at(resolution, s) for s in test_scales]:
        # the validation loss is computed at the input size the model trains at
        raise ConfigError("model.test_scales", test_scales, f"none runs the model at its input size {resolution}",
                          "include 1.0, e.g. [0.9,1.0,1.1]")  # fmt: skip
    if cfg.model.get("garment_type_input") and cfg.clothes.name != "all":
        raise ConfigError("model.garment_type_input", True, f"a clothes={cfg.clothes.name} model serves one garment "
                          "type: there is no type to tell it (clothes=all)")  # fmt: skip
    check_two_passes(cfg)
    check_erasing(cfg.get("augmentation"))
    check_sync_batchnorm(cfg.trainer)
    fraction = cfg.data.val_fraction
    if not cfg.data.get("val_root") and not 0 < fraction < 1:
        raise ConfigError("data.val_fraction", fraction, "must lie between 0 and 1 (or give data.val_root)")
    check_data_root(as_list(cfg.data.root))
    if cfg.data.get("val_root"):
        check_data_root(as_list(cfg.data.val_root), "data.val_root")
    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(ckpt).exists():
        raise ConfigError("ckpt_path", ckpt, "no such checkpoint file or run folder")
    check_loggers(cfg)  # before the backbone: offline, the weights check would hide this one
    check_backbone(cfg.backbone)
    check_frozen_stages(cfg.backbone, cfg.model.frozen_backbone_stages)


def check_share(key: str, value: object, what: str) -> None:
    """A share of the samples: a number in [0, 1]."""
    if not is_number(value) or not 0 <= value <= 1:
        raise ConfigError(key, value, f"the share of {what} lies in [0, 1]")


def check_range(key: str, value: object, low_above_zero: bool, at_most: float | None = None) -> None:
    """A range ``[low, high]`` of two numbers, 0 <= low (0 < low when ``low_above_zero``) <= high (<= ``at_most``)."""
    rule = f"0 {'<' if low_above_zero else '<='} low <= high" + ("" if at_most is None else f" <= {at_most:g}")
    if OmegaConf.is_list(value) and len(value) == 2 and all(map(is_number, value)):
        low, high = value
        if (low > 0 if low_above_zero else low >= 0) and low <= high and (at_most is None or high <= at_most):
            return
    raise ConfigError(key, list(value) if OmegaConf.is_list(value) else value, f"a range [low, high] with {rule}")


def check_erasing(augmentation: DictConfig | None) -> None:
    """Random erasing: a share of the samples, a range of areas."""
    if augmentation is None or "erase" not in augmentation:
        return
    check_share("augmentation.erase", augmentation.erase, "erased samples")
    check_range("augmentation.erase_area", augmentation.erase_area, low_above_zero=True, at_most=1)


def check_two_passes(cfg: DictConfig) -> None:
    """The crop samples of training and the crop pass of validation."""
    augmentation = cfg.get("augmentation")
    if augmentation is not None and "crop" in augmentation:
        check_share("augmentation.crop", augmentation.crop, "crop samples")
        check_range("augmentation.crop_margin", augmentation.crop_margin, low_above_zero=False)
        jitter = augmentation.crop_jitter
        if not is_number(jitter) or jitter < 0:
            raise ConfigError("augmentation.crop_jitter", jitter, "a number, not negative")
    if cfg.model.get("two_pass"):
        check_crop_margin("model.crop_margin", cfg.model.crop_margin)
        check_crop_passes("model.crop_passes", cfg.model.crop_passes)
        if augmentation is None or not augmentation.get("crop"):
            log.warning("model.two_pass without crop samples (augmentation.crop=0): the crop pass sees garments "
                        "larger than the model was trained on")  # fmt: skip
    elif cfg.model.crop_passes != 1:  # 1, the model config's own, says nothing
        log.warning("model.crop_passes=%s: ignored, the model predicts in one pass (model.two_pass=true adds the "
                    "crop passes)", cfg.model.crop_passes)  # fmt: skip
    needs_photos = validation_needs_photos(cfg.model.get("two_pass"), cfg.model.test_scales)
    if needs_photos and not cfg.data.get("keep_val_photos"):
        raise ConfigError(
            "data.keep_val_photos", False, "a crop pass or other test scales validate on the photos themselves"
        )


def check_sync_batchnorm(trainer: DictConfig) -> None:
    """Synchronized batch norms in DDP on CPU processes: torch's DistributedDataParallel refuses them, but only
    once the data is loaded and the fit starts."""
    if not trainer.get("sync_batchnorm"):
        return
    from fashionkp.inference.precision import runs_on_cpu

    strategy = str(trainer.get("strategy", "auto")).lower()
    several = (trainer.get("num_nodes") or 1) > 1 or trainer.get("devices", "auto") not in (1, "1", "auto")
    distributed = "ddp" in strategy or (strategy == "auto" and several)  # Lightning picks DDP for several
    if distributed and runs_on_cpu(trainer.get("accelerator") or "auto"):
        raise ConfigError("trainer.sync_batchnorm", True, "synchronized batch norms need GPUs",
                          "set trainer.sync_batchnorm=false for DDP on CPU")  # fmt: skip


def check_backbone(backbone: DictConfig) -> None:
    import timm

    from fashionkp.models.backbone import OFFLINE_WEIGHT_PACKAGES, pyramid_indices

    name = backbone.name
    if not timm.is_model(name):
        close = timm.list_models(f"*{str(name).split('.')[0][:6]}*")[:8]
        raise ConfigError("backbone.name", name, "not a timm model", f"similar: {', '.join(close) or 'none'}")
    pyramid_indices(name)  # raises ConfigError when strides 4..32 are missing
    if backbone.get("weights"):
        if not Path(backbone.weights).expanduser().is_file():
            raise ConfigError("backbone.weights", backbone.weights, "no such weights file")
    elif backbone.get("pretrained") and name not in OFFLINE_WEIGHT_PACKAGES:
        problem = weights_unreachable(name)
        if problem:
            raise ConfigError(
                "backbone.pretrained", True, f"ImageNet weights for {name!r} cannot be had: {problem}",
                "pass a local file with backbone.weights=/path/to/weights.pth, or backbone.pretrained=false",
            )  # fmt: skip


def check_frozen_stages(backbone: DictConfig, stages: object) -> None:
    """``model.frozen_backbone_stages``: a stage count the backbone can freeze; frozen layers that were never
    trained are warned about."""
    import torch

    from fashionkp.models.backbone import Backbone

    with torch.device("meta"):  # only the layout: no memory, no weights
        Backbone(backbone.name).freeze_stages(stages)
    if stages and not (backbone.get("pretrained") or backbone.get("weights")):
        log.warning(
            "model.frozen_backbone_stages=%s with backbone.pretrained=false: the frozen layers keep their random "
            "initial weights (set model.frozen_backbone_stages=0 to train them)", stages,
        )  # fmt: skip


def weights_unreachable(name: str) -> str | None:
    """Why timm could not get ``name``'s pretrained weights now (None when cached or the host answers)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    from timm.models._hub import check_cached_file

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return "timm knows no pretrained weights for it"
    hub_id, url = cfg.hf_hub_id, cfg.url
    if hub_id and any(
        isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")
    ):
        return None
    if url and check_cached_file(url):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") and not url:
        return "HF_HUB_OFFLINE is set and they are not in the local cache"
    hosts = []
    if hub_id:
        hosts.append(urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname)
    if url:
        hosts.append(urlparse(url).hostname)
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct probe proves nothing: let the download try
    if any(_reachable(h) for h in hosts if h):
        return None
    return f"not in the local cache and {' / '.join(h for h in hosts if h)} cannot be reached (offline?)"


@cache
def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    # One quick probe per host and process: a sweep learns at once that it is offline instead of each job
    # retrying the hub for most of a minute.
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_loggers(cfg: DictConfig) -> None:
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg and not wandb_cfg.get("offline", True) and not wandb_api_key():
        raise ConfigError(
            "logger.wandb.offline", False, "online wandb needs an account on this machine",
            "run `wandb login` first (or set WANDB_API_KEY), or keep logger.wandb.offline=true and "
            "`wandb sync` the run later",
        )  # fmt: skip


def wandb_api_key() -> str | None:
    """The key wandb would log in with: ``WANDB_API_KEY``, or the .netrc entry ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host) if path.is_file() else None
    except (netrc.NetrcParseError, OSError):  # an unreadable .netrc holds no usable key either
        return None
    return entry[2] if entry else None


def check_inference_config(cfg: DictConfig) -> None:
    """predict.py / evaluate.py: the checkpoint files and the test scales."""
    if not as_list(cfg.checkpoints):
        raise ConfigError("checkpoints", [], "no checkpoint given", "checkpoints=a.ckpt or checkpoints=[a.ckpt,b.ckpt]")
    for key in ("checkpoints", "fine_checkpoints"):
        for path in as_list(cfg.get(key)):
            if not Path(path).is_file():
                raise ConfigError(key, str(path), "no such checkpoint file")
    if cfg.get("calibration_root"):
        check_data_root(as_list(cfg.calibration_root), "calibration_root")
    # decoder, backend, precision and ensemble weights: checked by KeypointPredictor, for the Python API too
    # scales=null: the model's own; crop_scales=null: the first pass's
    for key in ("scales", "crop_scales"):
        if cfg.get(key) is not None:
            check_scales(key, as_list(cfg[key]))
    if cfg.get("crop_passes") is not None:
        check_crop_passes("crop_passes", cfg.crop_passes)


def check_scales(key: str, scales: list) -> None:
    """Test scales: a non-empty list of positive factors."""
    if not scales or not all(isinstance(s, (int, float)) and s > 0 for s in scales):
        raise ConfigError(key, scales, "must be a list of positive factors", "e.g. [1.0] or [1.0,1.25]")
