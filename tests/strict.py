"""Relevance by hand in strict mode, for the family tests: register, one forward, one backward."""
from __future__ import annotations

from typing import Any, Callable

import torch

from lrp_explicit import composites


def strict_relevance(model, leaves: dict, variant: str, select: Callable[[Any], torch.Tensor],
                     run: Callable[[Any, dict], Any] | None = None, **options):
    """The relevance of every leaf for ``select(output)`` (initialised with its value) under the
    registered ``variant`` in strict mode; ``run(model, leaves)`` runs the model (default:
    ``model(**leaves, use_cache=False)``). Returns the relevance by leaf and the output."""
    comp = composites.get(variant, model, strict=True, **options)
    with comp.context(model):
        xs = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
        output = run(model, xs) if run is not None else model(**xs, use_cache=False)
        y = select(output)
        y.backward(y.detach())
    assert not comp.unruled
    return {k: x.grad for k, x in xs.items()}, output


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the largest absolute reference value."""
    return float((got - ref).abs().max() / ref.abs().max())
