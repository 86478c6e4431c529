"""The automatic composite: the rules found from the model itself.

Any model (a Hugging Face model of a type no family claims, or a researcher's own) is explained
without a line of model-specific code. The composite is built from three sources:

* a table of module classes whose rule is known from ``torch.nn`` and ``transformers`` alone
  (:func:`known_rules`): ``nn.Linear``, transformers' ``Conv1D`` and the convolutions take the
  ε-rule, ``nn.LayerNorm``/``nn.RMSNorm`` the constant-std rule, every activation class of
  ``torch.nn`` and ``transformers.activations`` the identity, ``nn.MultiheadAttention`` its
  rule, dropout and ``nn.Identity`` plain autograd;
* a look at every other leaf module (:func:`classify`): a module whose output is invariant to
  the scale of its input (and varies with it otherwise) is a norm — centring ones (invariant to
  a shift too) take the LayerNorm rule, the others the RMSNorm rule, whatever their class name,
  scale form (``w``, ``1 + w``) or implementation (``pow``/``mean``/``rsqrt``/``var`` in
  modeling code);
* the shared op table for everything the forward does in functional calls: attention (eager or
  sdpa), rotary embeddings, residuals, gates, MoE routers and experts, soft-capping, pooling.

State-space mixers (Mamba, Mamba 2, gated delta-nets) take the rules of
:mod:`~lrp_explicit.composites.ssm`, which holds their input-dependent parameters constant
(MambaLRP); a mixer of a class it does not know (a module with an ``A_log`` parameter) is
refused at registration, naming the module.

Nothing is guessed: a functional call on the relevance path without a rule raises
:class:`~lrp_explicit.UnruledOpError` naming the op and the module (the composite is strict by
default; ``strict=False`` warns instead). On every registered family the automatic composite
gives the relevance of the family's hand-written composite (``tests/test_auto.py``).
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from ..errors import AutoCompositeWarning
from .base import Composite, RuleFactory
from .detect import Detector, classify
from .generic import module_rules as generic_rules
from .registry import AUTO, register
from .variants import variant

__all__ = ["AUTO", "AutoCompositeWarning", "known_rules", "classify", "Detector", "attnlrp",
           "cp_lrp"]


def known_rules(cp_lrp: bool) -> dict[Any, RuleFactory]:
    """Module rules known from the module class alone: those of plain PyTorch models and, when
    ``transformers`` is installed, those every Hugging Face family shares."""
    table: dict[Any, RuleFactory] = dict(generic_rules(cp_lrp))
    try:
        from .hf import base_rules
    except ImportError:  # pragma: no cover - transformers is a dependency
        return table
    table.update(base_rules(cp_lrp))
    return table


# ---------------------------------------------------------------------------- the composites


def _state_space_rules(cp_lrp: bool) -> dict[Any, RuleFactory]:
    """The rules of the state-space mixers and gated norms of
    :mod:`~lrp_explicit.composites.ssm` whose modeling modules are imported (a model of them
    exists), so that ``family="auto"`` explains them as their family does."""
    from . import ssm

    specs = list(ssm.MIXERS) + list(ssm.GATED_NORMS)
    loaded = tuple(sorted({spec.split(":")[0].split(".")[2] for spec in specs
                           if spec.split(":")[0] in sys.modules}))
    return ssm.module_rules(cp_lrp, modules=loaded) if loaded else {}


def _auto_rules(cp_lrp: bool) -> dict[Any, RuleFactory]:
    return {**known_rules(cp_lrp), **_state_space_rules(cp_lrp)}


def _validate(model: nn.Module) -> None:
    """Checks every Hugging Face model needs: Mixture-of-Experts kernels the rules can see, and
    no state-space mixer whose input-dependent parameters no rule knows how to hold
    (:func:`~lrp_explicit.composites.ssm.check_mixers`)."""
    from .ssm import check_mixers

    check_mixers(model)


def _factory(cp_lrp: bool) -> Callable[..., Composite]:
    build = variant(AUTO, cp_lrp, _auto_rules, validate=_validate)

    def auto(**options: Any) -> Composite:
        options.setdefault("strict", True)
        return build(**options)

    auto.__name__ = build.__name__
    auto.__doc__ = (("CP-LRP" if cp_lrp else "AttnLRP") + " with the rules found from the model "
                    "(strict by default: an op without rule raises, naming op and module).")
    return auto


#: AttnLRP with the rules found from the model.
attnlrp = _factory(False)
#: CP-LRP with the rules found from the model.
cp_lrp = _factory(True)

register("attnlrp", attnlrp, family=AUTO)
register("cp-lrp", cp_lrp, family=AUTO)
