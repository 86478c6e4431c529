""":func:`explain`: one prediction (or a batch) explained by a composite, as an
:class:`~lrp_explicit.explain.result.Explanation`."""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import composites
from ..audit import _main_output as _logits
from ..composites import Composite
from .inputs import _batch, _forward, _Item, _leaf, _per_item, _prepare, _progress
from .inputs import task_of
from .result import Explanation
from .targets import (SOFTMAX, _class_id, _class_name, _initial, _resolve, _row, _token_ids,
                      _token_name)

__all__ = ["explain", "mean_pool", "cosine"]


def explain(model: nn.Module, inputs: Any, target: Any = None,
            composite: str | Composite = "attnlrp", contrast: Any = None,
            tokenizer: Any = None, *, position: int | None = None,
            record: Sequence[str] = (), progress: bool | None = None
            ) -> Explanation | list[Explanation]:
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
        sample, with a progress bar.
    target : int, str or list of int, optional
        The token or class to explain; default: the model's prediction. For a causal LM a
        text of several tokens or a list of ids is a continuation: it is appended to the input
        and the sum of its logits (each at the position before it) is explained. A classifier
        also takes a label name. For a batch: one target for all samples, or a list with one
        per sample (so a continuation for a batch is a list of lists).
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

    Returns
    -------
    Explanation or list of Explanation
        One explanation, or a list for a batch.

    Raises
    ------
    ValueError
        For a target or contrast outside the vocabulary or the classes, an empty text, an
        unknown composite name, or relevance that is NaN or infinite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain() needs an nn.Module, got {type(model).__name__}")
    task = task_of(model)
    if isinstance(composite, str):
        _composite(composite, model)  # an unknown name fails before any work
    samples = _batch(inputs, task)
    if samples is None:
        return _explain_one(model, inputs, target, contrast, composite, tokenizer, task,
                            position, record)
    targets, contrasts = _per_item(target, len(samples)), _per_item(contrast, len(samples))
    show = progress if progress is not None else True
    return [_explain_one(model, s, t, c, composite, tokenizer, task, position, record)
            for s, t, c in zip(_progress(samples, show), targets, contrasts)]


def _composite(spec: str | Composite, model: nn.Module) -> Composite:
    if isinstance(spec, Composite):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"composite must be a name or a Composite, not {type(spec).__name__}")
    try:
        return composites.get(spec, model)
    except KeyError as err:
        names = sorted({n for names in composites.available().values() for n in names})
        raise ValueError(f"no composite {spec!r}; available: {', '.join(names)}") from err


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    path = str(getattr(config, "_name_or_path", "") or "")
    return path.rstrip("/").split("/")[-1] or type(model).__name__


def _vocabulary(model: nn.Module, logits: Tensor | None = None) -> int:
    if logits is not None:
        return logits.shape[-1]
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor):
        return weight.shape[0]
    return int(model.config.vocab_size)


