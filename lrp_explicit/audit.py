"""Conservation audit: where relevance is conserved, absorbed, leaked, or turns non-finite.

:func:`audit` explains one output of a model with a composite and keeps a ledger of the backward
pass at two levels:

* **modules** — for every module on the relevance path, the relevance that *enters* it at its
  outputs (the gradient of its output tensors: everything its consumers pass back to it) and
  the relevance that *leaves* it through its tensor inputs. Inputs are measured on a private
  alias (``x.view_as(x)``, same values and storage) handed to the module in place of ``x``, so
  what leaves through an input is what *this* module passes on, not what other consumers of the
  same tensor (a residual branch) add to it. ``absorbed = at output − at inputs``.
* **autograd nodes** — every node of the backward graph is assigned to the innermost module
  running when it was created (by its sequence number) and its own balance
  ``Σ relevance in − Σ relevance passed on`` is attributed to an absorber kind
  (:data:`ABSORBERS`): the ``bias`` or ``epsilon`` of an ε-rule, the AttnLRP ``softmax``, a
  ``constant`` operand; or, undocumented, a plain autograd node ``autograd:<Node>`` (an op
  without rule), a foreign ``function:<Function>``, and whatever relevance entered or left a
  module some other way (``unaccounted``).

A stop rule (CP-LRP attention weights and gates, q/k branches held constant) moves no relevance
itself: the stopped tensor is a constant, the next rule gives its share to the other operand
(``A·V`` → all to ``V``, ``gate ⊙ x`` → all to ``x``) or, in a sum, the constant keeps it
(``constant``). The audit leaves the model as it was: the composite (unless it was registered
before) and every hook are removed, also when the forward or the backward raises.
"""
from __future__ import annotations

import bisect
import contextlib
import fnmatch
import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence, Union

import torch
from torch import Tensor, nn

from . import composites as _registry
from .composites.base import Composite, carrier
from .dispatch import UnruledOpWarning
from .rules import Rule

__all__ = ["audit", "check", "zero_bias", "documented", "AuditReport", "ModuleRecord",
           "CheckResult", "UnruledOp", "Leak", "ABSORBERS", "TARGET", "INPUTS", "ROOT"]

#: Documented absorbers: relevance that an LRP rule is meant to drop.
ABSORBERS: dict[str, str] = {
    "bias": "bias of an ε-rule (Linear, Conv, addmm, LayerNorm); also its ε share",
    "epsilon": "ε-stabiliser of an ε-rule (linear maps, sums, matmul, norms)",
    "softmax": "AttnLRP softmax rule (Gradient×Input), also inside sdpa attention",
    "constant": "constant operand: attention mask, position or token-type embedding, "
                "a stopped (CP-LRP) branch, values written by masked_fill/where",
}
TARGET, INPUTS, ROOT = "<target>", "<inputs>", "<root>"


def documented(kind: str) -> bool:
    """True for the kinds of :data:`ABSORBERS` and for ``rule:<Function>``, an LRP rule of this
    package that the audit has no finer kind for; False for ``autograd:<Node>`` (plain autograd,
    an op without rule), ``function:<Function>`` (a foreign autograd Function) and
    ``unaccounted``."""
    return kind in ABSORBERS or kind.startswith("rule:")
BIAS_PATTERNS = ("bias", "*_bias")

_LINEAR = {"LinearEpsilonFunction", "AddmmEpsilonFunction", "BilinearUniformFunction",
           "LayerNormFunction"}
_ADD = {"AddEpsilonFunction", "_AddInplaceFunction", "_IndexAddFunction"}
_EPSILON = {"MatmulUniformFunction", "ReductionEpsilonFunction", "RMSNormFunction",
            "VectorNormFunction", "UniformFunction", "_UniformInplaceFunction", "StopFunction"}
_CONSTANT_NODES = ("MaskedFill", "Where", "IndexPut", "MaskedScatter")
_seq_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)

Inputs = Union[Tensor, Mapping[str, Any], Callable[[nn.Module], Any]]
Target = Union[int, Sequence[int], Callable[[Any], Tensor], Tensor, None]


def _next_seq() -> int:
    """The sequence number the next autograd node of this thread will get."""
    if _seq_nr is not None:
        return _seq_nr()
    probe = torch.zeros((), requires_grad=True)  # pragma: no cover - older torch
    return probe.view(()).grad_fn._sequence_nr() + 1


# ============================================================================ zero_bias


def _is_bias(name: str, patterns: Sequence[str] = BIAS_PATTERNS) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(leaf, p) for p in patterns)


@contextlib.contextmanager
def zero_bias(model: nn.Module, patterns: Sequence[str] = BIAS_PATTERNS) -> Iterator[nn.Module]:
    """Set every bias parameter of ``model`` to zero inside a ``with`` block.

    On exit (also on error) the original values are copied back bit for bit, into the very same
    parameter objects. Buffers are never touched (GPT-2's causal-mask buffer, for example).

    Parameters
    ----------
    model : nn.Module
        The model; it may carry a composite.
    patterns : sequence of str
        ``fnmatch`` patterns for the last component of parameter names; the default matches
        ``bias`` (Linear, Conv, LayerNorm, GPT-2's Conv1D, BERT's prediction-head bias) and
        ``*_bias`` (``in_proj_bias``).

    Examples
    --------
    >>> with lrp_explicit.zero_bias(model):
    ...     report = lrp_explicit.audit(model, x, target=3, composite="cp-lrp")
    >>> abs(report.absorbed) < 1e-8 * abs(report.explained)
    True
    """
    saved = []
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if _is_bias(name, patterns):
                    saved.append((param, param.detach().clone()))
                    param.zero_()
        yield model
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


