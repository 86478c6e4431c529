"""LLaMA 2/3: RMSNorm with constant std; attention, rotary embeddings, residuals and the
SiLU gate product go through the shared op table."""
from __future__ import annotations

from .hf import norm_rules, register_family

register_family("llama", ["llama"],
                norm_rules("transformers.models.llama.modeling_llama", "LlamaRMSNorm"))
