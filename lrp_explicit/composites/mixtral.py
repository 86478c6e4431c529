"""Mixtral: LLaMA-style attention and RMSNorm with a sparse Mixture-of-Experts MLP.

The MoE block needs no code of its own, only op rules: the router's ``F.linear`` takes the
ε-rule, its softmax Gradient×Input (AttnLRP) or is held constant (CP-LRP); ``topk`` selects; the
renormalisation ``w / Σw`` holds the denominator constant; each expert is ε-linear layers around
a SiLU gate product and is multiplied by its routing weight (uniform rule; CP-LRP gives all to
the expert output); the per-token sum of the experts is an ε-sum. The experts implementations
(``config._experts_implementation``) route as follows:

- ``"eager"``: a loop of ``F.linear`` on weight slices, summed with ``index_add_`` (ε-add rule);
- ``"grouped_mm"`` (the default): ``torch._grouped_mm`` (or transformers' fallback op), ε-rule
  through one vector-Jacobian product; the kernel takes float32, bfloat16 and float16 only, so a
  float64 model needs ``"eager"`` or ``"batched_mm"``;
- ``"batched_mm"``: ``torch.bmm`` with gathered weights (ε-rule), summed over the top-k (ε-sum).

``"deepgemm"`` and ``"sonicmoe"`` (CUDA kernels from the hub) compute the experts in foreign
kernels the rules cannot see: they are refused at registration, for every Hugging Face model
(:func:`~lrp_explicit.composites.hf.check_experts_implementation`). ``MixtralRMSNorm`` is found
to be a norm from the module itself; nothing here is specific to Mixtral beyond its model type.
"""
from __future__ import annotations

from .hf import register_family

register_family("mixtral", ["mixtral"])
