"""Phi-3: RMSNorm (found from the module) with constant std; the fused gate/up projection is
split by ``chunk`` (a layout op) before the SiLU gate product."""
from __future__ import annotations

from .hf import register_family

register_family("phi3", ["phi3"])
