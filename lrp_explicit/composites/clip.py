"""CLIP dual encoders (``CLIPModel``, ``CLIPTextModel``, ``CLIPVisionModel`` and their
``…WithProjection`` forms).

Both towers are pre-norm transformers of stock parts: ``nn.LayerNorm`` (constant std),
quick-GELU (identity), eager or sdpa attention and the residuals through the shared op table,
the patch ``Conv2d`` by the ε-rule. Position embeddings and the class embedding are constants
of the embedding sum. The similarity head of ``CLIPModel`` (``u/‖u‖ · v/‖v‖ · exp(s)``) runs
under the op table too: each norm is a denominator on the relevance path and is held constant
(the identity rule of a scaling), the product of the two normalised embeddings is the
uniform-ε matmul (half of the relevance to each tower), and ``exp(s)`` is a constant factor.
With CP-LRP and a bias-free model, the relevance of the pixels and of the text tokens sums to
the explained logit.

:func:`vision_gamma` gives zennit's γ rule to the vision tower's ``Conv2d`` and ``Linear``
layers (as for ViT, see :class:`~lrp_explicit.Composite`'s ``zennit=``) and leaves the text
tower to our ε-rule.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .hf import register_family

__all__ = ["VISION_TOWERS", "vision_gamma"]

#: Module-name prefixes of the vision side of the multimodal families: CLIP's tower and
#: projection, LLaVA's tower and projector.
VISION_TOWERS = ("vision_model", "visual_projection", "vision_tower", "multi_modal_projector")


def vision_gamma(conv_gamma: float = 0.25, linear_gamma: float = 0.05,
                 towers: Sequence[str] = VISION_TOWERS) -> Any:
    """A zennit composite with ``Gamma(conv_gamma)`` on the ``nn.Conv2d`` and
    ``Gamma(linear_gamma)`` on the ``nn.Linear`` layers inside the modules named ``towers``
    (qualified-name components, matched anywhere in a module's name, so wrappers are looked
    through), and no rule elsewhere.

    Pass it as ``zennit=`` to a composite (``composites.get("attnlrp", clip, zennit=
    vision_gamma())``): the vision tower's linear layers and patch embedding take γ, everything
    else (attention, norms, activations, the text tower, the similarity head) keeps our rules,
    in one backward pass.
    """
    from zennit.core import Composite as ZennitComposite
    from zennit.rules import Gamma

    conv, linear = Gamma(conv_gamma), Gamma(linear_gamma)
    marks = tuple(f".{t}." for t in towers)

    def module_map(ctx: dict, name: str, module: nn.Module) -> Any:
        if not any(mark in f".{name}." for mark in marks):
            return None
        if isinstance(module, nn.Conv2d):
            return conv
        if isinstance(module, nn.Linear):
            return linear
        return None

    return ZennitComposite(module_map=module_map)


register_family("clip", ["clip", "clip_text_model", "clip_vision_model"])
