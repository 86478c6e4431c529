"""``nn.MultiheadAttention`` explained by the LRP rules (packed projections replayed op for op)."""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as lf
from ..ops import on_path
from .simple import Rule

__all__ = ["MultiheadAttentionRule", "zennit_hooked"]


def zennit_hooked(module: nn.Module) -> bool:
    """True if a zennit rule (a ``zennit.core.Hook``) is registered on ``module`` itself."""
    core = sys.modules.get("zennit.core")
    if core is None:  # zennit never imported: nothing can be hooked
        return False
    return any(isinstance(getattr(hook, "__self__", None), core.Hook)
               for hook in module._forward_pre_hooks.values())


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention`` self-attention with LRP rules on its packed projections.

    ``nn.MultiheadAttention`` runs ``F.multi_head_attention_forward`` on its parameters (the
    packed ``in_proj_weight`` and ``out_proj.weight``), so neither the op dispatch nor a module
    rule on ``out_proj`` would see its parts. This rule replays the same computation, op for op
    (the output is bit-identical), with:

    * the packed in-projection ``x ↦ x W_inᵀ + b_in`` by the ε-rule (it is a parameter, not a
      module: no zennit rule can be attached to it);
    * the attention by the AttnLRP rules (uniform-ε on ``q kᵀ`` and ``A v``, Gradient×Input on
      the softmax, identity on the scaling) or, with ``hold_weights``, by CP-LRP (the weights
      are constants, ``A v`` gives all relevance to ``v``);
    * the out-projection ``out_proj`` (an ``nn.Linear`` subclass that the original forward
      never calls as a module) *called as a module* when a zennit rule is registered on it, so
      the zennit composite's rule for ``nn.Linear`` (γ, αβ, ε …) applies there; otherwise by
      the ε-rule.

    Masks are merged exactly as ``F.multi_head_attention_forward`` merges them (``attn_mask``
    boolean or additive, ``key_padding_mask``, the ``is_causal`` hint); the merged additive mask
    absorbs its share of the relevance (ε-rule of the sum ``scores + mask``), and masked
    positions receive none.

    Supported: self-attention (``query is key is value``) and a query over one key/value tensor
    (``key is value``: SigLIP's attention pooling of a learned probe over the patches; a query
    off the relevance path sends all relevance to the keys and values), batched or not,
    ``batch_first`` either way, ``need_weights`` either way (the returned weights are
    constants), packed projections, masks, no ``bias_k``/``bias_v``, no ``add_zero_attn``.
    Other calls raise ``NotImplementedError``.

    Parameters
    ----------
    module : nn.MultiheadAttention
        The module to wrap.
    epsilon : float, optional
        ε-stabiliser of the projections and the attention products; ``None`` takes the
        composite's ε or the dtype default.
    hold_weights : bool
        CP-LRP: hold the attention weights constant.
    """

    def __init__(self, module: nn.Module, epsilon: float | None = None,
                 hold_weights: bool = False) -> None:
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttentionRule wraps nn.MultiheadAttention, got "
                            f"{type(module).__name__}")
        super().__init__(module, epsilon)
        self.hold_weights = hold_weights

    def extra_repr(self) -> str:
        return f"hold_weights={self.hold_weights}" + (
            ", " + super().extra_repr() if self.epsilon is not None else "")

    def _check(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        mha = self.module
        problems = []
        if key is not value:
            problems.append("cross-attention with different key and value tensors")
        if not mha._qkv_same_embed_dim:
            problems.append("separate q/k/v projection weights (kdim/vdim)")
        if mha.bias_k is not None or mha.add_zero_attn:
            problems.append("bias_k/bias_v or add_zero_attn")
        if mha.training and mha.dropout > 0:
            problems.append("attention dropout in training mode")
        if problems:
            raise NotImplementedError(
                "MultiheadAttentionRule explains attention with one key/value tensor and packed "
                f"projections; this call uses {', '.join(problems)}")

    def _merged_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                     is_causal: bool, need_weights: bool, batched: bool, batch: int,
                     length: int, dtype: torch.dtype) -> tuple[Tensor | None, bool]:
        """The additive mask ``(batch·heads | 1, L, S)`` and causal flag that
        ``F.multi_head_attention_forward`` computes from the module's arguments (the same
        steps, with torch's own canonicalisation)."""
        heads = self.module.num_heads
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=dtype, check_other=False)
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as "
                               "nn.MultiheadAttention requires)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # F.scaled_dot_product_attention's is_causal does the masking
        elif key_padding_mask is not None:
            is_causal = False
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.view(batch, 1, 1, -1).expand(
                -1, heads, -1, -1).reshape(batch * heads, 1, -1)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        return attn_mask, is_causal

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        mha = self.module
        if not torch.is_grad_enabled() or not any(on_path(t) for t in (query, key, value)):
            return mha.forward(query, key, value, key_padding_mask=key_padding_mask,
                               need_weights=need_weights, attn_mask=attn_mask,
                               average_attn_weights=average_attn_weights, is_causal=is_causal)
        self._check(query, key, value)
        batched = query.dim() == 3
        shared = query is key  # self-attention; else a query (a learned probe) over key = value
        x, kv = query, key
        if batched and mha.batch_first:
            x, kv = x.transpose(1, 0), kv.transpose(1, 0)
        if not batched:
            x, kv = x.unsqueeze(1), kv.unsqueeze(1)
        length, batch, dim = x.shape
        source = kv.shape[0]
        heads = mha.num_heads
        head_dim = dim // heads
        eps = self.epsilon
        mask, is_causal = self._merged_mask(attn_mask, key_padding_mask, is_causal, need_weights,
                                            batched, batch, length, x.dtype)

        if batched and shared:  # query is key is value: one packed projection
            proj = lf.linear_epsilon(x, mha.in_proj_weight, mha.in_proj_bias, eps)
            proj = proj.unflatten(-1, (3, dim)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            proj = proj.contiguous()
        elif batched:  # key is value: the query's and the packed key-value projections
            w_q, w_kv = mha.in_proj_weight.split([dim, 2 * dim])
            b_q, b_kv = mha.in_proj_bias.split([dim, 2 * dim]) \
                if mha.in_proj_bias is not None else (None, None)
            pair = lf.linear_epsilon(kv, w_kv, b_kv, eps)
            pair = pair.unflatten(-1, (2, dim)).unsqueeze(0).transpose(0, -2).squeeze(-2)
            pair = pair.contiguous()
            proj = [lf.linear_epsilon(x, w_q, b_q, eps), pair[0], pair[1]]
        else:  # torch unsqueezes q, k, v one by one: three projections (same relevance)
            biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else [None] * 3
            proj = [lf.linear_epsilon(t, w, b, eps)
                    for t, w, b in zip((x, kv, kv), mha.in_proj_weight.chunk(3), biases)]
        q = proj[0].view(length, batch * heads, head_dim).transpose(0, 1)
        k, v = (t.view(source, batch * heads, head_dim).transpose(0, 1) for t in proj[1:])

        weights = None
        if need_weights:
            factor = math.sqrt(1.0 / float(head_dim))
            q = lf.identity(lambda t: t * factor, q)
            if mask is not None:  # the mask is a constant summand: it absorbs its share
                scores = lf.AddmmEpsilonFunction.apply(mask, q, k.transpose(-2, -1), 1, 1, eps,
                                                       torch.baddbmm)
            else:
                scores = lf.MatmulUniformFunction.apply(q, k.transpose(-2, -1), eps, torch.bmm)
            if self.hold_weights:
                weights = lf.stop(torch.softmax(scores, -1))
            else:
                weights = lf.softmax(scores, -1)
            out = lf.MatmulUniformFunction.apply(weights, v, eps, torch.bmm)
            out = out.transpose(0, 1).reshape(length * batch, dim)
        else:
            q = q.view(batch, heads, length, head_dim)
            k, v = (t.view(batch, heads, source, head_dim) for t in (k, v))
            if mask is not None:
                mask = mask.unsqueeze(0) if mask.size(0) == 1 else \
                    mask.view(batch, heads, -1, source)
            out = lf.scaled_dot_product_attention(q, k, v, mask, is_causal, epsilon=eps,
                                                  hold_weights=self.hold_weights)
            out = out.permute(2, 0, 1, 3).reshape(batch * length, dim)

        out_proj = mha.out_proj
        if zennit_hooked(out_proj):
            out = out_proj(out)
        else:
            out = lf.linear_epsilon(out, out_proj.weight, out_proj.bias, eps)
        out = out.view(length, batch, out.size(1))

        if weights is not None:
            weights = weights.detach().view(batch, heads, length, source)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif mha.batch_first:
            out = out.transpose(1, 0)
        return out, weights
