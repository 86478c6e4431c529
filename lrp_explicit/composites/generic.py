"""Generic AttnLRP and CP-LRP composites for models built from plain PyTorch blocks.

They bind ``nn.Linear`` (ε), ``nn.Conv1d/2d/3d`` (ε through a vector-Jacobian product),
``nn.LayerNorm``/``nn.RMSNorm`` (constant std), the element-wise activation modules (identity),
``nn.Softmax``, dropout and ``nn.MultiheadAttention`` (:class:`~lrp_explicit.rules.
MultiheadAttentionRule`, CP-LRP holding its weights constant), and leave attention, residuals,
gates and pooling written with functional calls to the shared op table. A hand-written
transformer block needs no extra code.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from .. import rules
from .registry import GENERIC
from .variants import register_variants, variant

__all__ = ["ACTIVATIONS", "module_rules", "attnlrp", "cp_lrp"]

#: Element-wise activation modules of ``torch.nn`` (identity rule).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.LogSigmoid,
)


def module_rules(cp_lrp: bool) -> dict[Any, Any]:
    """The generic module rules of AttnLRP (``cp_lrp=False``) or CP-LRP."""
    table: dict[Any, Any] = {
        nn.Linear: rules.EpsilonRule,
        nn.Conv1d: rules.EpsilonRule,
        nn.Conv2d: rules.EpsilonRule,
        nn.Conv3d: rules.EpsilonRule,
        nn.LayerNorm: rules.NormRule,
        nn.RMSNorm: rules.NormRule,
        nn.Softmax: rules.StopRule if cp_lrp else rules.SoftmaxRule,
        nn.Dropout: rules.PassRule,
        nn.Identity: rules.PassRule,
        nn.MultiheadAttention: partial(rules.MultiheadAttentionRule, hold_weights=cp_lrp),
    }
    table.update({act: rules.IdentityRule for act in ACTIVATIONS})
    return table


#: AttnLRP (Achtibat et al., ICML 2024) for plain PyTorch models.
attnlrp = variant(GENERIC, False, module_rules)
#: CP-LRP (Ali et al., 2022) for plain PyTorch models: attention weights and gates held constant.
cp_lrp = variant(GENERIC, True, module_rules)

register_variants(GENERIC, module_rules)
