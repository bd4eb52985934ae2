"""Where the Hydra configs live, the OmegaConf resolvers they use, and reading one-or-many values."""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

#: The configs ship inside the package, so an installed wheel finds them from any folder.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


#: Longest sweep job folder name made from overrides: file systems refuse names over 255 bytes.
MAX_DIRNAME = 150


def is_number(value: object) -> bool:
    """An int or a float as a config value gives it: booleans are not numbers here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def short_dirname(name: str) -> str:
    """``name`` cut to :data:`MAX_DIRNAME` characters, with a hash of the whole so that cut names stay apart."""
    if len(name) <= MAX_DIRNAME:
        return name
    return f"{name[: MAX_DIRNAME - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    """``${fkp_div:a,b}`` = a / b (e.g. the heatmap sigma from the input resolution); ``${fkp_short:name}``
    a folder name kept short (:func:`short_dirname`); ``${fkp_val_photos:two_pass,test_scales}``: see
    :func:`validation_needs_photos`."""
    if not OmegaConf.has_resolver("fkp_div"):
        OmegaConf.register_new_resolver("fkp_div", lambda a, b: float(a) / float(b))
    if not OmegaConf.has_resolver("fkp_short"):
        OmegaConf.register_new_resolver("fkp_short", lambda name: short_dirname(str(name)))
    if not OmegaConf.has_resolver("fkp_val_photos"):
        OmegaConf.register_new_resolver("fkp_val_photos", validation_needs_photos)


def validation_needs_photos(two_pass: bool, test_scales) -> bool:
    """Whether validation needs the photos themselves: a crop pass, or test scales other than the input size,
    warp their inputs from them."""
    return bool(two_pass) or any(float(s) != 1.0 for s in as_list(test_scales))


def as_list(value) -> list:
    """A config value that may be one item or a list (``checkpoints=a.ckpt`` or ``checkpoints=[a.ckpt]``)."""
    if value is None:
        return []
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, Path, int, float)):
        return [value]
    return list(value)
