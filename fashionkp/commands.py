"""The Hydra entry points: ``train.py`` / ``fashionkp-train``, ``predict.py`` / ``fashionkp-predict`` and
``evaluate.py`` / ``fashionkp-evaluate``. Each is a thin shell over its stage's function (``train(cfg)``,
``predict(cfg)``, ``evaluate(cfg)``), which tests and ``make demo`` call directly."""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fashionkp.config import CONFIG_DIR, register_resolvers
from fashionkp.errors import report_user_errors

log = logging.getLogger(__name__)
register_resolvers()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_user_errors("fashionkp-train")
def train_main(cfg: DictConfig) -> float:
    """The run's validation NE in percent (what a Hydra sweeper minimises)."""
    # Each command imports only its own stage: predicting needs no Lightning training code loaded.
    from fashionkp.training.module import NonFiniteLossError
    from fashionkp.training.train import train

    try:
        result = train(cfg)
    except NonFiniteLossError as e:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # One diverging job of a sweep (an Optuna trial with too high a learning rate) is its worst result,
        # not the end of the sweep.
        log.error("fashionkp-train: %s", e)
        return float("inf")
    return result.get("best_val_ne", result["val_ne"])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@report_user_errors("fashionkp-predict")
def predict_main(cfg: DictConfig) -> None:
    from fashionkp.inference.predict import predict

    predict(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
@report_user_errors("fashionkp-evaluate")
def evaluate_main(cfg: DictConfig) -> float:
    """The NE in percent (what a Hydra sweeper minimises)."""
    from fashionkp.evaluation.evaluate import evaluate

    return 100 * evaluate(cfg).ne
