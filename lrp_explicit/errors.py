"""Exceptions and warnings of :mod:`lrp_explicit`, in one place.

Every other module raises these; none of them depends on anything else in the package, so any
layer can import them.
"""
from __future__ import annotations

__all__ = ["CompositeError", "UnknownCompositeError", "UnknownModelError", "UnruledOpError",
           "UnruledOpWarning", "UnsupportedModelError", "AutoCompositeWarning", "RenderError",
           "InputError"]


class CompositeError(RuntimeError):
    """A composite cannot be registered or removed (already registered, nothing registered)."""


class UnknownCompositeError(KeyError, ValueError):
    """No composite of that name is registered (for the model's family).

    A ``KeyError`` (a failed registry look-up) and a ``ValueError`` (a bad argument of
    :func:`lrp_explicit.explain` or :func:`lrp_explicit.audit`); the message lists the names
    that are available.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownModelError(LookupError):
    """No registered composite family matches the model."""


class UnruledOpError(RuntimeError):
    """An op on the relevance path has no LRP rule (raised in strict mode)."""


class UnruledOpWarning(UserWarning):
    """An op on the relevance path has no LRP rule; plain autograd was used for it."""


class UnsupportedModelError(CompositeError, NotImplementedError):
    """A model (or a part of it) the rules cannot explain is refused at registration, before
    any work; the message names the module (an unknown state-space mixer, a Mixture-of-Experts
    kernel the rules cannot see)."""


class AutoCompositeWarning(UserWarning):
    """A Hugging Face model of a type without a registered family is explained by the automatic
    composite (:mod:`lrp_explicit.composites.auto`): one line naming the type."""


class InputError(ValueError):
    """An input that cannot be explained (empty, on the meta device, of the wrong shape or
    length, a mask that does not fit it …); the message is one line and names the argument
    (``inputs``, ``input_ids``, ``inputs_embeds``, ``attention_mask`` …)."""


class RenderError(RuntimeError):
    """A heatmap format cannot be produced here (a missing program, or a format that does not
    fit the explanation)."""
