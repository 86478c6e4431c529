"""Qwen2: as LLaMA, with biases on the q/k/v projections (they absorb their share)."""
from __future__ import annotations

from .. import rules
from .hf import register_family


def module_rules() -> dict[type, type]:
    """The family's own module rules."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return {Qwen2RMSNorm: rules.NormRule}


register_family("qwen2", ['qwen2'], module_rules)
