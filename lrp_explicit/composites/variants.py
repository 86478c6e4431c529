"""The AttnLRP / CP-LRP pair of a family, built from one table of module rules.

Both variants share the module rules of a family except where CP-LRP holds attention weights
and gates constant: the family gives a function ``module_rules(cp_lrp)`` and, optionally,
op-table entries ``ops(cp_lrp)``; CP-LRP adds :data:`lrp_explicit.ops.CPLRP_OPS` underneath.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from torch import nn

from ..ops import CPLRP_OPS, attention_ops
from .base import Composite
from .detect import Detector
from .registry import GENERIC, register

__all__ = ["ModuleRules", "variant", "register_variants"]

#: A module-rule table: module class or name pattern to rule factory.
ModuleRules = Mapping[Any, Callable[[nn.Module], nn.Module]]


def variant(family: str, cp_lrp: bool, module_rules: Callable[[bool], ModuleRules],
            ops: Callable[[bool], Mapping[str, Any]] | None = None,
            validate: Callable[[nn.Module], None] | None = None,
            detect: bool = True) -> Callable[..., Composite]:
    """A composite factory for AttnLRP (``cp_lrp=False``) or CP-LRP of ``family``.

    Parameters
    ----------
    family : str
        Family name, shown in the composite's name (not for the generic family).
    cp_lrp : bool
        Build CP-LRP (attention weights and gates held constant) instead of AttnLRP.
    module_rules : callable
        ``module_rules(cp_lrp)`` returns the module-rule table.
    ops : callable, optional
        ``ops(cp_lrp)`` returns op-table entries merged over the variant's table.
    validate : callable, optional
        Called with the model at registration (see :class:`~lrp_explicit.Composite`).
    detect : bool
        Find the rules of modules the table does not name from the modules themselves (norms,
        activations: :class:`~lrp_explicit.composites.detect.Detector`), a fresh detector per
        composite.

    Returns
    -------
    callable
        ``factory(**options)`` returning a new :class:`~lrp_explicit.Composite`; an ``ops``
        option is merged last, over the family's entries; ``attention="exact"`` takes the
        exact rule decomposition of sdpa attention instead of the fused backward
        (:data:`lrp_explicit.ops.ATTENTION_MODES`).
    """
    kind = "cp-lrp" if cp_lrp else "attnlrp"
    name = kind if family == GENERIC else f"{kind} ({family})"

    def build(**options: Any) -> Composite:
        table = dict(CPLRP_OPS) if cp_lrp else {}
        if ops is not None:
            table.update(ops(cp_lrp))
        table.update(attention_ops(options.pop("attention", "fused"), cp_lrp))
        table.update(options.pop("ops", None) or {})  # the user's entries come last
        if validate is not None:
            options.setdefault("validate", validate)
        if detect:
            options.setdefault("detect", Detector(cp_lrp))
        return Composite(dict(module_rules(cp_lrp)), ops=table, name=name, **options)

    label = "CP-LRP (attention weights and gates held constant)" if cp_lrp else "AttnLRP"
    build.__doc__ = f"{label} for {family} models."
    build.__name__ = kind.replace("-", "_")
    return build


def register_variants(family: str, module_rules: Callable[[bool], ModuleRules], *,
                      model_types: Iterable[str] = (), model_classes: Iterable[type | str] = (),
                      ops: Callable[[bool], Mapping[str, Any]] | None = None,
                      validate: Callable[[nn.Module], None] | None = None,
                      detect: bool = True) -> None:
    """Register ``"attnlrp"`` and ``"cp-lrp"`` for ``family`` (arguments as for
    :func:`variant` and :func:`lrp_explicit.composites.register`)."""
    model_types, model_classes = tuple(model_types), tuple(model_classes)
    for cp_lrp in (False, True):
        register("cp-lrp" if cp_lrp else "attnlrp",
                 variant(family, cp_lrp, module_rules, ops, validate, detect), family=family,
                 model_types=model_types, model_classes=model_classes)
