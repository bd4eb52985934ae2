"""The LightningModule: a CPN, its loss, optimiser and schedule, and validation by the official NE through
the deployed predictor (the ``val/ne`` that selects checkpoints is what ``evaluate.py`` gives)."""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torchmetrics.classification import MulticlassConfusionMatrix

from fashionkp.config import as_list
from fashionkp.data.fashionai import as_submitted
from fashionkp.data.keypoints import ALL, CATEGORIES, check_category
from fashionkp.errors import UserError
from fashionkp.evaluation.metric import NormalizedError, garment_type_report
from fashionkp.inference.checkpoint import CheckpointError, TrainedModel, build_model
from fashionkp.inference.predictor import KeypointPredictor, PhotoBatch, TorchHeatmapRunner
from fashionkp.models import CPNOutput, make_depthwise_train_in_fp32
from fashionkp.training.callbacks import validate_if_last_epoch

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged (NaN or infinite loss or weights)."""


def _as_override(value: Any) -> str:
    """A value as a Hydra command-line override writes it (``null``, ``true``)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class _ValidationRunner(TorchHeatmapRunner):
    """The predictor's runner over the network in training. It keeps the full output of its first pass at the
    training input size (the whole batch, not mirrored), so that the validation loss needs no forward pass of
    its own."""

    first_output: CPNOutput | None = None

    def network(self, x: torch.Tensor, types: torch.Tensor | None) -> CPNOutput:
        output = self.model(x, types)
        if self.first_output is None and x.shape[-1] == self.input_size:  # not another test scale's
            self.first_output = output
        return output


