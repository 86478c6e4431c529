"""Shared building blocks of the Hugging Face family composites.

A family file names the model types it serves and only what cannot be found from the model
itself, each entry saying why: norm and activation classes are found from the modules
(:class:`~lrp_explicit.composites.detect.Detector`); everything else comes from here:
``nn.Linear`` and transformers' ``Conv1D`` take the ε-rule, every activation class of
``transformers.activations`` the identity, ``nn.LayerNorm`` the constant-std rule, and the
functional calls of the modeling code (attention, rotary embeddings, residuals, gates,
soft-capping, pooling) the shared op table.
Model classes are imported only when a composite is built, so importing ``lrp_explicit`` does not
import any modeling file.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from torch import nn

from .. import rules
from ..errors import UnsupportedModelError
from ..ops import name_transformers_ops
from .generic import ACTIVATIONS
from .variants import ModuleRules, register_variants
from .wrappers import hf_models, unwrap

__all__ = ["base_rules", "register_family", "check_experts_implementation", "norm_rules"]


def _transformers_activations() -> tuple[type[nn.Module], ...]:
    from transformers.activations import ACT2CLS

    classes = {v[0] if isinstance(v, tuple) else v for v in ACT2CLS.values()}
    return tuple(sorted((c for c in classes if issubclass(c, nn.Module)), key=lambda c: c.__name__))


def base_rules(cp_lrp: bool) -> dict[Any, Callable[[nn.Module], nn.Module]]:
    """Module rules every Hugging Face family shares."""
    from transformers.pytorch_utils import Conv1D

    table: dict[Any, Callable[[nn.Module], nn.Module]] = {
        nn.Linear: rules.EpsilonRule,
        Conv1D: rules.EpsilonRule,
        nn.Conv2d: rules.EpsilonRule,
        nn.LayerNorm: rules.NormRule,
        nn.RMSNorm: rules.NormRule,
        nn.Dropout: rules.PassRule,
        nn.Softmax: rules.StopRule if cp_lrp else rules.SoftmaxRule,
    }
    table.update({act: rules.IdentityRule for act in ACTIVATIONS + _transformers_activations()})
    return table


SUPPORTED_EXPERTS = ("eager", "grouped_mm", "batched_mm")


def check_experts_implementation(model: nn.Module) -> None:
    """Refuse Mixture-of-Experts implementations whose kernels the rules cannot see
    (``"deepgemm"``, ``"sonicmoe"``): they would give silently wrong relevance. Every Hugging
    Face composite runs this check at registration; it also names transformers' MoE ops once
    their integration is imported (:func:`lrp_explicit.ops.name_transformers_ops`)."""
    name_transformers_ops()
    configs = [m.config for _, m in hf_models(unwrap(model))] or [getattr(model, "config", None)]
    implementation = next((c._experts_implementation for c in configs
                           if getattr(c, "_experts_implementation", None)), None) or "eager"
    if implementation not in SUPPORTED_EXPERTS:
        raise UnsupportedModelError(
            f"experts implementation {implementation!r} runs in kernels the LRP rules cannot "
            f"see; load the model with experts_implementation in {SUPPORTED_EXPERTS}")


def register_family(
    family: str,
    model_types: Iterable[str],
    module_rules: Callable[[], ModuleRules] | None = None,
    ops: Callable[[bool], Mapping[str, Any]] | None = None,
    validate: Callable[[nn.Module], None] | None = None,
) -> None:
    """Register ``"attnlrp"`` and ``"cp-lrp"`` for a Hugging Face family.

    Parameters
    ----------
    family : str
        Family name shown by :func:`lrp_explicit.composites.available`.
    model_types : iterable of str
        The ``config.model_type`` values of the family.
    module_rules : callable, optional
        Returns the family's own module rules (imported lazily), merged over :func:`base_rules`.
    ops : callable, optional
        ``ops(cp_lrp)`` returns op-table entries merged over the variant's table.
    validate : callable, optional
        Called with the model at registration, after
        :func:`check_experts_implementation`; raises for configurations the rules cannot
        explain (see :class:`~lrp_explicit.Composite`).

    Notes
    -----
    Modules that no table names are looked at when a composite is registered: norms and
    activations are found from the modules themselves
    (:class:`~lrp_explicit.composites.detect.Detector`), so a family gives only what cannot be
    found that way, and says why.
    """
    def table(cp_lrp: bool) -> dict[Any, Callable[[nn.Module], nn.Module]]:
        rules_ = base_rules(cp_lrp)
        if module_rules is not None:
            rules_.update(module_rules())
        return rules_

    def checks(model: nn.Module) -> None:
        check_experts_implementation(model)
        if validate is not None:
            validate(model)

    register_variants(family, table, model_types=model_types, ops=ops, validate=checks)


def norm_rules(module: str, *classes: str) -> Callable[[], ModuleRules]:
    """Module rules that give the constant-std norm rule to ``classes`` of the transformers
    modeling ``module``.

    .. deprecated:: 0.3.0
        Norm classes are found from the modules themselves
        (:class:`~lrp_explicit.composites.detect.Detector`); a family needs no table of them.
        Kept for one release.
    """
    import warnings

    warnings.warn("norm_rules is deprecated: norm classes are found from the modules "
                  "themselves (lrp_explicit.composites.auto)", DeprecationWarning, stacklevel=2)

    def rules_() -> ModuleRules:
        import importlib

        source = importlib.import_module(module)
        return {getattr(source, c): rules.NormRule for c in classes}

    return rules_
