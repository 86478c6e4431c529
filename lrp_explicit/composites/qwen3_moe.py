"""Qwen3-MoE: Qwen3 attention (RMSNorm on queries and keys) with a sparse Mixture-of-Experts MLP.

The MoE block goes through the op rules as in :mod:`lrp_explicit.composites.mixtral` (router
ε-rule, softmax Gradient×Input or held constant, ``w / Σw`` with a constant denominator when
``norm_topk_prob``, ε-linear experts, uniform routing-weight product, ε-sum of the experts), with
the same experts implementations supported: ``"eager"``, ``"grouped_mm"`` (float32, bfloat16,
float16) and ``"batched_mm"``; not ``"deepgemm"`` or ``"sonicmoe"``. Dense MLP layers
(``mlp_only_layers``) are LLaMA-style MLPs. Norms are found from the modules themselves.
"""
from __future__ import annotations

from .hf import register_family

register_family("qwen3_moe", ["qwen3_moe"])
