"""The module rules of one input-output map each: ε, uniform, identity, softmax, norm, stop,
pass, and their base class :class:`Rule`."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as lf
from ..ops import GATE_ATTR, on_path

__all__ = ["Rule", "EpsilonRule", "UniformEpsilonRule", "UniformRule", "IdentityRule",
           "SoftmaxRule", "NormRule", "StopRule", "PassRule"]


class Rule(nn.Module):
    """Base class: wraps ``module`` and replaces its backward by an LRP rule.

    Parameters
    ----------
    module : nn.Module
        The module instance to wrap; it is kept unchanged as ``self.module``.
    epsilon : float, optional
        ε-stabiliser of rules that use one; ``None`` takes the composite's ε or, failing that,
        the dtype default.
    """

    def __init__(self, module: nn.Module, epsilon: float | None = None) -> None:
        super().__init__()
        self.module = module
        self.epsilon = epsilon

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:  # half-built (copy, unpickling): nothing to fall back to
                raise
            return getattr(inner, name)

    def extra_repr(self) -> str:
        return "" if self.epsilon is None else f"epsilon={self.epsilon}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class EpsilonRule(Rule):
    """ε-rule ``R_x = x ⊙ J(x)ᵀ (R ⊘ s(z))`` for a module linear (affine) in its input.

    ``nn.Linear`` and transformers' ``Conv1D`` use closed forms; any other module (``Conv2d``,
    a custom affine map) takes one vector-Jacobian product in the backward.
    """

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        module = self.module
        if not torch.is_grad_enabled() or not on_path(x):
            return module(x, *args, **kwargs)
        if type(module) is nn.Linear:
            return lf.linear_epsilon(x, module.weight, module.bias, self.epsilon)
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and not args:
            shape = x.shape[:-1] + (module.nf,)
            z = lf.addmm_epsilon(module.bias, x.view(-1, x.size(-1)), module.weight,
                                 epsilon=self.epsilon)
            return z.view(shape)
        return lf.bilinear_uniform(lambda t: module(t, *args, **kwargs), x, epsilon=self.epsilon)


class UniformEpsilonRule(Rule):
    """Uniform-ε rule for a module multilinear in its tensor inputs (e.g. ``A @ B``):
    ``R_i = x_i ⊙ VJP_i(R ⊘ s(z)) / n`` over the ``n`` inputs on the relevance path."""

    def forward(self, *args: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not any(on_path(a) for a in args):
            return self.module(*args)
        return lf.bilinear_uniform(self.module, *args, epsilon=self.epsilon)


class UniformRule(Rule):
    """Relevance split equally among the inputs on the relevance path (gate products);
    with a single input on the path this is the identity."""

    def forward(self, *args: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not any(on_path(a) for a in args):
            return self.module(*args)
        return lf.UniformFunction.apply(self.module, *args)


class IdentityRule(Rule):
    """Identity rule ``R_x = R`` for element-wise modules (activations). The output is tagged as
    a gate, so that CP-LRP holds it constant in a later gate product."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled() or not on_path(x):
            return self.module(x, *args, **kwargs)
        out = lf.identity(lambda t: self.module(t, *args, **kwargs), x)
        setattr(out, GATE_ATTR, True)
        return out


class SoftmaxRule(Rule):
    """``nn.Softmax`` with the Gradient×Input rule of :func:`lrp_explicit.functional.softmax`."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not on_path(x):
            return self.module(x)
        return lf.softmax(x, self.module.dim)


_RMS_EPS_NAMES = ("eps", "variance_epsilon", "epsilon")


class NormRule(Rule):
    """LayerNorm / RMSNorm with the standard deviation held constant.

    The module's own forward computes the output (exact for any implementation, including the
    ``(1 + w)`` scale of Gemma-style norms); the backward is the constant-std rule.

    Parameters
    ----------
    module : nn.Module
        ``nn.LayerNorm``, ``nn.RMSNorm`` or a module behaving like one.
    kind : {"layer", "rms"}, optional
        Which rule to use. By default ``nn.LayerNorm`` and classes whose name contains
        ``LayerNorm`` are ``"layer"``; ``nn.RMSNorm`` and classes whose name contains ``RMS``
        are ``"rms"``. Other classes must say.
    epsilon : float, optional
        ε-stabiliser.
    """

    def __init__(self, module: nn.Module, epsilon: float | None = None,
                 kind: str | None = None) -> None:
        super().__init__(module, epsilon)
        self.kind = kind or self.infer_kind(module)

    @staticmethod
    def infer_kind(module: nn.Module) -> str:
        """Return ``"layer"`` or ``"rms"`` for ``module``, or raise ``TypeError``."""
        name = type(module).__name__.lower()
        if isinstance(module, nn.RMSNorm) or "rms" in name:
            return "rms"
        if isinstance(module, nn.LayerNorm) or "layernorm" in name:
            return "layer"
        raise TypeError(f"NormRule cannot tell whether {type(module).__name__} is a LayerNorm or "
                        "an RMSNorm; pass kind='layer' or kind='rms'")

    def forward(self, x: Tensor) -> Tensor:
        module = self.module
        if not torch.is_grad_enabled() or not on_path(x):
            return module(x)
        if self.kind == "rms":
            return lf.norm_rule(x, module, "rms", epsilon=self.epsilon)
        shape = getattr(module, "normalized_shape", None) or (x.shape[-1],)
        eps = next((getattr(module, n) for n in _RMS_EPS_NAMES if hasattr(module, n)), 1e-5)
        return lf.norm_rule(x, module, "layer", weight=getattr(module, "weight", None), eps=eps,
                            epsilon=self.epsilon, normalized_shape=shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (", " + super().extra_repr() if self.epsilon else "")


class StopRule(Rule):
    """Stop rule: the module's output is a constant, no relevance enters the module."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        if isinstance(out, Tensor) and out.requires_grad:
            return lf.stop(out)
        return out


class PassRule(Rule):
    """Plain autograd inside the module, with the op dispatch suspended.

    For modules whose gradient already moves relevance where it belongs (dropout in eval
    mode, flatten, selection, pooling by maximum) or that must stay opaque to the dispatch.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
