"""Module-level rules: wrap a module instance and route its forward through an LRP Function.

A rule is an ``nn.Module`` holding the original module as ``rule.module``; attributes it does
not have itself are looked up on the original, so model code that reads ``self.proj.weight``
or ``self.norm.eps`` keeps working while the rule is in place. Inside a rule the op dispatch is
suspended: the rule alone decides the relevance of the whole module.

=========================  ====================================================================
:class:`EpsilonRule`       ε-rule: ``nn.Linear``, transformers' ``Conv1D`` and, through a
                           vector-Jacobian product, any module linear in its input
:class:`UniformEpsilonRule`  uniform-ε: a module multilinear in several inputs (``A @ B``)
:class:`UniformRule`       relevance split equally among the inputs (element-wise products)
:class:`IdentityRule`      ``R_x = R`` (element-wise activations)
:class:`SoftmaxRule`       ``nn.Softmax`` as Gradient×Input
:class:`NormRule`          LayerNorm / RMSNorm (also ``(1 + w)`` forms) with σ held constant
:class:`StopRule`          output constant: no relevance into the module (CP-LRP)
:class:`PassRule`          plain autograd inside, dispatch suspended (dropout, layout modules)
:class:`MultiheadAttentionRule`  ``nn.MultiheadAttention`` (packed projections) explained by the
                           ε, uniform-ε and softmax rules, or CP-LRP inside the attention
=========================  ====================================================================
"""
from .attention import MultiheadAttentionRule, zennit_hooked
from .simple import (EpsilonRule, IdentityRule, NormRule, PassRule, Rule, SoftmaxRule, StopRule,
                     UniformEpsilonRule, UniformRule)

__all__ = ["Rule", "EpsilonRule", "UniformEpsilonRule", "UniformRule", "IdentityRule",
           "SoftmaxRule", "NormRule", "StopRule", "PassRule", "MultiheadAttentionRule",
           "zennit_hooked"]
