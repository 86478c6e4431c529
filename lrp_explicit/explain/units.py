"""Latent units in :func:`~lrp_explicit.explain`: the relevance per unit of every result,
units as targets (``target={"model.layers.3.mlp.act_fn": 17}``), conditions
(``condition=…``) and the latent view. The machinery (unit names, the observer, the target
function, the passes of a condition) is :mod:`lrp_explicit.latent`; this module fits it to
the explanations."""
from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import heatmaps
from ..composites import Composite
from ..latent import (Site, Unit, UnitRecorder, conditional, parse, top_units, unit_layers,
                      unit_target)
from ..pipeline import Prepared, Target, check_finite, main_output
from ..pipeline.targets import explained_row

__all__ = ["LatentView", "UnitPlan", "is_unit_target", "conditions_of"]

#: Kind → word for labels.
_WORDS = {"neuron": "neuron", "head": "head", "dim": "dimension"}


def is_unit_target(target: Any) -> bool:
    """Whether ``target`` names latent units (a mapping of module name to units)."""
    return isinstance(target, Mapping)


def conditions_of(condition: Any) -> tuple[list[Mapping[str, Any]], bool] | None:
    """The conditions of ``condition=`` and whether several were given (a list); ``None``
    for no condition."""
    if condition is None:
        return None
    if isinstance(condition, Mapping):
        return [condition], False
    if isinstance(condition, (list, tuple)) and all(isinstance(c, Mapping) for c in condition):
        if not condition:
            raise ValueError("condition=[] gives no result; give a condition or None")
        return list(condition), True
    raise TypeError("condition must be a mapping of module name to units, or a list of them, "
                    f"not {type(condition).__name__}")


def describe(weights: Mapping[Site, Mapping[int, float]]) -> str:
    """Units in words: ``model.layers.1.mlp.act_fn[3, 17]``, ``….self_attn.head[2]``,
    weights shown where they are not 1."""
    parts = []
    for site, units in weights.items():
        items = [f"{i}" if w == 1.0 else f"{i}×{w:g}" for i, w in units.items()]
        name = f"{site.name}.head" if site.kind == "head" else site.name
        parts.append(f"{name}[{', '.join(items)}]")
    return ", ".join(parts) or "no unit"


