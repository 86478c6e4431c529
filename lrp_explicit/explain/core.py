""":func:`explain`: one prediction (or a batch) explained by a composite, as an
:class:`~lrp_explicit.explain.result.Explanation`."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..composites import Composite, unwrap
from ..errors import InputError
from ..pipeline import (
    SOFTMAX,
    Prepared,
    Target,
    attribute,
    check_finite,
    collate,
    embed,
    main_output,
    make_leaf,
    per_sample,
    prepare,
    resolve_composite,
    split_batch,
    task_of,
)
from ..pipeline import progress as show_progress
from ..pipeline.core import grad_enabled
from ..pipeline.inputs import check_length
from ..pipeline.targets import (
    check_position,
    decoded_pieces,
    explained_row,
    logit_relevance,
    plain_spec,
    resolve_ids,
)
from .common import contrast_id as _common_contrast_id
from .common import model_name, namer, vocabulary
from .generate import explain_generation
from .result import Explanation, ExplanationBatch, GenerationExplanation
from .tasks import OWN_TASKS, explain_task
from .units import UnitPlan, conditions_of, is_unit_target
from .words import TokenText, extend_text, join_text, token_text

__all__ = ["BATCH_SIZE", "cosine", "explain", "mean_pool"]

#: Default number of samples explained in one forward and one backward pass.
BATCH_SIZE = 8


@grad_enabled()
def explain(model: nn.Module, inputs: Any, target: Any = None,
            composite: str | Composite = "attnlrp", contrast: Any = None,
            tokenizer: Any = None, *, position: int | None = None,
            record: Sequence[str] = (), progress: bool | None = None,
            batch_size: int = BATCH_SIZE, continuation: bool = False,
            generate: int | None = None,
            generation_kwargs: Mapping[str, Any] | None = None,
            condition: Any = None
            ) -> Explanation | GenerationExplanation | ExplanationBatch:
    """Explain a prediction of ``model`` with LRP and return the relevance of each input token
    (or pixel).

    The task follows the model's head (:func:`~lrp_explicit.explain.task_of`): a causal LM
    explains the next token's logit, a masked LM the logit at the mask token, a sequence or
    image classifier a class logit, a sentence encoder (a Hugging Face base model) the cosine
    similarity of the mean-pooled embeddings of two texts. The relevance is initialised with
    the explained logit and read from the input embeddings (or pixels) after one backward pass;
    the model is left exactly as it was, also when an error is raised.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face model or a plain PyTorch model (which takes one float tensor).
    inputs : str, tuple of str, Tensor, dict, PIL image or list
        Text (needs ``tokenizer``); a pair of texts ``(a, b)`` for a sentence encoder (and as
        a text pair for a classifier); token ids (``list`` of int or an integer tensor);
        embeddings or pixel values (float tensor); a dict of model keyword arguments; an image
        (with its image processor as ``tokenizer``). A list of such inputs (or a tensor or
        dict with a batch dimension larger than 1) is a batch: one :class:`Explanation` per
        sample, with a progress bar; the samples are explained ``batch_size`` at a time in one
        forward and one backward pass (padded on the right where their lengths differ), and
        each gets exactly the relevance it gets alone.
    target : int, str, list of int or mapping, optional
        The token or class to explain; default: the model's prediction. A text must be one
        token (``" Paris"``, with the space a byte-level tokenizer puts before a word): a text
        that the tokenizer splits into several tokens is an error that names the pieces and
        the single-token form if there is one, unless ``continuation=True``. For a causal LM a
        list of ids is a continuation: it is appended to the input and the sum of its logits
        (each at the position before it) is explained. A classifier also takes a label name.
        For a batch: one target for all samples, or a list with one per sample (so a
        continuation for a batch is a list of lists). A mapping of module name to latent
        units (as for ``condition``, or ``{unit: weight}``) explains the units instead of a
        logit: the relevance starts at their activation (times the weights) at the explained
        token (``position``; by default the last token of a causal LM, the mask of a masked
        LM, all tokens otherwise), so it shows which inputs make a neuron fire. Every result
        carries the relevance of every MLP neuron, attention head and residual-stream
        dimension in ``units`` (``top_units()``, ``latent_view()``).
    composite : str or Composite
        Registry name (``"attnlrp"``, ``"cp-lrp"``) or a :class:`~lrp_explicit.Composite`.
    contrast : int, str, optional
        Another token or class: the logit difference ``z_target − z_contrast`` is explained.
        ``"softmax"``: initial relevance ``z_t`` for the target and ``−z_j / N`` for every
        logit ``z_j`` of the others (the weights 1 and −1/N of a softmax-style explanation,
        N the number of classes or tokens).
    tokenizer : tokenizer or image processor, optional
        Needed for text (and to show tokens), or an image processor for images.
    position : int, optional
        Token position of a per-token output (default: the last one, the mask for a masked
        LM).
    record : sequence of str
        ``fnmatch`` patterns of module names whose output relevance is kept in
        :attr:`Explanation.latent`.
    progress : bool, optional
        Show a progress bar for batches (default: when there are at least two samples).
    batch_size : int
        Samples per forward and backward pass (no rule mixes the samples of a batch, so the
        sum of their explained scores is explained at once); with ``generate``, generated
        tokens per pass.
    continuation : bool
        A causal LM's ``target`` text is a continuation, whatever its number of tokens: it is
        appended to the input and the sum of its tokens' logits is explained.
    generate : int, optional
        Let the causal LM generate up to this many tokens after the prompt (its own
        ``generate``, greedy by default) and explain each generated token from the tokens
        before it: a :class:`~lrp_explicit.GenerationExplanation` whose ``relevance[i, j]`` is
        the relevance of token ``j`` for generated token ``i`` (row ``i`` equals ``explain``
        of the prefix with ``target`` the generated token; see
        :mod:`lrp_explicit.explain.generate`). ``contrast`` applies at every step; no
        ``target`` or ``position``.
    generation_kwargs : mapping, optional
        More arguments of ``model.generate`` (``do_sample``, ``temperature``,
        ``repetition_penalty`` …).
    condition : mapping or list of mapping, optional
        Let only the relevance of these latent units pass: module name → units
        (``{"model.layers.3.mlp.act_fn": [17, 301]}``, ``{"model.layers.3.self_attn":
        {"heads": [2, 5]}}``, ``{"model.layers.3": [7]}`` for residual dimensions; see
        :mod:`lrp_explicit.latent`). The relevance is the input relevance that flows through
        the units (of every module named, later ones first); the relevance of all units of a
        layer sums over them, and a condition on no unit gives zero. A list of conditions
        gives one result per condition (sample-major for a batch), the conditions that name
        the same modules explained together, stacked along the batch.

    Returns
    -------
    Explanation, GenerationExplanation or ExplanationBatch
        One explanation, or for a batch an :class:`~lrp_explicit.ExplanationBatch` (a list
        with ``save``, ``to_html`` and a notebook view).

    Raises
    ------
    ValueError
        For a target or contrast outside the vocabulary or the classes, an empty text, an
        unknown composite name, or relevance that is NaN or infinite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain() needs an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    position = check_position(position)
    target, contrast = plain_spec(target), plain_spec(contrast)
    task = task_of(model)
    config = getattr(unwrap(model), "config", None)
    if task is None and getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{type(unwrap(model)).__name__} is an encoder–decoder without a head: "
                         "nothing to explain; load its …ForConditionalGeneration class")
    comp = resolve_composite(composite, model)  # looked up once; an unknown name fails first
    conditions = conditions_of(condition)
    if (conditions is not None or is_unit_target(target)) and (
            task in OWN_TASKS or task == "similarity" or generate is not None):
        raise ValueError(f"condition= and latent unit targets are for one prediction of a "
                         f"decoder or encoder, not for {'generate=' if generate else task}")
    if is_unit_target(target) and contrast is not None:
        raise ValueError("a latent unit target has no contrast; give weights to several units "
                         "instead ({unit: 1.0, other: -1.0})")
    if task in OWN_TASKS:  # encoder–decoders and image–text models: explain/tasks.py
        return explain_task(task, model, inputs, target, comp, contrast, tokenizer,
                            position=position, record=record, generate=generate,
                            generation_kwargs=generation_kwargs, batch_size=batch_size,
                            continuation=continuation)
    samples = split_batch(inputs, task)
    if generate is not None:
        return _generations(model, inputs, samples, target, contrast, comp, tokenizer,
                            position, record, progress, batch_size, continuation, generate,
                            generation_kwargs)
    if generation_kwargs is not None:
        raise ValueError("generation_kwargs needs generate=N (the number of tokens to generate)")
    if samples is None:
        got = _explain_chunk(model, [inputs], [target], [contrast], comp, tokenizer, task,
                             position, record, continuation, conditions, batch_size)
        return ExplanationBatch(got) if conditions is not None and conditions[1] else got[0]
    targets, contrasts = per_sample(target, len(samples)), per_sample(contrast, len(samples))
    show = progress if progress is not None else True
    chunks = [range(i, min(i + batch_size, len(samples)))
              for i in range(0, len(samples), batch_size)]
    bar = show_progress(range(len(samples)), show, total=len(samples))
    out = ExplanationBatch()
    for chunk in chunks:
        out += _explain_chunk(model, [samples[i] for i in chunk], [targets[i] for i in chunk],
                              [contrasts[i] for i in chunk], comp, tokenizer, task, position,
                              record, continuation, conditions, batch_size)
        if hasattr(bar, "update"):
            bar.update(len(chunk))
    if hasattr(bar, "close"):
        bar.close()
    return out