class _Recorder:
    """Keeps the relevance (gradient) at the outputs of the modules matching ``patterns``."""

    def __init__(self, model: nn.Module, patterns: Sequence[str]) -> None:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        self.latent: dict[str, Tensor] = {}
        self.handles = [module.register_forward_hook(self._hook(name))
                        for name, module in model.named_modules()
                        if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if patterns and not self.handles:
            self.remove()
            raise ValueError(f"record={patterns!r} matches no module of {type(model).__name__}")

    def _hook(self, name: str):
        calls = [0]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output if isinstance(output, Tensor) else (
                output[0] if isinstance(output, (tuple, list)) and output else
                getattr(output, "last_hidden_state", None))
            if not isinstance(out, Tensor) or not out.requires_grad:
                return
            key = name if calls[0] == 0 else f"{name}#{calls[0]}"
            calls[0] += 1

            def keep(grad: Tensor) -> None:
                g = grad.detach().cpu()
                self.latent[key] = g[0] if g.dim() > 1 and g.shape[0] == 1 else g

            out.register_hook(keep)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _explain_one(model: nn.Module, inp: Any, target: Any, contrast: Any,
                 composite: str | Composite, tokenizer: Any, task: str | None,
                 position: int | None, record: Sequence[str]) -> Explanation:
    comp = _composite(composite, model)
    if task == "similarity":
        return _explain_similarity(model, inp, target, contrast, comp, tokenizer, record)
    item = _prepare(model, inp, tokenizer, task)
    continuation = None
    if task == "causal-lm" and target is not None and not isinstance(target, int):
        ids = _resolve(target, task, _vocabulary(model), tokenizer, None, 0)
        if isinstance(ids, list):
            if contrast is not None:
                raise ValueError("a continuation cannot be contrasted; give one target token")
            continuation = ids
            item = _extend(model, item, ids, tokenizer)
    config = getattr(model, "config", None)
    with comp.context(model):
        recorder = _Recorder(model, record)
        try:
            logits = _logits(_forward(model, item, task))
            if not logits.requires_grad:
                raise ValueError(f"the output of {type(model).__name__} does not depend on the "
                                 "explained input")
            if continuation is not None:
                start = logits.shape[1] - len(continuation) - 1
                rows = [(0, start + k, t) for k, t in enumerate(continuation)]
                init = torch.zeros_like(logits)
                for r in rows:
                    init[r] = logits[r].detach()
                score = float(sum(float(logits[r].detach()) for r in rows))
                explained: Any = continuation
                words = "".join(_words(tokenizer, continuation))
                label, prediction = f"continuation {words!r} ({len(continuation)} tokens)", None
            else:
                row = _row(logits, task, item, tokenizer, position)
                z = logits[row].detach()
                prediction = int(z.argmax())
                explained = _resolve(target, task or "classification", z.shape[-1], tokenizer,
                                     config, prediction)
                name = _namer(task, tokenizer, config)
                init, suffix = _initial(logits, row, explained, contrast, name,
                                        lambda c: _contrast_id(c, task, z.shape[-1], tokenizer,
                                                               config))
                score = float(init[row].double().sum())  # Σ weights ⊙ logits
                label = _label(task, name(explained), row, logits) + suffix
            _finite(score, "score")
            logits.backward(init)
        finally:
            recorder.remove()
    grad = item.leaf.grad
    if grad is None:
        raise ValueError("no relevance reached the input: is the explained output computed "
                         "from it?")
    relevance = _per_position(grad)
    _finite(relevance, "relevance")
    tokens = item.tokens if item.key != "pixel_values" and relevance.dim() == 1 else None
    if tokens is None and relevance.dim() == 1:
        tokens = [str(i) for i in range(relevance.shape[0])]
    segments = names = None
    if continuation is not None:
        prompt = len(tokens) - len(continuation)
        segments, names = [0] * prompt + [1] * len(continuation), ["prompt", "continuation"]
    return Explanation(tokens=tokens, relevance=relevance, score=score, target=explained,
                       label=label, task=task or "classification",
                       contrast=_contrast_value(contrast, task, tokenizer, config, logits),
                       prediction=prediction, segments=segments, segment_names=names,
                       image=item.image, latent=recorder.latent, composite=comp.name,
                       model=_model_name(model))


def _finite(value: float | Tensor, what: str) -> None:
    if isinstance(value, Tensor):
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"the {what} has {bad} NaN or infinite values of {value.numel()} "
                             "(check the model's dtype and the composite's epsilon)")
    elif not math.isfinite(value):
        raise ValueError(f"the explained {what} is {value}")


def _per_position(grad: Tensor) -> Tensor:
    """Relevance per token (summed over the hidden size) or per pixel (over the channels)."""
    g = grad.detach()
    g = g[0] if g.dim() in (3, 4) and g.shape[0] == 1 else g
    return (g.sum(0) if g.dim() == 3 and grad.dim() == 4 else g.sum(-1)).cpu()


