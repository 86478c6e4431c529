"""Assertions for users' own test suites.

>>> from lrp_explicit.testing import assert_conserves
>>> def test_my_model_conserves():
...     with lrp_explicit.zero_bias(model):
...         assert_conserves(model, x, target=3, composite="cp-lrp", rtol=1e-8)

No test framework is needed: a failure raises :class:`AssertionError` (pytest shows it as a
test failure) whose message names the module where relevance is lost.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from .audit import ABSORBERS, AuditReport, Inputs, ModuleRecord, Target, audit
from .composites.base import Composite

__all__ = ["assert_conserves"]

_PREFIXES = ("rule:", "autograd:", "function:")


def assert_conserves(
    model: nn.Module,
    inputs: Inputs,
    target: Target,
    composite: str | Composite = "cp-lrp",
    rtol: float = 1e-6,
    atol: float = 0.0,
    allow: Iterable[str] = (),
    **options: Any,
) -> AuditReport:
    """Assert that explaining ``target`` conserves relevance in every module.

    A module fails when the relevance it absorbs in its own code (submodules are judged on
    their own), minus what the absorber kinds in ``allow`` take, exceeds
    ``atol + rtol·Σ|R_init|``; the model fails as a whole on the same test for
    ``explained − input total``. Unruled ops and non-finite relevance fail too.

    Parameters
    ----------
    model, inputs, target, composite, **options
        As for :func:`lrp_explicit.audit` (``options`` go to the composite factory; a
        ``family`` option selects the family).
    rtol, atol : float
        Tolerance, relative to the sum of absolute initial relevance, and absolute.
    allow : iterable of str
        Absorber kinds that may take relevance: ``"bias"``, ``"epsilon"``, ``"softmax"``,
        ``"constant"`` (see :data:`lrp_explicit.ABSORBERS`), or a node kind of the
        report such as ``"autograd:ToCopyBackward0"`` (a dtype cast inside a layer).
        ``allow=("softmax",)`` checks that AttnLRP loses relevance only in its softmax rule.

    Returns
    -------
    AuditReport
        The audit, for further checks.

    Raises
    ------
    AssertionError
        Naming the first offending module (closest to the output), its rule, the relevance at
        its output and inputs and what absorbed the difference.
    """
    allowed = set(allow)
    unknown = {k for k in allowed if k not in ABSORBERS and not k.startswith(_PREFIXES)}
    if unknown:
        raise ValueError(f"unknown absorber kinds {sorted(unknown)}; known: {sorted(ABSORBERS)} "
                         f"and kinds starting with {', '.join(_PREFIXES)}")
    report = audit(model, inputs, target, composite, **options)
    tol = atol + rtol * report.scale
    problems: list[str] = []
    for u in report.unruled:
        problems.append(f"op {u.op} on the relevance path in module '{u.module}' has no LRP rule "
                        f"({u.count} call{'s' if u.count != 1 else ''}): plain autograd there")
    if report.first_nonfinite:
        problems.append(f"relevance becomes non-finite in module '{report.first_nonfinite}' "
                        f"({report.first_nonfinite_op})")
    failing = [r for r in report.modules if abs(_excess(r, allowed, own=True)) > tol]
    for r in reversed(failing):  # closest to the output first
        problems.append(_describe(r, allowed, tol))
    total = report.absorbed - sum(v for k, v in report.absorbed_by.items() if k in allowed)
    if abs(total) > tol:
        problems.append(f"the input relevance sums to {report.input_total:.10g}, the explained "
                        f"output to {report.explained:.10g}: {total:.3g} lost outside "
                        f"{'the allowed absorbers ' + str(sorted(allowed)) if allowed else 'any'}"
                        f" (tolerance {tol:.3g})")
    if problems:
        head = (f"relevance is not conserved in {report.model} with {report.composite} "
                f"({report.dtype}, tolerance {tol:.3g}):")
        raise AssertionError("\n  ".join([head] + problems))
    return report


def _excess(record: ModuleRecord, allowed: set[str], own: bool) -> float:
    absorbed = record.own_absorbed if own else record.absorbed
    by = record.own_absorbed_by if own else record.absorbed_by
    result = absorbed - sum(v for k, v in by.items() if k in allowed)
    return result if result == result else float("inf")  # NaN fails


def _describe(record: ModuleRecord, allowed: set[str], tol: float) -> str:
    kinds = ", ".join(f"{k} {v:.3g}" for k, v in sorted(
        record.own_absorbed_by.items(), key=lambda kv: -abs(kv[1])) if abs(v) > tol)
    if abs(record.own_unaccounted) > tol:
        kinds = (kinds + ", " if kinds else "") + f"unaccounted {record.own_unaccounted:.3g}"
    return (f"module '{record.name}' ({record.type}, rule {record.rule}) absorbs "
            f"{record.own_absorbed:.6g} of its own (relevance at output "
            f"{record.relevance_at_output:.10g}, at inputs {record.relevance_at_input:.10g})"
            + (f" by {kinds}" if kinds else ""))
