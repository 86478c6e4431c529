"""A synthetic text task with ground truth for explanations: subject–verb agreement.

The protocol of Arras et al. (2025, section 3, table 2) on generated data. A vocabulary of 24
singular nouns (``noun7``), their 24 plurals (``noun7s``), 32 filler words and the two verb forms
``is`` / ``are``. A sentence is a few fillers, the *subject*, then nouns separated by fillers,
then the verb slot. In training the intervening nouns (0 to 4) have random number, so the
subject is the only cue to the verb; held-out sets use one to four *attractors*, all of the
opposite number. The subject token is the ground truth of where the evidence is.

Tiny LLaMA and GPT-2 models (causal: the stimulus ends before the verb, which is predicted at
the last position) and a tiny BERT (masked: ``[CLS] stimulus [MASK] continuation [SEP]``, the
continuation being fillers and nouns of random number) are built from their ``transformers``
config classes (:func:`build_model`) and trained on CPU (:func:`train`). The explained function
is the contrastive logit difference ``logit(predicted form) − logit(other form)``
(:func:`contrast`), computed under the composite's op rules, so that LRP explains the difference
as one function; :func:`explain_batch` explains a batch of samples in one backward pass of
:func:`lrp_explicit.pipeline.attribute`. The metrics are in :mod:`lrp_explicit.evaluation.metrics`.

Examples
--------
>>> import torch
>>> from lrp_explicit.evaluation import metrics, text
>>> val = text.make_samples(200, masked=False, attractors=True, seed=10)
>>> model, info = text.train("llama", steps=300, seed=0, val=val)
>>> same = [s for s in val if len(s.ids) == len(val[0].ids)]      # one length: no padding
>>> ids, _, positions, labels, subjects = text.collate(same)
>>> relevance = text.explain_batch(model.double(), ids, positions, labels)
>>> truth = torch.nn.functional.one_hot(subjects, ids.shape[1]).bool()
>>> scores = metrics.token_metrics(relevance["attnlrp"], truth, text.scored_tokens(ids))
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..composites import Composite
from ..pipeline import Target, attribute, prepare, resolve_composite

__all__ = ["FAMILIES", "VOCAB", "VERBS", "PAD", "CLS", "SEP", "MASK", "NOUN0", "FILLER0",
           "N_NOUNS", "N_FILLERS", "STOP_ACCURACY", "GRADIENT_METHODS", "Sample", "make_samples",
           "collate", "build_model", "verb_logits", "accuracy", "train", "fit", "contrast",
           "explain_batch", "scored_tokens"]

#: Model families of the task: tiny LLaMA and GPT-2 (causal LMs) and BERT (masked LM).
FAMILIES: tuple[str, ...] = ("llama", "gpt2", "bert")

#: Number of singular nouns (and of plurals).
N_NOUNS = 24
#: Number of filler words.
N_FILLERS = 32
#: Id of the padding token.
PAD = 0
#: Id of ``[CLS]``.
CLS = 1
#: Id of ``[SEP]``.
SEP = 2
#: Id of ``[MASK]``.
MASK = 3
#: Ids of the verb forms ``is`` (singular, label 0) and ``are`` (plural, label 1).
VERBS = torch.tensor([4, 5])
#: First singular noun; singular nouns are ``NOUN0 .. NOUN0+23``, plurals ``NOUN0+24 ..``.
NOUN0 = 6
#: First filler word.
FILLER0 = NOUN0 + 2 * N_NOUNS
#: The words of the vocabulary, by id.
VOCAB: list[str] = (["[PAD]", "[CLS]", "[SEP]", "[MASK]", "is", "are"]
                    + [f"noun{i}" for i in range(N_NOUNS)]
                    + [f"noun{i}s" for i in range(N_NOUNS)]
                    + [f"w{i}" for i in range(N_FILLERS)])
#: Validation accuracy (attractor samples) at which :func:`train` stops.
STOP_ACCURACY = 0.985
#: The gradient baselines of :func:`explain_batch` (one plain backward pass serves both).
GRADIENT_METHODS = ("gradient", "gxi")


@dataclass
class Sample:
    """One agreement sentence.

    Attributes
    ----------
    ids : numpy.ndarray
        Token ids.
    subject : int
        Position of the subject (the ground truth).
    position : int
        Position whose output predicts the verb.
    label : int
        Number of the subject: 0 singular, 1 plural.
    """

    ids: np.ndarray
    subject: int
    position: int
    label: int


def make_samples(n: int, masked: bool, attractors: bool, seed: int) -> list[Sample]:
    """Draw ``n`` agreement sentences (seeded).

    Parameters
    ----------
    n : int
        Number of sentences.
    masked : bool
        BERT layout ``[CLS] stimulus [MASK] continuation [SEP]``; else the causal stimulus alone
        (the verb follows its last token).
    attractors : bool
        One to four intervening nouns, all of the opposite number (held-out sets); else zero
        to four of random number (training).
    seed : int
        Seed of numpy's generator.

    Returns
    -------
    list of Sample
    """
    rng = np.random.default_rng(seed)

    def fillers(lo: int, hi: int) -> list[int]:
        return list(FILLER0 + rng.integers(0, N_FILLERS, rng.integers(lo, hi + 1)))

    def noun(number: int) -> int:
        return int(NOUN0 + number * N_NOUNS + rng.integers(N_NOUNS))

    out = []
    for _ in range(n):
        label = int(rng.integers(2))
        tokens = fillers(0, 3)
        subject = len(tokens)
        tokens.append(noun(label))
        for _ in range(rng.integers(1, 5) if attractors else rng.integers(0, 5)):
            tokens += fillers(0, 2)
            tokens.append(noun(1 - label if attractors else int(rng.integers(2))))
        tokens += fillers(0, 2)
        if masked:
            tail = [noun(int(rng.integers(2))) if rng.random() < 0.3 else FILLER0
                    + int(rng.integers(N_FILLERS)) for _ in range(rng.integers(0, 5))]
            ids = [CLS, *tokens, MASK, *tail, SEP]
            out.append(Sample(np.array(ids), subject + 1, len(tokens) + 1, label))
        else:
            out.append(Sample(np.array(tokens), subject, len(tokens) - 1, label))
    return out


def collate(samples: Sequence[Sample]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A batch of samples.

    Returns
    -------
    ids : Tensor
        ``(batch, tokens)`` right-padded with :data:`PAD`.
    attention_mask : Tensor
        ``(batch, tokens)``, 1 on the tokens, 0 on the padding.
    positions, labels, subjects : Tensor
        ``(batch,)`` prediction positions, labels and subject positions.
    """
    length = max(len(s.ids) for s in samples)
    ids = np.full((len(samples), length), PAD)
    for i, s in enumerate(samples):
        ids[i, :len(s.ids)] = s.ids
    ids_t = torch.from_numpy(ids)

    def field(name: str) -> Tensor:
        return torch.tensor([getattr(s, name) for s in samples])

    return ids_t, (ids_t != PAD).long(), field("position"), field("label"), field("subject")


