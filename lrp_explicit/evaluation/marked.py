"""A discriminating synthetic text task with ground truth: agreement with a *marked* noun.

Subject–verb agreement (:mod:`~lrp_explicit.evaluation.text`) is at the ceiling for LRP: the
subject is the first noun, and both LRP variants point at it in every sentence. Here the noun
the verb agrees with can be anywhere: a sentence lists several nouns (with filler words between
them), one of them preceded by the marker ``*``, and the verb (``is`` / ``are``) agrees with the
marked noun. The model has to combine two positions: the marker (which noun) and the noun after
it (which number). Other nouns may be preceded by a *decoy* marker ``+``, which the verb
ignores. In held-out sentences there are seven to eleven nouns, at least two of the opposite
number (attractors) and at least one of the same number as the marked noun (a distractor that
carries the same evidence as the answer, in the wrong place), and two decoys. The evidence is
the marker and the marked noun (:func:`collate`'s ground truth); :func:`noun_only` scores the
noun alone with the marker left out, the stricter test (the rare marker token is easy to point
at) that ``benchmarks/faithfulness.py`` reports first.

Tiny LLaMA and GPT-2 models (causal: the sentence ends before the verb, predicted at the last
position) and a tiny BERT (masked: ``[CLS] sentence [MASK] [SEP]``) are built from their
``transformers`` config classes (:func:`lrp_explicit.evaluation.text.build_model`) and trained
on CPU (:func:`train`, about a minute each on one thread). The explained function is the
contrastive logit difference ``logit(predicted form) − logit(other form)``; :func:`explain_batch`
explains a batch with AttnLRP, CP-LRP, Gradient, Gradient×Input and Integrated Gradients (from a
filler word's embedding), each one pass of :func:`lrp_explicit.pipeline.attribute`.
``benchmarks/faithfulness.py`` scores them with :func:`lrp_explicit.evaluate`.

Examples
--------
>>> from lrp_explicit.evaluation import marked
>>> val = marked.make_samples(300, masked=False, held_out=True, seed=10)
>>> model, info = marked.train("llama", steps=2000, seed=0, val=val, min_steps=1000)
>>> same = [s for s in val if len(s.ids) == len(val[0].ids)]     # one length: no padding
>>> ids, _, positions, labels, truth = marked.collate(same)
>>> relevance = marked.explain_batch(model.double(), ids, positions, labels)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..composites import Composite
from ..pipeline import Target, attribute, prepare, resolve_composite
from .text import build_model as _build
from . import text as _text
from .text import fit

__all__ = ["VOCAB", "PAD", "CLS", "SEP", "MASK", "MARK", "DECOY", "VERBS", "NOUN0", "FILLER0",
           "N_NOUNS", "N_FILLERS", "MAX_LENGTH", "STOP_ACCURACY", "METHODS", "Sample",
           "make_samples", "collate", "scored_tokens", "noun_only", "build_model",
           "verb_logits", "accuracy", "train", "contrast", "explain_batch"]

#: Special tokens, the marker ``*`` and the decoy marker ``+``.
PAD, CLS, SEP, MASK, MARK, DECOY = 0, 1, 2, 3, 4, 5
#: Ids of ``is`` (singular, label 0) and ``are`` (plural, label 1).
VERBS = torch.tensor([6, 7])
#: Number of singular nouns (and of plurals).
N_NOUNS = 24
#: First singular noun; plurals follow the singulars.
NOUN0 = 8
#: Number of filler words.
N_FILLERS = 24
#: First filler word.
FILLER0 = NOUN0 + 2 * N_NOUNS
#: The words of the vocabulary, by id.
VOCAB: list[str] = (["[PAD]", "[CLS]", "[SEP]", "[MASK]", "*", "+", "is", "are"]
                    + [f"noun{i}" for i in range(N_NOUNS)]
                    + [f"noun{i}s" for i in range(N_NOUNS)]
                    + [f"w{i}" for i in range(N_FILLERS)])
#: The most tokens a model takes.
MAX_LENGTH = 64
#: Validation accuracy at which :func:`train` stops (after its ``min_steps``).
STOP_ACCURACY = 0.98
#: The methods of :func:`explain_batch`.
METHODS = ("attnlrp", "cp-lrp", "gradient", "gxi", "ig")


@dataclass
class Sample:
    """One sentence.

    Attributes
    ----------
    ids : numpy.ndarray
        Token ids.
    marker : int
        Position of the marker ``*``.
    noun : int
        Position of the marked noun (``marker + 1``).
    position : int
        Position whose output predicts the verb.
    label : int
        Number of the marked noun: 0 singular, 1 plural.
    """

    ids: np.ndarray
    marker: int
    noun: int
    position: int
    label: int


def make_samples(n: int, masked: bool, held_out: bool, seed: int,
                 nouns: tuple[int, int] | None = None,
                 decoys: tuple[int, int] | None = None) -> list[Sample]:
    """Draw ``n`` sentences (seeded).

    Parameters
    ----------
    n : int
        Number of sentences.
    masked : bool
        BERT layout ``[CLS] sentence [MASK] [SEP]``; else the sentence alone.
    held_out : bool
        Seven to eleven nouns with at least two attractors (opposite number), one distractor
        of the marked noun's number and two decoys; else two to eleven nouns of random number
        and up to two decoys (training).
    seed : int
        Seed of numpy's generator.
    nouns : (int, int), optional
        The fewest and most nouns (overrides the defaults).
    decoys : (int, int), optional
        The fewest and most other nouns preceded by the decoy ``+`` (overrides the
        defaults).

    Returns
    -------
    list of Sample
    """
    rng = np.random.default_rng(seed)
    lo, hi = nouns or ((7, 11) if held_out else (2, 11))
    fewest, most = decoys or ((2, 2) if held_out else (0, 2))
    if held_out and lo < 4:
        raise ValueError("held-out sentences need at least four nouns")
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        label, chosen = int(rng.integers(2)), int(rng.integers(k))
        numbers = rng.integers(0, 2, k)
        numbers[chosen] = label
        if held_out:
            others = [j for j in range(k) if j != chosen]
            rng.shuffle(others)
            numbers[others[:2]] = 1 - label
            numbers[others[2]] = label
        others = [j for j in range(k) if j != chosen]
        count = min(int(rng.integers(fewest, most + 1)), len(others))
        decoyed = set(int(j) for j in rng.choice(others, size=count, replace=False)) \
            if count else set()
        tokens: list[int] = [CLS] if masked else []
        marker = 0
        for j in range(k):
            tokens += [int(t) for t in FILLER0 + rng.integers(0, N_FILLERS, rng.integers(0, 3))]
            if j == chosen:
                marker = len(tokens)
                tokens.append(MARK)
            elif j in decoyed:
                tokens.append(DECOY)
            tokens.append(int(NOUN0 + numbers[j] * N_NOUNS + rng.integers(N_NOUNS)))
        tokens += [int(t) for t in FILLER0 + rng.integers(0, N_FILLERS, rng.integers(0, 3))]
        if masked:
            tokens += [MASK, SEP]
        position = len(tokens) - (2 if masked else 1)
        out.append(Sample(np.array(tokens), marker, marker + 1, position, label))
    return out


def collate(samples: Sequence[Sample]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A batch, right-padded with :data:`PAD`.

    Returns
    -------
    ids, attention_mask : Tensor
        ``(batch, tokens)``.
    positions, labels : Tensor
        ``(batch,)`` prediction positions and labels.
    truth : Tensor
        ``(batch, tokens)`` boolean masks of the ground truth (the marker and the marked
        noun).
    """
    length = max(len(s.ids) for s in samples)
    ids = np.full((len(samples), length), PAD)
    truth = np.zeros((len(samples), length), dtype=bool)
    for i, s in enumerate(samples):
        ids[i, :len(s.ids)] = s.ids
        truth[i, [s.marker, s.noun]] = True
    ids_t = torch.from_numpy(ids)
    return (ids_t, (ids_t != PAD).long(), torch.tensor([s.position for s in samples]),
            torch.tensor([s.label for s in samples]), torch.from_numpy(truth))


