"""From the ledger of one pass to the report: node balances attributed to modules and absorber
kinds, module rows, the first non-finite relevance."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..pipeline import Attribution
from ..rules import Rule
from .ledger import Call, Ledger, Node
from .report import INPUTS, ROOT, TARGET, AuditReport, ModuleRecord, UnruledOp, _sum

__all__ = ["build_report"]


def build_report(model: nn.Module, result: Attribution, ledger: Ledger,
                 input_relevance: dict[str, Tensor]) -> AuditReport:
    """The :class:`AuditReport` of one attribution pass watched by ``ledger``."""
    y, relevance, nodes = result.target.explained, result.target.initial, ledger.nodes
    unruled = [UnruledOp(op, path, n) for (op, path), n in result.unruled.items()]
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
        model=type(model).__name__, composite=result.composite.name,
        dtype=str(y.dtype).replace("torch.", ""),
        explained=explained, scale=scale, input_total=input_total, absorbed_by=total_by,
        modules=modules, recorded=dict(result.latent), input_relevance=input_relevance,
        unruled=unruled,
        first_nonfinite=first, first_nonfinite_op=first_op, first_nonfinite_forward=forward)


def _add(into: dict[str, float], other: Mapping[str, float]) -> None:
    for k, v in other.items():
        into[k] = into.get(k, 0.0) + v


def _pseudo(name: str, kind: str, r_out: float, r_in: float, by: dict[str, float]) -> ModuleRecord:
    absorbed = r_out - r_in
    return ModuleRecord(name, kind, "op rules", 1, r_out, r_in, absorbed, dict(by),
                        absorbed - sum(by.values()), own_absorbed=absorbed,
                        own_absorbed_by=dict(by), own_unaccounted=absorbed - sum(by.values()))


def _first_nonfinite(relevance: Tensor, nodes: list[Node],
                     calls: list[Call]) -> tuple[str | None, str | None]:
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

