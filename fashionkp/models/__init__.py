"""Stage 2, the networks: timm backbones and the Cascaded Pyramid Network."""

from fashionkp.models.backbone import Backbone, build_backbone, make_depthwise_train_in_fp32
from fashionkp.models.cpn import CPN, CPNOutput, HeatmapModel, build_cpn

__all__ = [
    "CPN",
    "CPNOutput",
    "Backbone",
    "HeatmapModel",
    "build_backbone",
    "build_cpn",
    "make_depthwise_train_in_fp32",
]
