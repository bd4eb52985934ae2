"""Stage 2, the networks: timm backbones and the Cascaded Pyramid Network."""

from fashionkp.models.backbone import Backbone, build_backbone
from fashionkp.models.cpn import CPN, CPNOutput, HeatmapModel, build_cpn

__all__ = ["CPN", "CPNOutput", "Backbone", "HeatmapModel", "build_backbone", "build_cpn"]
