"""Latent units by name: MLP neurons, attention heads and residual-stream dimensions.

LRP gives every latent unit a relevance, not only the inputs. This module names the units of a
transformer, reads their relevance from one attribution pass, explains a unit instead of a
logit, lets only chosen units' relevance through (conditional relevance, as Concept Relevance
Propagation does for CNNs) and changes units in the forward pass (:func:`intervene`).

**Unit layers.** A unit layer is named by a module of the model and holds units along the last
dimension of one tensor:

============  ====================================  =========================================
kind          named by                              the tensor
============  ====================================  =========================================
``neuron``    the MLP's activation                  the input of the MLP's down projection
              (``model.layers.3.mlp.act_fn``)       (``down_proj``, ``c_proj``, ``fc2``,
                                                    BERT's ``output.dense`` …): the
                                                    activation's output, after the gate
                                                    product in gated MLPs
``head``      the attention module                  the input of its output projection
              (``model.layers.3.self_attn``,        (``o_proj``, ``c_proj``, BERT's
              ``{"heads": …}``)                     ``attention.output.dense`` …), reshaped
                                                    to ``(heads, head_dim)``, summed per head
``dim``       any other module, e.g. a block        its output (a block's output is the
              (``model.layers.3``)                  residual stream after it)
============  ====================================  =========================================

In a gated MLP (LLaMA, Mistral, Gemma …) the activation's own output carries only part of a
neuron's relevance (half under AttnLRP's uniform rule for the gate product, none under CP-LRP,
which holds the gate constant), so a neuron is read where its whole relevance passes: the
down projection's input. An activation without a down projection (a plain ``nn.Sequential``)
holds its units at its own output.

A unit's relevance is the relevance at its tensor summed over the tokens (and, for a head,
over the head's dimensions); :func:`unit_layers` lists the layers every explanation reports
(:attr:`lrp_explicit.Explanation.units`).

**Specifications.** Conditions, unit targets and interventions name units by module:
``{"model.layers.3.mlp.act_fn": [17, 301]}`` (units), ``{"model.layers.3.self_attn":
{"heads": [2, 5]}}`` (heads), ``{"model.layers.3": 7}`` (one residual dimension), and weights
or values as a mapping ``{17: 1.0, 301: -0.5}``; ``{"units": …, "heads": …}`` names both kinds
of one module.

**Conditional relevance** is the input relevance that flows *through* chosen units: the
relevance that reaches the units' layer in the ordinary pass, kept at the chosen units only,
propagated on to the inputs (relevance that goes around the layer, along the residual stream,
is not part of it). Several layers in one condition: the relevance that flows through the
chosen units of each (later layers first). Because every rule is linear in the relevance it
carries, the conditional relevances of all units of a layer sum to the relevance through the
whole layer, and, for a layer every path crosses (a block's output), to the ordinary input
relevance; a condition on no unit gives zero.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import functional as lf
from .composites import Composite
from .pipeline import Attribution, Prepared, Target, attribute, make_leaf, tensors
from .rules import Rule

__all__ = ["KINDS", "Site", "Unit", "UnitRecorder", "as_spec", "conditional", "find_site",
           "intervene", "parse", "top_units", "unit_layers", "unit_target"]

#: The kinds of unit layers.
KINDS = ("neuron", "head", "dim")

#: Names of an MLP's down projection, looked up in the activation's parent module.
DOWN_PROJECTIONS = ("down_proj", "c_proj", "fc2", "fc_out", "wo", "w2", "dense_4h_to_h",
                    "out_proj", "proj_out")
#: Names of an attention module's output projection, looked up in the module.
OUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "output.dense", "dense", "o", "wo",
                   "proj", "out")
#: Attributes that hold an attention module's number of heads.
HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads")
#: Activation classes that are not element-wise (never neurons).
_NOT_ACTIVATIONS = ("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention",
                    "GLU")


@dataclass(frozen=True)
class Site:
    """Where the units of one unit layer live.

    Attributes
    ----------
    name : str
        The layer's name: the module that names it (an activation, an attention module, a
        block …).
    kind : str
        ``"neuron"``, ``"head"`` or ``"dim"`` (:data:`KINDS`).
    module : str
        Qualified name of the module whose input or output is the layer's tensor.
    at : str
        ``"input"`` or ``"output"`` of :attr:`module`.
    heads : int
        Number of heads (``0`` unless :attr:`kind` is ``"head"``).
    size : int or None
        Number of units where it is known before a forward pass (the projection's input
        features; heads), else ``None``.
    """

    name: str
    kind: str
    module: str
    at: str
    heads: int = 0
    size: int | None = None

    def label(self, index: int) -> str:
        """A unit's name: ``layer[17]``, ``layer.head[2]``."""
        return f"{self.name}.head[{index}]" if self.kind == "head" else f"{self.name}[{index}]"