def _generations(model: nn.Module, inputs: Any, samples: list[Any] | None, target: Any,
                 contrast: Any, comp: Composite, tokenizer: Any, position: int | None,
                 record: Sequence[str], progress: bool | None, batch_size: int,
                 continuation: bool, generate: int, options: Mapping[str, Any] | None
                 ) -> GenerationExplanation | ExplanationBatch:
    """``explain(..., generate=N)``: one prompt, or each prompt of a batch in turn."""
    if target is not None or continuation:
        raise ValueError("generate= explains the tokens the model generates: give no target "
                         "(or continuation)")
    if position is not None:
        raise ValueError("generate= explains each generated token at its own position: give "
                         "no position")
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"generation_kwargs must be a dict, not {type(options).__name__}")
    if samples is None:
        return explain_generation(model, inputs, comp, tokenizer, contrast, generate, options,
                                  record=record, batch_size=batch_size, progress=progress)
    contrasts = per_sample(contrast, len(samples))
    return ExplanationBatch(
        explain_generation(model, sample, comp, tokenizer, c, generate, options, record=record,
                           batch_size=batch_size, progress=progress)
        for sample, c in zip(samples, contrasts))


_model_name = model_name
_vocabulary = vocabulary


@dataclass
class _Sample:
    """One sample of a chunk: its prepared input and what is explained for it."""

    item: Prepared
    target: Any
    contrast: Any
    continuation: list[int] | None = None
    texts: tuple[str, ...] | None = None