# ============================================================================ the report


@dataclass
class ModuleRecord:
    """Relevance ledger of one module (summed over its calls).

    Attributes
    ----------
    name, type, rule : str
        Qualified name (``<root>`` for the model; ``<target>`` and ``<inputs>`` for what runs
        after and before it), class of the original module, and the module rule wrapping it
        (``"ops"``: its functional calls are ruled by the op table).
    calls : int
        How often it ran in the explained forward.
    relevance_at_output, relevance_at_input : float
        Σ relevance entering the module at its outputs / leaving it through its tensor inputs.
    absorbed : float
        ``relevance_at_output − relevance_at_input``.
    absorbed_by : dict
        ``absorbed`` split by absorber kind, over the module and its submodules.
    unaccounted : float
        The part of ``absorbed`` no autograd node inside explains (relevance that entered or
        left other than through outputs and tensor inputs).
    max_abs : float
        Largest finite ``|R|`` at its outputs and inputs.
    nonfinite_output, nonfinite_input, nonfinite_forward : bool
        NaN/Inf in the relevance at its outputs, at its inputs, or in its forward outputs.
    own_absorbed, own_absorbed_by, own_unaccounted
        The same, for the module's own code only (submodules excluded).
    """

    name: str
    type: str
    rule: str
    calls: int = 0
    relevance_at_output: float = 0.0
    relevance_at_input: float = 0.0
    absorbed: float = 0.0
    absorbed_by: dict[str, float] = field(default_factory=dict)
    unaccounted: float = 0.0
    max_abs: float = 0.0
    nonfinite_output: bool = False
    nonfinite_input: bool = False
    nonfinite_forward: bool = False
    own_absorbed: float = 0.0
    own_absorbed_by: dict[str, float] = field(default_factory=dict)
    own_unaccounted: float = 0.0

    def undocumented(self, own: bool = False) -> float:
        """Absorbed relevance that no documented absorber explains (see :func:`documented`)."""
        by = self.own_absorbed_by if own else self.absorbed_by
        rest = self.own_unaccounted if own else self.unaccounted
        return rest + sum(v for k, v in by.items() if not documented(k))


@dataclass(frozen=True)
class UnruledOp:
    """An op on the relevance path without rule: its name, module path and number of calls."""

    op: str
    module: str
    count: int


