"""Qwen2: as LLaMA, with biases on the q/k/v projections (they absorb their share)."""
from __future__ import annotations

from .hf import register_family

register_family("qwen2", ["qwen2"])