def scored_tokens(ids: Tensor) -> Tensor:
    """Tokens the metrics score: all but ``[CLS]``, ``[SEP]``, ``[MASK]`` and padding."""
    return (ids != CLS) & (ids != SEP) & (ids != MASK) & (ids != PAD)


def noun_only(ids: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """The stricter scoring: the marked noun alone is the ground truth and the marker is not
    scored. Returns ``(truth, valid)``."""
    return truth & (ids != MARK), scored_tokens(ids) & (ids != MARK)


def build_model(family: str, seed: int) -> nn.Module:
    """A tiny untrained model of ``family`` for this vocabulary (see
    :func:`lrp_explicit.evaluation.text.build_model`)."""
    return _build(family, seed, vocab_size=len(VOCAB), positions=MAX_LENGTH)


def verb_logits(logits: Tensor, positions: Tensor) -> Tensor:
    """The two verb logits at each sample's prediction position, ``(batch, 2)``."""
    rows = logits[torch.arange(len(positions)), positions]
    return rows[:, VERBS.to(rows.device)]


def accuracy(model: nn.Module, samples: Sequence[Sample], batch: int = 500) -> float:
    """Fraction of ``samples`` whose verb number ``model`` predicts correctly."""
    return _text.accuracy(model, samples, batch, collate_fn=collate, head=verb_logits)


def train(family: str, steps: int, seed: int, val: Sequence[Sample], min_steps: int = 0,
          batch: int = 64, check_every: int = 250, lr: float = 3e-3
          ) -> tuple[nn.Module, dict[str, Any]]:
    """Train a model of ``family`` on the verb (seeded, CPU).

    Cross-entropy over the two verb forms on freshly drawn training sentences, AdamW with a
    warm-up; training stops when the accuracy on ``val`` reaches :data:`STOP_ACCURACY` (after
    ``min_steps`` at least) or after ``steps``.

    Parameters
    ----------
    family : {"llama", "gpt2", "bert"}
        The model family.
    steps : int
        Most optimiser steps.
    seed : int
        Seed of the weights and the training sentences.
    val : sequence of Sample
        Validation sentences, checked every ``check_every`` steps.
    min_steps : int
        Fewest steps before stopping early.
    batch : int
        Sentences per step.
    check_every : int
        Steps between validations.
    lr : float
        Learning rate after the warm-up.

    Returns
    -------
    model : nn.Module
        The trained model in eval mode.
    info : dict
        ``steps``, ``seconds``, ``val_accuracy``, ``history`` and ``parameters``.
    """
    model = build_model(family, seed).train()
    masked = family == "bert"
    rng = np.random.default_rng(seed + 2)
    return fit(model, lambda: collate(make_samples(batch, masked, held_out=False,
                                                   seed=int(rng.integers(2 ** 31)))),
               verb_logits, lambda m: accuracy(m, val), steps, min_steps, check_every, lr)


def contrast(logits: Tensor, positions: Tensor, predicted: Tensor) -> Tensor:
    """``logit(predicted verb) − logit(other verb)`` per sample, ``(batch,)``."""
    return _text.contrast(logits, positions, predicted, head=verb_logits)


def explain_batch(model: nn.Module, ids: Tensor, positions: Tensor, predicted: Tensor,
                  methods: Sequence[str] = METHODS,
                  composites: Mapping[str, Composite] | None = None,
                  ig_steps: int = 16) -> dict[str, Tensor]:
    """Per-token relevance of :func:`contrast` for a batch of equal-length sentences.

    Each method is one pass of :func:`lrp_explicit.pipeline.attribute` over the batch from the
    input embeddings (Integrated Gradients: one pass over ``ig_steps`` scaled copies of it).

    Parameters
    ----------
    model : nn.Module
        A model of the task; float64 for exact comparisons.
    ids : Tensor
        ``(batch, tokens)`` token ids, all of one length (no padding).
    positions, predicted : Tensor
        ``(batch,)`` prediction positions and explained verb forms.
    methods : sequence of str
        Composite names (``"attnlrp"``, ``"cp-lrp"``), ``"gradient"`` (``‖∂Δ/∂x_t‖₂``),
        ``"gxi"`` (``∂Δ/∂x_t · x_t``) and ``"ig"`` (Integrated Gradients from the baseline
        ``b`` of a filler word's embedding at every position, midpoint rule:
        ``Σ_h (x_t − b_t) (1/S) Σ_s ∂Δ/∂x_t(b + α_s (x − b))``; a zero baseline is degenerate
        for LLaMA, whose RMSNorm makes the output constant along ``α x`` except next to 0).
    composites : mapping of str to Composite, optional
        Ready composites by name.
    ig_steps : int
        Steps of Integrated Gradients.

    Returns
    -------
    dict of str to Tensor
        ``(batch, tokens)`` relevance per method, and ``<composite>:delta`` and ``ig:delta``
        (the explained difference, and for Integrated Gradients ``Δ(x) − Δ(b)``) for
        conservation checks.
    """
    ready = dict(composites or {})

    def target(initial_is_value: bool, repeat: int = 1) -> Callable[[Any], Target]:
        def make(output: Any) -> Target:
            y = contrast(output.logits, positions.repeat(repeat), predicted.repeat(repeat))
            return Target(y, y.detach() if initial_is_value else torch.ones_like(y))
        return make

    out: dict[str, Tensor] = {}
    x = prepare(model, ids).leaf.detach()
    if "gradient" in methods or "gxi" in methods:
        grad = attribute(model, prepare(model, x), target(False), None).relevance[
            "inputs_embeds"]
        if "gradient" in methods:
            out["gradient"] = grad.norm(dim=-1)
        if "gxi" in methods:
            out["gxi"] = (grad * x).sum(-1)
    if "ig" in methods:
        base = prepare(model, torch.full_like(ids, FILLER0)).leaf.detach()
        alphas = (torch.arange(ig_steps, dtype=x.dtype, device=x.device) + 0.5) / ig_steps
        scaled = (base[None] + alphas[:, None, None, None] * (x - base)[None]).flatten(0, 1)
        result = attribute(model, prepare(model, scaled), target(False, ig_steps), None)
        grad = result.relevance["inputs_embeds"].view(ig_steps, *x.shape)
        out["ig"] = (grad.mean(0) * (x - base)).sum(-1)
        with torch.no_grad():
            ends = contrast(model(inputs_embeds=torch.cat([x, base])).logits,
                            positions.repeat(2), predicted.repeat(2))
        out["ig:delta"] = ends[:len(x)] - ends[len(x):]
    for name in methods:
        if name in ("gradient", "gxi", "ig"):
            continue
        comp = ready[name] if name in ready else resolve_composite(name, model, strict=True)
        result = attribute(model, prepare(model, x), target(True), comp)
        out[name] = result.relevance["inputs_embeds"].sum(-1)
        out[name + ":delta"] = result.target.explained.detach()
    return out
