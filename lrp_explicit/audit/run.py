"""The audit's entry points: :func:`audit` runs one attribution pass with the ledger watching,
:func:`check` judges it."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor, nn

from ..composites import Composite
from ..errors import UnruledOpWarning
from ..pipeline import (TargetSpec, attribute, grad_enabled, output_target, prepare,
                        resolve_composite, task_of)
from .analysis import build_report
from .ledger import Ledger
from .report import TARGET, AuditReport, CheckResult

__all__ = ["audit", "check", "Inputs", "Target"]

#: What :func:`audit` explains: a tensor, a dict of model keyword arguments, or a callable
#: running the model.
Inputs = Union[Tensor, Mapping[str, Any], Callable[[nn.Module], Any]]
#: What :func:`audit` starts from (see :func:`lrp_explicit.pipeline.output_target`).
Target = TargetSpec


@grad_enabled()
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
    comp = resolve_composite(composite, model, family=family, **options)
    prepared = prepare(model, inputs, task=task_of(model))  # the inputs explain() takes
    ledger = Ledger(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnruledOpWarning)
        result = attribute(model, prepared, lambda output: output_target(output, target), comp,
                           record=list(record or ()) if not isinstance(record, (str, type))
                           else [record], observers=[ledger], label=TARGET)
    input_relevance = {k: v if v is not None else torch.zeros_like(prepared.leaves[k])
                       for k, v in result.relevance.items()}
    return build_report(model, result, ledger, input_relevance)


@grad_enabled()
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
    comp = resolve_composite(composite, model, family=family, **options)
    saved = comp.strict
    comp.strict = strict
    try:
        report = audit(model, inputs, target, comp)
    finally:
        comp.strict = saved
    return report.check(rtol, atol)
