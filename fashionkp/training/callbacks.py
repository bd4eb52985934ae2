"""Callbacks and plugins: per-epoch NE reports, training curves, atomic checkpoint writing, batch norms
synchronized across processes without losing timm's fused activations."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.plugins import TorchSyncBatchNorm
from timm.layers import convert_sync_batchnorm
from torch import nn

from fashionkp.data.keypoints import CATEGORIES, KEYPOINT_NAMES
from fashionkp.errors import ConfigError
from fashionkp.training.schedules import end_cosines_at

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file, flush it to disk, then rename: an interrupted write
    never leaves a truncated ``last.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def validate_if_last_epoch(trainer: pl.Trainer) -> None:
    """Validate the current epoch if it is the run's last (``trainer.max_epochs``, after any time-budget cut),
    whatever ``trainer.check_val_every_n_epoch`` says: its weights are the run's to keep and report."""
    if trainer.current_epoch == trainer.max_epochs - 1:
        trainer.check_val_every_n_epoch = 1


class FitEpochsToTime(pl.Callback):
    """Fit the run to its time budget (``trainer.max_time``): after ``probe_steps`` timed steps, cut the number
    of epochs to what fits, end the LR schedule there and validate the last epoch. ``reserve`` (a share of
    ``max_time``) is kept back for the last epoch's validation and a busy minute. At each later epoch start the
    plan is made again from the steps of the last ``window`` epochs (their training time; validations are timed
    apart and counted for each one the interval still asks): it cuts the run if they ran slower, and in the
    run's first half, where moving the end of the cosine barely moves the learning rate, gives back epochs, up
    to those asked, if they ran faster (a busy minute on a shared machine must not cost the run a quarter of its
    epochs, nor a slow first minute leave the budget unspent). Without it a slower machine stops a run
    mid-schedule, its learning rate still high. Inactive without ``max_time``. The plan is saved in the
    checkpoints, so a resumed run keeps it; every process of a distributed run takes the first's decision."""

    def __init__(self, probe_steps: int, reserve: float, window: int) -> None:
        if window < 1:
            raise ConfigError("callbacks.time_budget.window", window, "must be at least one epoch")
        self.probe_steps, self.reserve, self.window = probe_steps, reserve, window
        #: the epochs of a run the budget shortened (None: as many as asked)
        self.epochs: int | None = None
        #: trainer.max_epochs as configured: a cut overwrites the trainer's figure
        self._asked_epochs: int | None = None
        self._first_step: tuple[int, float] | None = None
        #: the step probe has run: from then on the epoch starts check the budget
        self._probed = False
        #: (global step, clock, validation seconds so far) at each epoch start of this fit
        self._epoch_starts: list[tuple[int, float, float]] = []
        self._validating_since: float | None = None
        self._validation_seconds: list[float] = []

    @staticmethod
    def _timer(trainer: pl.Trainer) -> Timer | None:
        return next((c for c in trainer.callbacks if isinstance(c, Timer) and c._duration), None)

    @staticmethod
    def _steps_per_epoch(trainer: pl.Trainer) -> int:
        return math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)

    def _asked(self, trainer: pl.Trainer) -> int | float:
        asked = trainer.max_epochs if self._asked_epochs is None else self._asked_epochs
        # max_epochs=-1 (or None): as many as max_time allows
        return asked if asked and asked > 0 else math.inf

    def _left(self, timer: Timer) -> float:
        """Seconds of the budget left for training, the reserve kept back."""
        return timer.time_remaining("train") - self.reserve * timer._duration

    def _apply(self, trainer: pl.Trainer) -> None:
        trainer.fit_loop.max_epochs = self.epochs
        for config in trainer.lr_scheduler_configs:
            end_cosines_at(config.scheduler, self.epochs * self._steps_per_epoch(trainer))
        validate_if_last_epoch(trainer)  # a cut made mid-epoch may make this epoch the last

    def _epochs_that_fit(self, trainer: pl.Trainer, seconds: float, epoch_seconds: float) -> int:
        """The most epochs (the current one and the next ones, with the validations that the interval asks after
        them) that ``seconds`` hold."""
        validation = sum(self._validation_seconds) / len(self._validation_seconds) if self._validation_seconds else 0
        every = trainer.check_val_every_n_epoch or 1
        first = end = trainer.current_epoch
        while end < min(self._asked(trainer), first + 100_000):
            validations = (end + 1) // every - first // every  # epochs first .. end at the interval
            if (end + 1 - first) * epoch_seconds + validations * validation > seconds:
                break
            end += 1
        return end

    def _fit(self, trainer: pl.Trainer, fit: int) -> None:
        """Cut the run to ``fit`` epochs (the first process's figure) if fewer than planned, never below the
        current one."""
        fit = max(trainer.current_epoch + 1, fit)
        if fit < (self.epochs or self._asked(trainer)):
            self._plan(trainer, fit, "fit in trainer.max_time")

    def _give_back(self, trainer: pl.Trainer, fit: int) -> None:
        """Raise a cut to ``fit`` epochs (at most the epochs asked) while the run is in its first half, where
        stretching the cosine barely moves the learning rate."""
        if self.epochs is None or trainer.current_epoch > self.epochs // 2:
            return
        fit = min(fit, self._asked(trainer))
        if fit >= self.epochs + 2:  # not for one epoch, which the next check may take back
            self._plan(trainer, fit, "fit again, epochs running faster")

    def _plan(self, trainer: pl.Trainer, epochs: int, why: str) -> None:
        self.epochs = epochs
        log.info("time budget: %d epochs %s; the LR schedule ends with them", epochs, why)
        self._apply(trainer)

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._asked_epochs = trainer.max_epochs  # before a cut (a resumed run's included) overwrites it
        self._epoch_starts, self._validation_seconds = [], []
        if self.epochs is not None and self._timer(trainer) is not None:  # resumed: the cut made before
            self._apply(trainer)

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validating_since = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._validating_since is not None:
            self._validation_seconds.append(time.monotonic() - self._validating_since)
            self._validating_since = None

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        timer, now = self._timer(trainer), time.monotonic()
        if timer is None:
            return
        self._epoch_starts.append((trainer.global_step, now, sum(self._validation_seconds)))
        if len(self._epoch_starts) < 2:
            return
        # the training time of the last `window` epochs' steps (checkpoints included, validations not), by the
        # step: the first of them may be a resumed run's part of an epoch
        step, since, validated = self._epoch_starts[-1 - min(self.window, len(self._epoch_starts) - 1)]
        if trainer.global_step <= step:
            return
        per_step = (now - since - (sum(self._validation_seconds) - validated)) / (trainer.global_step - step)
        fit = self._epochs_that_fit(trainer, self._left(timer), per_step * self._steps_per_epoch(trainer))
        fit = int(trainer.strategy.broadcast(fit))
        self._fit(trainer, fit)
        self._give_back(trainer, fit)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        timer = self._timer(trainer)
        if timer is None or self.epochs is not None or self._probed:
            return
        # timed from the second step on: the first carries the loaders' start and the first-call allocations
        if self._first_step is None:
            self._first_step = (trainer.global_step, time.monotonic())
            return
        steps = trainer.global_step - self._first_step[0]
        if steps >= self.probe_steps:
            per_step = (time.monotonic() - self._first_step[1]) / steps
            log.info("time budget: %.2f s per step", per_step)
            self._probed = True
            fit = (trainer.global_step + self._left(timer) / per_step) // self._steps_per_epoch(trainer)
            self._fit(trainer, int(trainer.strategy.broadcast(int(fit))))

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epochs = state["epochs"]


