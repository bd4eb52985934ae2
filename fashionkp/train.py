"""``train(cfg)``: build the data module, the CPN module, loggers and callbacks from a Hydra config and fit."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fashionkp.callbacks import AtomicCheckpointIO
from fashionkp.config import register_resolvers
from fashionkp.dataset import DataConfig, FashionAIDataModule, TargetConfig
from fashionkp.transforms import AugmentConfig

log = logging.getLogger(__name__)
register_resolvers()
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def build_datamodule(cfg: DictConfig) -> FashionAIDataModule:
    d, aug = cfg.data, cfg.augmentation
    augment = (
        AugmentConfig(
            rotation=aug.rotation, scale=tuple(aug.scale), translate=aug.translate, flip=aug.flip, color=aug.color
        )
        if aug.enabled
        else None
    )
    data_cfg = DataConfig(
        root=OmegaConf.to_container(d.root) if OmegaConf.is_list(d.root) else d.root,
        val_root=OmegaConf.to_container(d.val_root) if OmegaConf.is_list(d.val_root) else d.val_root,
        val_fraction=d.val_fraction, val_salt=d.val_salt, batch_size=d.batch_size, num_workers=d.num_workers,
        missing_images=d.missing_images, limit_train=d.limit_train, seed=cfg.seed, augment=augment,
        targets=TargetConfig(cfg.heatmap.sigma, cfg.heatmap.global_sigma, include_occluded=d.include_occluded),
    )  # fmt: skip
    return FashionAIDataModule(data_cfg, cfg.clothes.name, cfg.resolution)


def hydra_choices() -> dict[str, str]:
    """The config-group choices of this run (clothes=dress, backbone=resnet50, ...), when under Hydra."""
    if not HydraConfig.initialized():
        return {}
    return {
        k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None and not k.startswith("hydra")
    }


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
            logger = instantiate(logger_cfg, tags=tags)
        else:
            logger = instantiate(logger_cfg)
        loggers.append(logger)
    return loggers


def build_callbacks(cfg: DictConfig, with_logger: bool) -> list[pl.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    # Lightning refuses a LearningRateMonitor without a logger (logger=none, debug=fdr).
    return [c for c in callbacks if with_logger or not isinstance(c, pl.callbacks.LearningRateMonitor)]


def train(cfg: DictConfig) -> dict:
    """Fit a CPN as ``cfg`` says; returns the validation NE, the best checkpoint and the run folder."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    module = instantiate(cfg.model, _recursive_=False)
    loggers = build_loggers(cfg)
    for logger in loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), "choices": hydra_choices()})
    callbacks = build_callbacks(cfg, with_logger=bool(loggers))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    checkpoint = trainer.checkpoint_callback
    best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
    result = {
        "val_ne": float(trainer.callback_metrics["val/ne"]) if "val/ne" in trainer.callback_metrics else float("nan"),
        "best_checkpoint": best,
        "last_checkpoint": getattr(checkpoint, "last_model_path", "") if checkpoint else "",
        "output_dir": str(output_dir),
        "global_step": trainer.global_step,
    }
    if cfg.get("validate_best") and best:
        trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        best_result = module.last_val_result
        result["best_val_ne"] = best_result.ne
        if trainer.is_global_zero:
            (output_dir / "val_ne_best.json").write_text(
                json.dumps({"checkpoint": best, **best_result.as_dict()}, indent=2)
            )
    if trainer.is_global_zero:
        log.info(
            "validation NE %.4f%% (best checkpoint: %s)", 100 * result.get("best_val_ne", result["val_ne"]), best or "-"
        )
        (output_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    return train(cfg)["val_ne"]


if __name__ == "__main__":
    main()
