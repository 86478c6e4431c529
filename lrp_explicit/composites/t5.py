"""T5 and Flan-T5 encoder–decoders (``T5ForConditionalGeneration``, ``T5Model``,
``T5EncoderModel`` …).

``T5LayerNorm`` scales without centring (an RMSNorm under a LayerNorm name): the automatic
detection finds its output invariant to a scaling but not to a shift of its input, so it takes
the constant-std rule of an RMSNorm (``kind="rms"``, the identity), not the LayerNorm rule its
name would suggest. The gated-GELU MLP (Flan-T5) or the ReLU MLP (T5) is an activation (identity)
and, for the gated form, a gate product (uniform; CP-LRP holds the gate constant). Self- and
cross-attention (eager: ``q kᵀ``, softmax, ``A v``; sdpa: the fused rule) go through the shared
op table, with the queries of the decoder and the keys and values of the encoder on the
relevance path in cross-attention, so relevance reaches both the encoder's input tokens and
the earlier decoder tokens. The relative position bias is computed from positions by an
embedding whose weights are frozen at registration: a constant summand of the scores (eager
``scores + bias``, sdpa its additive mask) that absorbs its share under the ε-add rule; no
relevance flows into it.
"""
from __future__ import annotations

from .hf import register_family

register_family("t5", ["t5"])
