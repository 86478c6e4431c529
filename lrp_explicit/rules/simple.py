"""The module rules of one input-output map each: ε, uniform, identity, softmax, norm, stop,
pass, and their base class :class:`Rule`."""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import BackwardHook

from .. import functional as lf
from ..errors import CompositeError
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
        the dtype default (:func:`lrp_explicit.functional.default_epsilon`: ``1e-11`` in
        float32, ``1e-12`` in float64, ``1e-6`` in bfloat16).

    Notes
    -----
    The wrapper stands in for the module it wraps:

    * the module's own hooks run as if it were called itself: its forward pre-hooks before
      the rule, its forward hooks after it (their return values replace the input and the
      output as usual), its full backward hooks on the relevance at its inputs and output;
      so a rule calls the wrapped module's ``forward`` (never ``self.module(...)``, which would
      run them twice);
    * ``state_dict()`` has the keys of the wrapped module (no ``module.`` inserted), and
      ``load_state_dict()`` takes them, so checkpoints move freely between the registered and
      the plain model;
    * a wrapped module with an accelerate hook (``device_map``, CPU or disk offload) runs the
      rule inside it: the hook loads offloaded weights and places the inputs first; a rule
      never computes on weights on the meta device: it raises
      :class:`~lrp_explicit.CompositeError` instead.
    """

    #: True where the rule lets the op dispatch rule the functional calls inside it one by one
    #: (it is not opaque); read by :mod:`lrp_explicit.dispatch` when the rule is entered.
    transparent: bool = False

    def __init__(self, module: nn.Module, epsilon: float | None = None) -> None:
        super().__init__()
        self.module = module
        self.epsilon = epsilon
        self._register_state_dict_hook(_strip_inner_prefix)
        self._register_load_state_dict_pre_hook(_add_inner_prefix, with_module=True)

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.__dict__["_modules"].get("module")
        if inner is None:
            return super()._call_impl(*args, **kwargs)
        call = super()._call_impl
        hook = inner.__dict__.get("_hf_hook")
        if hook is not None:  # accelerate: load offloaded weights, place the inputs
            call = functools.partial(_with_accelerate, self, hook, call)
        else:
            _check_loaded(self)
        if not (inner._forward_pre_hooks or inner._forward_hooks or inner._backward_hooks
                or inner._backward_pre_hooks):
            return call(*args, **kwargs)
        return _with_hooks(inner, call, args, kwargs)

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


def _check_loaded(rule: Rule) -> None:
    """Raise if the wrapped module's weights are on the meta device (no data)."""
    inner = rule.module
    for name, param in inner._parameters.items():
        if param is not None and param.is_meta:
            raise CompositeError(
                f"{type(inner).__name__}.{name} is on the meta device (offloaded or not "
                f"loaded); {type(rule).__name__} would compute on a tensor without data")


def _with_accelerate(rule: Rule, hook: Any, call: Callable[..., Any], *args: Any,
                     **kwargs: Any) -> Any:
    """``call`` (the rule) inside the accelerate hook of the wrapped module, as its forward
    would run: ``pre_forward`` loads offloaded weights and moves the inputs to the execution
    device, ``post_forward`` offloads again (the backward keeps the loaded tensors it saved)."""
    inner = rule.module
    args, kwargs = hook.pre_forward(inner, *args, **kwargs)
    _check_loaded(rule)
    return hook.post_forward(inner, call(*args, **kwargs))


