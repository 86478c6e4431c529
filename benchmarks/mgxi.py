"""Modified Gradient×Input: AttnLRP and CP-LRP as one plain gradient of a patched forward.

This is the formulation of Arras et al. (2025, section 2.7 and appendix D) in the efficient form
that LXT's "efficient" mode popularised: only the non-linear parts of the model are replaced, by
functions whose forward returns the very same values and whose gradient, multiplied by the
input at the end, is the LRP relevance. Linear layers, residual sums, embeddings, rotary
position embeddings and all layout ops are left untouched: plain autograd already gives the
ε-rule (ε → 0) there. Nothing here uses ``lrp_explicit``; it is the yardstick the explicit rules
are timed against, so it is written to be as cheap as the formulation allows:

- element-wise activations (identity rule ``R_x = R_y``): a Function whose forward is the
  module's own forward and whose backward multiplies by ``y / x`` (computed once, in the
  forward, and saved instead of ``x``);
- RMSNorm (σ held constant): LLaMA's own forward with ``rsqrt(variance + eps)`` detached;
  other RMSNorm classes take the ``y / x`` Function above (exact for a diagonal map);
- LayerNorm (σ held constant): ``torch.native_layer_norm`` in the forward (the op ``F.layer_norm``
  runs), the constant-σ backward ``w·g/σ − mean(w·g/σ)`` from the saved ``1/σ``;
- the gate product of gated MLPs (``act(gate(x)) * up(x)``): the gradient of the product is
  halved (AttnLRP's uniform rule) or the gate is detached (CP-LRP);
- ``F.scaled_dot_product_attention`` stays the fused kernel, forward and backward. For AttnLRP
  the uniform rule on ``A·V`` and on ``q·kᵀ`` halves the gradient reaching ``v`` and quarters the
  one reaching ``q`` and ``k`` (the softmax is Gradient×Input already); for CP-LRP ``q`` and ``k``
  are detached so all relevance flows into ``v``.

Relevance of the input embeddings: ``x * x.grad`` after ``y.backward()``.

Supported: LLaMA-like decoders, GPT-2 and BERT with ``attn_implementation="sdpa"`` (the
default). Eager attention is refused: its softmax and matmuls are module-level functions of each
modeling file and would need patching there.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["modified_gxi", "relevance", "SUPPORTED_ATTENTION"]

SUPPORTED_ATTENTION = ("sdpa",)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward, gradient times ``factor`` in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    return _ScaleGrad.apply(x, factor) if x.requires_grad else x


class _Ratio(torch.autograd.Function):
    """``y = f(x)`` element-wise with gradient ``y / x`` (0 where ``x`` is 0): Gradient×Input then
    hands the output's relevance to the input unchanged (the identity rule)."""

    @staticmethod
    def forward(ctx, x: Tensor, fn) -> Tensor:
        y = fn(x)
        ratio = y / x
        ctx.save_for_backward(ratio.nan_to_num_(0.0, 0.0, 0.0))
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class _LayerNorm(torch.autograd.Function):
    """LayerNorm whose gradient treats the standard deviation as a constant."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        y, _, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.dims = tuple(range(-len(shape), 0))
        ctx.save_for_backward(weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, rstd = ctx.saved_tensors
        g = grad * weight if weight is not None else grad.clone()
        g.mul_(rstd)
        return g.sub_(g.mean(ctx.dims, keepdim=True)), None, None, None, None


# ------------------------------------------------------------------------------ patched forwards


def _ratio_forward(module: nn.Module):
    original = module.forward

    def forward(x, *args, **kwargs):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return original(x, *args, **kwargs)
        return _Ratio.apply(x, lambda t: original(t, *args, **kwargs))

    return forward


def _llama_rms_forward(module: nn.Module):
    """LlamaRMSNorm's forward, verbatim, with the normaliser detached."""

    def forward(hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        with torch.no_grad():
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            scale = torch.rsqrt(variance + module.variance_epsilon)
        hidden_states = hidden_states * scale
        return module.weight * hidden_states.to(input_dtype)

    return forward


def _layer_norm_forward(module: nn.LayerNorm):
    def forward(x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
        return _LayerNorm.apply(x, tuple(module.normalized_shape), module.weight, module.bias,
                                module.eps)

    return forward


def _gated_mlp_forward(module: nn.Module, attnlrp: bool):
    """``down(act(gate(x)) * up(x))`` with the product's gradient halved (AttnLRP) or the gate
    detached (CP-LRP). ``act`` is patched separately (identity rule)."""

    def forward(x: Tensor) -> Tensor:
        gate = module.act_fn(module.gate_proj(x))
        up = module.up_proj(x)
        if attnlrp:
            product = scale_grad(gate * up, 0.5)
        else:
            product = gate.detach() * up
        return module.down_proj(product)

    return forward


def _sdpa(original, attnlrp: bool):
    def sdpa(query, key, value, *args, **kwargs):
        if not torch.is_grad_enabled():
            return original(query, key, value, *args, **kwargs)
        if attnlrp:
            # uniform rule on A·v (½ to v, ½ to A) and on q·kᵀ (½ of A's share to each)
            query, key, value = scale_grad(query, 0.25), scale_grad(key, 0.25), \
                scale_grad(value, 0.5)
        else:
            query, key = query.detach(), key.detach()
        return original(query, key, value, *args, **kwargs)

    return sdpa


def _is_activation(module: nn.Module) -> bool:
    from transformers import activations

    if type(module).__module__ == activations.__name__ and "Activation" in type(module).__name__:
        return True
    return isinstance(module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid))


@contextlib.contextmanager
def modified_gxi(model: nn.Module, variant: str = "attnlrp") -> Iterator[nn.Module]:
    """Patch ``model`` so that ``x * x.grad`` after a plain backward is the ``variant``'s LRP
    relevance (``"attnlrp"`` or ``"cp-lrp"``). Parameters should be frozen by the caller; the
    model and ``F.scaled_dot_product_attention`` are restored on exit."""
    if variant not in ("attnlrp", "cp-lrp"):
        raise ValueError(f"variant must be 'attnlrp' or 'cp-lrp', not {variant!r}")
    attnlrp = variant == "attnlrp"
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if implementation not in SUPPORTED_ATTENTION:
        raise NotImplementedError(f"modified_gxi supports attention {SUPPORTED_ATTENTION}, "
                                  f"not {implementation!r}")
    patched: list[nn.Module] = []
    for module in model.modules():
        name = type(module).__name__
        if name == "LlamaRMSNorm":
            module.forward = _llama_rms_forward(module)
        elif "RMSNorm" in name or isinstance(module, nn.RMSNorm):
            module.forward = _ratio_forward(module)
        elif isinstance(module, nn.LayerNorm):
            module.forward = _layer_norm_forward(module)
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = _gated_mlp_forward(module, attnlrp)
        elif _is_activation(module):
            module.forward = _ratio_forward(module)
        else:
            continue
        patched.append(module)
    original_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa(original_sdpa, attnlrp)
    try:
        yield model
    finally:
        F.scaled_dot_product_attention = original_sdpa
        for module in patched:
            del module.forward


def relevance(x: Tensor) -> Tensor:
    """The relevance of leaf ``x`` after the backward pass: Gradient×Input."""
    return x * x.grad
