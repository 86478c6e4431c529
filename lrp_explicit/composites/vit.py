"""Hugging Face ViT: the patch embedding ``Conv2d`` takes the ε-rule (one vector-Jacobian
product), the class token and position embeddings are constants of the embedding sum.

With ``zennit=`` (e.g. ``LayerMapComposite([(nn.Conv2d, Gamma(0.25)), (nn.Linear,
Gamma(0.05))])``) the patch ``Conv2d`` and the q/k/v/o, MLP and classifier ``nn.Linear``
layers are left to zennit's rules; attention (eager or sdpa), LayerNorm, GELU and the
residuals keep ours, in the same backward pass (see :class:`~lrp_explicit.Composite`).
"""
from __future__ import annotations

from .hf import register_family

register_family("vit", ["vit"])