def _with_hooks(inner: nn.Module, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``call(*args, **kwargs)`` (the rule) with the hooks of the wrapped module ``inner`` around
    it, in the order and with the semantics of ``nn.Module.__call__`` (global hooks run once,
    for the wrapper)."""
    for hook_id, hook in tuple(inner._forward_pre_hooks.items()):
        if hook_id in inner._forward_pre_hooks_with_kwargs:
            changed = hook(inner, args, kwargs)
            if changed is not None:
                if not (isinstance(changed, tuple) and len(changed) == 2):
                    raise RuntimeError("forward pre-hook must return None or a tuple of "
                                       f"(new_args, new_kwargs), but got {changed}.")
                args, kwargs = changed
        else:
            changed = hook(inner, args)
            if changed is not None:
                args = changed if isinstance(changed, tuple) else (changed,)
    full = list(inner._backward_hooks.values()) if inner._is_full_backward_hook else []
    pre = list(inner._backward_pre_hooks.values())
    partial = list(inner._backward_hooks.values()) if inner._is_full_backward_hook is False \
        else []
    backward = BackwardHook(inner, full, pre) if full or pre else None
    if backward is not None:
        args = backward.setup_input_hook(args)
    result: Any = None
    called: set[int] = set()
    try:
        result = call(*args, **kwargs)
        for hook_id, hook in tuple(inner._forward_hooks.items()):
            if hook_id in inner._forward_hooks_always_called:
                called.add(hook_id)
            if hook_id in inner._forward_hooks_with_kwargs:
                changed = hook(inner, args, kwargs, result)
            else:
                changed = hook(inner, args, result)
            if changed is not None:
                result = changed
    except Exception:
        for hook_id, hook in tuple(inner._forward_hooks.items()):
            if hook_id in inner._forward_hooks_always_called and hook_id not in called:
                try:
                    changed = hook(inner, args, result)
                    result = changed if changed is not None else result
                except Exception as err:
                    warnings.warn("module forward hook with ``always_call=True`` raised an "
                                  f"exception that was ignored: {err!r}", stacklevel=2)
        raise
    if backward is not None:
        result = backward.setup_output_hook(result)
    if partial:
        var = result
        while not isinstance(var, Tensor):
            var = next(v for v in var.values() if isinstance(v, Tensor)) \
                if isinstance(var, dict) else var[0]
        if var.grad_fn is not None:
            for hook in partial:
                var.grad_fn.register_hook(_PartialHook(hook, inner))
    return result


class _PartialHook:
    """A non-full (``register_backward_hook``) hook of the wrapped module on its output node."""

    def __init__(self, hook: Callable[..., Any], module: nn.Module) -> None:
        self.hook, self.module = hook, module

    def __call__(self, grad_input: Any, grad_output: Any) -> Any:
        return self.hook(self.module, grad_input, grad_output)


_INNER = "module."


def _strip_inner_prefix(rule: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict hook: the wrapped module's keys without ``module.``, in their order."""
    inner = prefix + _INNER
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner):]] = state.pop(key)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == inner[:-1] or k.startswith(inner)]:
            value = metadata.pop(key)
            metadata[prefix[:-1] if key == inner[:-1] else prefix + key[len(inner):]] = value


def _add_inner_prefix(rule: nn.Module, state: dict, prefix: str, local_metadata: Any,
                      strict: bool, missing: list, unexpected: list, errors: list) -> None:
    """Load-state-dict pre-hook: keys of the wrapped module (with or without ``module.``)."""
    own = set(rule._parameters) | set(rule._buffers) | set(rule._modules)
    for key in [k for k in state if k.startswith(prefix)]:
        if key[len(prefix):].split(".", 1)[0] not in own:
            state[prefix + _INNER + key[len(prefix):]] = state.pop(key)


_PEFT_TUNERS = "peft.tuners."


class EpsilonRule(Rule):
    """ε-rule ``R_x = x ⊙ J(x)ᵀ (R ⊘ s(z))`` for a module linear (affine) in its input.

    ``nn.Linear`` and transformers' ``Conv1D`` use closed forms; any other module (``Conv2d``,
    a custom affine map) takes one vector-Jacobian product in the backward. An ``nn.Linear``
    subclass with a forward of its own is not known to be linear (Llama 4's and PhiMoE's MoE
    routers return a tuple of scores and logits): the rule is :attr:`transparent` for it, and
    each functional call of that forward gets its own op rule (``super().forward`` the ε-rule)
    or is reported. PEFT's adapter layers that subclass ``nn.Linear`` (RandLoRA, VB-LoRA) are
    linear in their input (the composite refuses unverified kinds), so they keep the ε-rule of
    the whole layer, as their merged ``nn.Linear`` has.
    """

    @property
    def transparent(self) -> bool:  # type: ignore[override]
        module = self.module
        return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward \
            and not type(module).__module__.startswith(_PEFT_TUNERS)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        module = self.module
        if not torch.is_grad_enabled() or not on_path(x):
            return module.forward(x, *args, **kwargs)
        if type(module) is nn.Linear:
            return lf.linear_epsilon(x, module.weight, module.bias, self.epsilon)
        if self.transparent:
            return module.forward(x, *args, **kwargs)  # its calls get the op rules
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and not args:
            shape = x.shape[:-1] + (module.nf,)
            z = lf.addmm_epsilon(module.bias, x.view(-1, x.size(-1)), module.weight,
                                 epsilon=self.epsilon)
            return z.view(shape)
        return lf.bilinear_uniform(lambda t: module.forward(t, *args, **kwargs), x,
                                   epsilon=self.epsilon)


