"""Qwen3: as LLaMA, with RMSNorm also on the queries and keys of every head."""
from __future__ import annotations

from .hf import norm_rules, register_family

register_family("qwen3", ["qwen3"],
                norm_rules("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"))
