"""Mistral: as LLaMA (RMSNorm found from the module, rotary attention, SiLU-gated MLP); the
sliding-window mask is an ordinary attention mask for the rules."""
from __future__ import annotations

from .hf import register_family

register_family("mistral", ["mistral"])