class UniformEpsilonRule(Rule):
    """Uniform-ε rule for a module multilinear in its tensor inputs (e.g. ``A @ B``):
    ``R_i = x_i ⊙ VJP_i(R ⊘ s(z)) / n`` over the ``n`` inputs on the relevance path."""

    def forward(self, *args: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not any(on_path(a) for a in args):
            return self.module.forward(*args)
        return lf.bilinear_uniform(self.module.forward, *args, epsilon=self.epsilon)


class UniformRule(Rule):
    """Relevance split equally among the inputs on the relevance path (gate products);
    with a single input on the path this is the identity."""

    def forward(self, *args: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not any(on_path(a) for a in args):
            return self.module.forward(*args)
        return lf.UniformFunction.apply(self.module.forward, *args)


class IdentityRule(Rule):
    """Identity rule ``R_x = R`` for element-wise modules (activations). The output is tagged as
    a gate, so that CP-LRP holds it constant in a later gate product."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled() or not on_path(x):
            return self.module.forward(x, *args, **kwargs)
        out = lf.identity(lambda t: self.module.forward(t, *args, **kwargs), x)
        setattr(out, GATE_ATTR, True)
        return out


class SoftmaxRule(Rule):
    """``nn.Softmax`` with the Gradient×Input rule of :func:`lrp_explicit.functional.softmax`."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not on_path(x):
            return self.module.forward(x)
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
        ε-stabiliser; ``None`` takes the composite's ε or the dtype default.
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
            return module.forward(x)
        if self.kind == "rms":
            return lf.norm_rule(x, module.forward, "rms", epsilon=self.epsilon)
        shape = tuple(getattr(module, "normalized_shape", None) or (x.shape[-1],))
        if len(shape) != 1 or x.shape[-1] != shape[0]:
            raise CompositeError(
                f"{type(module).__name__} normalises over {shape}, not over the last dimension "
                f"of its input {tuple(x.shape)} (channels first?): the LayerNorm rule does not "
                "apply; give the module a rule of its own")
        eps = next((getattr(module, n) for n in _RMS_EPS_NAMES if hasattr(module, n)), 1e-5)
        weight, bias = self._affine(x, float(eps))
        return lf.norm_rule(x, module.forward, "layer", weight=weight, bias=bias, eps=eps,
                            epsilon=self.epsilon, normalized_shape=shape)

    def _affine(self, x: Tensor, eps: float) -> tuple[Tensor | None, Tensor | None]:
        """The weight and bias of the module's affine map ``y = n(x) ⊙ w + b``.

        ``nn.LayerNorm`` itself has them as parameters. Any other class is read from its own
        forward (its weights are frozen while registered; read once per device and dtype): a
        LayerNorm is odd in its centred input, ``n(−u) = −n(u)``, so ``w = (f(u) − f(−u)) / (2
        n(u))`` and ``b = (f(u) + f(−u)) / 2`` for a probe row ``u`` of mean 0 — whatever the
        parameters are called and however they enter (Nemotron's ``1 + w``).
        """
        module = self.module
        if type(module).forward is nn.LayerNorm.forward:
            return module.weight, module.bias
        key = (x.device, x.dtype)
        cached = self.__dict__.setdefault("_affine_cache", {})
        if key not in cached:
            width = x.shape[-1]
            u = torch.randn(width, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64) * 1e3
            u = (u - u.mean()).to(device=x.device, dtype=x.dtype)
            with torch.no_grad():
                up, down = module.forward(u[None]), module.forward(-u[None])
            n = u / torch.sqrt(u.square().mean() + eps)
            cached[key] = ((up - down)[0] / (2 * n), (up + down)[0] / 2)
        return cached[key]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (", " + super().extra_repr() if self.epsilon else "")


class StopRule(Rule):
    """Stop rule: the module's output is a constant, no relevance enters the module."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module.forward(*args, **kwargs)
        if isinstance(out, Tensor) and out.requires_grad:
            return lf.stop(out)
        return out


class PassRule(Rule):
    """Plain autograd inside the module, with the op dispatch suspended.

    For modules whose gradient already moves relevance where it belongs (dropout in eval
    mode, flatten, selection, pooling by maximum) or that must stay opaque to the dispatch.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.forward(*args, **kwargs)
