"""Encoder–decoder models (T5, Flan-T5): a decoder prediction explained over the source tokens
*and* the earlier decoder tokens, in one backward pass.

The source ids are embedded and passed as ``inputs_embeds``, the decoder's input ids (the
decoder start token and the target prefix, teacher-forced) as ``decoder_inputs_embeds``: both
are leaves of the pass, so the relevance of the encoder's input (through cross-attention) and
of the decoder's own earlier tokens (through causal self-attention) is read from one
:func:`~lrp_explicit.pipeline.attribute` call. Several rows (the samples of a batch, the steps
of a generation) share that call: sources and decoder inputs are padded on the right with
their attention masks, and no rule mixes the rows.

:func:`explain_seq2seq` is what :func:`lrp_explicit.explain` runs for a model whose task is
``"seq2seq-lm"`` (:func:`~lrp_explicit.pipeline.task_of`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..composites import Composite, unwrap
from ..errors import InputError
from ..pipeline import (Prepared, Target, attribute, check_finite, embed, make_leaf,
                        per_sample)
from ..pipeline.targets import (SOFTMAX, as_index, check_position, logit_relevance,
                                plain_spec, token_ids, token_name)
from ..tokens import clean_tokens
from .common import model_name, vocabulary
from .result import Explanation
from .units import UnitPlan

__all__ = ["SEQ2SEQ", "explain_seq2seq"]

#: The task of an encoder–decoder language model (``…ForConditionalGeneration`` with
#: ``config.is_encoder_decoder``).
SEQ2SEQ = "seq2seq-lm"


@dataclass
class _Row:
    """One explained prediction: a source, the decoder's input ids and the explained logits."""

    source: Tensor                     # (S,) ids
    mask: Tensor | None                # (S,) attention mask of the source, or None
    source_tokens: list[str]
    decoder: list[int]                 # decoder input ids: start token + target prefix
    targets: list[tuple[int, int]]     # (decoder position, token id), their logits summed
    contrast: Any = None
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return list(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def _source(inputs: Any, tokenizer: Any) -> tuple[Tensor, Tensor | None, Any]:
    """Source ids ``(S,)``, their attention mask and a target found in the input (a dict's
    ``labels`` or ``decoder_input_ids``)."""
    found = None
    if isinstance(inputs, str):
        if tokenizer is None:
            raise ValueError("text input needs a tokenizer: explain(model, text, tokenizer=...)")
        if not inputs.strip():
            raise ValueError("the text is empty")
        enc = tokenizer(inputs, return_tensors="pt")
        ids, mask = enc["input_ids"], enc.get("attention_mask")
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError("an encoder–decoder explains from token ids: give input_ids (and "
                             f"optionally labels), got keys {sorted(inputs)}")
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        found = inputs.get("labels", inputs.get("decoder_input_ids"))
        if isinstance(found, Tensor):  # labels: -100 marks positions without a label
            found = [int(i) for i in found.reshape(-1).tolist() if int(i) >= 0]
    elif isinstance(inputs, (list, tuple)) and inputs and all(as_index(i) is not None
                                                               for i in inputs):
        ids, mask = torch.tensor([[as_index(i) for i in inputs]]), None
    elif isinstance(inputs, Tensor) and not inputs.is_floating_point():
        ids, mask = inputs, None
    else:
        raise TypeError(f"an encoder–decoder explains text or token ids, not "
                        f"{type(inputs).__name__}")
    ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise InputError(f"input_ids has shape {tuple(ids.shape)}; give one sample (tokens,) or "
                         "(1, tokens), or a list of samples")
    if ids.numel() == 0:
        raise InputError("input_ids has no tokens: the input is empty")
    if mask is not None:
        mask = torch.as_tensor(mask).reshape(-1)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has {mask.numel()} entries for {ids.numel()} "
                             "tokens")
    return ids, mask, found


def _start(model: nn.Module) -> int:
    config = unwrap(model).config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    if start is None:
        raise ValueError("the model's config names no decoder_start_token_id")
    return int(start)


