"""Phi-3: RMSNorm with constant std; the fused gate/up projection is split by ``chunk``
(a layout op) before the SiLU gate product."""
from __future__ import annotations

from .hf import norm_rules, register_family

register_family("phi3", ["phi3"],
                norm_rules("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm"))