def scored_tokens(ids: Tensor) -> Tensor:
    """Tokens the metrics score: all but ``[CLS]``, ``[SEP]``, ``[MASK]`` and padding."""
    return (ids != CLS) & (ids != SEP) & (ids != MASK) & (ids != PAD)


def build_model(family: str, seed: int, vocab_size: int | None = None,
                positions: int = 64) -> nn.Module:
    """A tiny untrained model of ``family`` (2 layers, width 64, no dropout), seeded.

    Parameters
    ----------
    family : {"llama", "gpt2", "bert"}
        ``LlamaForCausalLM``, ``GPT2LMHeadModel`` or ``BertForMaskedLM``.
    seed : int
        Seed of the initial weights.
    vocab_size : int, optional
        The vocabulary's size (default: this task's, ``len(VOCAB)``; other synthetic tasks
        such as :mod:`~lrp_explicit.evaluation.retrieval` pass theirs).
    positions : int
        The most tokens the model takes.

    Raises
    ------
    ValueError
        For another family.
    """
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    common = dict(vocab_size=len(VOCAB) if vocab_size is None else vocab_size, pad_token_id=PAD)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=positions, tie_word_embeddings=False,
                                **common)
        return tf.LlamaForCausalLM(config)
    if family == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=positions,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=None, eos_token_id=None, **common)
        return tf.GPT2LMHeadModel(config)
    config = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=positions,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    return tf.BertForMaskedLM(config)


