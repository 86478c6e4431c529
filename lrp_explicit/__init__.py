"""lrp_explicit: explicit Layer-wise Relevance Propagation for transformers.

Custom autograd Functions (:mod:`lrp_explicit.functional`) whose forward is the plain op and
whose backward is an LRP rule, module rules (:mod:`lrp_explicit.rules`), an op-level dispatch
for functional calls (:mod:`lrp_explicit.dispatch`, :mod:`lrp_explicit.ops`) and composites
with a registry (:mod:`lrp_explicit.composites`); :func:`explain` and its heatmaps
(:mod:`lrp_explicit.heatmaps`) on top.
"""
from . import functional, ops, rules
from .composites import Composite, CompositeError
from . import composites
from .dispatch import UnruledOpError, UnruledOpWarning

__all__ = ["Composite", "CompositeError", "UnruledOpError", "UnruledOpWarning", "composites",
           "functional", "ops", "rules", "__version__"]
__version__ = "0.1.0"
from .audit import ABSORBERS, AuditReport, CheckResult, audit, check, zero_bias  # noqa: E402
from . import testing  # noqa: E402
from .explain import Explanation, explain  # noqa: E402

__all__ += ["ABSORBERS", "AuditReport", "CheckResult", "audit", "check", "testing", "zero_bias",
            "Explanation", "explain"]
