"""An independent modified Gradient×Input reference for stock models (appendix D of Arras et al.).

The forward of the model is modified with ``.detach()`` tricks so that a plain gradient, times
the input, gives the LRP relevance of each variant; only non-linear parts need a trick:

- a product of two relevance-path tensors ``z = a·b`` (element-wise or matrix): AttnLRP uses
  ``½ z + ½ [z]`` (half of the gradient to each factor); CP-LRP detaches the gate (the output of
  an activation) or the attention weights;
- an element-wise non-linearity ``g`` (activations, RMSNorm with its std held constant):
  ``x ⊙ [g(x) / x]``;
- LayerNorm: ``(x − μ) / [σ] ⊙ w + b``;
- softmax: unchanged for AttnLRP (its rule *is* Gradient×Input), detached for CP-LRP;
- a division by a relevance-path tensor: the denominator detached;
- everything linear (linear layers, sums, means, residuals, scalings, layout): unchanged.

Encoder–decoders, dual encoders and vision–language models need nothing else, which is the
point of checking them here: cross-attention is the product trick on ``q kᵀ`` with the decoder's
queries and the encoder's keys (both on the path); T5's relative position bias is a summand of
the scores computed from frozen parameters, so it is a constant (it gets no gradient and its
share of ``x ⊙ ∂y/∂x`` is simply not counted); CLIP's similarity head ``u/‖u‖ · v/‖v‖`` is a
division by a path tensor (the norm detached) and a product of two path tensors (halved under
both variants: the normalised embeddings are no gates); LLaVA's ``masked_scatter`` of the image
features into the text embeddings is layout. :func:`reference_relevances` explains several
inputs at once (pixels and text, encoder and decoder embeddings).

Nothing here uses ``lrp_explicit``: it is a second implementation to check the first against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

T = torch.Tensor
GATE = "_gxi_gate"

PRODUCTS = {torch.mul, T.mul, T.__mul__, T.__rmul__, torch.matmul, T.matmul, T.__matmul__,
            torch.bmm, T.bmm}
DIVISIONS = {torch.div, T.div, T.__truediv__, T.div_, T.__itruediv__, T.__idiv__}
ELEMENTWISE = {F.gelu, F.silu, F.relu, torch.relu, T.relu, torch.tanh, T.tanh, F.tanh,
               torch.sigmoid, T.sigmoid, F.sigmoid, torch.exp, T.exp, torch.pow, T.pow, T.__pow__,
               torch.rsqrt, T.rsqrt, torch.sqrt, T.sqrt, torch.erf, T.erf, F.softplus}
SOFTMAX = {torch.softmax, T.softmax, F.softmax}


def grad_path(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def ratio_trick(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x ⊙ [y / x]``: forward ``y``, gradient ``[y / x]`` (0 where ``x`` is 0)."""
    ratio = torch.where(x == 0, torch.zeros_like(y), y / x)
    return (x * ratio.detach()).to(y.dtype)


