"""T5 and Flan-T5 encoder–decoders (``T5ForConditionalGeneration``, ``T5Model``,
``T5EncoderModel`` …), and mT5 and UMT5 (T5's architecture; UMT5 with a position bias in every
layer).

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

Since transformers 5.15 T5 runs on sdpa by default, and since 5.25 the shared sdpa interface
passes the learned relative position bias as the additive ``attn_mask``. In a plain forward with
grad that mask requires grad (it comes from a trainable embedding), and PyTorch's CPU sdpa then
takes its math kernel instead of the flash kernel, which rounds differently (1e-15 in float64).
Registration freezes the parameters, so the same call would see a mask without grad and take
the flash kernel: the forward would no longer be the plain one bit for bit.
:class:`PositionBiasRule` gives the bias the flag it has in the plain forward (with grad, and
only then); the attention rules never pass relevance to the mask, so it stays a constant.
"""
from __future__ import annotations

from typing import Any

import torch

from ..rules import Rule
from .hf import register_family


class PositionBiasRule(Rule):
    """T5's relative-position-bias embedding: its output requires grad when grad is enabled,
    as it does in the plain forward (the sdpa kernel PyTorch picks depends on it); no
    relevance flows into it (the attention rules give the mask none)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module.forward(*args, **kwargs)
        if torch.is_grad_enabled() and out.grad_fn is None and not out.requires_grad:
            out.requires_grad_()
        return out


def module_rules() -> dict[Any, Any]:
    """The relative position bias of every T5 attention layer (:class:`PositionBiasRule`)."""
    return {"*.relative_attention_bias": PositionBiasRule}


register_family("t5", ["t5", "mt5", "umt5"], module_rules)