@dataclass
class AuditReport:
    """The result of :func:`audit`.

    Attributes
    ----------
    model, composite, dtype : str
        What was explained, with which composite, in which dtype.
    explained : float
        Σ initial relevance (the explained logit(s), or the given relevance tensor).
    scale : float
        Σ |initial relevance|, the unit of relative tolerances.
    input_total : float
        Σ relevance of the explained inputs.
    absorbed, absorbed_by, unaccounted
        ``explained − input_total``, split by absorber kind over the whole backward pass.
    modules : list of ModuleRecord
        Modules on the relevance path in model order, after ``<target>``.
    recorded : dict of str to Tensor
        Relevance at the first on-path output of the modules asked for with ``record``
        (``name`` for the first call, ``name#k`` for call ``k ≥ 1``).
    input_relevance : dict of str to Tensor
        Relevance of each explained input (``x.grad`` of a plain explanation).
    unruled : list of UnruledOp
        Ops on the relevance path without a rule (including foreign autograd Functions).
    first_nonfinite, first_nonfinite_op : str or None
        Module, and autograd node, where relevance first became NaN/Inf in the backward pass
        (``<target>`` with op ``initial relevance`` if it started that way).
    first_nonfinite_forward : str or None
        Innermost module whose forward output on the relevance path was non-finite first.
    """

    model: str
    composite: str
    dtype: str
    explained: float
    scale: float
    input_total: float
    absorbed_by: dict[str, float]
    modules: list[ModuleRecord]
    recorded: dict[str, Tensor] = field(default_factory=dict)
    input_relevance: dict[str, Tensor] = field(default_factory=dict)
    unruled: list[UnruledOp] = field(default_factory=list)
    first_nonfinite: str | None = None
    first_nonfinite_op: str | None = None
    first_nonfinite_forward: str | None = None

    @property
    def absorbed(self) -> float:
        """``explained − input_total``."""
        return self.explained - self.input_total

    @property
    def unaccounted(self) -> float:
        """The part of :attr:`absorbed` that no autograd node explains."""
        return self.absorbed - sum(self.absorbed_by.values())

    def __getitem__(self, name: str) -> ModuleRecord:
        for record in self.modules:
            if record.name == name:
                return record
        raise KeyError(f"no module {name!r} on the relevance path; "
                       f"modules: {[r.name for r in self.modules]}")

    def check(self, rtol: float = 1e-6, atol: float = 0.0) -> "CheckResult":
        """Judge this report as :func:`check` does.

        Parameters
        ----------
        rtol, atol : float
            A module leaks when the relevance it absorbs beyond the documented absorbers
            exceeds ``atol + rtol·scale``.

        Returns
        -------
        CheckResult
        """
        return _analyse(self, rtol, atol)

    # ------------------------------------------------------------------ export

    def to_records(self) -> list[dict[str, Any]]:
        """One plain ``dict`` per module (JSON-ready apart from non-finite floats)."""
        return [asdict(r) for r in self.modules]

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain Python data; recorded tensors as shape and sum."""
        out = {k: getattr(self, k) for k in (
            "model", "composite", "dtype", "explained", "scale", "input_total", "absorbed",
            "absorbed_by", "unaccounted", "first_nonfinite", "first_nonfinite_op",
            "first_nonfinite_forward")}
        out["unruled"] = [asdict(u) for u in self.unruled]
        out["inputs"] = {k: {"shape": list(v.shape), "sum": _sum(v)}
                         for k, v in self.input_relevance.items()}
        out["recorded"] = {k: {"shape": list(v.shape), "sum": _sum(v)}
                           for k, v in self.recorded.items()}
        out["modules"] = self.to_records()
        return out

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as strict JSON (NaN and ±Inf become ``"NaN"``, ``"Infinity"``…)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(_jsonable(self.to_dict()), allow_nan=False, **kwargs)

    # ------------------------------------------------------------------ rendering

    def table(self, depth: int | None = None, threshold: float = 1e-9) -> str:
        """Render the report as a fixed-width text table.

        Parameters
        ----------
        depth : int, optional
            Show modules up to this many name components (``model.layers.0`` is 3).
        threshold : float
            Absorbers below ``threshold · scale`` are not listed in the "absorbed by" column.
        """
        pct = 100 * self.input_total / self.explained if self.explained else float("nan")
        lines = [
            f"Conservation audit of {self.model} with {self.composite} ({self.dtype})",
            f"explained output {_num(self.explained)}   input relevance "
            f"{_num(self.input_total)} ({pct:.4g} %)   absorbed {_num(self.absorbed)}",
            f"absorbed by: {_by(self.absorbed_by, threshold * self.scale) or 'nothing'}"
            + (f"   unaccounted {_num(self.unaccounted)}"
               if abs(self.unaccounted) > threshold * self.scale else ""),
            "unruled ops: " + (", ".join(f"{u.op} in '{u.module}' ×{u.count}"
                                         for u in self.unruled) or "none"),
        ]
        if self.first_nonfinite or self.first_nonfinite_forward:
            lines.append(f"non-finite: relevance first at '{self.first_nonfinite}' "
                         f"({self.first_nonfinite_op}); forward first at "
                         f"'{self.first_nonfinite_forward}'")
        head = ("module", "type", "rule", "R at output", "R at inputs", "absorbed",
                "absorbed by", "max |R|", "flags")
        rows = []
        for r in self.modules:
            if depth is not None and r.name[0] != "<" and r.name.count(".") >= depth:
                continue
            flags = [f for f, on in (("NaN-out", r.nonfinite_output), ("NaN-in", r.nonfinite_input),
                                     ("NaN-fwd", r.nonfinite_forward)) if on]
            if r.calls > 1:
                flags.append(f"calls={r.calls}")
            rows.append((r.name, r.type, r.rule, _num(r.relevance_at_output),
                         _num(r.relevance_at_input), _num(r.absorbed),
                         _by(r.absorbed_by, threshold * self.scale), _num(r.max_abs),
                         " ".join(flags)))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        fmt = "  ".join(f"{{:{'>' if 3 <= i <= 5 or i == 7 else '<'}{w}}}"
                        for i, w in enumerate(widths))
        lines += ["", fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*row).rstrip() for row in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _sum(t: Tensor) -> float:
    return float(t.detach().sum(dtype=torch.float64))


def _num(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)


def _by(by: Mapping[str, float], cut: float) -> str:
    items = sorted(((k, v) for k, v in by.items() if not abs(v) <= cut), key=lambda kv: -abs(kv[1]))
    return ", ".join(f"{k} {_num(v)}" for k, v in items)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ============================================================================ check


@dataclass(frozen=True)
class Leak:
    """A module whose relevance is not conserved by more than the tolerance and whose loss no
    documented absorber explains. ``inherited`` is True when the undocumented part lies in a
    submodule (which is listed itself) rather than in the module's own code."""

    module: str
    type: str
    rule: str
    absorbed: float
    undocumented: float
    absorbed_by: dict[str, float]
    inherited: bool


