"""LLaMA 2/3: RMSNorm with constant std; attention, rotary embeddings, residuals and the
SiLU gate product go through the shared op table."""
from __future__ import annotations

from .. import rules
from .hf import register_family


def module_rules() -> dict[type, type]:
    """The family's own module rules."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return {LlamaRMSNorm: rules.NormRule}


register_family("llama", ['llama'], module_rules)
