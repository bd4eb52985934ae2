"""Where the Hydra configs live and the OmegaConf resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

#: The configs ship inside the package, so an installed wheel finds them from any folder.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def register_resolvers() -> None:
    """``${fkp_div:a,b}`` = a / b (e.g. the heatmap sigma from the input resolution)."""
    if not OmegaConf.has_resolver("fkp_div"):
        OmegaConf.register_new_resolver("fkp_div", lambda a, b: float(a) / float(b))
