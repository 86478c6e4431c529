"""Hugging Face ViT: the patch embedding ``Conv2d`` takes the ε-rule (one vector-Jacobian
product), the class token and position embeddings are constants of the embedding sum."""
from __future__ import annotations

from .hf import register_family

register_family("vit", ["vit"])