class Unit(NamedTuple):
    """One unit and its relevance (an item of :func:`top_units`).

    Attributes
    ----------
    layer : str
        The unit layer's name (:attr:`Site.name`).
    kind : str
        ``"neuron"``, ``"head"`` or ``"dim"``.
    index : int
        The unit's index in its layer.
    relevance : float
        Its relevance.
    """

    layer: str
    kind: str
    index: int
    relevance: float

    def __str__(self) -> str:
        name = f"{self.layer}.head[{self.index}]" if self.kind == "head" \
            else f"{self.layer}[{self.index}]"
        return f"{name} {self.relevance:+.4g}"

    @property
    def spec(self) -> dict[str, Any]:
        """The unit as a specification: ``{layer: [index]}`` or ``{layer: {"heads": [index]}}``
        (for ``condition=``, ``target=`` and, with a value, :func:`intervene`)."""
        return as_spec([self])


# ============================================================================ the unit layers


def _original(module: nn.Module) -> nn.Module:
    """The module a rule wrapper stands for, or the module itself."""
    while isinstance(module, Rule):
        module = module.module
    return module


def _named(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → original module, not looking inside rule wrappers."""
    out: dict[str, nn.Module] = {}
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, Rule):
            inside.update(id(m) for m in module.modules() if m is not module)
        out[name] = _original(module)
    return out


def _child(modules: Mapping[str, nn.Module], parent: str, path: str) -> str | None:
    name = f"{parent}.{path}" if parent else path
    return name if name in modules and _features_in(modules[name]) is not None else None


def _features_in(module: nn.Module) -> int | None:
    """Input features of a linear layer (``nn.Linear``, GPT-2's ``Conv1D``, quantised
    linears with ``in_features``), else ``None``."""
    size = getattr(module, "in_features", None)
    if isinstance(size, int):
        return size
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _is_activation(module: nn.Module) -> bool:
    cls = type(module)
    if cls.__name__ in _NOT_ACTIVATIONS:
        return False
    return cls.__module__.startswith("torch.nn.modules.activation") \
        or cls.__module__ == "transformers.activations" or cls.__name__.endswith("Activation")


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _down_projection(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """The MLP down projection that takes activation ``name``'s output: a child of its parent
    named as in :data:`DOWN_PROJECTIONS`, the next linear module of an ``nn.Sequential``, or,
    for BERT-style layers (the activation in ``intermediate``), ``output.dense`` beside it."""
    parent = _parent(name)
    for candidate in DOWN_PROJECTIONS:
        found = _child(modules, parent, candidate)
        if found is not None:
            return found
    if parent and isinstance(modules.get(parent), nn.Sequential):
        children = list(modules[parent]._modules)
        index = children.index(name.rpartition(".")[2])
        return _child(modules, parent, children[index + 1]) if index + 1 < len(children) \
            else None
    if parent.rpartition(".")[2] == "intermediate":
        return _child(modules, _parent(parent), "output.dense")
    return None


def _out_projection(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """The output projection of attention module ``name`` (inside it, or beside it for
    BERT's ``attention.self``)."""
    for candidate in OUT_PROJECTIONS:
        found = _child(modules, name, candidate)
        if found is not None:
            return found
    parent = _parent(name)
    if parent and _is_attention(modules[parent]):
        return _child(modules, parent, "output.dense")
    return None


def _num_heads(modules: Mapping[str, nn.Module], attention: str, width: int) -> int | None:
    """Number of heads of an attention module whose output projection takes ``width``
    features."""
    scope = [m for n, m in modules.items()
             if n == attention or n.startswith(attention + ".")]
    parent = _parent(attention)
    if parent and _is_attention(modules[parent]):
        scope.append(modules[parent])
    for module in scope:
        for attr in HEAD_ATTRIBUTES:
            value = module.__dict__.get(attr)
            if isinstance(value, int) and value > 0 and width % value == 0:
                return value
    for module in scope:
        config = module.__dict__.get("config")
        for attr in HEAD_ATTRIBUTES:
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0 and width % value == 0:
                return value
    for module in scope:
        head_dim = module.__dict__.get("head_dim") or module.__dict__.get(
            "attention_head_size")
        if isinstance(head_dim, int) and head_dim > 0 and width % head_dim == 0:
            return width // head_dim
    return None


def _neuron_site(modules: Mapping[str, nn.Module], name: str) -> Site:
    down = _down_projection(modules, name)
    if down is None:
        return Site(name, "neuron", name, "output")
    return Site(name, "neuron", down, "input", size=_features_in(modules[down]))


def _head_site(modules: Mapping[str, nn.Module], name: str) -> Site:
    module = modules[name]
    if _features_in(module) is not None and not _is_attention(module):
        projection = name  # the output projection itself
        owner = _parent(name)
        while owner and not _is_attention(modules[owner]):
            owner = _parent(owner)
        attention = owner or name
    else:
        projection = _out_projection(modules, name) if _is_attention(module) else None
        attention = name
    if projection is None:
        raise ValueError(f"{name} ({type(module).__name__}) has no attention output projection "
                         f"({', '.join(OUT_PROJECTIONS[:4])} …): heads need one; name the "
                         "attention module")
    width = _features_in(modules[projection])
    assert width is not None
    heads = _num_heads(modules, attention, width)
    if heads is None:
        raise ValueError(f"cannot tell the number of heads of {attention} (no "
                         f"{'/'.join(HEAD_ATTRIBUTES)} or head_dim)")
    return Site(name, "head", projection, "input", heads=heads, size=heads)


def find_site(model: nn.Module, name: str, heads: bool = False) -> Site:
    """The unit layer named by module ``name`` of ``model``.

    Parameters
    ----------
    model : nn.Module
        The model (with or without a registered composite).
    name : str
        Qualified module name: an MLP activation (neurons), an attention module (with
        ``heads``), any other module (the dimensions of its output).
    heads : bool
        The heads of an attention module (or of its output projection).

    Returns
    -------
    Site

    Raises
    ------
    ValueError
        For an unknown module (the message suggests near names) or heads of a module without
        an attention output projection.
    """
    if not isinstance(name, str):
        raise TypeError(f"a unit layer is named by a module name (str), not "
                        f"{type(name).__name__}")
    modules = _named(model)
    if name not in modules or not name:
        near = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise ValueError(f"no module {name!r} in {type(_original(model)).__name__}{hint}")
    if heads:
        return _head_site(modules, name)
    if _is_activation(modules[name]):
        return _neuron_site(modules, name)
    return Site(name, "dim", name, "output")


def unit_layers(model: nn.Module) -> list[Site]:
    """The unit layers every explanation reports: the neurons of each MLP (activations with a
    down projection), the heads of each attention module with an output projection, and the
    residual-stream dimensions at the output of each block (an item of the ``nn.ModuleList``
    that holds the layers), in the order of the modules.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    list of Site
    """
    modules = _named(model)
    sites: list[Site] = []
    attentions: list[str] = []
    for name, module in modules.items():
        if not name:
            continue
        if _is_attention(module) and not any(name.startswith(a + ".") for a in attentions):
            projection = _out_projection(modules, name)
            if projection is not None and _num_heads(
                    modules, name, _features_in(modules[projection]) or 0):
                attentions.append(name)
                sites.append(_head_site(modules, name))
        elif _is_activation(module) and _down_projection(modules, name) is not None:
            sites.append(_neuron_site(modules, name))
    blocks: list[str] = []
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and not any(
                name.startswith(b + ".") for b in blocks):  # not the sub-layers of a block
            for child in module._modules:
                block = f"{name}.{child}" if name else child
                if any(s.name.startswith(block + ".") for s in sites):
                    blocks.append(block)
    order = {name: i for i, name in enumerate(modules)}
    sites += [Site(b, "dim", b, "output") for b in blocks]
    # a block's dimensions come after the units inside it
    last = {s.name: max((order[t.name] for t in sites if t.name.startswith(s.name + ".")),
                        default=order[s.name]) for s in sites if s.kind == "dim"}
    return sorted(sites, key=lambda s: (last.get(s.name, order[s.name]), s.kind == "dim"))


# ============================================================================ specifications


def _index(value: Any, what: str) -> int:
    if isinstance(value, str) and value.isdigit():  # a key read back from JSON
        return int(value)
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or (
            isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point())):
        raise TypeError(f"{what}: a unit is an int index, not {value!r}")
    return int(value)


def _weights(value: Any, what: str, default: float | None) -> dict[int, float]:
    """``{unit: weight}`` from an index, indices or a mapping of index to number."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (numbers.Real, Tensor)):
                raise TypeError(f"{what}: unit {k!r} maps to {v!r}, not a number")
            out[_index(k, what)] = float(v)
        return out
    if default is None:
        raise TypeError(f"{what}: give a mapping of unit to value, e.g. {{17: 0.0}}")
    if isinstance(value, Tensor):
        value = value.flatten().tolist() if value.dim() else int(value)
    if isinstance(value, (numbers.Integral, str)) and not isinstance(value, bool):
        return {_index(value, what): default}  # a str that is no index is refused there
    if isinstance(value, Iterable):
        return {_index(v, what): default for v in value}
    raise TypeError(f"{what}: units are an index, a list of indices or a mapping, not "
                    f"{type(value).__name__}")


def _kinds(name: str, value: Any) -> list[tuple[bool, Any]]:
    """``(heads, what)`` pairs of one module's entry."""
    if isinstance(value, Mapping) and any(k in ("heads", "units") for k in value):
        extra = [k for k in value if k not in ("heads", "units")]
        if extra:
            raise ValueError(f"{name}: unknown keys {extra!r} beside 'heads'/'units'")
        return [(k == "heads", v) for k, v in value.items()]
    return [(False, value)]


def _check_range(site: Site, units: Iterable[int], size: int | None = None) -> None:
    size = site.size if size is None else size
    for unit in units:
        if size is not None and not 0 <= unit < size:
            noun = "heads" if site.kind == "head" else "units"
            raise IndexError(f"unit {unit} out of range for {site.name} ({size} {noun}, "
                             f"0 to {size - 1})")
        if size is None and unit < 0:
            raise IndexError(f"unit {unit} of {site.name} is negative")


def parse(model: nn.Module, spec: Mapping[str, Any], what: str = "condition"
          ) -> dict[Site, dict[int, float]]:
    """Unit layers and per-unit weights of a condition or unit target.

    Parameters
    ----------
    model : nn.Module
    spec : mapping
        Module name → units: an index, a list of indices (weight 1), a mapping of index to
        weight, or ``{"heads": …, "units": …}``.
    what : str
        ``"condition"`` or ``"target"``, for messages.

    Returns
    -------
    dict of Site to dict of int to float

    Raises
    ------
    ValueError, IndexError, TypeError
        For an unknown module, heads of a module without an output projection, a unit out of
        range, or a value of another type.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"a {what} is a mapping of module name to units, not "
                        f"{type(spec).__name__}")
    out: dict[Site, dict[int, float]] = {}
    for name, value in spec.items():
        for heads, units in _kinds(name, value):
            site = find_site(model, name, heads)
            weights = _weights(units, f"{what} {name}", 1.0)
            _check_range(site, weights)
            out.setdefault(site, {}).update(weights)
    return out


def as_spec(units: Iterable[Unit], value: float | None = None) -> dict[str, Any]:
    """A specification from :class:`Unit` items (e.g. :func:`top_units`): ``{layer: [indices]}``
    and ``{layer: {"heads": [indices]}}``; with ``value``, ``{layer: {index: value}}`` (an
    intervention that sets them).

    Parameters
    ----------
    units : iterable of Unit
    value : float, optional

    Returns
    -------
    dict
    """
    out: dict[str, Any] = {}
    for unit in units:
        entry = out.setdefault(unit.layer, {})
        key = "heads" if unit.kind == "head" else "units"
        if value is None:
            entry.setdefault(key, []).append(unit.index)
        else:
            entry.setdefault(key, {})[unit.index] = value
    return {layer: (entry["units"] if list(entry) == ["units"] else entry)
            for layer, entry in out.items()}


# ============================================================================ reading units


def _unit_view(site: Site, t: Tensor) -> Tensor:
    """``t`` (…, width) as (…, units): heads split off and summed over their dimensions."""
    if site.kind == "head":
        return t.reshape(*t.shape[:-1], site.heads, t.shape[-1] // site.heads).sum(-1)
    return t


def _per_sample(site: Site, g: Tensor) -> Tensor:
    """Relevance per unit and sample, ``(batch, units)`` (``(1, units)`` for a tensor without
    a batch dimension)."""
    u = _unit_view(site, g.detach())
    if u.dim() == 1:
        return u.unsqueeze(0)
    return u.reshape(u.shape[0], -1, u.shape[-1]).sum(1)


def _expand(site: Site, weights: Tensor, width: int) -> Tensor:
    """Per-unit weights ``(…, units)`` spread over a head's dimensions."""
    if site.kind == "head":
        return weights.repeat_interleave(width // site.heads, dim=-1)
    return weights


def _first_tensor(obj: Any) -> Tensor | None:
    return next(iter(tensors(obj)), None)


class UnitRecorder:
    """An observer of :func:`lrp_explicit.pipeline.attribute` that reads unit layers.

    It keeps, for every call of a layer's module in the pass, the layer's tensor (the
    activation), the relevance per unit and sample (:meth:`units`), and for the layers in
    ``keep`` the full relevance tensor (:meth:`relevance`).

    Parameters
    ----------
    sites : iterable of Site
        The layers to read.
    keep : iterable of Site
        Layers whose full relevance is kept (conditions).
    strict : bool
        Raise when a layer did not run on the relevance path (else it is left out).
    """

    def __init__(self, sites: Iterable[Site], keep: Iterable[Site] = (),
                 strict: bool = False) -> None:
        self.keep = list(dict.fromkeys(keep))
        self.sites = list(dict.fromkeys([*sites, *self.keep]))
        self.strict = strict
        self.activations: dict[Site, list[Tensor]] = {}
        self.order: list[Site] = []
        self._sums: dict[Site, list[Tensor]] = {}
        self._grads: dict[Site, list[Tensor | None]] = {}
        self._handles: list[Any] = []

    def install(self, model: nn.Module) -> None:
        """Hook the modules of the layers (their rule wrappers when a composite is
        registered)."""
        for site in self.sites:
            module = model.get_submodule(site.module)
            if site.at == "input":
                handle = module.register_forward_pre_hook(self._pre(site), with_kwargs=True)
            else:
                handle = module.register_forward_hook(self._post(site))
            self._handles.append(handle)

    def _pre(self, site: Site) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._capture(site, _first_tensor((args, kwargs)))
        return hook

    def _post(self, site: Site) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._capture(site, _first_tensor(output))
        return hook

    def _capture(self, site: Site, t: Tensor | None) -> None:
        if t is None or not t.requires_grad or not torch.is_grad_enabled():
            return
        if site.kind == "head" and t.shape[-1] % site.heads:
            raise ValueError(f"{site.name}: {t.shape[-1]} features do not split into "
                             f"{site.heads} heads")
        if site not in self.activations:
            self.order.append(site)
        calls = self.activations.setdefault(site, [])
        calls.append(t)
        sums = self._sums.setdefault(site, [])
        sums.append(torch.zeros_like(_per_sample(site, t)))
        grads = self._grads.setdefault(site, [])
        grads.append(None)
        k = len(calls) - 1
        keep = site in self.keep

        def read(grad: Tensor) -> None:
            sums[k] = sums[k] + _per_sample(site, grad)
            if keep:
                grads[k] = grad.detach().clone() if grads[k] is None else grads[k] + grad

        t.register_hook(read)

    def before_backward(self, explained: Tensor) -> None:
        """Check that every layer ran on the relevance path (with ``strict``)."""
        missing = [s.name for s in self.sites if s not in self.activations]
        if self.strict and missing:
            raise ValueError(f"{', '.join(missing)} did not run on the relevance path of this "
                             "forward pass")

    def remove(self) -> None:
        """Remove the module hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def units(self) -> dict[str, Tensor]:
        """Relevance per unit, ``(batch, units)``, by layer name in forward order (the calls of
        a module that runs several times summed when their shapes agree, else the first)."""
        out = {}
        for site in self.order:
            calls = self._sums[site]
            # calls of one shape (the two texts of a pair) add up; of different shapes (tokens
            # routed to an expert) only the first is kept
            out[site.name] = sum(calls[1:], calls[0]) if len({c.shape for c in calls}) == 1 \
                else calls[0]
        return out

    def relevance(self, site: Site) -> list[Tensor]:
        """The full relevance of each call of a kept layer (zeros where none arrived)."""
        return [g if g is not None else torch.zeros_like(t.detach())
                for g, t in zip(self._grads.get(site, []), self.activations.get(site, []))]

    def kinds(self) -> dict[str, str]:
        """Layer name → kind, for the layers read."""
        return {s.name: s.kind for s in self.order}


# ============================================================================ unit targets


def _weight_tensor(site: Site, t: Tensor, weights: Mapping[int, float],
                   positions: Sequence[int | None] | None) -> Tensor:
    """Weights of ``t``'s shape: the units' weights at each sample's position (all tokens
    where it is ``None``)."""
    units = site.heads if site.kind == "head" else t.shape[-1]
    _check_range(site, weights, units)
    per_unit = torch.zeros(units, dtype=t.dtype, device=t.device)
    for unit, w in weights.items():
        per_unit[unit] = w
    per_unit = _expand(site, per_unit, t.shape[-1])
    out = torch.zeros_like(t.detach())
    if positions is None or t.dim() < 3:
        out[...] = per_unit
        return out
    for b, pos in enumerate(positions[:t.shape[0]]):
        if pos is None:
            out[b] = per_unit
        else:
            out[b, pos] = per_unit
    return out


def unit_target(recorder: UnitRecorder, weights: Mapping[Site, Mapping[int, float]],
                positions: Sequence[int | None] | None = None
                ) -> Callable[[Any], Target]:
    """A target function that explains units instead of a logit: the explained tensor is the
    layers' tensors, the initial relevance their activation times the units' weights (so a
    unit's relevance starts as its own activation).

    Parameters
    ----------
    recorder : UnitRecorder
        The observer of the same pass that holds the activations (its sites include those of
        ``weights``).
    weights : mapping of Site to mapping of int to float
        Units and weights (:func:`parse`).
    positions : sequence of int or None, optional
        The token of each sample at which the units are explained (``None``: every token).

    Returns
    -------
    callable
        ``target(output)`` → :class:`~lrp_explicit.pipeline.Target` whose ``info["scores"]``
        is each sample's weighted activation.
    """
    def target(output: Any) -> Target:
        parts, inits = [], []
        for site, w in weights.items():
            calls = recorder.activations.get(site)
            if not calls:
                raise ValueError(f"the unit layer {site.name} did not run on the relevance "
                                 "path of this forward pass")
            for t in calls:
                init = t.detach() * _weight_tensor(site, t, w, positions)
                parts.append(t.reshape(-1))
                inits.append(init.reshape(-1))
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        initial = torch.cat(inits) if len(inits) > 1 else inits[0]
        scores = _sample_scores(weights, recorder, inits)
        return Target(y, initial, {"scores": scores})

    return target


def _sample_scores(weights: Mapping[Site, Any], recorder: UnitRecorder,
                   inits: list[Tensor]) -> list[float]:
    """The weighted activation of each sample (the first dimension of the layers' tensors)."""
    total: list[float] = []
    k = 0
    for site in weights:
        for t in recorder.activations[site]:
            init = inits[k].reshape(t.shape)
            k += 1
            per = init.double().reshape(init.shape[0], -1).sum(1) if init.dim() >= 2 \
                else init.double().sum().reshape(1)
            for b, v in enumerate(per.tolist()):
                if b < len(total):
                    total[b] += v
                else:
                    total.append(v)
    return total


# ============================================================================ conditions


@dataclass
class _Chain:
    """The layers of one condition, later layers first, with their weights."""

    sites: list[Site]
    masks: list[Mapping[int, float]]
    index: int
    relevance: list[list[Tensor]] = field(default_factory=list)


def _mask(site: Site, t: Tensor, weights: Mapping[int, float]) -> Tensor:
    return _weight_tensor(site, t, weights, None)


def _repeat(batch: Prepared, m: int) -> Prepared | None:
    """``batch`` stacked ``m`` times along the batch dimension (``None`` where it cannot)."""
    if m == 1:
        return batch
    if batch.call is not None or len(batch.leaves) != 1:
        return None
    key, leaf = next(iter(batch.leaves.items()))
    size = leaf.shape[0]
    kwargs = {}
    for k, v in batch.kwargs.items():
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == size:
            kwargs[k] = v.repeat(m, *[1] * (v.dim() - 1))
        elif isinstance(v, Tensor):
            return None
        else:
            kwargs[k] = v
    return Prepared({key: make_leaf(leaf.detach().repeat(m, *[1] * (leaf.dim() - 1)))},
                    kwargs, None, None, batch.image,
                    lengths=list(batch.lengths) * m if batch.lengths is not None else None)


def conditional(model: nn.Module, batch: Prepared, composite: Composite | None,
                first: UnitRecorder, conditions: Sequence[Mapping[Site, Mapping[int, float]]],
                sites: Sequence[Site] = (), group: int = 8) -> list[Attribution]:
    """The input relevance that flows through the units of each condition.

    The pass that explained the target (its observer ``first`` kept the full relevance of
    every condition layer) gives the relevance at the latest layer of a condition; it is kept
    at the chosen units (times their weights) and explained from there, by one more pass of
    :func:`~lrp_explicit.pipeline.attribute` whose target is that layer's tensor, down to the
    next layer of the condition, and so on to the inputs. Conditions with the same layers
    share their passes, stacked along the batch dimension (no rule mixes samples).

    Parameters
    ----------
    model : nn.Module
    batch : Prepared
        The batch of the first pass.
    composite : Composite or None
    first : UnitRecorder
        The first pass's observer, with every condition layer in ``keep``.
    conditions : sequence of mapping
        Each a mapping of Site to unit weights (:func:`parse`).
    sites : sequence of Site
        Unit layers to read in the last pass (their relevance per unit flows through the
        condition).
    group : int
        Most conditions stacked in one pass.

    Returns
    -------
    list of Attribution
        One per condition, from its last pass: ``relevance`` the conditional input relevance
        (batch of the first pass) and ``target.info["units"]`` the relevance per unit of the
        layers of ``sites`` before the condition's earliest layer, ``(batch, units)``.
    """
    size = next(iter(batch.leaves.values())).shape[0] if batch.leaves else 1
    order = {s: i for i, s in enumerate(first.order)}
    results: list[Attribution | None] = [None] * len(conditions)
    chains: dict[tuple[Site, ...], list[int]] = {}
    for c, cond in enumerate(conditions):
        ran = [s for s in cond if s in order]
        if len(ran) < len(cond) or not cond:
            results[c] = None  # a layer that did not run: nothing flows through it
            continue
        chain = tuple(sorted(cond, key=lambda s: -order[s]))
        chains.setdefault(chain, []).append(c)
    for chain, members in chains.items():
        for start in range(0, len(members), max(1, group // max(size, 1))):
            part = members[start:start + max(1, group // max(size, 1))]
            stacked = _repeat(batch, len(part))
            if stacked is None:
                for c in part:
                    results[c] = _run_chain(model, batch, composite, first, chain,
                                            [conditions[c]], sites, size)[0]
            else:
                got = _run_chain(model, stacked, composite, first, chain,
                                 [conditions[c] for c in part], sites, size)
                for c, r in zip(part, got):
                    results[c] = r
    return [r if r is not None else _zero(batch, first, sites, size) for r in results]


def _zero(batch: Prepared, first: UnitRecorder, sites: Sequence[Site],
          size: int) -> Attribution:
    """The result of a condition through which nothing flows: zero relevance."""
    relevance = {k: torch.zeros_like(v.detach()) for k, v in batch.leaves.items()}
    units = {s.name: torch.zeros(size, first.units()[s.name].shape[-1])
             for s in sites if s.name in first.units()}
    dummy = torch.zeros(())
    return Attribution([relevance], {}, None, Target(dummy, dummy, {"units": units}), None)


def _run_chain(model: nn.Module, batch: Prepared, composite: Composite | None,
               first: UnitRecorder, chain: Sequence[Site],
               conditions: Sequence[Mapping[Site, Mapping[int, float]]],
               sites: Sequence[Site], size: int) -> list[Attribution]:
    """The passes of conditions that share the layers ``chain`` (later first); ``batch`` holds
    the first pass's batch once per condition."""
    m = len(conditions)
    top = chain[0]
    current = [torch.cat([g * _mask(top, g, cond[top]) for cond in conditions])
               for g in first.relevance(top)]
    last_units: dict[str, Tensor] = {}
    result: Attribution | None = None
    for i, site in enumerate(chain):
        below = chain[i + 1] if i + 1 < len(chain) else None
        earliest = first.order.index(chain[-1])
        read = [s for s in sites if s in first.order and first.order.index(s) < earliest] \
            if below is None else []
        recorder = UnitRecorder([*read, site], keep=[below] if below is not None else [])
        start = list(current)

        def target(output: Any, site: Site = site, start: list[Tensor] = start,
                   recorder: UnitRecorder = recorder) -> Target:
            calls = recorder.activations.get(site, [])
            if len(calls) != len(start):
                raise ValueError(f"{site.name} ran {len(calls)} times, not {len(start)} as in "
                                 "the first pass")
            y = torch.cat([t.reshape(-1) for t in calls])
            init = torch.cat([r.to(y.dtype).reshape(-1) for r in start])
            return Target(y, init)

        result = attribute(model, batch, target, composite, observers=[recorder],
                           label=f"<{site.name}>")
        if below is not None:
            current = [g * torch.cat([_mask(below, g[:size], cond[below])
                                      for cond in conditions]) for g in
                       recorder.relevance(below)]
        else:
            last_units = {k: v for k, v in recorder.units().items()
                          if k in {s.name for s in read}}
    assert result is not None
    out = []
    for c in range(m):
        rows = slice(c * size, (c + 1) * size)
        relevance = {k: (v[rows] if v is not None else None)
                     for k, v in result.relevance.items()}
        units = {k: v[rows] if v.shape[0] == size * m else v for k, v in last_units.items()}
        out.append(Attribution([relevance], {}, result.output, Target(
            result.target.explained, result.target.initial, {"units": units}), composite,
            result.unruled))
    return out


# ============================================================================ top units


def top_units(units: Mapping[str, Tensor], pattern: str = "*", k: int = 10,
              kinds: Mapping[str, str] | None = None, largest: bool = True,
              absolute: bool = False) -> list[Unit]:
    """The ``k`` most relevant units of the layers whose names match ``pattern``.

    Parameters
    ----------
    units : mapping of str to Tensor
        Layer name → relevance per unit (1-d).
    pattern : str
        ``fnmatch`` pattern of layer names (``"*mlp*"``, ``"model.layers.3.self_attn"``).
    k : int
        How many.
    kinds : mapping of str to str, optional
        Layer name → kind (``"neuron"``, ``"head"``, ``"dim"``).
    largest : bool
        The largest relevance first (else the most negative first).
    absolute : bool
        Rank by absolute relevance.

    Returns
    -------
    list of Unit

    Raises
    ------
    ValueError
        When ``pattern`` matches no layer (the message lists some).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    names = [n for n in units if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        shown = ", ".join(list(units)[:6]) + (" …" if len(units) > 6 else "")
        raise ValueError(f"{pattern!r} matches no unit layer; layers: {shown or 'none'}")
    values = torch.cat([units[n].detach().double().reshape(-1).cpu() for n in names])
    # the layer of flat index j: the first layer whose running end lies past j
    ends = torch.tensor([units[n].numel() for n in names]).cumsum(0)
    key = values.abs() if absolute else (values if largest else -values)
    order = torch.argsort(key, descending=True, stable=True)[:k]
    layers = torch.searchsorted(ends, order, right=True)
    kinds = kinds or {}
    out = []
    for j, layer in zip(order.tolist(), layers.tolist()):
        start = int(ends[layer - 1]) if layer else 0
        out.append(Unit(names[layer], kinds.get(names[layer], "neuron"), j - start,
                        float(values[j])))
    return out


# ============================================================================ interventions


def _changes(value: Any, what: str) -> tuple[dict[int, float], dict[int, float]]:
    """``(set, scale)`` of one entry of :func:`intervene`."""
    if isinstance(value, Mapping) and any(k in ("set", "scale") for k in value):
        extra = [k for k in value if k not in ("set", "scale")]
        if extra:
            raise ValueError(f"{what}: unknown keys {extra!r} beside 'set'/'scale'")
        return (_weights(value.get("set", {}), what, None),
                _weights(value.get("scale", {}), what, None))
    return _weights(value, what, None), {}


def _apply(site: Site, t: Tensor, setting: Mapping[int, float],
           scaling: Mapping[int, float]) -> Tensor:
    width = t.shape[-1]
    units = site.heads if site.kind == "head" else width
    _check_range(site, [*setting, *scaling], units)
    if scaling:
        factor = torch.ones(units, dtype=t.dtype, device=t.device)
        for unit, s in scaling.items():
            factor[unit] = s
        factor = _expand(site, factor, width)
        t = lf.identity(lambda x: x * factor, t) if t.requires_grad else t * factor
    if setting:
        mask = torch.zeros(units, dtype=torch.bool, device=t.device)
        values = torch.zeros(units, dtype=t.dtype, device=t.device)
        for unit, v in setting.items():
            mask[unit] = True
            values[unit] = v
        t = torch.where(_expand(site, mask, width), _expand(site, values, width), t)
    return t


def _replace_first(obj: Any, new: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` (a tensor, or a tuple/list whose first item is one) with its first tensor
    replaced."""
    if isinstance(obj, Tensor):
        return new(obj)
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        items = [new(obj[0]), *obj[1:]]
        if type(obj) in (tuple, list):
            return type(obj)(items)
        return type(obj)(*items)  # a named tuple
    if isinstance(obj, Mapping):  # a ModelOutput: its first field
        key = next(iter(obj))
        if isinstance(obj[key], Tensor):
            obj[key] = new(obj[key])
            return obj
    raise TypeError(f"cannot change units of an output of type {type(obj).__name__}")


@contextlib.contextmanager
def intervene(model: nn.Module, changes: Mapping[str, Any]) -> Iterator[nn.Module]:
    """Set or scale units in the forward pass of ``model`` while the block runs.

    Parameters
    ----------
    model : nn.Module
        The model; forward hooks are added to the modules of the unit layers (the modules
        themselves, so that an explanation inside the block sees the changed forward too) and
        removed on exit, also when the block raises: the model is afterwards exactly as it was.
    changes : mapping
        Module name (as for :func:`find_site`) → ``{unit: value}`` (set the unit to the value),
        ``{"set": {…}, "scale": {unit: factor}}``, or ``{"heads": …}`` for heads (a head set to
        ``v`` has every dimension ``v``). Units are changed at every token.

    Yields
    ------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError, IndexError, TypeError
        For unknown modules, units out of range, or values that are not numbers (before any
        hook is added).

    Notes
    -----
    A set unit is constant (``torch.where``: no relevance flows into it); a scaled unit keeps
    the identity rule (``R_x = R``), so explanations of the changed model stay conservative.

    Examples
    --------
    >>> with lrp_explicit.intervene(model, {"model.layers.1.mlp.act_fn": {17: 0.0}}):
    ...     logits = model(ids).logits
    """
    if not isinstance(changes, Mapping):
        raise TypeError(f"changes must be a mapping of module name to units, not "
                        f"{type(changes).__name__}")
    plan: list[tuple[Site, dict[int, float], dict[int, float]]] = []
    for name, value in changes.items():
        for heads, entry in _kinds(name, value):
            site = find_site(model, name, heads)
            setting, scaling = _changes(entry, f"intervene {name}")
            _check_range(site, [*setting, *scaling])
            plan.append((site, setting, scaling))
    handles: list[Any] = []
    try:
        for site, setting, scaling in plan:
            module = _original(model.get_submodule(site.module))

            def change(t: Tensor, site: Site = site, setting: dict = setting,
                       scaling: dict = scaling) -> Tensor:
                return _apply(site, t, setting, scaling)

            if site.at == "input":
                def pre(module: nn.Module, args: tuple, kwargs: dict,
                        change: Callable[[Tensor], Tensor] = change) -> Any:
                    if args and isinstance(args[0], Tensor):
                        return (change(args[0]), *args[1:]), kwargs
                    key = next(k for k, v in kwargs.items() if isinstance(v, Tensor))
                    return args, {**kwargs, key: change(kwargs[key])}

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module: nn.Module, args: Any, output: Any,
                         change: Callable[[Tensor], Tensor] = change) -> Any:
                    return _replace_first(output, change)

                handles.append(module.register_forward_hook(post))
        yield model
    finally:
        for handle in reversed(handles):
            handle.remove()
