"""LLaVA vision–language models (``LlavaForConditionalGeneration``): a CLIP vision tower, a
two-layer projector and a LLaMA-like language model.

The vision tower takes CLIP's rules (``nn.LayerNorm``, quick-GELU, attention and residuals
through the op table, the patch ``Conv2d`` by the ε-rule), the projector the ε-rule and the
identity through its activation, the language model the rules of its own family (RMSNorm with
constant std). The image features replace the image-token embeddings with
``masked_scatter`` (a layout op): relevance reaches the pixels through the projected patch
features, and the text tokens through their embeddings, in one backward pass; the placeholder
embeddings of the image tokens receive none.

Any language model and vision tower: their norm classes are found from the modules themselves
(:class:`~lrp_explicit.composites.detect.Detector`), so a norm class is never seen op by op.
"""
from __future__ import annotations

from .hf import register_family

register_family("llava", ["llava"])
