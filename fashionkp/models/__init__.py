"""Backbones and the Cascaded Pyramid Network."""

from fashionkp.models.backbone import Backbone, build_backbone
from fashionkp.models.cpn import CPN, CPNOutput

__all__ = ["CPN", "CPNOutput", "Backbone", "build_backbone"]
