"""Rules of state-space and linear-attention layers (MambaLRP, Rezaei Jafari et al., NeurIPS 2024).

A selective state-space layer computes its parameters (the step Δ, the input and output maps B
and C, and with them the decay ``exp(Δ·A)``) from its own input. MambaLRP holds these constant:
the scan is then linear in its input and relevance passes through the recurrence by the ε-rule
of its sums and products with constants, which the shared op table already applies. What
needs a rule of its own is *where* the parameters are made:

:class:`HeldParametersRule`
    runs a mixer's own forward under the composite's op rules, with its child modules under the
    composite's module rules, and holds constant the tensors a :class:`Held` entry names: whole
    child modules (Mamba's ``x_proj`` gives exactly ``[Δ_low, B, C]``), pieces of a
    ``split`` (Mamba 2 cuts Δ out of ``in_proj``'s output and B, C out of the convolution's),
    and outputs of functions (the ``rsqrt`` statistic of the l2-normalisation of queries and
    keys in a gated delta-net, held as a norm's standard deviation is).
:class:`GatedNormRule`
    an RMSNorm with a SiLU gate, ``norm(x, gate)`` (Mamba 2, Qwen3-Next): the standard deviation
    held constant, the gate product uniform (AttnLRP) or the gate constant (CP-LRP).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import dispatch
from .. import functional as lf
from ..ops import on_path
from .simple import Rule, StopRule

__all__ = ["Held", "HeldParametersRule", "GatedNormRule"]

_T = torch.Tensor
_SPLITS = frozenset([torch.split, _T.split, _T.split_with_sizes, torch.split_with_sizes])


@dataclass(frozen=True)
class Held:
    """What a mixer computes from its input and :class:`HeldParametersRule` holds constant.

    Attributes
    ----------
    children : tuple of str
        Child modules whose whole output is held (they take the stop rule).
    splits : callable, optional
        ``splits(module)`` maps the section sizes of a ``split`` made in the mixer's forward to
        the indices of the pieces held, e.g. ``{(I, C, H): {2}}`` for ``gate, xBC, dt``.
    outputs : frozenset
        Torch functions whose outputs are held wherever the mixer calls them.
    why : str
        Why this cannot be found from the model itself (shown in the documentation).
    """

    children: tuple[str, ...] = ()
    splits: Callable[[nn.Module], Mapping[tuple[int, ...], frozenset[int]]] | None = None
    outputs: frozenset = field(default_factory=frozenset)
    why: str = ""


def _split_sizes(func: Callable, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    sizes = args[1] if len(args) > 1 else kwargs.get(
        "split_size_or_sections", kwargs.get("split_size", kwargs.get("split_sizes")))
    if isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
        return tuple(sizes)
    return None


class _HoldMode(TorchFunctionMode):
    """Above the op dispatch, for one mixer forward: the named split pieces and function
    outputs leave the relevance path (the stop rule); every call runs through the dispatch."""

    def __init__(self, splits: Mapping[tuple[int, ...], frozenset[int]],
                 outputs: frozenset) -> None:
        super().__init__()
        self.splits, self.outputs = splits, outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        if func in _SPLITS and self.splits:
            pieces = self.splits.get(_split_sizes(func, args, kwargs))
            if pieces:
                return type(out)(lf.stop(t) if i in pieces and on_path(t) else t
                                 for i, t in enumerate(out))
        elif func in self.outputs and on_path(out):
            return lf.stop(out)
        return out


class HeldParametersRule(Rule):
    """A state-space (or linear-attention) mixer with its input-dependent parameters held.

    The mixer's own forward runs, so the output is exact. Inside it, the composite's op table
    rules the functional code (convolution, scan, gate product, residual ``D·x``) and the
    composite's module rules its children, except that the tensors ``held`` names are
    constants: relevance reaches the input only through the signal the scan carries.

    Parameters
    ----------
    module : nn.Module
        The mixer.
    held : Held
        What to hold constant.
    epsilon : float, optional
        Not used by the rule itself (the composite's ε rules the ops inside).

    Notes
    -----
    The mixer's children are bound to their rules while its forward runs (once per composite:
    the wrappers are made at the first forward and put back afterwards; concurrent forwards
    share one binding). Outside a registered model (no composite owns the mixer) the mixer
    runs unchanged.
    """

    def __init__(self, module: nn.Module, held: Held, epsilon: float | None = None) -> None:
        super().__init__(module, epsilon)
        self.held = held
        self._splits = dict(held.splits(module)) if held.splits is not None else {}
        self._lock = threading.Lock()
        self._active = 0
        self._wrappers: dict[str, nn.Module] | None = None
        self._source: Any = None
        self._path = type(module).__name__

    def extra_repr(self) -> str:
        parts = [f"children={list(self.held.children)}"] if self.held.children else []
        if self._splits:
            parts.append(f"splits={ {k: sorted(v) for k, v in self._splits.items()} }")
        if self.held.outputs:
            parts.append("outputs=[" + ", ".join(sorted(f.__name__ for f in self.held.outputs))
                         + "]")
        return ", ".join(parts)

    def child_rules(self) -> dict[str, nn.Module]:
        """The rule of each child module while the mixer runs (made at its first forward
        under a composite; empty before)."""
        return dict(self._wrappers or {})

    def _bind_children(self, source: Any) -> dict[str, nn.Module]:
        """The rule wrapper of each child of the mixer (its own, or the composite's)."""
        model = getattr(source, "model", None)
        prefix = ""
        if model is not None:  # the path of this rule: the mixer's own qualified name
            prefix = next((n for n, m in model.named_modules() if m is self), "")
            self._path = prefix or self._path
        zennit = getattr(source, "zennit_modules", set())
        wrappers: dict[str, nn.Module] = {}
        for name, child in self.module.named_children():
            if id(child) in zennit:  # hooked by the zennit composite: its rules, not ours
                continue
            if name in self.held.children:
                factory: Any = StopRule
            else:
                factory = source.rule_for(f"{prefix}.{name}" if prefix else name, child)
                if factory is None:  # a container: its own functional code under the rules
                    factory = _Transparent
            wrappers[name] = source.make_rule(factory, child)
        return wrappers

    def _enter(self, source: Any) -> None:
        with self._lock:
            if self._active == 0:
                if self._wrappers is None or self._source is not source:
                    self._wrappers, self._source = self._bind_children(source), source
                for name, wrapper in self._wrappers.items():
                    self.module._modules[name] = wrapper
            self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._wrappers is not None:
                for name, wrapper in self._wrappers.items():
                    self.module._modules[name] = wrapper.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        found = dispatch.owner(self.module) if torch.is_grad_enabled() else None
        if found is None:
            return self.module.forward(*args, **kwargs)
        source = found[1]
        self._enter(source)
        mark = dispatch.depth()
        try:
            dispatch.enter(source, self._path)
            with _HoldMode(self._splits, self.held.outputs):
                return self.module.forward(*args, **kwargs)
        finally:
            dispatch.unwind(mark, exit_mode=False)
            self._leave()


class _Transparent(HeldParametersRule):
    """A child without a rule of its own inside a held mixer: its code runs under the
    composite's rules, nothing held."""

    def __init__(self, module: nn.Module, epsilon: float | None = None) -> None:
        super().__init__(module, Held(), epsilon)


class GatedNormRule(Rule):
    """An RMSNorm with a multiplicative SiLU gate, ``norm(x, gate)``, with its standard deviation
    held constant.

    Whether the gate multiplies before the normalisation (Mamba 2's ``MambaRMSNormGated``) or
    after it (Qwen3-Next's ``RMSNormGated``), the normalisation with a constant deviation and the
    weight are scalings (identity) and the SiLU is element-wise (identity), so the module is one
    product of the signal branch and the gate branch: AttnLRP gives each half of the relevance
    (uniform rule), CP-LRP holds the gate constant and gives all of it to ``x``. The module's
    own forward computes the output.

    Parameters
    ----------
    module : nn.Module
        The gated norm; called as ``module(x, gate)`` (``gate`` may be ``None``).
    hold_gate : bool
        CP-LRP: the gate is a constant.
    epsilon : float, optional
        Not used (no ε-rule inside).
    """

    def __init__(self, module: nn.Module, hold_gate: bool = False,
                 epsilon: float | None = None) -> None:
        super().__init__(module, epsilon)
        self.hold_gate = hold_gate

    def extra_repr(self) -> str:
        return f"hold_gate={self.hold_gate}"

    def forward(self, x: Tensor, gate: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        forward = self.module.forward
        if not torch.is_grad_enabled() or not (on_path(x) or on_path(gate)):
            return forward(x, gate, *args, **kwargs)
        if gate is None or not on_path(gate) or self.hold_gate:
            gate_value = lf.stop(gate) if on_path(gate) else gate
            if not on_path(x):
                return forward(x, gate_value, *args, **kwargs)
            return lf.UniformFunction.apply(lambda t: forward(t, gate_value, *args, **kwargs), x)
        if not on_path(x):
            return lf.UniformFunction.apply(lambda g: forward(x, g, *args, **kwargs), gate)
        return lf.UniformFunction.apply(lambda t, g: forward(t, g, *args, **kwargs), x, gate)
