"""Phi-3: RMSNorm with constant std; the fused gate/up projection is split by ``chunk``
(a layout op) before the SiLU gate product."""
from __future__ import annotations

from .. import rules
from .hf import register_family


def module_rules() -> dict[type, type]:
    """The family's own module rules."""
    from transformers.models.phi3.modeling_phi3 import Phi3RMSNorm

    return {Phi3RMSNorm: rules.NormRule}


register_family("phi3", ['phi3'], module_rules)