def _texts(inp: Any) -> tuple[str, ...] | None:
    """The text (or pair of texts) of an input given as text."""
    if isinstance(inp, str):
        return (inp,)
    if isinstance(inp, tuple) and inp and all(isinstance(t, str) for t in inp):
        return inp
    return None


def _sample(model: nn.Module, inp: Any, target: Any, contrast: Any, tokenizer: Any,
            task: str | None, continuation: bool = False) -> _Sample:
    target, contrast = plain_spec(target), plain_spec(contrast)
    item = prepare(model, inp, tokenizer, task)
    texts = _texts(inp)
    if continuation and task != "causal-lm":
        raise ValueError(f"continuation=True is for a causal LM; a {task or 'plain'} model "
                         "explains one token or class")
    if task == "causal-lm" and target is not None and not is_unit_target(target) \
            and (continuation or not isinstance(target, int)):
        ids = resolve_ids(target, task, _vocabulary(model), tokenizer, None, 0,
                          continuation=continuation)
        if isinstance(ids, list):
            if contrast is not None:
                raise ValueError("a continuation cannot be contrasted; give one target token")
            return _Sample(_extend(model, item, ids, tokenizer), target, contrast, ids, texts)
    elif continuation:
        raise ValueError("continuation=True needs a target: the text or token ids of the "
                         "continuation")
    return _Sample(item, target, contrast, None, texts)


