"""Qwen3: as LLaMA, with RMSNorm also on the queries and keys of every head (found from the
module, as every norm is)."""
from __future__ import annotations

from .hf import register_family

register_family("qwen3", ["qwen3"])
