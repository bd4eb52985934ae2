"""Callbacks and plugins: per-epoch NE reports, training curves, atomic checkpoint writing."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from fashionkp.data.keypoints import CATEGORIES, KEYPOINT_NAMES


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
        (self.out_dir / "val_ne_last.json").write_text(json.dumps({**breakdown, **row}, indent=2))


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
