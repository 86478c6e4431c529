"""torchvision's ``VisionTransformer`` (``vit_b_16`` …): the generic module rules plus
:class:`~lrp_explicit.rules.MultiheadAttentionRule` for its ``nn.MultiheadAttention``.

The patch ``Conv2d`` takes the ε-rule, ``LayerNorm`` the constant-std rule, ``GELU`` the
identity; the class token and the position embedding are constants of the functional sums
(op table). Inside attention, AttnLRP uses the uniform-ε and softmax rules, CP-LRP holds the
weights constant. With ``zennit=``, the zennit composite takes the modules it hooks (typically
every ``nn.Linear`` and the patch ``Conv2d``); of ``nn.MultiheadAttention`` it gets ``out_proj``,
while the packed in-projection (a parameter, not a module) keeps the ε-rule.
"""
from __future__ import annotations

from typing import Any

from ..ops import CPLRP_OPS
from . import register
from .base import Composite
from .generic import module_rules

__all__ = ["attnlrp", "cp_lrp"]

FAMILY = "torchvision-vit"
VISION_TRANSFORMER = "torchvision.models.vision_transformer.VisionTransformer"


def attnlrp(**options: Any) -> Composite:
    """AttnLRP for torchvision's ``VisionTransformer``."""
    return Composite(module_rules(False), name=f"attnlrp ({FAMILY})", **options)


def cp_lrp(**options: Any) -> Composite:
    """CP-LRP for torchvision's ``VisionTransformer`` (attention weights held constant)."""
    return Composite(module_rules(True), ops=CPLRP_OPS, name=f"cp-lrp ({FAMILY})", **options)


register("attnlrp", attnlrp, family=FAMILY, model_classes=[VISION_TRANSFORMER])
register("cp-lrp", cp_lrp, family=FAMILY, model_classes=[VISION_TRANSFORMER])
