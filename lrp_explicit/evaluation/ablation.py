"""Ablation of latent units: does removing the units an explanation finds most relevant change
the explained score more than removing as many random units?

:func:`ablate` explains a prediction (or takes an explanation), ranks the units of the chosen
layers by their relevance (:meth:`lrp_explicit.Explanation.top_units`), sets the ``k`` most
relevant ones to a value (zero by default) with :func:`lrp_explicit.intervene`, and explains
the same target again to read the changed score; ``draws`` sets of ``k`` units drawn at random
from the same layers give the baseline. A faithful explanation's top units change the score
more than random ones.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..composites import Composite
from ..explain import Explanation, explain
from ..latent import Unit, as_spec, intervene

__all__ = ["Ablation", "ablate"]


@dataclass
class Ablation:
    """What :func:`ablate` returns.

    Attributes
    ----------
    ks : list of int
        The numbers of units removed.
    base : float
        The explained score of the unchanged model.
    top : list of float
        The score with the ``k`` most relevant units removed, for each ``k``.
    random : list of list of float
        The scores with ``k`` random units removed, ``draws`` per ``k``.
    units : list of Unit
        The most relevant units, best first (``max(ks)`` of them).
    pattern : str
        The layers the units were taken from.
    label : str
        The explained score in words.
    value : float
        The value the removed units were set to.
    """

    ks: list[int]
    base: float
    top: list[float]
    random: list[list[float]]
    units: list[Unit]
    pattern: str
    label: str
    value: float = 0.0
    seed: int = field(default=0, repr=False)

    @property
    def top_change(self) -> list[float]:
        """The change of the score when the top ``k`` units are removed (negative: lower)."""
        return [t - self.base for t in self.top]

    @property
    def random_change(self) -> list[float]:
        """The mean change of the score when ``k`` random units are removed."""
        return [float(np.mean(r)) - self.base if r else float("nan") for r in self.random]

    def __str__(self) -> str:
        lines = [f"ablation of {self.pattern} (set to {self.value:g}) · {self.label} · "
                 f"score {self.base:.4g}",
                 f"{'k':>5}  {'top-k change':>13}  {'random-k change (mean ± sd)':>28}"]
        for k, top, rand in zip(self.ks, self.top_change, self.random):
            spread = float(np.std(rand)) if rand else float("nan")
            mean = float(np.mean(rand)) - self.base if rand else float("nan")
            lines.append(f"{k:>5}  {top:>+13.4g}  {mean:>+16.4g} ± {spread:<9.3g}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"ks": self.ks, "base": self.base, "top": self.top, "random": self.random,
                "top_change": self.top_change, "random_change": self.random_change,
                "units": [dict(u._asdict()) for u in self.units], "pattern": self.pattern,
                "label": self.label, "value": self.value, "seed": self.seed}


def ablate(model: nn.Module, inputs: Any, units: str = "*", k: int | Sequence[int] = (1, 5, 10),
           *, target: Any = None, contrast: Any = None, tokenizer: Any = None,
           composite: str | Composite = "attnlrp", position: int | None = None,
           draws: int = 10, seed: int = 0, value: float = 0.0,
           explanation: Explanation | None = None) -> Ablation:
    """Remove the most relevant units of ``model`` for one prediction, and as many random ones,
    and report the change of the explained score.

    Parameters
    ----------
    model : nn.Module
        The model; it is left as it was.
    inputs : Any
        One input, as for :func:`lrp_explicit.explain`.
    units : str
        ``fnmatch`` pattern of the unit layers (``"*mlp.act_fn"``: every MLP's neurons,
        ``"*self_attn"``: every attention layer's heads; see :mod:`lrp_explicit.latent`).
    k : int or sequence of int
        How many units to remove.
    target, contrast, tokenizer, composite, position
        As for :func:`lrp_explicit.explain`: the explained score is the same each time
        (the first explanation's target, not a new prediction).
    draws : int
        Random sets of ``k`` units per ``k``.
    seed : int
        Seed of the random sets.
    value : float
        The value the removed units are set to.
    explanation : Explanation, optional
        An explanation of ``inputs`` to rank the units by (computed when not given). It must
        be one of these inputs: its token ids and score are checked against the model's on
        ``inputs``.

    Returns
    -------
    Ablation

    Raises
    ------
    ValueError
        For a batch, a ``k`` larger than the units of the layers, a pattern that matches no
        layer, or an explanation of other inputs (other token ids, or another score).
    """
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ks):
        raise ValueError(f"k must be a positive int or a list of them, got {k!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
        raise ValueError(f"draws must be a non-negative int, got {draws!r}")
    given = explanation is not None
    if explanation is None:
        explanation = explain(model, inputs, target, composite, contrast, tokenizer,
                              position=position, progress=False)
    if not isinstance(explanation, Explanation):
        raise ValueError("ablate() takes one input (one Explanation), not a batch or a "
                         "generation; loop over the samples")
    layers = [n for n in explanation.units if fnmatch.fnmatchcase(n, units)]
    ranked = explanation.top_units(units, max(ks))
    pool = [(n, explanation.unit_kinds.get(n, "dim"), i)
            for n in layers for i in range(explanation.units[n].numel())]
    if max(ks) > len(pool):
        raise ValueError(f"k={max(ks)} is more than the {len(pool)} units of {units!r}")
    rest = {"tokenizer": tokenizer, "composite": composite, "position": position,
            "progress": False, "contrast": explanation.contrast,
            "continuation": isinstance(explanation.target, list)}

    def score(chosen: Sequence[Unit]) -> float:
        with intervene(model, as_spec(chosen, value)):
            again = explain(model, inputs, explanation.target, **rest)
        return float(again.score)

    if given:  # it must explain these inputs: the same tokens and the same score
        plain = explain(model, inputs, explanation.target, **rest)
        if explanation.ids is not None and plain.ids is not None and plain.ids != explanation.ids:
            raise ValueError("the explanation is of other inputs: its token ids differ from "
                             "those of inputs (give the explanation of these inputs)")
        if not math.isclose(plain.score, explanation.score, rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(f"the explanation's score {explanation.score:.6g} is not the "
                             f"model's {plain.score:.6g} on inputs: is it an explanation of "
                             "other inputs, or of another model?")
    rng = np.random.default_rng(seed)
    top, random = [], []
    for n in ks:
        top.append(score(ranked[:n]))
        draws_n = []
        for _ in range(draws):
            picks = rng.choice(len(pool), size=n, replace=False)
            draws_n.append(score([Unit(pool[j][0], pool[j][1], pool[j][2], 0.0)
                                  for j in picks]))
        random.append(draws_n)
    return Ablation(ks, float(explanation.score), top, random, ranked, units, explanation.label,
                    value, seed)
