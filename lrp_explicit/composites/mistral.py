"""Mistral: as LLaMA (RMSNorm with constant std, rotary attention, SiLU-gated MLP); the
sliding-window mask is an ordinary attention mask for the rules."""
from __future__ import annotations

from .hf import norm_rules, register_family

register_family("mistral", ["mistral"],
                norm_rules("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"))
