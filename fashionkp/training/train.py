"""``train(cfg)``: build the data module, the CPN module, loggers and callbacks from a Hydra config and fit."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fashionkp.checks import check_train_config
from fashionkp.config import register_resolvers
from fashionkp.data.codec import DEPRECATED_DECODERS, check_decoder
from fashionkp.data.dataset import FashionAIDataModule
from fashionkp.errors import ConfigError
from fashionkp.inference.precision import training_precision
from fashionkp.training.callbacks import AtomicCheckpointIO, NEReport, TimmSyncBatchNorm
from fashionkp.training.module import CPNModule

log = logging.getLogger(__name__)
register_resolvers()


def apply_deprecated_names(cfg: DictConfig) -> None:
    """Old option names, accepted for one release with a warning: ``model.decoder`` and
    ``model.decode_sigma`` and ``data.include_occluded`` (now ``heatmap.*``), the decoder ``seed`` (now
    ``quarter_offset``) and ``augmentation=seed`` (now ``flip_rotate``)."""
    with open_dict(cfg):
        for group, key in (("model", "decoder"), ("model", "decode_sigma"), ("data", "include_occluded")):
            value = cfg[group].pop(key, None)
            if value is not None:
                log.warning("%s.%s is deprecated: use heatmap.%s", group, key, key)
                cfg.heatmap[key] = value
        if cfg.heatmap.decoder in DEPRECATED_DECODERS:
            cfg.heatmap.decoder = check_decoder(cfg.heatmap.decoder)
        if cfg.get("augmentation") and cfg.augmentation.get("deprecated"):
            log.warning("%s", cfg.augmentation.deprecated)
            cfg.augmentation.pop("deprecated")


def build(cfg: DictConfig) -> tuple[CPNModule, FashionAIDataModule]:
    """The LightningModule and the data module that ``cfg`` describes (the way to instantiate the model and data
    configs: it applies the deprecated names first)."""
    apply_deprecated_names(cfg)
    if cfg.get("augmentation") is not None and "_target_" not in cfg.augmentation:
        raise ConfigError(
            "augmentation", OmegaConf.to_container(cfg.augmentation), "changes keys of no augmentation",
            "pick a config with augmentation=default|mild|flip_rotate before changing its keys",
        )  # fmt: skip
    module = instantiate(cfg.model, _recursive_=False)
    # The codec is the model's (its stride is the network's): handed over as an object, not as config.
    return module, instantiate(cfg.data, _partial_=True)(codec=module.codec)


def hydra_choices() -> dict[str, str]:
    """The config-group choices of this run (clothes=dress, backbone=resnet50, ...), when under Hydra."""
    if not HydraConfig.initialized():
        return {}
    return {
        k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None and not k.startswith("hydra")
    }


def run_group(cfg: DictConfig) -> str:
    """The wandb group: ``group=`` when set; in a multirun, the task and the sweep's folder, so that one
    sweep's jobs line up together and apart from other sweeps."""
    group = str(cfg.get("group") or cfg.task_name)
    if group == cfg.task_name and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{cfg.task_name}-{Path(HydraConfig.get().sweep.dir).name}"
    return group


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    choices = hydra_choices()
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        if "Wandb" in logger_cfg._target_:
            os.environ.setdefault("WANDB_SILENT", "true")
            if logger_cfg.get("offline", True):
                os.environ.setdefault("WANDB_MODE", "offline")
            tags = list(cfg.get("tags") or []) + [f"{k}={v}" for k, v in choices.items()]
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                tags.append(f"job={HydraConfig.get().job.num}")
            logger = instantiate(logger_cfg, tags=tags, group=run_group(cfg))
        else:
            logger = instantiate(logger_cfg)
        loggers.append(logger)
    return loggers


