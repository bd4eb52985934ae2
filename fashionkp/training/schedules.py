"""Learning-rate schedules that take the run's total number of steps."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """The LR factor at ``step``: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.01) -> LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to ``min_ratio`` of it at ``total_steps``. (A partial
    keeps its arguments out of LambdaLR's checkpoint state: a resumed run takes its horizon from its config,
    or from the time budget that shortened it, ``FitEpochsToTime``.)"""
    factor = partial(warmup_cosine_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)
    return LambdaLR(optimizer, factor)


def end_cosines_at(scheduler: object, total_steps: int) -> bool:
    """Make the warm-up cosine factors of a LambdaLR end at ``total_steps``; False if it has none."""
    factors = getattr(scheduler, "lr_lambdas", [])
    found = False
    for i, factor in enumerate(factors):
        if isinstance(factor, partial) and factor.func is warmup_cosine_factor:
            factors[i] = partial(warmup_cosine_factor, **{**factor.keywords, "total_steps": total_steps})
            found = True
    return found
