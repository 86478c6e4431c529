"""Gemma 2 and Gemma 3 text models.

Their RMSNorm scales by ``(1 + w)``: it is found to be a norm from the module itself (its output
is invariant to the scale of its input), and the norm rule runs the module's own forward, so any
scale form is exact; the embeddings are multiplied by a constant ``sqrt(hidden_size)`` (identity);
attention and final-logit soft-capping ``cap · tanh(x / cap)`` are a scaling, an element-wise
function and a scaling (identity each). Gemma 2 ships eager attention only.
"""
from __future__ import annotations

from .hf import register_family

register_family("gemma", ["gemma2", "gemma3_text"])