def _words(tokenizer: Any, ids: list[int]) -> list[str]:
    from ..heatmaps import clean_tokens

    if tokenizer is None:
        return [f" {i}" for i in ids]
    return clean_tokens(tokenizer.convert_ids_to_tokens(list(ids)))


def _namer(task: str | None, tokenizer: Any, config: Any):
    if task in ("causal-lm", "masked-lm"):
        return lambda i: _token_name(tokenizer, i)
    return lambda i: _class_name(config, i)


def _label(task: str | None, name: str, row: tuple[int, ...], logits: Tensor) -> str:
    if task == "causal-lm":
        return f"next token {name}"
    if task == "masked-lm":
        return f"mask token → {name}"
    if len(row) == 2 and task != "causal-lm":
        return f"{name} at token {row[1]}"
    return name


def _contrast_id(spec: Any, task: str | None, size: int, tokenizer: Any, config: Any) -> int:
    if task in ("causal-lm", "masked-lm"):
        ids = _token_ids(spec, tokenizer, size, "contrast")
        if len(ids) != 1:
            raise ValueError(f"contrast {spec!r} is {len(ids)} tokens; give one token")
        return ids[0]
    return _class_id(spec, config, size, "contrast class")


def _contrast_value(contrast: Any, task: str | None, tokenizer: Any, config: Any,
                    logits: Tensor) -> int | str | None:
    if contrast is None:
        return None
    if isinstance(contrast, str) and contrast.lower() == SOFTMAX:
        return SOFTMAX
    return _contrast_id(contrast, task, logits.shape[-1], tokenizer, config)


def _extend(model: nn.Module, item: _Item, ids: list[int], tokenizer: Any) -> _Item:
    """The item with a continuation's tokens appended (teacher forcing)."""
    if item.ids is None:
        raise ValueError("a continuation needs the input as text or token ids")
    extra = torch.tensor([ids])
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        x = embedding(extra.to(item.leaf.device))
    leaf = _leaf(torch.cat([item.leaf.detach(), x], dim=1), item.leaf.device)
    kwargs = dict(item.kwargs)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor):
        kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(1, len(ids))], dim=1)
    tokens = list(item.tokens or []) + (
        list(tokenizer.convert_ids_to_tokens(ids)) if tokenizer is not None
        else [str(i) for i in ids])
    return _Item(leaf, item.key, kwargs, torch.cat([item.ids, extra[0]]), tokens)


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
    return hidden if isinstance(hidden, Tensor) else _logits(output)


def _explain_similarity(model: nn.Module, pair: Any, target: Any, contrast: Any,
                        comp: Composite, tokenizer: Any, record: Sequence[str]) -> Explanation:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError("a sentence encoder explains the similarity of two texts: pass a "
                         f"pair (text_a, text_b), got {type(pair).__name__}"
                         + (f" of {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
    if target is not None or contrast is not None:
        raise ValueError(f"a similarity has no target or contrast (got target={target!r}, "
                         f"contrast={contrast!r})")
    items = [_prepare(model, p, tokenizer, "similarity") for p in pair]
    with comp.context(model):
        recorder = _Recorder(model, record)
        try:
            hidden = [_hidden(_forward(model, it, "similarity")) for it in items]
            with comp.op_rules("similarity"):
                u, v = (mean_pool(h, it.kwargs.get("attention_mask"))
                        for h, it in zip(hidden, items))
                y = cosine(u, v)[0]
            _finite(float(y.detach()), "similarity")
            y.backward(y.detach())
        finally:
            recorder.remove()
    relevance = torch.cat([_per_position(it.leaf.grad) for it in items])
    _finite(relevance, "relevance")
    tokens = [t for it in items for t in (it.tokens or [])]
    segments = [n for n, it in enumerate(items) for _ in range(len(it.tokens or []))]
    return Explanation(tokens=tokens, relevance=relevance, score=float(y.detach()), target=None,
                       label="similarity of text 1 and text 2", task="similarity",
                       segments=segments, segment_names=["text 1", "text 2"],
                       latent=recorder.latent, composite=comp.name, model=_model_name(model))
