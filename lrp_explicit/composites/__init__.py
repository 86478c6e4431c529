"""Composites and their registry.

``get(name, model)`` returns a fresh :class:`Composite` for ``model``'s family: families are
found by the Hugging Face ``config.model_type`` or by the module classes the model contains;
a plain PyTorch model takes the ``"generic"`` family, and a Hugging Face model of a type no family
claims the ``"auto"`` family: the automatic composite (:mod:`~lrp_explicit.composites.auto`),
whose rules are found from the model itself. ``register`` adds user-defined composites,
``available`` lists what is registered.

Layout: :mod:`~lrp_explicit.composites.base` holds :class:`Composite`,
:mod:`~lrp_explicit.composites.registry` the registry, :mod:`~lrp_explicit.composites.variants`
the AttnLRP / CP-LRP pair built from a module-rule table, and one small module per family
registers its composites when imported (all are imported here).
"""
from __future__ import annotations

from ..errors import CompositeError, UnknownModelError
from .base import Composite, carrier
from .registry import AUTO, GENERIC, available, family_of, get, normalise_name, register, unregister
from .wrappers import unwrap

# importing a family module registers its composites
from . import generic  # noqa: F401  (first: the fallback family)
from . import auto  # noqa: F401  (the automatic composite)
from . import bert, gemma, gpt2, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe  # noqa: F401
from . import torchvision_vit, vit  # noqa: F401
from . import clip, llava, t5  # noqa: F401
from . import ssm  # noqa: F401  (state-space and linear-attention families)
from .clip import vision_gamma

__all__ = ["Composite", "CompositeError", "get", "register", "unregister", "available",
           "family_of", "carrier", "UnknownModelError", "GENERIC", "AUTO", "normalise_name",
           "unwrap", "vision_gamma"]
