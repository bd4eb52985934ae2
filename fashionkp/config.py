"""OmegaConf resolvers used by the Hydra configs under ``conf/``."""

from __future__ import annotations

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """``${fkp_div:a,b}`` = a / b (e.g. the heatmap sigma from the input resolution)."""
    if not OmegaConf.has_resolver("fkp_div"):
        OmegaConf.register_new_resolver("fkp_div", lambda a, b: float(a) / float(b))
