"""Gemma 2 and Gemma 3 text models.

Their RMSNorm scales by ``(1 + w)`` (the norm rule runs the module's own forward, so any scale
form is exact); the embeddings are multiplied by a constant ``sqrt(hidden_size)`` (identity);
attention and final-logit soft-capping ``cap · tanh(x / cap)`` are a scaling, an element-wise
function and a scaling (identity each). Gemma 2 ships eager attention only.
"""
from __future__ import annotations

from .. import rules
from .hf import register_family


def module_rules() -> dict[type, type]:
    """The family's own module rules."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    return {Gemma2RMSNorm: rules.NormRule, Gemma3RMSNorm: rules.NormRule}


register_family("gemma", ["gemma2", "gemma3_text"], module_rules)
