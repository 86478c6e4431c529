"""LLaMA 2/3: attention, rotary embeddings, residuals and the SiLU gate product go through the
shared op table; ``LlamaRMSNorm`` is found to be a norm (constant std) from the module itself.
Nothing here is specific to LLaMA beyond its model type."""
from __future__ import annotations

from .hf import register_family

register_family("llama", ["llama"])