@dataclass
class CheckResult:
    """The result of :func:`check` (also :meth:`AuditReport.check`).

    Attributes
    ----------
    unruled : list of UnruledOp
        Ops (and foreign autograd Functions) on the relevance path without a rule.
    leaks : list of Leak
        Modules not conserving beyond the tolerance with no documented absorber, innermost and
        closest to the output first.
    first_nonfinite, first_nonfinite_op, first_nonfinite_forward : str or None
        Where relevance (backward) and activations (forward) first became NaN/Inf.
    tolerance : float
        The absolute tolerance used (``atol + rtol·scale``).
    report : AuditReport
        The underlying audit.
    """

    unruled: list[UnruledOp]
    leaks: list[Leak]
    first_nonfinite: str | None
    first_nonfinite_op: str | None
    first_nonfinite_forward: str | None
    tolerance: float
    report: AuditReport

    @property
    def ok(self) -> bool:
        """True when nothing is unruled, leaking or non-finite."""
        return not (self.unruled or self.leaks or self.first_nonfinite
                    or self.first_nonfinite_forward)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (without the underlying report)."""
        return {"ok": self.ok, "tolerance": self.tolerance,
                "unruled": [asdict(u) for u in self.unruled],
                "leaks": [asdict(k) for k in self.leaks],
                "first_nonfinite": self.first_nonfinite,
                "first_nonfinite_op": self.first_nonfinite_op,
                "first_nonfinite_forward": self.first_nonfinite_forward}

    def __str__(self) -> str:
        r = self.report
        lines = [f"Check of {r.model} with {r.composite}: "
                 + ("OK" if self.ok else "problems found") + f" (tolerance {self.tolerance:.3g})"]
        for u in self.unruled:
            lines.append(f"  unruled op {u.op} in module '{u.module}' ({u.count} call"
                         f"{'s' if u.count != 1 else ''})")
        own = [k for k in self.leaks if not k.inherited]
        for k in own:
            lines.append(f"  not conserved: '{k.module}' ({k.type}, {k.rule}) absorbs "
                         f"{_num(k.absorbed)}, undocumented {_num(k.undocumented)}"
                         + (f" [{_by(k.absorbed_by, self.tolerance)}]" if k.absorbed_by else ""))
        if len(self.leaks) > len(own):
            lines.append(f"  (+{len(self.leaks) - len(own)} enclosing modules)")
        if self.first_nonfinite:
            lines.append(f"  relevance first non-finite in '{self.first_nonfinite}' "
                         f"({self.first_nonfinite_op})")
        if self.first_nonfinite_forward:
            lines.append(f"  forward first non-finite in '{self.first_nonfinite_forward}'")
        return "\n".join(lines)


def _analyse(report: AuditReport, rtol: float, atol: float) -> CheckResult:
    tol = atol + rtol * report.scale
    leaks = []
    for r in report.modules:
        undocumented = r.undocumented()
        if abs(r.absorbed) > tol and not abs(undocumented) <= tol:
            leaks.append(Leak(r.name, r.type, r.rule, r.absorbed, undocumented,
                              dict(r.absorbed_by), inherited=abs(r.undocumented(own=True)) <= tol))
    order = {r.name: i for i, r in enumerate(report.modules)}
    leaks.sort(key=lambda k: (k.inherited, -order[k.module]))
    return CheckResult(list(report.unruled), leaks, report.first_nonfinite,
                       report.first_nonfinite_op, report.first_nonfinite_forward, tol, report)


# ============================================================================ the ledger


@dataclass(eq=False)
class _Call:
    """One call of a hooked module during the explained forward."""

    name: str
    module: nn.Module
    parent: "_Call | None"
    index: int
    start: int
    end: int = -1
    record: bool = False
    alias_nodes: list = field(default_factory=list)
    out_sum: list = field(default_factory=list)
    in_sum: list = field(default_factory=list)
    max_abs: list = field(default_factory=list)
    nonfinite_out: list = field(default_factory=list)
    nonfinite_in: list = field(default_factory=list)
    in_orders: list = field(default_factory=list)
    forward_out: Tensor | None = None
    forward_in: Tensor | None = None
    recorded: Tensor | None = None
    recorded_like: Tensor | None = None
    has_path: bool = False


@dataclass(eq=False)
class _Node:
    node: Any
    owner: _Call | None
    kind: str | None
    live: tuple[bool, ...]
    name: str
    order: int = -1
    balance: Any = None
    finite_out: list = field(default_factory=list)
    finite_in: list = field(default_factory=list)


def _tensors(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    """Tensors in ``obj`` (nested tuples, lists and dicts, e.g. a ``ModelOutput``)."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item, depth + 1)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor], depth: int = 0) -> Any:
    """Apply ``fn`` to the tensors in ``obj`` (tuples, lists, dicts, ``ModelOutput``), rebuilding
    containers only where something changed; mutable mappings are updated in place."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if depth >= 4:
        return obj
    if isinstance(obj, (tuple, list)):
        items = [_map_tensors(o, fn, depth + 1) for o in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, Mapping):
        items = {k: _map_tensors(v, fn, depth + 1) for k, v in obj.items()}
        changed = {k: v for k, v in items.items() if v is not obj[k]}
        if not changed:
            return obj
        if type(obj) is dict:
            return items
        if isinstance(obj, MutableMapping):
            for k, v in changed.items():
                obj[k] = v
        return obj
    return obj


def _stats(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    finite = torch.isfinite(t)
    total = t.sum(dtype=torch.float64)
    big = torch.where(finite, t.abs(), 0).amax() if t.numel() else t.new_zeros(())
    return total, big, ~finite.all()


class _Ledger:
    """Module hooks (forward) and tensor/node hooks (backward) of one audit."""

    def __init__(self, model: nn.Module, record: Sequence[str | type]) -> None:
        self.model = model
        self.record = list(record)
        self.calls: list[_Call] = []
        self.done: list[_Call] = []
        self.stack: list[_Call] = []
        self.handles: list = []
        self.counter = itertools.count()
        self.names: dict[int, tuple[str, nn.Module]] = {}

    # ------------------------------------------------------------------ forward hooks

    def install(self) -> None:
        skip: set[int] = set()
        for name, module in self.model.named_modules():
            if id(module) in skip:
                continue
            if isinstance(module, Rule):
                skip.update(id(m) for m in module.modules() if m is not module)
            self.names[id(module)] = (name or ROOT, module)
            self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _wants(self, name: str, module: nn.Module) -> bool:
        original = module.module if isinstance(module, Rule) else module
        return any(fnmatch.fnmatchcase(name, p) if isinstance(p, str) else isinstance(original, p)
                   for p in self.record)

    def _pre(self, module, args, kwargs):
        name, _ = self.names[id(module)]
        call = _Call(name, module, self.stack[-1] if self.stack else None, len(self.calls),
                     _next_seq(), record=self._wants(name, module))
        self.calls.append(call)
        self.stack.append(call)
        memo: dict[int, Tensor] = {}
        with torch._C.DisableTorchFunction():
            args, kwargs = _map_tensors((args, kwargs), lambda t: self._alias(t, call, memo, True))
        return (args, kwargs) if memo else None

    def _post(self, module, args, output):
        call = self.stack.pop()
        call.end = _next_seq()  # before the output aliases: they belong to no module
        self.done.append(call)
        memo: dict[int, Tensor] = {}
        with torch._C.DisableTorchFunction():
            output = _map_tensors(output, lambda t: self._alias(t, call, memo, False))
        return output if memo else None

    def _alias(self, t: Tensor, call: _Call, memo: dict[int, Tensor], is_input: bool) -> Tensor:
        """A private alias of an on-path input or output, so that its gradient is exactly the
        relevance crossing this module's boundary (not that of other users of ``t``)."""
        if not t.requires_grad:
            return t
        if id(t) in memo:
            return memo[id(t)]
        alias = t.view_as(t)
        alias.__dict__.update(t.__dict__)  # keep tags (e.g. CP-LRP gates)
        memo[id(t)] = alias
        call.has_path = True
        call.alias_nodes.append(alias.grad_fn)
        finite = torch.isfinite(t).all()
        if is_input:
            call.forward_in = finite if call.forward_in is None else call.forward_in & finite
            alias.register_hook(self._input_hook(call))
        else:
            call.forward_out = finite if call.forward_out is None else call.forward_out & finite
            first = len(memo) == 1
            if first and call.record:
                call.recorded_like = t
            alias.register_hook(self._output_hook(call, first))
        return alias

    # ------------------------------------------------------------------ backward hooks

    def _output_hook(self, call: _Call, first: bool):
        def hook(grad: Tensor | None) -> None:
            if grad is None:
                return
            total, big, bad = _stats(grad)
            call.out_sum.append(total)
            call.max_abs.append(big)
            call.nonfinite_out.append(bad)
            if first and call.record:
                call.recorded = grad.detach().clone()
        return hook

    def _input_hook(self, call: _Call):
        def hook(grad: Tensor | None) -> None:
            if grad is None:
                return
            total, big, bad = _stats(grad)
            call.in_sum.append(total)
            call.max_abs.append(big)
            call.nonfinite_in.append(bad)
            call.in_orders.append((next(self.counter), bad))
        return hook

    # ------------------------------------------------------------------ the graph

    def hook_graph(self, roots: Sequence[Any]) -> tuple[list[_Node], list[Tensor]]:
        """Hook every node reachable from ``roots``; return the nodes and the leaves."""
        aliases = {id(n) for c in self.calls for n in c.alias_nodes}
        starts = [c.start for c in self.calls]
        bias_cache: dict[int, bool] = {}
        nodes: list[_Node] = []
        leaves: list[Tensor] = []
        seen: dict[int, Any] = {}  # holds the node objects, so that their ids stay unique
        stack = [r for r in roots if r is not None]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            edges = node.next_functions
            stack.extend(n for n, _ in edges if n is not None)
            if type(node).__name__ == "AccumulateGrad":
                if not any(node.variable is t for t in leaves):
                    leaves.append(node.variable)
                continue
            if id(node) in aliases:
                continue
            entry = self._classify(node, edges, starts, bias_cache)
            node.register_hook(self._node_hook(entry))
            nodes.append(entry)
        return nodes, leaves

    def _owner(self, seq: int, starts: list[int]) -> _Call | None:
        i = bisect.bisect_right(starts, seq) - 1
        call = self.calls[i] if i >= 0 else None
        while call is not None and not seq < call.end:
            call = call.parent
        return call

    def _classify(self, node, edges, starts, bias_cache) -> _Node:
        owner = self._owner(node._sequence_nr(), starts)
        live = tuple(n is not None for n, _ in edges)
        cls = getattr(type(node), "_forward_cls", None)
        name = type(node).__name__
        kind: str | None
        if cls is None:
            kind = "constant" if name.startswith(_CONSTANT_NODES) else f"autograd:{name}"
        elif not (cls.__module__ or "").startswith("lrp_explicit"):
            name = cls.__qualname__
            kind = f"function:{name}"
        else:
            fn = cls.__name__
            name = fn
            if fn == "SoftmaxFunction":
                kind = "softmax"
            elif fn == "AttentionFunction":
                kind = None  # decided in the hook: softmax unless q and k get nothing
            elif fn in _LINEAR:
                module = owner.module if owner is not None else None
                if module is not None and id(module) not in bias_cache:
                    bias_cache[id(module)] = _has_bias(module)
                kind = "bias" if module is None or bias_cache[id(module)] else "epsilon"
            elif fn in _ADD:
                kind = "constant" if sum(live) < 2 else "epsilon"
            elif fn in _EPSILON:
                kind = "epsilon"
            else:
                kind = f"rule:{fn}"
        return _Node(node, owner, kind, live, name)

    def _node_hook(self, entry: _Node):
        def hook(grad_inputs, grad_outputs) -> None:
            entry.order = next(self.counter)
            passed = [g for g, on in zip(grad_inputs, entry.live) if on and g is not None]
            received = [g for g in grad_outputs if g is not None]
            entry.balance = (sum((g.sum(dtype=torch.float64) for g in received), 0.0)
                             - sum((g.sum(dtype=torch.float64) for g in passed), 0.0))
            entry.finite_out = [torch.isfinite(g).all() for g in received]
            entry.finite_in = [torch.isfinite(g).all() for g in passed]
            if entry.kind is None:
                qk = [g for g, on in list(zip(grad_inputs, entry.live))[:2] if on and g is not None]
                entry.kind = "softmax" if qk else "epsilon"
        return hook


