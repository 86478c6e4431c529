"""The audit's report types and their rendering: :class:`AuditReport` (one row per module),
:class:`CheckResult` (what breaks conservation) and the absorber kinds."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["ABSORBERS", "documented", "ModuleRecord", "UnruledOp", "AuditReport", "Leak",
           "CheckResult", "TARGET", "INPUTS", "ROOT", "jsonable"]

#: Documented absorbers: relevance that an LRP rule is meant to drop.
ABSORBERS: dict[str, str] = {
    "bias": "bias of an ε-rule (Linear, Conv, addmm, LayerNorm); also its ε share",
    "epsilon": "ε-stabiliser of an ε-rule (linear maps, sums, matmul, norms)",
    "softmax": "AttnLRP softmax rule (Gradient×Input), also inside sdpa attention",
    "constant": "constant operand: attention mask, position or token-type embedding, "
                "a stopped (CP-LRP) branch, values written by masked_fill/where",
}
#: Row of the report for what runs after the model (the target function).
TARGET = "<target>"
#: Row of the report for what runs before the model (input preprocessing).
INPUTS = "<inputs>"
#: Row of the report for the model itself.
ROOT = "<root>"


def documented(kind: str) -> bool:
    """True for the kinds of :data:`ABSORBERS` and for ``rule:<Function>``, an LRP rule of this
    package that the audit has no finer kind for; False for ``autograd:<Node>`` (plain autograd,
    an op without rule), ``function:<Function>`` (a foreign autograd Function) and
    ``unaccounted``."""
    return kind in ABSORBERS or kind.startswith("rule:")

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
        return json.dumps(jsonable(self.to_dict()), allow_nan=False, **kwargs)

    # ------------------------------------------------------------------ rendering

    def table(self, depth: int | None = None, threshold: float = 1e-9,
              width: int | None = None) -> str:
        """Render the report as a text table that fits ``width`` columns.

        The full table has one line per module and nine columns (module, type, rule, R at
        output, R at inputs, absorbed, absorbed by, max |R|, flags). Where it is wider than
        ``width``, each module takes two lines instead (its name, then its type, rule and flags
        indented below it) and the absorbers are listed one per line; where that is still too
        wide, the derived columns *R at inputs* (``R at output − absorbed``) and *max |R|*
        are left out (both are in :meth:`to_dict`) and long names fold. No line is wider than
        ``width``.

        Parameters
        ----------
        depth : int, optional
            Show modules up to this many name components (``model.layers.0`` is 3).
        threshold : float
            Absorbers below ``threshold · scale`` are not listed in the "absorbed by" column.
        width : int, optional
            Columns (at least 40); by default the terminal's width (``COLUMNS``, the
            terminal's size, else 80).

        Returns
        -------
        str
            The table, drawn with rich, plain text.
        """
        pct = 100 * self.input_total / self.explained if self.explained else float("nan")
        header = [
            f"Conservation audit of {self.model} with {self.composite} ({self.dtype})",
            f"explained output {_num(self.explained)}   input relevance "
            f"{_num(self.input_total)} ({pct:.4g} %)",
            f"absorbed {_num(self.absorbed)}, by: "
            f"{_by(self.absorbed_by, threshold * self.scale) or 'nothing'}"
            + (f"   unaccounted {_num(self.unaccounted)}"
               if abs(self.unaccounted) > threshold * self.scale else ""),
            "unruled ops: " + (", ".join(f"{u.op} in '{u.module}' ×{u.count}"
                                         for u in self.unruled) or "none"),
        ]
        if self.first_nonfinite or self.first_nonfinite_forward:
            header.append(f"non-finite: relevance first at '{self.first_nonfinite}' "
                          f"({self.first_nonfinite_op}); forward first at "
                          f"'{self.first_nonfinite_forward}'")
        rows = []
        for r in self.modules:
            if depth is not None and r.name[0] != "<" and r.name.count(".") >= depth:
                continue
            flags = [f for f, on in (("NaN-out", r.nonfinite_output), ("NaN-in", r.nonfinite_input),
                                     ("NaN-fwd", r.nonfinite_forward)) if on]
            if r.calls > 1:
                flags.append(f"calls={r.calls}")
            rows.append({"module": r.name, "type": r.type, "rule": r.rule,
                         "R at output": _num(r.relevance_at_output),
                         "R at inputs": _num(r.relevance_at_input),
                         "absorbed": _num(r.absorbed),
                         "absorbed by": _by_items(r.absorbed_by, threshold * self.scale),
                         "max |R|": _num(r.max_abs), "flags": " ".join(flags)})
        return _render_table(header, rows, width)

    def __str__(self) -> str:
        return self.table()


def _sum(t: Tensor) -> float:
    return float(t.detach().sum(dtype=torch.float64))


def _num(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)


def _by_items(by: Mapping[str, float], cut: float) -> list[str]:
    items = sorted(((k, v) for k, v in by.items() if not abs(v) <= cut), key=lambda kv: -abs(kv[1]))
    return [f"{k} {_num(v)}" for k, v in items]


def _by(by: Mapping[str, float], cut: float) -> str:
    return ", ".join(_by_items(by, cut))


_NUMBERS = ("R at output", "R at inputs", "absorbed", "max |R|")
_STACKED = "module\n  type · rule · flags"


def _render_table(header: list[str], rows: list[dict[str, Any]], width: int | None) -> str:
    """The report's header lines and module table, drawn with rich to fit ``width`` columns:
    one line per module if that fits; else two (type, rule and flags under the name) with the
    absorbers one per line; else also without the derived columns (R at inputs, max |R|).
    Absorbers wrap between kind and value before a module name folds."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if width is None:
        width = Console().width
    if not isinstance(width, int) or isinstance(width, bool) or width < 40:
        raise ValueError(f"width must be an int of at least 40 columns, got {width!r}")
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False,
                      force_jupyter=False, highlight=False, markup=False, emoji=False,
                      soft_wrap=False, _environ={})

    def span(name: str, cells: list[str]) -> int:
        return max(len(line) for text in [name, *cells] for line in text.split("\n"))

    def below(row: dict[str, Any]) -> str:
        return "  " + " · ".join(x for x in (row["type"], row["rule"], row["flags"]) if x)

    wide_cols = ["module", "type", "rule", "R at output", "R at inputs", "absorbed",
                 "absorbed by", "max |R|", "flags"]
    wide_w = {c: span(c, [", ".join(r[c]) if c == "absorbed by" else r[c] for r in rows])
              for c in wide_cols}
    gap = 2  # right padding and the column separator
    if sum(wide_w.values()) + gap * (len(wide_cols) - 1) <= width:
        layout, numbers = "wide", _NUMBERS
    else:
        by_full = span("absorbed by", ["\n".join(r["absorbed by"]) for r in rows])
        # the absorbers wrap between kind and value; numbers never fold, a long kind may
        by_word = max([12] + [len(item.split()[-1]) for r in rows for item in r["absorbed by"]])
        module_full = span(_STACKED, [r["module"] + "\n" + below(r) for r in rows])
        longest_name = max([12] + [len(r["module"]) for r in rows])
        layout = "narrow"
        for layout, numbers in (("stacked", _NUMBERS),
                                ("narrow", ("R at output", "absorbed"))):
            fixed = sum(span(n, [r[n] for r in rows]) for n in numbers) + gap * (len(numbers) + 1)
            if fixed + longest_name + by_word <= width:
                break
        avail = width - fixed
        by = by_full if module_full + by_full <= avail else \
            max(by_word, min(by_full, avail - longest_name))
        module = max(12, min(module_full, avail - by))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  safe_box=True)
    if layout == "wide":
        for c in wide_cols:
            table.add_column(c, justify="right" if c in _NUMBERS else "left", no_wrap=True)
        for r in rows:
            table.add_row(*[", ".join(r[c]) if c == "absorbed by" else r[c] for c in wide_cols])
    else:
        table.add_column(_STACKED, width=module, overflow="fold")
        for n in numbers[:3]:
            table.add_column(n, justify="right", no_wrap=True)
        table.add_column("absorbed by", width=by, overflow="fold")
        if "max |R|" in numbers:
            table.add_column("max |R|", justify="right", no_wrap=True)
        for r in rows:
            cells = [Text(r["module"] + "\n" + below(r))] + [r[n] for n in numbers[:3]]
            cells.append("\n".join(item if len(item) <= by else item.replace(" ", "\n")
                                   for item in r["absorbed by"]))
            if "max |R|" in numbers:
                cells.append(r["max |R|"])
            table.add_row(*cells)
    for line in header:
        console.print(Text(line), overflow="fold")
    console.print()
    console.print(table)
    if layout == "narrow":
        console.print(Text("(R at inputs = R at output − absorbed; max |R| per module in the "
                           "JSON report)"), overflow="fold")
    lines = console.file.getvalue().rstrip("\n").split("\n")
    return "\n".join(line.rstrip() for line in lines)


def jsonable(x: Any) -> Any:
    """``x`` with non-finite floats spelled as strict JSON strings (``"NaN"``, ``"Infinity"``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x



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


