"""CPN losses: weighted L2 on heatmaps, GlobalNet on every level, RefineNet with online hard keypoint mining."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fashionkp.models.cpn import CPNOutput


def per_keypoint_l2(pred: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """(N, K) mean over pixels of (1 + pos_weight * target) * (pred - target)^2."""
    sq = (pred.float() - target) ** 2
    if pos_weight:
        sq = sq * (1.0 + pos_weight * target)
    return sq.flatten(2).mean(2)


def masked_mean(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def ohkm(loss: torch.Tensor, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the top-M losses per sample among its labelled keypoints, M = ceil(ratio * labelled)."""
    if ratio >= 1.0:
        return masked_mean(loss, weight)
    labelled = weight > 0
    keep = torch.ceil(labelled.sum(1, keepdim=True).float() * ratio).clamp_min(1)
    ranked = torch.where(labelled, loss, torch.full_like(loss, -math.inf))
    order = ranked.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(loss.shape[1], device=loss.device).expand_as(order))
    selected = (rank < keep) & labelled
    return masked_mean(loss, selected.float())


@dataclass(frozen=True)
class CPNLoss:
    """The CPN training loss (``model.loss``): GlobalNet L2 on its levels plus RefineNet L2 with OHKM."""

    #: Extra weight on foreground pixels, (1 + pos_weight * target): without it the loss sits on the
    #: all-background solution for a long time (measured on CPU: -5.4 NE points on real photos, README).
    pos_weight: float
    #: Fraction of a sample's labelled keypoints kept by OHKM (M = ceil(ratio * K)); 1.0 = OHKM off.
    ohkm_ratio: float
    #: Supervise every GlobalNet level (the CPN paper) or only the finest (the reference CPN system).
    global_all_levels: bool
    global_weight: float
    #: Weight of the garment-type cross-entropy, for models with a type head.
    type_weight: float

    def __call__(
        self,
        output: CPNOutput,
        target: torch.Tensor,
        weight: torch.Tensor,
        target_global: torch.Tensor | None = None,
        categories: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``categories``: (N,) garment-type ids, the type head's targets."""
        target_global = target if target_global is None else target_global
        levels = output.global_heatmaps if self.global_all_levels else output.global_heatmaps[:1]
        global_loss = sum(masked_mean(per_keypoint_l2(h, target_global, self.pos_weight), weight) for h in levels)
        global_loss = global_loss / len(levels)
        refine_loss = ohkm(per_keypoint_l2(output.refine_heatmaps, target, self.pos_weight), weight, self.ohkm_ratio)
        losses = {"loss": self.global_weight * global_loss + refine_loss, "global": global_loss, "refine": refine_loss}
        if output.type_logits is not None and categories is not None:
            losses["type"] = F.cross_entropy(output.type_logits.float(), categories)
            losses["loss"] = losses["loss"] + self.type_weight * losses["type"]
        return losses
