"""lrp_explicit: explicit Layer-wise Relevance Propagation for transformers.

The layers, each importing only those before it:

1. :mod:`~lrp_explicit.errors`, :mod:`~lrp_explicit.tokens` — exceptions, token display;
2. :mod:`~lrp_explicit.functional` — autograd Functions whose forward is the plain op and whose
   backward is an LRP rule;
3. :mod:`~lrp_explicit.ops` — the op table: functional calls to rule handlers;
4. :mod:`~lrp_explicit.rules` — module rules that wrap a module instance;
5. :mod:`~lrp_explicit.dispatch` — the ``TorchFunctionMode`` that routes functional calls;
6. :mod:`~lrp_explicit.composites` — :class:`Composite` and the registry of families;
7. :mod:`~lrp_explicit.pipeline` — the one attribution pass every entry point runs;
8. the user layer: :func:`explain`, :func:`audit` / :func:`check`, :mod:`~lrp_explicit.heatmaps`,
   :func:`explain_dataset` (:mod:`~lrp_explicit.runs`), :mod:`~lrp_explicit.testing`,
   :mod:`~lrp_explicit.evaluation` (:func:`evaluate`, :func:`ablate`); :func:`intervene` and the
   latent units (:mod:`~lrp_explicit.latent`) sit between the pipeline and the user layer;
9. :mod:`~lrp_explicit.cli`.
"""
from . import composites, functional, latent, ops, pipeline, rules
from .audit import ABSORBERS, AuditReport, CheckResult, audit, check, zero_bias
from .composites import Composite
from .errors import CompositeError, UnruledOpError, UnruledOpWarning
from .explain import Explanation, ExplanationBatch, GenerationExplanation, explain, load
from .pipeline import attribute
from .runs import explain_dataset
from .evaluation.results import evaluate
from .evaluation.ablation import ablate
from .latent import intervene
from . import testing

#: The version of the package.
__version__ = "0.2.0"

__all__ = ["Composite", "CompositeError", "UnruledOpError", "UnruledOpWarning", "composites",
           "functional", "ops", "rules", "pipeline", "attribute", "ABSORBERS", "AuditReport",
           "CheckResult", "audit", "check", "testing", "zero_bias", "Explanation", "explain",
           "ExplanationBatch", "GenerationExplanation", "load", "explain_dataset", "evaluate",
           "intervene", "ablate", "latent", "__version__"]