def verb_logits(logits: Tensor, positions: Tensor) -> Tensor:
    """The two verb logits at each sample's prediction position, ``(batch, 2)``."""
    rows = logits[torch.arange(len(positions)), positions]
    return rows[:, VERBS]


@torch.no_grad()
def accuracy(model: nn.Module, samples: Sequence[Any], batch: int = 500,
             collate_fn: Callable[[Sequence[Any]], Sequence[Tensor]] | None = None,
             head: Callable[[Tensor, Tensor], Tensor] | None = None) -> float:
    """Fraction of ``samples`` whose verb number ``model`` predicts correctly.

    ``collate_fn`` and ``head`` (default: this task's :func:`collate` and
    :func:`verb_logits`) let another task of the same shape reuse it.
    """
    collate_fn, head = collate_fn or collate, head or verb_logits
    correct = 0
    for start in range(0, len(samples), batch):
        ids, mask, pos, label = collate_fn(samples[start:start + batch])[:4]
        pred = head(model(input_ids=ids, attention_mask=mask).logits, pos).argmax(-1)
        correct += int((pred == label).sum())
    return correct / len(samples)


def train(family: str, steps: int, seed: int, val: Sequence[Sample], min_steps: int = 0,
          batch: int = 64, check_every: int = 100) -> tuple[nn.Module, dict[str, Any]]:
    """Train a model of ``family`` on the verb position (seeded, CPU).

    Cross-entropy over the two verb forms, AdamW; training stops when the accuracy on ``val``
    reaches :data:`STOP_ACCURACY` (after ``min_steps`` at least) or after ``steps``.

    Parameters
    ----------
    family : {"llama", "gpt2", "bert"}
        The model family (:func:`build_model`).
    steps : int
        Most optimiser steps.
    seed : int
        Seed of the weights, the training sentences and their order.
    val : sequence of Sample
        Validation sentences, checked every ``check_every`` steps.
    min_steps : int
        Fewest steps before stopping early.
    batch : int
        Sentences per step.
    check_every : int
        Steps between validations.

    Returns
    -------
    model : nn.Module
        The trained model in eval mode.
    info : dict
        ``steps``, ``seconds``, ``val_accuracy``, ``history`` (``(step, loss, accuracy)``) and
        ``parameters``.
    """
    model = build_model(family, seed).train()
    pool = make_samples(40 * batch + 8000, family == "bert", attractors=False, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    return fit(model, lambda: collate([pool[i] for i in rng.integers(len(pool), size=batch)]),
               verb_logits, lambda m: accuracy(m, val), steps, min_steps, check_every)


def fit(model: nn.Module, draw: Callable[[], Sequence[Tensor]],
        head: Callable[[Tensor, Tensor], Tensor], check: Callable[[nn.Module], float],
        steps: int, min_steps: int = 0, check_every: int = 100, lr: float = 3e-3
        ) -> tuple[nn.Module, dict[str, Any]]:
    """The training loop of the synthetic text tasks (seeded by the caller's ``draw``).

    Cross-entropy of ``head(logits, positions)`` against the labels, AdamW with a 100-step
    linear warm-up; stops when ``check(model)`` reaches :data:`STOP_ACCURACY` (after
    ``min_steps`` at least) or after ``steps``.

    Parameters
    ----------
    model : nn.Module
        The model, trained in place.
    draw : callable
        Returns the next batch ``(ids, attention_mask, positions, labels, …)``.
    head : callable
        ``head(logits, positions)``: the logits of the classes at each position.
    check : callable
        The validation accuracy of a model in eval mode.
    steps, min_steps, check_every : int
        Most steps, fewest steps before stopping early, steps between checks.
    lr : float
        Learning rate after the warm-up.

    Returns
    -------
    model : nn.Module
        The trained model in eval mode.
    info : dict
        ``steps``, ``seconds``, ``val_accuracy``, ``history`` (``(step, loss, accuracy)``) and
        ``parameters``.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    start, history, step = time.perf_counter(), [], 0
    for step in range(1, steps + 1):
        ids, mask, pos, label = draw()[:4]
        loss = nn.functional.cross_entropy(
            head(model(input_ids=ids, attention_mask=mask).logits, pos), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % check_every == 0 or step == steps:
            model.eval()
            acc = check(model)
            model.train()
            history.append((step, round(loss.item(), 4), acc))
            if acc >= STOP_ACCURACY and step >= min_steps:
                break
    info = dict(steps=step, seconds=round(time.perf_counter() - start, 1),
                val_accuracy=history[-1][2] if history else float("nan"), history=history,
                parameters=sum(p.numel() for p in model.parameters()))
    return model.eval(), info


def contrast(logits: Tensor, positions: Tensor, predicted: Tensor,
             head: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """``logit(predicted verb) − logit(other verb)`` per sample, ``(batch,)``.

    Parameters
    ----------
    logits : Tensor
        ``(batch, tokens, vocabulary)`` logits of the model.
    positions : Tensor
        ``(batch,)`` prediction positions.
    predicted : Tensor
        ``(batch,)`` the explained verb form (0 ``is``, 1 ``are``) of each sample.
    head : callable, optional
        The two verb logits at each position (default :func:`verb_logits`).
    """
    two = (head or verb_logits)(logits, positions)
    rows = torch.arange(len(positions))
    return two[rows, predicted] - two[rows, 1 - predicted]


def explain_batch(model: nn.Module, ids: Tensor, positions: Tensor, predicted: Tensor,
                  methods: Sequence[str] = ("attnlrp", "cp-lrp", "gradient", "gxi"),
                  composites: Mapping[str, Composite] | None = None,
                  attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per-token relevance of the contrastive verb logit difference, method by method.

    Each method is one pass of :func:`lrp_explicit.pipeline.attribute` over the whole batch,
    from the input embeddings: the samples are independent, so one backward pass of the sum of
    their differences (:func:`contrast`) explains every sample.

    Parameters
    ----------
    model : nn.Module
        A model of the task (:func:`build_model`); float64 for exact comparisons.
    ids : Tensor
        ``(batch, tokens)`` token ids. Samples of one length need no ``attention_mask``.
    positions, predicted : Tensor
        ``(batch,)`` prediction positions and explained verb forms (e.g. the predictions).
    methods : sequence of str
        Composite names (``"attnlrp"``, ``"cp-lrp"`` …, looked up in ``composites`` or else in
        the registry, strict) and the gradient baselines ``"gradient"`` (``‖∂Δ/∂x_t‖₂``) and
        ``"gxi"`` (Gradient×Input ``∂Δ/∂x_t · x_t``, summed over the embedding), which share
        one plain backward pass.
    composites : mapping of str to Composite, optional
        Ready composites by method name (built once for many batches).
    attention_mask : Tensor, optional
        ``(batch, tokens)`` mask passed to the model (padded batches).

    Returns
    -------
    dict of str to Tensor
        ``(batch, tokens)`` relevance per method: for a composite the relevance of the input
        embeddings summed over the embedding, initialised with the difference itself, and
        ``<name>:delta``, the explained difference ``(batch,)`` (for conservation checks).
    """
    ready = dict(composites or {})
    named = [m for m in methods if m not in GRADIENT_METHODS]
    baselines = [m for m in methods if m in GRADIENT_METHODS]
    kwargs = {"input_ids": ids} if attention_mask is None \
        else {"input_ids": ids, "attention_mask": attention_mask}

    def difference(initial_is_value: bool) -> Callable[[Any], Target]:
        def target(output: Any) -> Target:
            y = contrast(output.logits, positions, predicted)
            return Target(y, y.detach() if initial_is_value else torch.ones_like(y))
        return target

    out: dict[str, Tensor] = {}
    if baselines:
        item = prepare(model, dict(kwargs))
        x = item.leaf.detach()
        grad = attribute(model, item, difference(False), None).relevance["inputs_embeds"]
        if "gradient" in baselines:
            out["gradient"] = grad.norm(dim=-1)
        if "gxi" in baselines:
            out["gxi"] = (grad * x).sum(-1)
    for name in named:
        comp = ready[name] if name in ready else resolve_composite(name, model, strict=True)
        result = attribute(model, prepare(model, dict(kwargs)), difference(True), comp)
        out[name] = result.relevance["inputs_embeds"].sum(-1)
        out[name + ":delta"] = result.target.explained.detach()
    return out