def _rows(model: nn.Module, inputs: Any, target: Any, contrast: Any, tokenizer: Any,
          position: int | None) -> list[_Row]:
    """The rows of one sample: one prediction (the next token, a given token, one token of a
    target sequence) or a whole target sequence (teacher-forced, its logits summed)."""
    ids, mask, found = _source(inputs, tokenizer)
    target = found if target is None and found is not None else target
    size = vocabulary(model)
    source_tokens = _tokens(tokenizer, ids.tolist())
    start = _start(model)
    if target is None or as_index(target) is not None:
        if position is not None:
            raise ValueError("position= picks a token of a target sequence; give the target "
                             "text or ids")
        token = None if target is None else token_ids(as_index(target), tokenizer, size,
                                                      "target")[0]
        return [_Row(ids, mask, source_tokens, [start], [(0, token if token is not None
                                                           else -1)], contrast)]
    sequence = token_ids(list(target) if isinstance(target, tuple) else target, tokenizer,
                         size, "target")
    if len(sequence) == 1:
        return [_Row(ids, mask, source_tokens, [start], [(0, sequence[0])], contrast)]
    if position is not None:
        if not -len(sequence) <= position < len(sequence):
            raise ValueError(f"position {position} outside the target's {len(sequence)} tokens")
        k = position % len(sequence)
        return [_Row(ids, mask, source_tokens, [start] + sequence[:k], [(k, sequence[k])],
                     contrast)]
    if contrast is not None:
        raise ValueError("a target sequence cannot be contrasted; give one target token or "
                         "position=")
    decoder = [start] + sequence[:-1]
    return [_Row(ids, mask, source_tokens, decoder, list(enumerate(sequence)), None)]


def _generation_rows(model: nn.Module, inputs: Any, contrast: Any, tokenizer: Any,
                     steps: int, options: Mapping[str, Any]) -> tuple[list[_Row], list[int]]:
    """The model's own generation (greedy unless ``options`` say otherwise), one row per
    generated token: the source and the decoder tokens before it."""
    ids, mask, _ = _source(inputs, tokenizer)
    inner = unwrap(model)
    device = next(inner.parameters()).device
    kwargs = {"max_new_tokens": steps, "do_sample": False, **options}
    with torch.no_grad():
        out = inner.generate(input_ids=ids[None].to(device),
                             attention_mask=None if mask is None else mask[None].to(device),
                             **kwargs)
    sequence = [int(i) for i in out[0].tolist()]
    if len(sequence) < 2:
        raise ValueError("the model generated no token")
    source_tokens = _tokens(tokenizer, ids.tolist())
    rows = [_Row(ids, mask, source_tokens, sequence[:i], [(i - 1, sequence[i])], contrast)
            for i in range(1, len(sequence))]
    return rows, sequence


def _pad(rows: list[Tensor], width: int) -> Tensor:
    return torch.stack([torch.cat([r, r.new_zeros(width - r.shape[0], *r.shape[1:])])
                        for r in rows])


def _prepare(model: nn.Module, rows: list[_Row]) -> Prepared:
    """The rows as one batch: source and decoder embeddings (leaves), padded on the right with
    zeros, and the attention masks of both."""
    inner = unwrap(model)
    decoder_embedding = inner.get_decoder().get_input_embeddings()
    sources = [embed(model, r.source[None])[0] for r in rows]
    device = sources[0].device
    with torch.no_grad():
        decoders = [decoder_embedding(torch.tensor(r.decoder, device=device)) for r in rows]
    width_s, width_d = max(s.shape[0] for s in sources), max(d.shape[0] for d in decoders)
    masks = [(r.mask if r.mask is not None else torch.ones(r.source.shape[0],
                                                           dtype=torch.long)).to(device)
             for r in rows]
    kwargs: dict[str, Any] = {}
    if any(r.mask is not None for r in rows) or len({s.shape[0] for s in sources}) > 1:
        kwargs["attention_mask"] = _pad(masks, width_s)
    if len({d.shape[0] for d in decoders}) > 1:
        kwargs["decoder_attention_mask"] = torch.stack([
            torch.arange(width_d, device=device) < d.shape[0] for d in decoders]).long()
    leaves = {"inputs_embeds": make_leaf(_pad(sources, width_s)),
              "decoder_inputs_embeds": make_leaf(_pad(decoders, width_d))}
    return Prepared(leaves, kwargs)


def _contrast_id(spec: Any, tokenizer: Any, size: int) -> int:
    ids = token_ids(spec, tokenizer, size, "contrast", several=False)
    return ids[0]


