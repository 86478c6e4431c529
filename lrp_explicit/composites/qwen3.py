"""Qwen3: as LLaMA, with RMSNorm also on the queries and keys of every head."""
from __future__ import annotations

from .. import rules
from .hf import register_family


def module_rules() -> dict[type, type]:
    """The family's own module rules."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return {Qwen3RMSNorm: rules.NormRule}


register_family("qwen3", ['qwen3'], module_rules)