def _has_bias(module: nn.Module) -> bool:
    """True if ``module`` (or the module its rule wraps) has a non-zero bias parameter."""
    inner = module.module if isinstance(module, Rule) else module
    return any(_is_bias(n) and bool(p.detach().ne(0).any())
               for n, p in inner.named_parameters(recurse=False))


# ============================================================================ inputs and target


def _prepare(model: nn.Module, inputs: Inputs) -> tuple[Callable[[], Any], dict[str, Tensor]]:
    """Return a thunk running the model and the named input leaves (empty: found later)."""
    def leaf(t: Tensor) -> Tensor:
        if not t.is_floating_point():
            raise TypeError(f"cannot explain a {t.dtype} input; pass embeddings")
        return t.detach().clone().requires_grad_(True)

    def embed(ids: Tensor) -> Tensor:
        get = getattr(model, "get_input_embeddings", None)
        if get is None or get() is None:
            raise TypeError("integer inputs need a model with get_input_embeddings(); "
                            "pass embeddings (float) instead")
        with torch.no_grad():
            return get()(ids)

    if isinstance(inputs, Tensor):
        if inputs.is_floating_point():
            x = leaf(inputs)
            return (lambda: model(x)), {"input": x}
        x = leaf(embed(inputs))
        return (lambda: model(inputs_embeds=x)), {"inputs_embeds": x}
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        chosen = [k for k, v in kwargs.items() if isinstance(v, Tensor) and v.requires_grad]
        if not chosen and isinstance(kwargs.get("inputs_embeds"), Tensor):
            chosen = ["inputs_embeds"]
        if not chosen and isinstance(kwargs.get("input_ids"), Tensor):
            kwargs["inputs_embeds"] = embed(kwargs.pop("input_ids"))
            chosen = ["inputs_embeds"]
        if not chosen:
            chosen = [k for k, v in kwargs.items() if isinstance(v, Tensor)
                      and v.is_floating_point() and "mask" not in k]
        if not chosen:
            raise ValueError("no explainable input among the keyword arguments: give "
                             "inputs_embeds, input_ids or a floating-point tensor")
        named = {k: leaf(kwargs[k]) for k in chosen}
        kwargs.update(named)
        return (lambda: model(**kwargs)), named
    if callable(inputs):
        return (lambda: inputs(model)), {}
    raise TypeError(f"inputs must be a tensor, a dict of model kwargs or a callable taking the "
                    f"model, not {type(inputs).__name__}")