def _resolve(rows: list[_Row], tokenizer: Any, size: int):
    """The target function: the sum over the rows of each one's explained logits."""
    def resolve(output: Any) -> Target:
        logits = output.logits
        init = torch.zeros_like(logits)
        for b, row in enumerate(rows):
            if len(row.targets) == 1:
                k, token = row.targets[0]
                z = logits[b, k].detach()
                prediction = int(z.argmax())
                token = prediction if token < 0 else token
                row.targets[0] = (k, token)
                _, suffix = logit_relevance(logits, (b, k), token, row.contrast,
                                            lambda i: token_name(tokenizer, i),
                                            lambda c: _contrast_id(c, tokenizer, size),
                                            out=init)
                score = float(init[b, k].double().sum())  # Σ weights ⊙ logits
                row.label = f"next token {token_name(tokenizer, token)}" + suffix
                row.info = {"score": score, "target": token, "prediction": prediction,
                            "probability": float(torch.softmax(z.double(), -1)[token])}
            else:
                for k, token in row.targets:
                    init[b, k, token] = logits[b, k, token].detach()
                sequence = [t for _, t in row.targets]
                score = float(sum(float(logits[b, k, t].detach()) for k, t in row.targets))
                words = "".join(clean_tokens(_tokens(tokenizer, sequence)))
                row.label = f"target {words!r} ({len(sequence)} tokens)"
                row.info = {"score": score, "target": sequence, "prediction": None}
            check_finite(row.info["score"], "score")
        return Target(logits, init, {"rows": [r.info for r in rows]})

    return resolve