def _explain_chunk(model: nn.Module, inputs: list[Any], targets: list[Any],
                   contrasts: list[Any], comp: Composite, tokenizer: Any, task: str | None,
                   position: int | None, record: Sequence[str],
                   continuation: bool = False,
                   conditions: tuple[list[Mapping[str, Any]], bool] | None = None,
                   group: int = BATCH_SIZE) -> list[Explanation]:
    """Explain the samples of one chunk in one forward and one backward pass (one pass per
    sample where they cannot share one)."""
    if task == "similarity":
        if continuation:
            raise ValueError("continuation=True is for a causal LM; a sentence encoder "
                             "explains a similarity")
        return _explain_similarities(model, inputs, targets, contrasts, comp, tokenizer,
                                     record)
    samples = [_sample(model, inp, t, c, tokenizer, task, continuation)
               for inp, t, c in zip(inputs, targets, contrasts)]
    units = [t for t in targets if is_unit_target(t)]
    if units and (len(units) < len(targets) or any(t != units[0] for t in units)):
        raise ValueError("a batch explains one latent unit target for all samples (or logits "
                         "for all); explain the samples apart")
    plan = UnitPlan(model, targets[0], conditions[0] if conditions is not None else None)
    batch = collate(model, [s.item for s in samples])
    if batch is None:
        return [e for s in samples
                for e in _explain_samples(model, [s], s.item, comp, tokenizer, task, position,
                                          record, plan, group)]
    return _explain_samples(model, samples, batch, comp, tokenizer, task, position, record,
                            plan, group)


def _explain_samples(model: nn.Module, samples: list[_Sample], batch: Prepared,
                     comp: Composite, tokenizer: Any, task: str | None, position: int | None,
                     record: Sequence[str], plan: UnitPlan | None = None,
                     group: int = BATCH_SIZE) -> list[Explanation]:
    config = getattr(unwrap(model), "config", None)
    lengths = batch.lengths
    plan = plan or UnitPlan(model)
    resolve = plan.target(samples, lengths, task, tokenizer, position) \
        if plan.weights is not None \
        else _logit_targets(samples, lengths, task, tokenizer, config, position)
    result = attribute(model, batch, resolve, comp, record=record, observers=plan.observers())
    grad = result.relevance[next(iter(batch.leaves))]
    if grad is None:
        raise ValueError("no relevance reached the input: is the explained output computed "
                         "from it?")
    logits = main_output(result.output)
    width = grad.shape[1] if grad.dim() > 1 else None
    out = []
    for b, (s, info) in enumerate(zip(samples, result.target.info["samples"])):
        n = lengths[b] if lengths is not None else None
        relevance = _per_position(grad[b:b + 1, :n] if n is not None else grad[b:b + 1])
        check_finite(relevance, "relevance")
        tokens = s.item.tokens[0] if s.item.tokens is not None \
            and s.item.key != "pixel_values" and relevance.dim() == 1 else None
        if tokens is None and relevance.dim() == 1:
            tokens = [str(i) for i in range(relevance.shape[0])]
        segments = names = None
        if s.continuation is not None:
            prompt = len(tokens) - len(s.continuation)
            segments = [0] * prompt + [1] * len(s.continuation)
            names = ["prompt", "continuation"]
        ids = s.item.ids[0].tolist() if s.item.ids is not None and tokens is not None \
            and s.item.ids.shape[-1] == len(tokens) else None
        out.append(Explanation(
            tokens=tokens, relevance=relevance, score=info["score"],
            target=info.get("target", s.target), label=info["label"],
            task=task or "classification",
            contrast=_contrast_value(s.contrast, task, tokenizer, config, logits),
            prediction=info["prediction"], segments=segments, segment_names=names,
            image=s.item.image, latent=_latent(result.latent, b, len(samples), n, width),
            composite=comp.name, model=_model_name(model), ids=ids,
            token_text=_token_text(tokenizer, s.texts, ids, tokens, s.continuation),
            units=plan.units(b, len(samples)), unit_kinds=dict(plan.kinds)))
    if plan.conditions:
        out = plan.conditioned(model, batch, comp, out, lengths, _per_position, group)
    return out


def _token_text(tokenizer: Any, texts: tuple[str, ...] | None, ids: list[int] | None,
                tokens: list[str] | None, continuation: list[int] | None) -> TokenText | None:
    """Pieces and words of the tokens (offsets of the text; the continuation decoded)."""
    if ids is None or tokens is None or tokenizer is None:
        return None
    extra = len(continuation or [])
    prompt = len(ids) - extra
    text = token_text(tokenizer, texts, ids[:prompt], tokens[:prompt])
    if extra:
        text = extend_text(tokenizer, text, ids[:prompt], ids[prompt:], tokens[prompt:])
    return text