def _main_output(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    for t in _tensors(output):
        return t
    raise TypeError(f"the model returned no tensor ({type(output).__name__})")


def _resolve_target(output: Any, target: Target) -> tuple[Tensor, Tensor]:
    """The explained tensor ``y`` and its initial relevance."""
    if callable(target) and not isinstance(target, Tensor):
        y = target(output)
        if not isinstance(y, Tensor):
            raise TypeError("a target callable must return a tensor")
        return y, y.detach()
    out = _main_output(output)
    if isinstance(target, Tensor):
        if target.shape != out.shape:
            raise ValueError(f"initial relevance of shape {tuple(target.shape)} does not match "
                             f"the output's {tuple(out.shape)}")
        return out, target.to(out.dtype).to(out.device)
    if target is None:  # the largest output (at the last position for sequences)
        last = out[..., -1, :] if out.dim() >= 3 else out
        y = last.gather(-1, last.detach().argmax(-1, keepdim=True)).squeeze(-1)
    elif isinstance(target, int):
        if not -out.shape[-1] <= target < out.shape[-1]:
            raise IndexError(f"target {target} out of range for {out.shape[-1]} outputs")
        y = out[..., -1, target] if out.dim() >= 3 else out[..., target]
    elif isinstance(target, (tuple, list)):
        y = out[tuple(target)]
    else:
        raise TypeError(f"target must be an index, a callable, a tensor or None, "
                        f"not {type(target).__name__}")
    return y, y.detach()


def _composite(model: nn.Module, composite: str | Composite, family: str | None,
               options: Mapping[str, Any]) -> Composite:
    if isinstance(composite, Composite):
        if options or family is not None:
            raise TypeError("options and family apply to a composite name, not to a Composite "
                            "instance")
        return composite
    if not isinstance(composite, str):
        raise TypeError(f"composite must be a name or a Composite, not {type(composite).__name__}")
    return _registry.get(composite, model, family=family, **options)


# ============================================================================ audit


def audit(model: nn.Module, inputs: Inputs, target: Target, composite: str | Composite = "attnlrp",
          record: Iterable[str | type] | None = None, *, family: str | None = None,
          **options: Any) -> AuditReport:
    """Explain ``target`` with ``composite`` and return the conservation ledger.

    Parameters
    ----------
    model : nn.Module
        The model; it is left exactly as it was (composite and hooks removed, also on error).
    inputs : Tensor, dict or callable
        A floating-point tensor (``model(x)``; an integer tensor is embedded with
        ``model.get_input_embeddings()`` and passed as ``inputs_embeds``); a dict of keyword
        arguments, whose explained inputs are the tensors that require grad, else
        ``inputs_embeds``, else ``input_ids`` turned into ``inputs_embeds``, else the
        floating-point tensors without ``mask`` in their name; or a callable ``f(model)`` that
        runs the model itself on tensors that require grad (found in the graph).
    target : int, sequence of int, callable, Tensor or None
        An int ``t`` explains ``out[..., -1, t]`` for outputs with a sequence dimension
        (``(batch, tokens, classes)``) and ``out[..., t]`` otherwise; a tuple indexes the output
        directly; a callable ``f(output)`` returns the explained tensor and runs under the
        composite's op rules (pooling, similarities); a tensor is the initial relevance of the
        output itself; ``None`` explains the largest output. ``out`` is ``output.logits`` for
        Hugging Face outputs, else the first tensor. The initial relevance of an explained
        tensor is its value.
    composite : str or Composite
        A registry name, resolved with ``composites.get(name, model, family=family,
        **options)``, or a ready composite (registered on ``model`` already, or not).
    record : iterable of str or type, optional
        Qualified-name ``fnmatch`` patterns (``"model.layers.?"``) or module classes whose
        output relevance is kept in :attr:`AuditReport.recorded`.
    family : str, optional
        Force a composite family (e.g. ``"generic"``).
    **options
        Passed to the composite factory (``epsilon=…``, ``strict=True``).

    Returns
    -------
    AuditReport

    Raises
    ------
    lrp_explicit.UnruledOpError
        In strict mode, for an op or a foreign autograd Function on the relevance path without
        a rule.
    """
    comp = _composite(model, composite, family, options)
    run, named = _prepare(model, inputs)
    owner = carrier(model)
    if owner is not None and owner is not comp:
        raise _registry.CompositeError(f"{type(model).__name__} carries {owner!r}; remove it "
                                       "or pass that composite")
    before = dict(comp.unruled) if owner is comp else {}
    if isinstance(record, (str, type)):
        record = [record]
    ledger = _Ledger(model, list(record or ()))
    if owner is None:
        comp.register(model)
    try:
        ledger.install()
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UnruledOpWarning)
            output = run()
            with comp.op_rules(TARGET):
                y, relevance = _resolve_target(output, target)
            if not y.requires_grad:
                raise ValueError("the explained output does not depend on any input that "
                                 "requires grad (explain from embeddings, not token ids)")
            nodes, leaves = ledger.hook_graph([y.grad_fn])
            inputs_found = named or {f"input{i}": t for i, t in enumerate(
                t for t in leaves if not isinstance(t, nn.Parameter))}
            grads: dict[str, list[Tensor]] = {k: [] for k in inputs_found}
            handles = [leaf.register_hook(lambda g, key=key: grads[key].append(g.detach().clone()))
                       for key, leaf in inputs_found.items()]
            ledger.remove()
            try:
                y.backward(relevance)
            finally:
                for handle in handles:
                    handle.remove()
        unruled = [UnruledOp(op, path, n - before.get((op, path), 0))
                   for (op, path), n in comp.unruled.items() if n > before.get((op, path), 0)]
    finally:
        ledger.remove()
        if owner is None:
            comp.remove()
    input_relevance = {k: (sum(v[1:], v[0]) if v else torch.zeros_like(inputs_found[k]))
                       for k, v in grads.items()}
    return _build(model, comp, y, relevance, ledger, nodes, input_relevance, unruled)


