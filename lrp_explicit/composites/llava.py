"""LLaVA vision–language models (``LlavaForConditionalGeneration``): a CLIP vision tower, a
two-layer projector and a LLaMA-like language model.

The vision tower takes CLIP's rules (``nn.LayerNorm``, quick-GELU, attention and residuals
through the op table, the patch ``Conv2d`` by the ε-rule), the projector the ε-rule and the
identity through its activation, the language model the rules of its own family (RMSNorm with
constant std). The image features replace the image-token embeddings with
``masked_scatter`` (a layout op): relevance reaches the pixels through the projected patch
features, and the text tokens through their embeddings, in one backward pass; the placeholder
embeddings of the image tokens receive none.

Language models: ``llama``, ``mistral`` and ``qwen2`` (their RMSNorm classes take the norm
rule); other language models and vision towers are refused at registration, since an unknown
norm class would be seen op by op and explained by the wrong rules.
"""
from __future__ import annotations

from torch import nn

from .. import rules
from .hf import register_family
from .wrappers import unwrap

#: Language models of a LLaVA model the family serves, with the modeling module and RMSNorm
#: class of each.
TEXT_MODELS = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
}
#: Vision towers of a LLaVA model the family serves.
VISION_MODELS = ("clip_vision_model",)


def module_rules() -> dict[type, object]:
    """The RMSNorm classes of the language models in :data:`TEXT_MODELS`."""
    import importlib

    return {getattr(importlib.import_module(module), name): rules.NormRule
            for module, name in TEXT_MODELS.values()}


def validate(model: nn.Module) -> None:
    """Refuse a LLaVA model whose language model or vision tower the family does not cover."""
    config = getattr(unwrap(model), "config", None)
    text = getattr(getattr(config, "text_config", None), "model_type", None)
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    if text is not None and text not in TEXT_MODELS:
        raise NotImplementedError(
            f"LLaVA with a {text!r} language model is not covered (its norm layers would get "
            f"the wrong rules); covered: {', '.join(TEXT_MODELS)}")
    if vision is not None and vision not in VISION_MODELS:
        raise NotImplementedError(
            f"LLaVA with a {vision!r} vision tower is not covered; covered: "
            f"{', '.join(VISION_MODELS)}")


register_family("llava", ["llava"], module_rules, validate=validate)