def half_trick(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z + 0.5 * z.detach()


class _Mode(TorchFunctionMode):
    def __init__(self, attnlrp: bool):
        super().__init__()
        self.attnlrp = attnlrp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        paths = [a for a in args if grad_path(a)]
        if func in PRODUCTS and len(args) >= 2 and grad_path(args[0]) and grad_path(args[1]):
            a, b = args[0], args[1]
            if self.attnlrp:
                return half_trick(func(*args, **kwargs))
            gate_a, gate_b = getattr(a, GATE, False), getattr(b, GATE, False)
            if gate_a != gate_b:
                a, b = (a.detach(), b) if gate_a else (a, b.detach())
                return func(a, b, *args[2:], **kwargs)
            return half_trick(func(*args, **kwargs))
        if func in DIVISIONS and len(args) >= 2 and grad_path(args[0]) and grad_path(args[1]):
            return func(args[0], args[1].detach(), *args[2:], **kwargs)
        if func in ELEMENTWISE and len(paths) == 1 and grad_path(args[0]):
            x = args[0]
            out = ratio_trick(x, func(x.detach(), *args[1:], **kwargs))
            setattr(out, GATE, True)
            return out
        if func in SOFTMAX:
            out = func(*args, **kwargs)
            return out if self.attnlrp else out.detach()
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self.multi_head_attention(*args, **kwargs)
        if func is F.layer_norm and grad_path(args[0]):
            return layer_norm(args[0], *args[1:], **kwargs)
        return func(*args, **kwargs)

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        groups = q.shape[-3] // k.shape[-3]
        if groups > 1:
            k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
        # (the mode is off inside its own handler: the tricks are spelled out here)
        scores = q @ k.transpose(-1, -2)
        if self.attnlrp and grad_path(q) and grad_path(k):
            scores = half_trick(scores)
        scores = scores * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        length, source = q.shape[-2], k.shape[-2]
        if is_causal:
            keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        weights = torch.softmax(scores, -1).nan_to_num(0.0)
        if not self.attnlrp:
            return weights.detach() @ v
        out = weights @ v
        return half_trick(out) if grad_path(weights) and grad_path(v) else out


    def multi_head_attention(self, query, key, value, embed_dim, num_heads, in_proj_weight,
                             in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p,
                             out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
                             need_weights=True, attn_mask=None, average_attn_weights=True,
                             is_causal=False, **kwargs):
        """Attention of ``nn.MultiheadAttention`` (sequence first), packed projections, over
        one key/value tensor (self-attention, or a query such as SigLIP's learned probe):
        linear maps unchanged, the attention with the tricks above. Masks (``True`` or −inf:
        not attended) are added to the scores as one additive mask; the ``is_causal`` hint
        needs the causal ``attn_mask`` anyway, so it adds nothing."""
        assert key is value and bias_k is None and not add_zero_attn
        batched = query.dim() == 3
        x = query if batched else query.unsqueeze(1)
        kv = key if batched else key.unsqueeze(1)
        length, batch, _ = x.shape
        source = kv.shape[0]
        head = embed_dim // num_heads

        def split(t):
            return t.reshape(t.shape[0], batch, num_heads, head).permute(1, 2, 0, 3)

        def additive(mask):
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask, float("-inf"))
            return mask.to(x.dtype)

        bias = torch.zeros(batch, num_heads, length, source, dtype=x.dtype)
        if attn_mask is not None:
            m = additive(attn_mask)
            bias = bias + (m if m.dim() == 2 else m.view(batch, num_heads, length, source))
        if key_padding_mask is not None:
            m = additive(key_padding_mask if batched else key_padding_mask.unsqueeze(0))
            bias = bias + m[:, None, None, :]
        masked = attn_mask is not None or key_padding_mask is not None
        if query is key:
            q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, -1)
        else:
            b_q, b_kv = (None, None) if in_proj_bias is None else \
                in_proj_bias.split([embed_dim, 2 * embed_dim])
            w_q, w_kv = in_proj_weight.split([embed_dim, 2 * embed_dim])
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(kv, w_kv, b_kv).chunk(2, -1)
        out = self.attention(split(q), split(k), split(v), attn_mask=bias if masked else None)
        out = F.linear(out.permute(2, 0, 1, 3).reshape(length, batch, embed_dim),
                       out_proj_weight, out_proj_bias)
        return (out if batched else out.squeeze(1)), None


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mu = x.mean(dims, keepdim=True)
    sigma = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps).detach()
    out = (x - mu) / sigma
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


#: Norms that scale without centring under another name (an RMSNorm with its std constant).
RMS_NORMS = ("T5LayerNorm",)


def _is_activation(module: nn.Module) -> bool:
    from transformers import activations

    return (type(module).__module__ == activations.__name__
            or isinstance(module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid)))


def _patched_ratio(module: nn.Module, gate: bool):
    original = module.forward

    def forward(x, *args, **kwargs):
        with torch.no_grad():
            y = original(x, *args, **kwargs)
        if not grad_path(x):
            return y
        out = ratio_trick(x, y)
        if gate:
            setattr(out, GATE, True)
        return out

    return forward


class ModifiedGradientTimesInput:
    """Context manager: the model runs its modified forward (``variant`` "attnlrp"/"cp-lrp")."""

    def __init__(self, model: nn.Module, variant: str):
        self.model, self.attnlrp = model, variant == "attnlrp"
        self.patched: list[nn.Module] = []

    def __enter__(self):
        for module in self.model.modules():
            name = type(module).__name__
            if "RMSNorm" in name or name in RMS_NORMS:
                module.forward = _patched_ratio(module, gate=False)
            elif _is_activation(module):
                module.forward = _patched_ratio(module, gate=True)
            else:
                continue
            self.patched.append(module)
        self.mode = _Mode(self.attnlrp)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for module in self.patched:
            del module.forward
        return False


def reference_relevance(model: nn.Module, variant: str, embeds: torch.Tensor, select,
                        input_name: str = "inputs_embeds", **kwargs) -> torch.Tensor:
    """Relevance of ``embeds`` (passed as ``input_name``) for the score ``select(output)`` by
    modified Gradient×Input."""
    for p in model.parameters():
        p.requires_grad_(False)
    x = embeds.detach().clone().requires_grad_(True)
    with ModifiedGradientTimesInput(model, variant):
        score = select(model(**{input_name: x}, **kwargs))
    score.sum().backward()
    return (x * x.grad).detach()


def reference_relevances(model: nn.Module, variant: str, leaves: dict, select, run=None,
                         **kwargs) -> dict:
    """Relevance of several inputs at once (``{keyword: tensor}``) for ``select(output)`` by
    modified Gradient×Input; ``run(model, leaves)`` calls the model itself where the inputs are
    not all keyword arguments (default: ``model(**leaves, **kwargs)``)."""
    for p in model.parameters():
        p.requires_grad_(False)
    xs = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    with ModifiedGradientTimesInput(model, variant):
        output = run(model, xs) if run is not None else model(**xs, **kwargs)
        score = select(output)
    score.sum().backward()
    return {k: (x * x.grad).detach() if x.grad is not None else torch.zeros_like(x)
            for k, x in xs.items()}
