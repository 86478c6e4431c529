"""Mistral: as LLaMA (RMSNorm with constant std, rotary attention, SiLU-gated MLP); the
sliding-window mask is an ordinary attention mask for the rules."""
from __future__ import annotations

from .. import rules
from .hf import register_family


def module_rules() -> dict[type, type]:
    """The family's own module rules."""
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    return {MistralRMSNorm: rules.NormRule}


register_family("mistral", ['mistral'], module_rules)