class CPNModule(pl.LightningModule):
    def __init__(
        self,
        clothes: str,
        backbone: dict,
        input_size: int,
        width: int,
        refine_upsample: str,
        codec: dict,
        loss: dict,
        optimizer: dict,
        backbone_lr_factor: float,
        decay_norms_and_biases: bool,
        ema_decay: float | None,
        scheduler: dict | None,
        scheduler_interval: str,
        flip_test: bool,
        channels_last: bool,
        train_depthwise_in_fp32: bool,
        frozen_backbone_stages: int,
        type_head: bool,
        garment_type_input: bool,
        two_pass: bool,
        crop_margin: float,
        crop_passes: int,
        test_scales: list[float],
    ) -> None:
        super().__init__()
        hparams = dict(
            clothes=check_category(clothes, allow_all=True), backbone=backbone, input_size=input_size, width=width,
            refine_upsample=refine_upsample, codec=codec, loss=loss, optimizer=optimizer,
            backbone_lr_factor=float(backbone_lr_factor), decay_norms_and_biases=decay_norms_and_biases,
            ema_decay=None if ema_decay is None else float(ema_decay),
            scheduler=scheduler, scheduler_interval=scheduler_interval, flip_test=flip_test,
            channels_last=channels_last, train_depthwise_in_fp32=train_depthwise_in_fp32,
            frozen_backbone_stages=frozen_backbone_stages,
            type_head=type_head, garment_type_input=garment_type_input, two_pass=two_pass, crop_margin=crop_margin,
            crop_passes=crop_passes, test_scales=[float(s) for s in as_list(test_scales)],
        )  # fmt: skip
        self.save_hyperparameters({k: _plain(v) for k, v in hparams.items()})
        self.model, self.codec = build_model(self.hparams)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if train_depthwise_in_fp32:
            make_depthwise_train_in_fp32(self.model)
        if self.model.backbone.freeze_stages(frozen_backbone_stages):
            log.info("backbone: the stem and the first %d stage(s) keep their weights", frozen_backbone_stages)
        self.loss = instantiate(self.hparams.loss)
        self.val_ne = NormalizedError()
        self.val_types = MulticlassConfusionMatrix(len(CATEGORIES)) if self.model.type_head is not None else None
        self.last_val_types: dict[str, Any] | None = None

    def forward(self, images: torch.Tensor, types: torch.Tensor | None = None) -> CPNOutput:
        """``types``: the photos' garment-type indices, which a network with the garment-type input needs."""
        images = images.float()
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images, types)

    def predictor(self) -> tuple[KeypointPredictor, _ValidationRunner]:
        """The deployed predictor over the network in training (flip test and test scales as configured, the codec's
        decoder)."""
        hp = self.hparams
        crop_margin = hp.crop_margin if hp.two_pass else None
        trained = TrainedModel(self.model, self.codec, hp.clothes, hp.input_size, None, "<training>",
                               crop_margin=crop_margin, scales=tuple(hp.test_scales),
                               crop_passes=hp.crop_passes)  # fmt: skip
        runner = _ValidationRunner(trained, channels_last=hp.channels_last)
        return KeypointPredictor([runner], flip_test=hp.flip_test), runner

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        output = self(batch["image"], batch["category"])
        losses = self.loss(output, batch["target"], batch["weight"], batch.get("target_global"), batch["category"])
        if not torch.isfinite(losses["loss"]):
            raise NonFiniteLossError(
                f"training loss is {losses['loss'].item()} at step {self.global_step} (epoch {self.current_epoch}): "
                f"the run stops here and keeps its last good checkpoint; try a lower model.optimizer.lr"
            )
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(batch["image"]))
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=len(batch["image"]))
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self._validation = self.predictor()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        categories = [CATEGORIES[int(c)] for c in batch["category"]]
        photos = PhotoBatch.from_inputs(batch["image"], batch["size"].tolist(), batch.get("photo"))
        predictor, runner = self._validation
        runner.first_output = None  # this batch's
        predictions = predictor.predict_letterboxed(photos, categories)
        self.val_ne.update(as_submitted(predictions.points[:, :, :2]), batch["keypoints"], categories)
        if self.val_types is not None:
            told = torch.from_numpy(predictions.type_probabilities.argmax(axis=1)).to(self.device)
            self.val_types.update(told, batch["category"])
        losses = self.loss(
            runner.first_output, batch["target"], batch["weight"], batch.get("target_global"), batch["category"]
        )
        self.log("val/loss", losses["loss"], batch_size=len(batch["image"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        # Summed over every process inside compute(): the breakdown is the whole split's under DDP too.
        result = NormalizedError.summarise(self.val_ne.compute())
        self.last_val_result = result
        #: the optimizer steps behind the weights scored (a checkpoint saved at this validation records the same)
        self.last_val_step = None if self.trainer.sanity_checking else self.trainer.global_step
        # In percent, like every NE fashionkp shows (progress bar, logs, tables, files).
        self.log("val/ne", 100 * result.ne, prog_bar=True, sync_dist=False)
        for category, value in result.per_category.items():
            self.log(f"val/ne_{category}", 100 * value)
        self.val_ne.reset()
        if self.val_types is not None:
            # rows: the true type, columns: the type told (CATEGORIES order), summed over every process
            self.last_val_types = garment_type_report(self.val_types.compute().cpu().numpy())
            self.log("val/type_accuracy", self.last_val_types["accuracy"])
            self.val_types.reset()

    def on_fit_start(self) -> None:
        frozen = len(self.model.backbone.frozen_modules)
        if frozen:
            # the frozen stages stay in eval mode on purpose (Backbone.train), which Lightning would warn about; only
            # that many modules, so that a run which fails before on_fit_end leaves other counts warned about
            self._warning_filter = (rf"Found {frozen} module\(s\) in eval mode", PossibleUserWarning)
            warnings.filterwarnings("ignore", *self._warning_filter)

    def on_train_start(self) -> None:
        validate_if_last_epoch(self.trainer)  # a run resumed inside its last epoch does not start that epoch again

    def on_train_epoch_start(self) -> None:
        # after the callbacks' hooks, so after a time budget's cut at this epoch start
        validate_if_last_epoch(self.trainer)

    def on_fit_end(self) -> None:
        added = getattr(self, "_warning_filter", None)
        if added is not None:
            warnings.filters[:] = [f for f in warnings.filters if (f[1] and f[1].pattern, f[2]) != added]
            self._warning_filter = None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        # the optimizer holds the parameters that train, in groups with their own learning rates, restored as
        # saved: a resumed run must freeze and group the same ones, and keep up the same average of the weights
        grouping = (("frozen_backbone_stages", 0), ("backbone_lr_factor", 1.0), ("decay_norms_and_biases", True),
                    ("ema_decay", None))  # fmt: skip
        for key, default in grouping:
            if saved.get(key, default) != self.hparams[key]:
                value = _as_override(saved.get(key, default))
                raise CheckpointError(f"the checkpoint was trained with model.{key}={value}: resume it with that value")
        trained_with_head = bool(saved.get("type_head"))
        if trained_with_head != (self.model.type_head is not None) and self.hparams.clothes == ALL:
            raise CheckpointError(
                f"the checkpoint was trained {'with' if trained_with_head else 'without'} a garment-type head: "
                f"resume it with model.type_head={_as_override(trained_with_head)}"
            )
        told = bool(saved.get("garment_type_input"))
        if told != (self.model.type_input is not None):
            raise CheckpointError(
                f"the checkpoint was trained {'with' if told else 'without'} the garment-type input: resume it with "
                f"model.garment_type_input={_as_override(told)}"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [name for name, p in self.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:  # never replace a good checkpoint with broken weights
            raise NonFiniteLossError(f"non-finite weights ({bad[0]}, ...) at step {self.global_step}: not saved")
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "mean_shape", None) is not None:
            checkpoint["mean_shape"] = datamodule.mean_shape.tolist()

    # -- optimisation -------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """The parameters that train, in optimizer groups: the backbone's at ``backbone_lr_factor`` times the
        learning rate, and the scales and shifts (batch norm's, the garment-type input's) and biases without weight
        decay unless ``decay_norms_and_biases``. Empty groups are left out."""
        hp = self.hparams
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                in_backbone = name.startswith("backbone.") and hp.backbone_lr_factor != 1
                undecayed = (p.ndim <= 1 or name.startswith("type_input.")) and not hp.decay_norms_and_biases
                groups.setdefault((in_backbone, undecayed), []).append(p)
        out = []
        for (in_backbone, undecayed), params in sorted(groups.items()):
            group: dict[str, Any] = {"params": params}
            if in_backbone:
                group["lr"] = hp.optimizer["lr"] * hp.backbone_lr_factor
            if undecayed:
                group["weight_decay"] = 0.0
            out.append(group)
        return out

    def configure_callbacks(self) -> list[pl.Callback]:
        """With ``ema_decay``: Lightning's moving average of the weights, swapped in for every validation and saved
        as the checkpoint's ``state_dict`` (the trained weights beside it, for resume), and the weights left in the
        module when the fit ends."""
        if self.hparams.ema_decay is None or self.trainer.state.fn != TrainerFn.FITTING:
            return []  # a validation of a checkpoint after the fit scores its state_dict: the average
        # fused (foreach) updates: 6 ms a step on the CPU recipe's model against 16 ms for EMAWeightAveraging's
        # one tensor at a time (benchmarks/bench_ema.py)
        return [WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(self.hparams.ema_decay))]

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameter_groups())
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