def _latent(latent: dict[str, Tensor], b: int, size: int, length: int | None,
            width: int | None = None) -> dict[str, Tensor]:
    """Recorded relevance of sample ``b`` of a batch of ``size``, on the CPU, without the
    batch dimension (and without the padding after its ``length`` of ``width`` tokens)."""
    out = {}
    for key, grad in latent.items():
        g = grad.cpu()
        if size == 1:
            out[key] = g[0] if g.dim() > 1 and g.shape[0] == 1 else g
            continue
        g = g[b] if g.dim() >= 1 and g.shape[0] == size else g
        if length is not None and g.dim() >= 1 and g.shape[0] == width and length < width:
            g = g[:length]
        out[key] = g
    return out


def _logit_targets(samples: list[_Sample], lengths: list[int] | None, task: str | None,
                   tokenizer: Any, config: Any, position: int | None
                   ) -> Callable[[Any], Target]:
    """The sum over the samples of each one's explained logit (with its contrast) or
    continuation, each read within the sample's own (unpadded) positions."""
    def resolve(output: Any) -> Target:
        logits = main_output(output)
        init = torch.zeros_like(logits)
        infos = []
        for b, s in enumerate(samples):
            n = lengths[b] if lengths is not None and logits.dim() == 3 else None
            view = logits[b:b + 1, :n] if n is not None else logits[b:b + 1]
            into = init[b:b + 1, :n] if n is not None else init[b:b + 1]
            if s.continuation is not None:
                info = _continuation(view, into, s.continuation, tokenizer)
            else:
                info = _logit(view, into, s, task, tokenizer, config, position)
            check_finite(info["score"], "score")
            infos.append(info)
        return Target(logits, init, {"samples": infos})

    return resolve


def _continuation(logits: Tensor, into: Tensor, continuation: list[int],
                  tokenizer: Any) -> dict[str, Any]:
    """The summed logits of a continuation, each at the position before its token."""
    start = logits.shape[1] - len(continuation) - 1
    rows = [(0, start + k, t) for k, t in enumerate(continuation)]
    for r in rows:
        into[r] = logits[r].detach()
    score = float(sum(float(logits[r].detach()) for r in rows))
    words = "".join(_words(tokenizer, continuation))
    return {"score": score, "target": continuation, "prediction": None,
            "label": f"continuation {words!r} ({len(continuation)} tokens)"}


def _logit(logits: Tensor, into: Tensor, s: _Sample, task: str | None, tokenizer: Any,
           config: Any, position: int | None) -> dict[str, Any]:
    """One logit (the prediction, or the sample's target), with an optional contrast."""
    row = explained_row(logits, task, s.item, tokenizer, position)
    z = logits[row].detach()
    prediction = int(z.argmax())
    explained = resolve_ids(s.target, task or "classification", z.shape[-1], tokenizer,
                            config, prediction)
    name = _namer(task, tokenizer, config)
    _, suffix = logit_relevance(
        logits, row, explained, s.contrast, name,
        lambda c: _contrast_id(c, task, z.shape[-1], tokenizer, config), out=into)
    score = float(into[row].double().sum())  # Σ weights ⊙ logits
    return {"score": score, "target": explained, "prediction": prediction,
            "label": _label(task, name(explained), row) + suffix}


def _per_position(grad: Tensor) -> Tensor:
    """Relevance per token (summed over the hidden size), per pixel (over the channels), or
    per feature of a plain model's ``(1, features)`` input."""
    g = grad.detach()
    if g.dim() == 2 and g.shape[0] == 1:  # one sample of features: nothing to sum over
        return g[0].cpu()
    g = g[0] if g.dim() in (3, 4) and g.shape[0] == 1 else g
    return (g.sum(0) if g.dim() == 3 and grad.dim() == 4 else g.sum(-1)).cpu()


def _words(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f" {i}" for i in ids]
    return decoded_pieces(tokenizer, ids)


_namer = namer


def _label(task: str | None, name: str, row: tuple[int, ...]) -> str:
    if task == "causal-lm":
        return f"next token {name}"
    if task == "masked-lm":
        return f"mask token → {name}"
    if len(row) == 2:
        return f"{name} at token {row[1]}"
    return name


_contrast_id = _common_contrast_id


def _contrast_value(contrast: Any, task: str | None, tokenizer: Any, config: Any,
                    logits: Tensor) -> int | str | None:
    if contrast is None:
        return None
    if isinstance(contrast, str) and contrast.lower() == SOFTMAX:
        return SOFTMAX
    return _contrast_id(contrast, task, logits.shape[-1], tokenizer, config)


