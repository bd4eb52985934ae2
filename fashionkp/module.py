"""The LightningModule: a CPN, its losses, optimiser and schedule, and validation by the official NE."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fashionkp.errors import UserError
from fashionkp.heatmaps import decode, flip_back, to_image_points
from fashionkp.keypoints import CATEGORIES, NUM_KEYPOINTS, channels_for, check_category, flip_permutation
from fashionkp.losses import LossConfig, cpn_loss
from fashionkp.metric import NormalizedError
from fashionkp.models import CPN, CPNOutput, build_backbone


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged (NaN or infinite loss or weights)."""


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class CPNModule(pl.LightningModule):
    def __init__(
        self,
        clothes: str,
        backbone: dict,
        input_size: int = 256,
        width: int = 256,
        refine_upsample: str = "bilinear",
        loss: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        scheduler_interval: str = "step",
        decoder: str = "dark",
        decode_sigma: float = 2.0,
        flip_test: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        backbone, loss, optimizer, scheduler = map(_plain, (backbone, loss, optimizer, scheduler))
        self.save_hyperparameters(
            dict(
                clothes=check_category(clothes, allow_all=True),
                backbone=backbone,
                input_size=input_size,
                width=width,
                refine_upsample=refine_upsample,
                loss=loss or {},
                optimizer=optimizer,
                scheduler=scheduler,
                scheduler_interval=scheduler_interval,
                decoder=decoder,
                decode_sigma=decode_sigma,
                flip_test=flip_test,
                channels_last=channels_last,
            )  # fmt: skip
        )
        self.channels = list(channels_for(clothes))
        self.model = CPN(
            build_backbone(backbone["name"], backbone.get("pretrained", False), backbone.get("weights")),
            num_keypoints=len(self.channels), width=width, refine_upsample=refine_upsample,
        )  # fmt: skip
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_cfg = LossConfig(**(loss or {}))
        self.val_ne = NormalizedError()

    # -- forward / heatmaps -------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def forward(self, images: torch.Tensor):
        return self.model(self._prepare(images))

    def predict_heatmaps(
        self, images: torch.Tensor, flip_test: bool | None = None, output: CPNOutput | None = None
    ) -> torch.Tensor:
        """RefineNet heatmaps, averaged with the un-flipped heatmaps of the mirrored input when asked.

        ``output``: the model's output on ``images`` when the caller already has it.
        """
        flip_test = self.hparams.flip_test if flip_test is None else flip_test
        images = self._prepare(images)
        # fp32 from here on: under bf16 autocast the flip average would otherwise round in bf16 too
        heatmaps = (output or self.model(images)).refine_heatmaps.float()
        if flip_test:
            mirrored = self.model(images.flip(-1)).refine_heatmaps.float()
            heatmaps = 0.5 * (heatmaps + flip_back(mirrored, flip_permutation(self.hparams.clothes)))
        return heatmaps

    def image_points(self, heatmaps: torch.Tensor, matrices: torch.Tensor) -> np.ndarray:
        """(N, 24, 2) original-pixel points (NaN on channels the model does not predict)."""
        # Decoding is sub-pixel arithmetic (DARK's log and Taylor step): always fp32, even under bf16 autocast.
        with torch.autocast(heatmaps.device.type, enabled=False):
            coords, _ = decode(heatmaps.float(), self.hparams.decoder, self.hparams.decode_sigma)
        points = to_image_points(coords, matrices.cpu().numpy(), self.model.stride)
        full = np.full((len(points), NUM_KEYPOINTS, 2), np.nan)
        full[:, self.channels] = points
        return full

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = cpn_loss(
            self(batch["image"]), batch["target"], batch["weight"], self.loss_cfg, batch.get("target_global")
        )
        if not torch.isfinite(losses["loss"]):
            raise NonFiniteLossError(
                f"training loss is {losses['loss'].item()} at step {self.global_step} (epoch {self.current_epoch}): "
                f"the run stops here and keeps its last good checkpoint; try a lower model.optimizer.lr"
            )
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(batch["image"]))
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=len(batch["image"]))
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        output = self(batch["image"])
        losses = cpn_loss(output, batch["target"], batch["weight"], self.loss_cfg, batch.get("target_global"))
        heatmaps = self.predict_heatmaps(batch["image"], output=output)
        self.log("val/loss", losses["loss"], batch_size=len(batch["image"]), sync_dist=True)
        categories = [CATEGORIES[int(c)] for c in batch["category"]]
        self.val_ne.update(self.image_points(heatmaps, batch["matrix"]), batch["keypoints"], categories)

    def on_validation_epoch_end(self) -> None:
        # Summed over every process inside compute(): the breakdown is the whole split's under DDP too.
        result = NormalizedError.summarise(self.val_ne.compute())
        self.last_val_result = result
        # In percent, like every NE fashionkp shows (progress bar, logs, tables, files).
        self.log("val/ne", 100 * result.ne, prog_bar=True, sync_dist=False)
        for category, value in result.per_category.items():
            self.log(f"val/ne_{category}", 100 * value)
        self.val_ne.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [name for name, p in self.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:  # never replace a good checkpoint with broken weights
            raise NonFiniteLossError(f"non-finite weights ({bad[0]}, ...) at step {self.global_step}: not saved")
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "mean_shape", None) is not None:
            checkpoint["mean_shape"] = datamodule.mean_shape.tolist()

    # -- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt_cfg = self.hparams.optimizer or {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
        optimizer = instantiate(opt_cfg)(params=[p for p in self.parameters() if p.requires_grad])
        if not self.hparams.scheduler:
            return optimizer
        make = instantiate(self.hparams.scheduler)
        kwargs = {}
        if "total_steps" in inspect.signature(make.func).parameters:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
            # Counting the steps made Lightning build and start the training loader before a resumed run's
            # checkpoint is restored: drop it, so that the loader is made again with its saved position (the
            # epoch and the batches already done; see ResumableLoader) rather than at epoch 0's start.
            self.trainer.fit_loop._combined_loader = None
        scheduler = make(optimizer, **kwargs)
        config = {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config.update(monitor="val/ne", interval="epoch")
        return {"optimizer": optimizer, "lr_scheduler": config}