class TimmSyncBatchNorm(TorchSyncBatchNorm):
    """``trainer.sync_batchnorm`` for timm backbones. Lightning's own conversion turns timm's ``BatchNormAct2d``
    (a batch norm followed by its activation) into a plain ``SyncBatchNorm``, so a distributed run would train
    and validate a network without the backbone's activations; timm's conversion keeps them. After the fit the
    original layers come back, holding the weights and statistics trained since."""

    def __init__(self) -> None:
        self._originals: dict[str, nn.Module] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        self._originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        for name, synced in list(model.named_modules()):
            original = self._originals.get(name)
            if original is None or not isinstance(synced, nn.SyncBatchNorm):
                continue
            # moving the model to its device (or another dtype) gave the synced layers new buffers
            for key, tensor in [*synced.named_parameters(recurse=False), *synced.named_buffers(recurse=False)]:
                setattr(original, key, tensor)
            original.train(synced.training)
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).add_module(child, original)
        self._originals = {}
        return model


class NEReport(pl.Callback):
    """After each validation during training: ``val_ne.csv`` (one row per epoch: overall and per category),
    ``val_ne_keypoints.csv`` (per keypoint) and ``val_ne_last.json`` (full breakdown) in ``out_dir``, NE in
    percent."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        #: False for validations after training (the best checkpoint's): they are not an epoch's row.
        self.record_epochs = True

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        result = getattr(module, "last_val_result", None)
        if trainer.sanity_checking or result is None or not trainer.is_global_zero or not self.record_epochs:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        breakdown = result.as_dict()  # percent
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "ne": breakdown["ne"]}
        per_category, per_keypoint = breakdown["per_category"], breakdown["per_keypoint"]
        _append(self.out_dir / "val_ne.csv", {**row, **{c: per_category.get(c, "") for c in CATEGORIES}})
        _append(self.out_dir / "val_ne_keypoints.csv", {**row, **{k: per_keypoint.get(k, "") for k in KEYPOINT_NAMES}})
        types = getattr(module, "last_val_types", None)
        extra = {"garment_types": types} if types else {}
        (self.out_dir / "val_ne_last.json").write_text(json.dumps({**breakdown, **row, **extra}, indent=2))
        if types:
            log_confusion(trainer, types)


def log_confusion(trainer: pl.Trainer, types: dict) -> None:
    """The type head's confusion matrix as a wandb table (rows: the true type), when wandb logs the run."""
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.WandbLogger):
            rows = [[t, *types["confusion"][t].values()] for t in CATEGORIES]
            logger.log_table("val/type_confusion", columns=["true type", *CATEGORIES], data=rows)


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


class TrainingCurves(pl.Callback):
    """Keeps the training loss per step and the NE per epoch, and draws ``curves.png`` at the end."""

    def __init__(self, out_dir: str, every_n_steps: int = 10) -> None:
        self.out_dir = Path(out_dir)
        self.every = every_n_steps
        self.steps: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0 and outputs is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.steps.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, module) -> None:
        result = getattr(module, "last_val_result", None)
        if not trainer.sanity_checking and result is not None:
            self.val.append((trainer.global_step, result.ne))

    def on_fit_end(self, trainer, module) -> None:
        if trainer.is_global_zero and self.steps:
            from fashionkp.draw import plot_curves

            plot_curves(self.steps, self.val, self.out_dir / "curves.png")

    def state_dict(self) -> dict:
        return {"steps": self.steps, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.val = [tuple(s) for s in state["steps"]], [tuple(v) for v in state["val"]]