def _build(model, comp, y, relevance, ledger: _Ledger, nodes: list[_Node],
           input_relevance: dict[str, Tensor], unruled: list[UnruledOp]) -> AuditReport:
    calls = [c for c in ledger.done if c.has_path]
    explained = _sum(relevance)
    scale = float(relevance.detach().abs().sum(dtype=torch.float64))
    input_total = sum((_sum(t) for t in input_relevance.values()), 0.0)

    def f(values: list[Tensor]) -> float:
        return sum(float(v) for v in values)

    # own node balances per call, then subtree sums in completion order (children first)
    own: dict[int, dict[str, float]] = {id(c): {} for c in ledger.calls}
    outside: dict[str, dict[str, float]] = {TARGET: {}, INPUTS: {}}
    total_by: dict[str, float] = {}
    first_root = min((c.start for c in calls if c.parent is None), default=0)
    for n in nodes:
        if n.balance is None:
            continue
        value = float(n.balance)
        if value == 0.0:
            continue
        kind = n.kind or "softmax"
        total_by[kind] = total_by.get(kind, 0.0) + value
        if n.owner is not None:
            bucket = own[id(n.owner)]
        else:
            bucket = outside[INPUTS if n.node._sequence_nr() < first_root else TARGET]
        bucket[kind] = bucket.get(kind, 0.0) + value
    subtree = {id(c): dict(own[id(c)]) for c in ledger.calls}
    child_absorbed = {id(c): 0.0 for c in ledger.calls}
    absorbed = {id(c): f(c.out_sum) - f(c.in_sum) for c in ledger.calls}
    for c in ledger.done:
        if c.parent is not None:
            _add(subtree[id(c.parent)], subtree[id(c)])
            child_absorbed[id(c.parent)] += absorbed[id(c)]

    records: dict[str, ModuleRecord] = {}
    recorded: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for c in sorted(calls, key=lambda c: c.index):
        module = c.module
        rec = records.get(c.name)
        if rec is None:
            original = module.module if isinstance(module, Rule) else module
            rec = records[c.name] = ModuleRecord(
                c.name, type(original).__name__,
                type(module).__name__ if isinstance(module, Rule) else "ops")
        rec.calls += 1
        rec.relevance_at_output += f(c.out_sum)
        rec.relevance_at_input += f(c.in_sum)
        rec.absorbed += absorbed[id(c)]
        _add(rec.absorbed_by, subtree[id(c)])
        _add(rec.own_absorbed_by, own[id(c)])
        rec.unaccounted += absorbed[id(c)] - sum(subtree[id(c)].values())
        rec.own_absorbed += absorbed[id(c)] - child_absorbed[id(c)]
        rec.own_unaccounted += absorbed[id(c)] - child_absorbed[id(c)] - sum(own[id(c)].values())
        rec.max_abs = max([rec.max_abs] + [float(v) for v in c.max_abs])
        rec.nonfinite_output |= any(bool(v) for v in c.nonfinite_out)
        rec.nonfinite_input |= any(bool(v) for v in c.nonfinite_in)
        rec.nonfinite_forward |= c.forward_out is not None and not bool(c.forward_out)
        if c.record and c.recorded_like is not None:
            k = counts.get(c.name, 0)
            counts[c.name] = k + 1
            value = c.recorded if c.recorded is not None else torch.zeros_like(c.recorded_like)
            recorded[c.name if k == 0 else f"{c.name}#{k}"] = value

    root_out = sum(f(c.out_sum) for c in calls if c.parent is None)
    root_in = sum(f(c.in_sum) for c in calls if c.parent is None)
    pseudo = [_pseudo(TARGET, "post-processing", explained, root_out, outside[TARGET])]
    if outside[INPUTS]:
        pseudo.append(_pseudo(INPUTS, "pre-processing", root_in, input_total, outside[INPUTS]))
    pseudo[0].nonfinite_output = not bool(torch.isfinite(relevance).all())
    pseudo[0].max_abs = float(torch.where(torch.isfinite(relevance), relevance.abs(), 0).max()) \
        if relevance.numel() else 0.0
    order = {name: i for i, (name, _) in enumerate(ledger.model.named_modules())}
    modules = pseudo + sorted(records.values(),
                              key=lambda r: order.get("" if r.name == ROOT else r.name, -1))
    first, first_op = _first_nonfinite(relevance, nodes, calls)
    forward = next((c.name for c in ledger.done if c.forward_out is not None
                    and not bool(c.forward_out) and (c.forward_in is None or bool(c.forward_in))),
                   None)
    return AuditReport(
        model=type(model).__name__, composite=comp.name, dtype=str(y.dtype).replace("torch.", ""),
        explained=explained, scale=scale, input_total=input_total, absorbed_by=total_by,
        modules=modules, recorded=recorded, input_relevance=input_relevance, unruled=unruled,
        first_nonfinite=first, first_nonfinite_op=first_op, first_nonfinite_forward=forward)


