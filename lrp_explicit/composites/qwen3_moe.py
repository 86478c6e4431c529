"""Qwen3-MoE: Qwen3 attention (RMSNorm on queries and keys) with a sparse Mixture-of-Experts MLP.

The MoE block goes through the op rules as in :mod:`lrp_explicit.composites.mixtral` (router
ε-rule, softmax Gradient×Input or held constant, ``w / Σw`` with a constant denominator when
``norm_topk_prob``, ε-linear experts, uniform routing-weight product, ε-sum of the experts), with
the same experts implementations supported: ``"eager"``, ``"grouped_mm"`` (float32, bfloat16,
float16) and ``"batched_mm"``; not ``"deepgemm"`` or ``"sonicmoe"``. Dense MLP layers
(``mlp_only_layers``) are LLaMA-style MLPs.
"""
from __future__ import annotations

from .. import rules
from ..ops import name_transformers_ops
from .hf import check_experts_implementation, register_family


def module_rules() -> dict[type, type]:
    """The family's own module rules."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    name_transformers_ops()  # the modeling file imported transformers' MoE integration
    return {Qwen3MoeRMSNorm: rules.NormRule}



register_family("qwen3_moe", ["qwen3_moe"], module_rules, validate=check_experts_implementation)
