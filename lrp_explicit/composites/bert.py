"""BERT and RoBERTa encoders (post-norm LayerNorm, GELU MLP, tanh pooler). Position and
token-type embeddings are constant operands of the embedding sum and absorb their share."""
from __future__ import annotations

from .hf import register_family

register_family("bert", ["bert", "roberta"])
