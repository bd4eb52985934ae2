"""Cascaded Pyramid Network (Chen et al., "Cascaded Pyramid Network for Multi-Person Pose
Estimation", CVPR 2018) over any timm backbone.

GlobalNet: FPN-like top-down pyramid over C2..C5 with a heatmap predictor on every level (all of them
supervised). RefineNet: 0/1/2/3 bottlenecks on P2..P5, upsampling to the P2 grid, concatenation, a
bottleneck and a predictor. ``refine_upsample="bilinear"`` is the paper's; ``"deconv"`` is the
reference CPN system's transposed convolutions (kernel 2f, stride f), kept so the two can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fashionkp.models.backbone import Backbone, build_backbone


def conv_bn_relu(cin: int, cout: int, k: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, residual), with a projection when widths differ."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = max(cout // 2, 16)
        self.body = nn.Sequential(
            conv_bn_relu(cin, mid, 1), conv_bn_relu(mid, mid, 3), conv_bn_relu(mid, cout, 1, relu=False)
        )
        self.skip = nn.Identity() if cin == cout else conv_bn_relu(cin, cout, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


def upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # align_corners=False keeps pixel centres consistent with the heatmap coordinate convention.
    y = F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
    # The CPU backward of bilinear upsampling is about 10x slower on a gradient that is not channels_last, such as
    # the channel slices torch.cat's backward hands RefineNet's upsampled maps: 15% of the CPU recipe's training
    # step (benchmarks/bench_upsample_grad.py). A hook hands it the gradient in channels_last; not when traced.
    cpu_channels_last = y.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)
    if y.requires_grad and cpu_channels_last and not torch.jit.is_tracing():
        y.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))
    return y


class GlobalNet(nn.Module):
    def __init__(self, in_channels: list[int], width: int, num_keypoints: int) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(conv_bn_relu(c, width, 1, relu=False) for c in in_channels)
        self.top_down = nn.ModuleList(conv_bn_relu(width, width, 1, relu=False) for _ in in_channels[1:])
        self.predictors = nn.ModuleList(
            nn.Sequential(conv_bn_relu(width, width, 1), nn.Conv2d(width, num_keypoints, 3, padding=1))
            for _ in in_channels
        )

    def forward(
        self, feats: list[torch.Tensor], modulation: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns pyramid features P2..P5 and one heatmap per level, each at the P2 resolution. ``modulation``
        (N, levels, 2, width): a per-photo scale (1 + the first) and shift (the second) of each level's
        features before their ReLU (see :class:`GarmentTypeInput`)."""
        pyramid = [None] * len(feats)
        top = self.laterals[-1](feats[-1])
        pyramid[-1] = top
        for i in range(len(feats) - 2, -1, -1):
            top = self.laterals[i](feats[i]) + self.top_down[i](upsample_to(top, feats[i]))
            pyramid[i] = top
        if modulation is not None:
            m = modulation.to(pyramid[0].dtype)[..., None, None]
            pyramid = [p * (1 + m[:, i, 0]) + m[:, i, 1] for i, p in enumerate(pyramid)]
        pyramid = [F.relu(p) for p in pyramid]
        heatmaps = [upsample_to(pred(p), pyramid[0]) for pred, p in zip(self.predictors, pyramid, strict=True)]
        return pyramid, heatmaps