def _extend(model: nn.Module, item: Prepared, ids: list[int], tokenizer: Any) -> Prepared:
    """The item with a continuation's tokens appended (teacher forcing)."""
    if item.ids is None:
        raise ValueError("a continuation needs the input as text or token ids")
    extra = torch.tensor([ids])
    check_length(model, item.leaf.shape[1] + len(ids), "the input with its continuation")
    x = embed(model, extra)
    leaf = make_leaf(torch.cat([item.leaf.detach(), x.to(item.leaf.device)], dim=1))
    kwargs = dict(item.kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor):
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(1, len(ids))], dim=1)
    tokens = list((item.tokens or [[]])[0]) + (
        list(tokenizer.convert_ids_to_tokens(ids)) if tokenizer is not None
        else [str(i) for i in ids])
    return Prepared({"inputs_embeds": leaf}, kwargs, torch.cat([item.ids, extra], dim=1),
                    [tokens])


# ============================================================================ similarity


def mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of the hidden states over the tokens the attention mask keeps
    (sentence-transformers' pooling)."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def cosine(u: Tensor, v: Tensor) -> Tensor:
    """Cosine similarity along the last dimension (the norms are held constant by the rules)."""
    return (u * v).sum(-1) / (torch.sqrt((u * u).sum(-1)) * torch.sqrt((v * v).sum(-1)))


def _hidden(output: Any) -> Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if isinstance(hidden, Tensor) else main_output(output)


def _explain_similarities(model: nn.Module, pairs: list[Any], targets: list[Any],
                          contrasts: list[Any], comp: Composite, tokenizer: Any,
                          record: Sequence[str]) -> list[Explanation]:
    """The cosine similarity of each pair of texts, all pairs in one pass."""
    for pair, target, contrast in zip(pairs, targets, contrasts):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError("a sentence encoder explains the similarity of two texts: pass a "
                             f"pair (text_a, text_b), got {type(pair).__name__}"
                             + (f" of {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
        if target is not None or contrast is not None:
            raise ValueError(f"a similarity has no target or contrast (got target={target!r}, "
                             f"contrast={contrast!r})")
    sides = [[prepare(model, pair[k], tokenizer, "similarity") for pair in pairs]
             for k in (0, 1)]
    batches = [collate(model, side) for side in sides]
    if any(b is None for b in batches):
        return [e for pair in pairs for e in _explain_similarities(
            model, [pair], [None], [None], comp, tokenizer, record)]

    def similarity(outputs: list[Any]) -> Target:
        u, v = (mean_pool(_hidden(out), batch.kwargs.get("attention_mask"))
                for out, batch in zip(outputs, batches))
        y = cosine(u, v)
        for value in y.detach().tolist():
            check_finite(value, "similarity")
        return Target(y, y.detach())

    plan = UnitPlan(model)
    result = attribute(model, batches, similarity, comp, record=record, label="similarity",
                       observers=plan.observers())
    out = []
    for i in range(len(pairs)):
        parts, tokens, segments, ids, texts = [], [], [], [], []
        for k, (batch, side) in enumerate(zip(batches, sides)):
            n = batch.lengths[i] if batch.lengths is not None else None
            grad = result.relevances[k]["inputs_embeds"][i:i + 1]
            parts.append(_per_position(grad[:, :n] if n is not None else grad))
            words = (side[i].tokens or [[]])[0]
            tokens += words
            segments += [k] * len(words)
            own = side[i].ids[0].tolist() if side[i].ids is not None else None
            ids = ids + own if ids is not None and own is not None else None
            texts.append(_token_text(tokenizer, _texts(pairs[i][k]), own, words, None))
        relevance = torch.cat(parts)
        check_finite(relevance, "relevance")
        out.append(Explanation(
            tokens=tokens, relevance=relevance,
            score=float(result.target.explained[i].detach()), target=None,
            label="similarity of text 1 and text 2", task="similarity", segments=segments,
            segment_names=["text 1", "text 2"],
            latent=_latent(result.latent, i, len(pairs), None), composite=comp.name,
            model=_model_name(model), ids=ids if ids and len(ids) == len(tokens) else None,
            token_text=join_text(texts), units=plan.units(i, len(pairs)),
            unit_kinds=dict(plan.kinds)))
    return out
