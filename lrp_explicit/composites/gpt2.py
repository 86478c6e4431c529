"""GPT-2: ``Conv1D`` projections (``addmm``) take the ε-rule, LayerNorm the constant-std rule,
``gelu_new`` the identity; learned position embeddings are a constant operand of the embedding
sum. Nothing here is specific to GPT-2 beyond its model type."""
from __future__ import annotations

from .hf import register_family

register_family("gpt2", ["gpt2"])
