"""Qwen2: as LLaMA, with biases on the q/k/v projections (they absorb their share)."""
from __future__ import annotations

from .hf import norm_rules, register_family

register_family("qwen2", ["qwen2"],
                norm_rules("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"))