def finish_loggers(loggers: list) -> None:
    """Close wandb runs: Lightning's WandbLogger would otherwise hand the still-open run to the next job
    of a sweep, which then logs into this job's run."""
    if any(isinstance(logger, pl.loggers.WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


def build_callbacks(cfg: DictConfig, with_logger: bool) -> list[pl.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    # Lightning refuses a LearningRateMonitor without a logger (logger=none, debug=fdr).
    return [c for c in callbacks if with_logger or not isinstance(c, pl.callbacks.LearningRateMonitor)]


def resume_checkpoint(path: str | None) -> str | None:
    """``ckpt_path`` as given: a checkpoint file, or a run folder whose newest checkpoint is taken
    (``last.ckpt`` at epoch ends, ``step.ckpt`` every ``callbacks.step_checkpoint.every_n_train_steps``)."""
    if not path or not Path(path).is_dir():
        return path
    folder = Path(path) / "checkpoints" if (Path(path) / "checkpoints").is_dir() else Path(path)
    candidates = [p for p in (folder / "last.ckpt", folder / "step.ckpt") if p.is_file()]
    if not candidates:
        raise ConfigError("ckpt_path", path, "no last.ckpt or step.ckpt in this run folder")
    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    log.info("resuming from %s", newest)
    return str(newest)


def last_checkpoint(trainer: pl.Trainer) -> str:
    """The ``last.ckpt`` the run wrote at its last epoch end ("" when it wrote none)."""
    for callback in trainer.checkpoint_callbacks:
        path = Path(callback.dirpath or "") / "last.ckpt"
        if callback.monitor is None and callback.every_n_epochs and path.is_file():
            return str(path)
    return ""


def train(cfg: DictConfig) -> dict:
    """Fit a CPN as ``cfg`` says; returns the validation NE (percent), the best checkpoint and the run folder."""
    apply_deprecated_names(cfg)
    check_train_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    module, datamodule = build(cfg)
    loggers = build_loggers(cfg)
    try:
        return _fit(cfg, datamodule, module, loggers, output_dir)
    finally:
        finish_loggers(loggers)


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list) -> pl.Trainer:
    """The Lightning trainer of ``cfg.trainer``: checkpoints written atomically, batch norms synchronized (with
    ``trainer.sync_batchnorm``) the way timm converts them."""
    plugins = [AtomicCheckpointIO(), *([TimmSyncBatchNorm()] if cfg.trainer.get("sync_batchnorm") else [])]
    return instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=plugins,
        precision=training_precision(cfg.trainer.precision, cfg.trainer.accelerator),
    )  # fmt: skip


def saved_at_last_validation(checkpoint: str, module: CPNModule) -> bool:
    """Whether ``checkpoint`` holds the weights the fit's last validation scored: saved at the same optimizer step.
    False where the file cannot be read here as one local file (a remote or sharded checkpoint): validate it."""
    try:
        step = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False).get("global_step")
    except (OSError, RuntimeError, AttributeError):
        return False
    return step is not None and step == getattr(module, "last_val_step", None)


def _fit(cfg: DictConfig, datamodule, module, loggers: list, output_dir: Path) -> dict:
    for logger in loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), "choices": hydra_choices()})
    trainer = build_trainer(cfg, loggers, build_callbacks(cfg, with_logger=bool(loggers)))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg.get("ckpt_path")))
    if "val/ne" not in trainer.callback_metrics and not trainer.interrupted:
        # A run stopped before its last epoch's end (max_steps, max_time): validate the final weights (with
        # model.ema_decay their average, which the fit's end leaves in the module), not report NaN.
        trainer.validate(module, datamodule=datamodule, verbose=False)
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
    result = {
        "unit": "%",
        "val_ne": float(trainer.callback_metrics["val/ne"]) if "val/ne" in trainer.callback_metrics else float("nan"),
        "best_checkpoint": best,
        "last_checkpoint": last_checkpoint(trainer),
        "output_dir": str(output_dir),
        "global_step": trainer.global_step,
    }
    if cfg.get("validate_best") and best:
        # every process takes the first one's decision: they validate together or not at all
        if trainer.strategy.broadcast(saved_at_last_validation(best, module)):
            # the weights in memory are the checkpoint's, and their validation is done (about 130 s on the CPU recipe)
            log.info("the best checkpoint is the last validated weights: their validation stands")
        else:
            for callback in trainer.callbacks:
                if isinstance(callback, NEReport):  # the per-epoch table is for training validations only
                    callback.record_epochs = False
            trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        best_result = module.last_val_result
        result["best_val_ne"] = 100 * best_result.ne
        if module.last_val_types:
            result["best_type_accuracy"] = module.last_val_types["accuracy"]
        if trainer.is_global_zero:
            types = {"garment_types": module.last_val_types} if module.last_val_types else {}
            (output_dir / "val_ne_best.json").write_text(
                json.dumps({"checkpoint": best, **best_result.as_dict(), **types}, indent=2)
            )
    if trainer.is_global_zero:
        log.info("validation NE %.4f%% (best checkpoint: %s)", result.get("best_val_ne", result["val_ne"]), best or "-")
        (output_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result