class UnitPlan:
    """What one :func:`explain` pass reads and explains in latent space.

    Parameters
    ----------
    model : nn.Module
    target : Any
        The target of :func:`explain`: units when it is a mapping.
    conditions : list of mapping, optional
        The conditions.
    """

    def __init__(self, model: nn.Module, target: Any = None,
                 conditions: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.sites = unit_layers(model)
        self.kinds = {s.name: s.kind for s in self.sites}
        self.weights = parse(model, target, "target") if is_unit_target(target) else None
        self.specs = list(conditions or [])
        self.conditions = [parse(model, c, "condition") for c in self.specs]
        extra = list(self.weights or {})
        keep = [s for c in self.conditions for s in c]
        self.recorder = UnitRecorder([*self.sites, *extra], keep=keep)

    def observers(self) -> list[UnitRecorder]:
        """The observers of the pass (a fresh recorder)."""
        self.recorder = UnitRecorder(self.recorder.sites, keep=self.recorder.keep)
        return [self.recorder]

    def units(self, b: int, size: int, units: Mapping[str, Tensor] | None = None
              ) -> dict[str, Tensor]:
        """Relevance per unit of sample ``b`` of a batch of ``size``, on the CPU, for the
        default layers."""
        got = self.recorder.units() if units is None else units
        out = {}
        for name, value in got.items():
            if name not in self.kinds:
                continue
            v = value.detach().cpu()
            if v.shape[0] == size:
                out[name] = v[b]
            elif size == 1:
                out[name] = v.sum(0)
        return out

    def target(self, samples: Sequence[Any], lengths: Sequence[int] | None, task: str | None,
               tokenizer: Any, position: int | None) -> Callable[[Any], Target]:
        """The target function of a unit target: each sample's units at its explained token
        (``position``, else the last token of a causal LM, the mask of a masked LM, all
        tokens otherwise)."""
        assert self.weights is not None
        weights = self.weights

        def resolve(output: Any) -> Target:
            logits = main_output(output)
            positions: list[int | None] = []
            predictions: list[int | None] = []
            for b, s in enumerate(samples):
                n = lengths[b] if lengths is not None and logits.dim() == 3 else None
                view = logits[b:b + 1, :n] if n is not None else logits[b:b + 1]
                row: tuple[int, ...] = (0,)
                if task in ("causal-lm", "masked-lm") or position is not None:
                    row = explained_row(view, task, s.item, tokenizer, position)
                positions.append(row[1] if len(row) == 2 else position)
                predictions.append(int(view[row].argmax()) if view[row].dim() == 1 else None)
            got = unit_target(self.recorder, weights, positions)(output)
            infos = []
            kinds = {s.kind for s in weights}
            word = _WORDS[kinds.pop()] if len(kinds) == 1 else "units"
            for b, score in enumerate(got.info["scores"]):
                check_finite(score, "score")
                where = f" at token {positions[b]}" if positions[b] is not None \
                    else " (all tokens)"
                infos.append({"score": score, "prediction": predictions[b],
                              "label": f"{word} {describe(weights)}{where}"})
            return Target(got.explained, got.initial, {"samples": infos})

        return resolve

    def conditioned(self, model: nn.Module, batch: Prepared, comp: Composite,
                    results: list[Any], lengths: Sequence[int] | None,
                    per_position: Callable[[Tensor], Tensor], group: int) -> list[Any]:
        """One result per sample and condition (sample-major): the conditional relevance,
        the units through the condition, the condition and its label."""
        attributions = conditional(model, batch, comp, self.recorder, self.conditions,
                                   self.sites, group=group)
        key = next(iter(batch.leaves))
        out = []
        for b, e in enumerate(results):
            n = lengths[b] if lengths is not None else None
            for spec, cond, att in zip(self.specs, self.conditions, attributions):
                grad = att.relevance[key]
                relevance = per_position(grad[b:b + 1, :n] if n is not None
                                         else grad[b:b + 1]).to(e.relevance.dtype)
                check_finite(relevance, "relevance")
                units = self.units(b, len(results), att.target.info.get("units", {}))
                out.append(dataclasses.replace(
                    e, relevance=relevance, units=units, condition=dict(spec),
                    label=f"{e.label} · through {describe(cond)}"))
        return out


# ============================================================================ the view


@dataclass
class LatentView:
    """The latent view of a result: rows of units and their relevance, in HTML (also in a
    notebook) and for the terminal.

    Attributes
    ----------
    rows : list of (str, list of (str, float))
        Captions (a unit layer, or a generated token) and their units.
    title, subtitle : str
        Heading and the line under it.
    """

    rows: list[tuple[str, list[tuple[str, float]]]]
    title: str
    subtitle: str = ""

    def to_html_fragment(self, cmap: Any = None) -> str:
        """An HTML fragment (:func:`lrp_explicit.heatmaps.units_html`)."""
        return heatmaps.units_html(self.rows, self.title, subtitle=self.subtitle or None,
                                   cmap=cmap)

    def to_html(self, cmap: Any = None) -> str:
        """A self-contained HTML page with the view."""
        return heatmaps.html_document([self.to_html_fragment(cmap)], self.title)

    def _repr_html_(self) -> str:
        """The notebook view."""
        return self.to_html_fragment()

    def to_terminal(self, color: bool | None = None, width: int | None = None,
                    cmap: Any = None) -> str:
        """Terminal text (:func:`lrp_explicit.heatmaps.units_terminal`)."""
        return heatmaps.units_terminal(self.rows, self.title, color=color, width=width,
                                       cmap=cmap)

    def __str__(self) -> str:
        return self.to_terminal(color=False)


def _chip(unit: Unit, short: bool) -> tuple[str, float]:
    index = f"head {unit.index}" if unit.kind == "head" else f"{unit.index}"
    return (index if short else f"{unit.layer} {index}"), unit.relevance


def layer_rows(units: Mapping[str, Tensor], kinds: Mapping[str, str], pattern: str,
               k: int) -> list[tuple[str, list[tuple[str, float]]]]:
    """One row per unit layer matching ``pattern``: its ``k`` most relevant units."""
    rows = []
    for name in units:
        if not fnmatch.fnmatchcase(name, pattern):
            continue
        word = _WORDS.get(kinds.get(name, "dim"), "unit")
        best = top_units({name: units[name]}, "*", k, kinds, absolute=True)
        rows.append((f"{name} ({word}s)", [_chip(u, True) for u in best]))
    if not rows:
        top_units(units, pattern, k, kinds)  # raises the error naming the layers
    return rows


def overall_rows(rows_units: Sequence[tuple[str, Mapping[str, Tensor]]],
                 kinds: Mapping[str, str], pattern: str,
                 k: int) -> list[tuple[str, list[tuple[str, float]]]]:
    """One row per caption (a generated token): its ``k`` most relevant units over all layers
    matching ``pattern``."""
    return [(caption, [_chip(u, False) for u in top_units(units, pattern, k, kinds,
                                                          absolute=True)])
            for caption, units in rows_units]


def rows_of(units: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """Row ``i`` of per-row units ``(rows, units)``."""
    return {name: v[i] for name, v in units.items()}


def stacked(parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Units of several chunks, concatenated along the first dimension."""
    names = list(parts[0]) if parts else []
    return {n: torch.cat([p[n] for p in parts]) for n in names if all(n in p for p in parts)}