class RefineNet(nn.Module):
    def __init__(self, levels: int, width: int, num_keypoints: int, upsample: str = "bilinear") -> None:
        super().__init__()
        if upsample not in ("bilinear", "deconv"):
            raise ValueError(f"refine_upsample must be bilinear or deconv, not {upsample!r}")
        self.upsample = upsample
        self.branches = nn.ModuleList(
            nn.Sequential(*[Bottleneck(width, width) for _ in range(i)]) for i in range(levels)
        )
        if upsample == "deconv":
            factors = [2**i for i in range(levels)]
            self.deconvs = nn.ModuleList(
                nn.Identity() if f == 1 else nn.ConvTranspose2d(width, width, 2 * f, stride=f, padding=f // 2)
                for f in factors
            )
        self.fuse = Bottleneck(levels * width, width)
        self.predictor = nn.Conv2d(width, num_keypoints, 3, padding=1)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        ups = []
        for i, (branch, p) in enumerate(zip(self.branches, pyramid, strict=True)):
            x = branch(p)
            if self.upsample == "deconv":
                x = self.deconvs[i](x)
            ups.append(upsample_to(x, pyramid[0]) if x.shape[-2:] != pyramid[0].shape[-2:] else x)
        return self.predictor(self.fuse(torch.cat(ups, dim=1)))


@dataclass
class CPNOutput:
    #: One (N, K, H/s, W/s) heatmap per pyramid level (P2..P5), all at the finest level's stride s.
    global_heatmaps: list[torch.Tensor]
    #: (N, K, H/s, W/s) RefineNet heatmaps: the model's prediction.
    refine_heatmaps: torch.Tensor
    #: (N, T) garment-type logits of the type head (``CPN(num_types=T)``); None without one.
    type_logits: torch.Tensor | None = None


class TypeHead(nn.Module):
    """Garment type from the deepest features: global average pooling and one linear layer. The five
    FashionAI types look different as wholes, so the pooled C5 features suffice."""

    def __init__(self, channels: int, num_types: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(channels, num_types)

    def forward(self, deepest: torch.Tensor) -> torch.Tensor:
        return self.classifier(deepest.float().mean(dim=(2, 3)))


class GarmentTypeInput(nn.Module):
    """The photo's garment type as an input (FiLM, Perez et al., AAAI 2018): one learned scale and shift per
    type for every channel of every pyramid level. Told "blouse", the network looks for the blouse's cuffs and
    hem, not those of the coat worn over it. Zero at the start: the network begins as one without the input."""

    def __init__(self, num_types: int, levels: int, width: int) -> None:
        super().__init__()
        self.levels, self.width = levels, width
        self.table = nn.Embedding(num_types, levels * 2 * width)
        nn.init.zeros_(self.table.weight)

    def forward(self, types: torch.Tensor) -> torch.Tensor:
        """(N,) type indices -> (N, levels, 2, width) scales and shifts."""
        return self.table(types.long()).view(-1, self.levels, 2, self.width)


class CPN(nn.Module):
    def __init__(
        self,
        backbone: Backbone,
        num_keypoints: int,
        width: int = 256,
        refine_upsample: str = "bilinear",
        num_types: int = 0,
        num_input_types: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_keypoints = num_keypoints
        self.global_net = GlobalNet(backbone.channels, width, num_keypoints)
        self.refine_net = RefineNet(len(backbone.channels), width, num_keypoints, refine_upsample)
        self.type_head = TypeHead(backbone.channels[-1], num_types) if num_types else None
        self.type_input = GarmentTypeInput(num_input_types, len(backbone.channels), width) if num_input_types else None

    @property
    def stride(self) -> int:
        """Input pixels per heatmap pixel: the heatmaps live on the finest pyramid level's grid."""
        return self.backbone.reductions[0]

    def modulation(self, types: torch.Tensor | None) -> torch.Tensor | None:
        """The garment-type input's scales and shifts for (N,) type indices; None for a network without that
        input. The type head reads the backbone alone: whatever type is given, it tells the same."""
        if self.type_input is None:
            return None
        if types is None:
            raise ValueError("this network takes each photo's garment type (model.garment_type_input)")
        return self.type_input(types)

    def forward(self, images: torch.Tensor, types: torch.Tensor | None = None) -> CPNOutput:
        """``images``: (N, 3, H, W) RGB 0..255 floats, H and W multiples of 32; ``types``: (N,) garment-type
        indices, for a network with the garment-type input."""
        feats = self.backbone(images)
        pyramid, global_heatmaps = self.global_net(feats, self.modulation(types))
        type_logits = None if self.type_head is None else self.type_head(feats[-1])
        return CPNOutput(global_heatmaps, self.refine_net(pyramid), type_logits)


class HeatmapModel(nn.Module):
    """Plain view of a CPN for inference, tracing and ONNX export: ``images -> refine heatmaps``, or
    ``images -> (refine heatmaps, garment-type probabilities)`` when the CPN has a type head; ``(images,
    types)`` in when it has the garment-type input."""

    def __init__(self, cpn: CPN) -> None:
        super().__init__()
        self.cpn = cpn

    def forward(
        self, images: torch.Tensor, types: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.cpn.backbone(images)
        pyramid, _ = self.cpn.global_net(feats, self.cpn.modulation(types))
        heatmaps = self.cpn.refine_net(pyramid)
        if self.cpn.type_head is None:
            return heatmaps
        return heatmaps, self.cpn.type_head(feats[-1]).softmax(dim=1)


def build_cpn(
    backbone: dict,
    num_keypoints: int,
    width: int,
    refine_upsample: str,
    num_types: int = 0,
    num_input_types: int = 0,
) -> CPN:
    """A CPN from its config values (``backbone``: name, pretrained, weights); ``num_types`` > 0 adds a type head
    for that many garment types, ``num_input_types`` > 0 takes each photo's type, one of that many, as an input."""
    body = build_backbone(backbone["name"], backbone.get("pretrained", False), backbone.get("weights"))
    return CPN(body, num_keypoints, width, refine_upsample, num_types, num_input_types)
