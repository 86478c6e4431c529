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

Layout: :mod:`~lrp_explicit.audit.run` (:func:`audit`, :func:`check`),
:mod:`~lrp_explicit.audit.ledger` (the hooks), :mod:`~lrp_explicit.audit.analysis` (ledger to
report), :mod:`~lrp_explicit.audit.report` (report types and rendering),
:mod:`~lrp_explicit.audit.bias` (:func:`zero_bias`).
"""
from .bias import BIAS_PATTERNS, zero_bias
from .report import (ABSORBERS, INPUTS, ROOT, TARGET, AuditReport, CheckResult, Leak,
                     ModuleRecord, UnruledOp, documented)
from .run import Inputs, Target, audit, check

__all__ = ["audit", "check", "zero_bias", "documented", "AuditReport", "ModuleRecord",
           "CheckResult", "UnruledOp", "Leak", "ABSORBERS", "TARGET", "INPUTS", "ROOT",
           "BIAS_PATTERNS", "Inputs", "Target"]
