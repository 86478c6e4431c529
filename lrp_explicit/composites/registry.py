"""The registry of named composites per model family.

Families are found by the Hugging Face ``config.model_type`` or by the module classes a model
contains; a plain PyTorch model takes the ``"generic"`` family. Family modules call
:func:`register` when imported (:mod:`lrp_explicit.composites` imports them all).
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from torch import nn

from ..errors import AutoCompositeWarning, UnknownModelError
from .base import Composite
from .wrappers import hf_models, model_type as _own_model_type, unwrap

__all__ = ["GENERIC", "AUTO", "normalise_name", "register", "unregister", "available", "family_of",
           "get"]

#: The family of plain PyTorch models (and the fallback one can force with ``family=``).
GENERIC = "generic"
#: The automatic composite's family: the rules found from the model itself
#: (:mod:`~lrp_explicit.composites.auto`); the default for model types no family claims.
AUTO = "auto"


@dataclass
class _Family:
    model_types: set[str] = field(default_factory=set)
    model_classes: tuple[type | str, ...] = ()
    factories: dict[str, Callable[..., Composite]] = field(default_factory=dict)


_families: dict[str, _Family] = {}
_lock = threading.Lock()


def normalise_name(name: str) -> str:
    """A composite name as the registry keys it: lower case, ``_`` read as ``-``."""
    return name.strip().lower().replace("_", "-")


def register(
    name: str,
    factory: Callable[..., Composite],
    *,
    family: str = GENERIC,
    model_types: Iterable[str] = (),
    model_classes: Iterable[type | str] = (),
    overwrite: bool = False,
) -> None:
    """Register a composite factory under ``name`` for a model family.

    Parameters
    ----------
    name : str
        Composite name, e.g. ``"attnlrp"`` (case and ``_``/``-`` are not significant).
    factory : callable
        Called as ``factory(**options)`` (the options given to :func:`get`); returns a new
        :class:`Composite`.
    family : str
        Family name, e.g. ``"llama"``; ``"generic"`` serves plain PyTorch models.
    model_types : iterable of str
        Hugging Face ``config.model_type`` values that belong to the family.
    model_classes : iterable of type or str
        Module classes whose presence in a model identifies the family; a string is a
        qualified class name (``"torchvision.models.vision_transformer.VisionTransformer"``),
        matched through the class hierarchy without importing its module.
    overwrite : bool
        Replace an existing entry instead of raising ``ValueError``.
    """
    key = normalise_name(name)
    with _lock:
        fam = _families.setdefault(family, _Family())
        if key in fam.factories and not overwrite:
            raise ValueError(f"composite {key!r} is already registered for family {family!r}; "
                             "pass overwrite=True to replace it")
        fam.factories[key] = factory
        fam.model_types.update(model_types)
        fam.model_classes = fam.model_classes + tuple(
            c for c in model_classes if c not in fam.model_classes)


def unregister(name: str, family: str = GENERIC) -> None:
    """Remove the composite ``name`` of ``family`` (``KeyError`` if it is not registered)."""
    with _lock:
        fam = _families.get(family)
        if fam is None or normalise_name(name) not in fam.factories:
            raise KeyError(f"no composite {name!r} registered for family {family!r}")
        del fam.factories[normalise_name(name)]


def available() -> dict[str, list[str]]:
    """Registered composite names per family, e.g. ``{"generic": ["attnlrp", "cp-lrp"]}``."""
    return {fam: sorted(f.factories) for fam, f in sorted(_families.items())}


def family_of(model: nn.Module) -> str:
    """The family of ``model``: by ``config.model_type``, then by module classes; a model
    without a Hugging Face config is ``"generic"``, a Hugging Face model of a type no family
    claims ``"auto"`` (the automatic composite, :mod:`~lrp_explicit.composites.auto`).

    Wrappers are looked through: ``DataParallel``, ``DistributedDataParallel``, compiled
    modules and PEFT models take the family of the model they run, and any other module that
    holds Hugging Face models (a user's wrapper) takes theirs.

    Raises
    ------
    UnknownModelError
        For a wrapper holding Hugging Face models of several families (the message names them;
        pass ``family=``).
    """
    what = type(model).__name__
    inner = unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type is None:
        found = hf_models(inner)
        kinds = sorted({_own_model_type(m) for _, m in found})
        if len(kinds) > 1:
            listed = ", ".join(f"{type(m).__name__} at {n!r} ({_own_model_type(m)})"
                               for n, m in found)
            raise UnknownModelError(
                f"{what} holds Hugging Face models of several families ({listed}); pass "
                "family= to choose the composite family, or explain the inner model")
        if kinds:
            model_type = kinds[0]
            what = f"{type(found[0][1]).__name__} inside {what}"
    if model_type is not None:
        for name, fam in _families.items():
            if model_type in fam.model_types:
                return name
    classes = {type(m) for m in model.modules()}
    for name, fam in _families.items():
        if fam.model_classes and any(_is_a(c, fam.model_classes) for c in classes):
            return name
    return GENERIC if model_type is None else AUTO


def _is_a(cls: type, model_classes: tuple[type | str, ...]) -> bool:
    for base in cls.__mro__:
        if base in model_classes or f"{base.__module__}.{base.__qualname__}" in model_classes:
            return True
    return False


def get(name: str, model: nn.Module | None = None, *, family: str | None = None,
        **options: Any) -> Composite:
    """Return a new composite ``name`` for ``model``'s family.

    Parameters
    ----------
    name : str
        ``"attnlrp"``, ``"cp-lrp"`` or a user-registered name.
    model : nn.Module, optional
        The model to explain; selects the family. Without it the generic family is used.
    family : str, optional
        Force a family instead of detecting it.
    **options
        Passed to the factory, e.g. ``epsilon=1e-6`` or ``strict=True``.

    Raises
    ------
    KeyError
        If no composite of that name exists for the family.
    UnknownModelError
        If ``model`` is a wrapper of Hugging Face models of several families.

    Warns
    -----
    AutoCompositeWarning
        One line, when ``model`` is a Hugging Face model of a type no family claims and the
        automatic composite (``family="auto"``) explains it.
    """
    if family is None:
        family = GENERIC if model is None else family_of(model)
        if family == AUTO:
            _warn_fallback(model)
    fam = _families.get(family)
    if fam is None:
        raise KeyError(f"no composite family {family!r}; available: {available()}")
    key = normalise_name(name)
    factory = fam.factories.get(key)
    if factory is None:
        raise KeyError(f"no composite {name!r} for family {family!r}; "
                       f"available for it: {sorted(fam.factories)}")
    return factory(**options)


def _warn_fallback(model: nn.Module) -> None:
    """Say, in one line, that a Hugging Face model of a type without family takes the
    automatic composite."""
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        found = hf_models(inner)
        inner, config = (found[0][1], found[0][1].config) if found else (inner, None)
    warnings.warn(
        f"lrp_explicit: no composite family is registered for model type "
        f"{getattr(config, 'model_type', '?')!r} ({type(inner).__name__}); using the automatic "
        "composite (rules found from the model, strict: an op without rule raises)",
        AutoCompositeWarning, stacklevel=3)
