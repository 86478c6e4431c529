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

from .generic import module_rules
from .variants import register_variants, variant

__all__ = ["FAMILY", "VISION_TRANSFORMER", "attnlrp", "cp_lrp"]

#: The family name in the registry.
FAMILY = "torchvision-vit"
#: The model class that identifies the family (matched by name: torchvision is not imported).
VISION_TRANSFORMER = "torchvision.models.vision_transformer.VisionTransformer"

#: AttnLRP for torchvision's ``VisionTransformer``.
attnlrp = variant(FAMILY, False, module_rules)
#: CP-LRP for torchvision's ``VisionTransformer`` (attention weights held constant).
cp_lrp = variant(FAMILY, True, module_rules)

register_variants(FAMILY, module_rules, model_classes=[VISION_TRANSFORMER])