def _run(model: nn.Module, rows: list[_Row], comp: Composite, tokenizer: Any,
         record: Sequence[str], plan: UnitPlan | None = None
         ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
    """One pass over the rows; the relevance per source token and per decoder token of each
    (and, with a ``plan``, the relevance per latent unit of each, read by ``plan.units``)."""
    batch = _prepare(model, rows)
    result = attribute(model, batch, _resolve(rows, tokenizer, vocabulary(model)), comp,
                       record=record, observers=plan.observers() if plan is not None else ())
    source = result.relevance["inputs_embeds"]
    decoder = result.relevance["decoder_inputs_embeds"]
    if source is None or decoder is None:
        raise ValueError("no relevance reached the source or the decoder input")
    sources, decoders = [], []
    for b, row in enumerate(rows):
        rs = source[b, :row.source.shape[0]].detach().sum(-1).cpu()
        rd = decoder[b, :len(row.decoder)].detach().sum(-1).cpu()
        check_finite(rs, "relevance")
        check_finite(rd, "relevance")
        sources.append(rs)
        decoders.append(rd)
    return sources, decoders, result.latent


def _latent_row(latent: dict[str, Tensor], b: int, size: int) -> dict[str, Tensor]:
    return {k: (v[b] if v.dim() >= 1 and v.shape[0] == size else v).detach().cpu()
            for k, v in latent.items()}


def explain_seq2seq(model: nn.Module, inputs: Any, target: Any = None,
                    composite: Composite | None = None, contrast: Any = None,
                    tokenizer: Any = None, *, position: int | None = None,
                    record: Sequence[str] = (), generate: int | None = None,
                    generation_kwargs: Mapping[str, Any] | None = None,
                    batch_size: int = 8) -> Any:
    """Explain a decoder prediction of an encoder–decoder model (T5, Flan-T5) over the source
    tokens and the decoder's earlier tokens.

    Parameters
    ----------
    model : nn.Module
        A ``…ForConditionalGeneration`` encoder–decoder of a registered family.
    inputs : str, list of int, Tensor, dict or list
        The source: text (with ``tokenizer``), token ids, or a dict with ``input_ids`` (and
        ``attention_mask``, and ``labels`` or ``decoder_input_ids`` as the target sequence); a
        list of such sources is a batch (one pass for all; each sample gets the relevance it
        gets alone).
    target : int, str or list of int, optional
        ``None``: the model's first predicted token. A token id (or a one-token text): that
        token as the first decoder prediction. A text of several tokens or a list of ids: the
        target sequence, teacher-forced (decoder input: the start token and the sequence
        without its last token); the sum of its tokens' logits is explained, or, with
        ``position=k``, the logit of its token ``k`` alone (from the source and the tokens
        before it). For a batch: one target for all samples, or a list with one per sample
        (a target sequence for each sample is a list of lists).
    composite : Composite
        The resolved composite (:func:`~lrp_explicit.pipeline.resolve_composite`).
    contrast : int, str, optional
        Another token, or ``"softmax"``, for a one-token explanation (as for causal LMs).
    tokenizer : tokenizer, optional
        For text and to name the tokens.
    position : int, optional
        The token of a target sequence to explain alone.
    record : sequence of str
        Module-name patterns whose output relevance is kept.
    generate : int, optional
        Generate up to ``generate`` tokens (greedy unless ``generation_kwargs`` say otherwise) and
        explain each generated token from the source and the tokens generated before it; all
        steps share one forward and one backward pass.
    generation_kwargs : dict, optional
        Further keyword arguments of ``model.generate``.
    batch_size : int
        Rows per pass.

    Returns
    -------
    Explanation, list of Explanation or GenerationExplanation
        Tokens are the source's followed by the decoder's input tokens (segments
        ``"source"`` and ``"decoder"``). With ``generate``, a
        :class:`~lrp_explicit.explain.GenerationExplanation` whose context is the source, the
        decoder start token and the generated tokens.
    """
    if composite is None:
        raise TypeError("explain_seq2seq needs a resolved composite")
    target, contrast = plain_spec(target), plain_spec(contrast)
    position = check_position(position)
    if generate is not None:
        if isinstance(generate, bool) or as_index(generate) is None or int(generate) < 1:
            raise ValueError(f"generate must be a positive int, got {generate!r}")
        if target is not None or position is not None:
            raise ValueError("generate= explains the generated tokens: give no target or "
                             "position")
        if isinstance(inputs, list) and inputs and as_index(inputs[0]) is None:
            return [explain_seq2seq(model, one, None, composite, contrast, tokenizer,
                                    record=record, generate=generate,
                                    generation_kwargs=generation_kwargs,
                                    batch_size=batch_size) for one in inputs]
        return _explain_generation(model, inputs, composite, contrast, tokenizer, record,
                                   int(generate), dict(generation_kwargs or {}), batch_size)
    batch = isinstance(inputs, list) and bool(inputs) and as_index(inputs[0]) is None
    samples = inputs if batch else [inputs]
    targets = per_sample(target, len(samples)) if batch else [target]
    rows = [r for s, t in zip(samples, targets)
            for r in _rows(model, s, t, contrast, tokenizer, position)]
    out = []
    plan = UnitPlan(model)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        sources, decoders, latent = _run(model, chunk, composite, tokenizer, record, plan)
        for b, (row, rs, rd) in enumerate(zip(chunk, sources, decoders)):
            decoder_tokens = _tokens(tokenizer, row.decoder)
            out.append(Explanation(
                tokens=row.source_tokens + decoder_tokens, relevance=torch.cat([rs, rd]),
                score=row.info["score"], target=row.info["target"], label=row.label,
                task=SEQ2SEQ, contrast=_contrast_value(row.contrast, tokenizer, model),
                prediction=row.info["prediction"],
                segments=[0] * len(rs) + [1] * len(rd), segment_names=["source", "decoder"],
                latent=_latent_row(latent, b, len(chunk)), composite=composite.name,
                model=model_name(model), ids=row.source.tolist() + list(row.decoder),
                units=plan.units(b, len(chunk)), unit_kinds=dict(plan.kinds)))
    return out if batch else out[0]


def _contrast_value(contrast: Any, tokenizer: Any, model: nn.Module) -> Any:
    if contrast is None:
        return None
    if isinstance(contrast, str) and contrast.lower() == SOFTMAX:
        return SOFTMAX
    return _contrast_id(contrast, tokenizer, vocabulary(model))


def _explain_generation(model: nn.Module, inputs: Any, composite: Composite, contrast: Any,
                        tokenizer: Any, record: Sequence[str], steps: int,
                        options: dict[str, Any], batch_size: int) -> Any:
    from .result import GenerationExplanation

    rows, sequence = _generation_rows(model, inputs, contrast, tokenizer, steps, options)
    source = rows[0].source.tolist()
    width = len(source) + len(sequence)   # the source, the start token, the generated tokens
    matrix = torch.zeros(len(rows), width, dtype=next(unwrap(model).parameters()).dtype)
    latent: dict[str, list[Tensor]] = {}
    plan = UnitPlan(model)
    units: list[dict[str, Tensor]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        sources, decoders, recorded = _run(model, chunk, composite, tokenizer, record, plan)
        units += [plan.units(b, len(chunk)) for b in range(len(chunk))]
        for b, (row, rs, rd) in enumerate(zip(chunk, sources, decoders)):
            i = start + b
            matrix[i, :len(source)] = rs
            matrix[i, len(source):len(source) + len(rd)] = rd
        for key, value in recorded.items():
            latent.setdefault(key, []).extend(value[b] for b in range(len(chunk)))
    ids = source + sequence
    return GenerationExplanation(
        tokens=_tokens(tokenizer, ids), ids=ids, relevance=matrix,
        prompt_length=len(source) + 1, probabilities=[r.info["probability"] for r in rows],
        scores=[r.info["score"] for r in rows], labels=[r.label for r in rows],
        contrast=_contrast_value(contrast, tokenizer, model),
        latent={k: torch.stack([t.detach().cpu() for t in v]) for k, v in latent.items()
                if len({t.shape for t in v}) == 1},
        composite=composite.name, model=model_name(model),
        generation={"max_new_tokens": steps, "do_sample": False, **options},
        units={k: torch.stack([u[k] for u in units]) for k in (units[0] if units else {})},
        unit_kinds=dict(plan.kinds))