def _add(into: dict[str, float], other: Mapping[str, float]) -> None:
    for k, v in other.items():
        into[k] = into.get(k, 0.0) + v


def _pseudo(name: str, kind: str, r_out: float, r_in: float, by: dict[str, float]) -> ModuleRecord:
    absorbed = r_out - r_in
    return ModuleRecord(name, kind, "op rules", 1, r_out, r_in, absorbed, dict(by),
                        absorbed - sum(by.values()), own_absorbed=absorbed,
                        own_absorbed_by=dict(by), own_unaccounted=absorbed - sum(by.values()))


def _first_nonfinite(relevance: Tensor, nodes: list[_Node],
                     calls: list[_Call]) -> tuple[str | None, str | None]:
    if not bool(torch.isfinite(relevance).all()):
        return TARGET, "initial relevance"
    fired = sorted((n for n in nodes if n.balance is not None), key=lambda n: n.order)
    for n in fired:
        if all(bool(v) for v in n.finite_out) and not all(bool(v) for v in n.finite_in):
            return (n.owner.name if n.owner is not None else TARGET), n.name
    # no single node turned finite relevance into NaN: fall back to module boundaries
    origins = [(order, c.name) for c in calls for order, bad in c.in_orders
               if bool(bad) and not any(bool(v) for v in c.nonfinite_out)]
    return (min(origins)[1], None) if origins else (None, None)


# ============================================================================ check


def check(model: nn.Module, inputs: Inputs, composite: str | Composite = "attnlrp", *,
          target: Target = None, rtol: float = 1e-6, atol: float = 0.0, strict: bool = False,
          family: str | None = None, **options: Any) -> CheckResult:
    """Find what breaks conservation: unruled ops, undocumented absorption, NaN/Inf.

    Parameters
    ----------
    model, inputs, composite, family, **options
        As for :func:`audit`.
    target : optional
        As for :func:`audit`; by default the largest output (the predicted class or token).
    rtol, atol : float
        A module leaks when its undocumented absorption exceeds ``atol + rtol·Σ|R_init|``.
    strict : bool
        Run the explanation in strict mode: the first unruled op raises
        :class:`lrp_explicit.UnruledOpError` instead of being listed.

    Returns
    -------
    CheckResult
        ``unruled`` (op, module path, count), ``leaks`` (modules not conserving with no
        documented absorber), ``first_nonfinite``; ``ok`` is True when all are empty.
    """
    comp = _composite(model, composite, family, options)
    saved = comp.strict
    comp.strict = strict
    try:
        report = audit(model, inputs, target, comp)
    finally:
        comp.strict = saved
    return report.check(rtol, atol)
