"""Targets of the attribution pipeline: what is explained and with which initial relevance.

A *target function* takes the model's output and returns a :class:`Target`: the explained
tensor ``y`` (on the graph) and its initial relevance (``y``'s value for a logit, weighted
logits for a contrast, a user's tensor …). The builders here cover a logit chosen by index, a
callable on the output, an initial-relevance tensor, and, for the language and classification
heads of :func:`lrp_explicit.explain`, token and class ids from ids, texts or label names, with a
contrast or the softmax-style initialisation.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from ..tokens import clean_tokens
from .inputs import Prepared

__all__ = [
    "SOFTMAX",
    "Target",
    "TargetSpec",
    "as_index",
    "check_position",
    "class_id",
    "class_name",
    "explained_row",
    "logit_relevance",
    "main_output",
    "output_target",
    "plain_spec",
    "resolve_ids",
    "several_tokens",
    "decoded_pieces",
    "tensors",
    "token_ids",
    "token_name",
]

#: ``contrast=SOFTMAX``: initial relevance ``z_t`` for the target's logit and ``−z_j/N`` for
#: every other logit ``z_j`` (the weights 1 and −1/N of a softmax-style explanation).
SOFTMAX = "softmax"

#: What :func:`output_target` accepts: an index, a tuple of indices, a callable, a tensor.
TargetSpec = Union[int, Sequence[int], Callable[[Any], Tensor], Tensor, None]


@dataclass
class Target:
    """What one attribution pass explains.

    Attributes
    ----------
    explained : Tensor
        The explained tensor ``y``; the backward pass starts from it.
    initial : Tensor
        Initial relevance, of ``y``'s shape (``y.backward(initial)``).
    info : dict
        Whatever the target function wants to hand back (score, label, prediction …).
    """

    explained: Tensor
    initial: Tensor
    info: dict[str, Any] = field(default_factory=dict)


def as_index(value: Any) -> int | None:
    """``value`` as an int if it is one: an int, a numpy integer or a 0-d integer tensor (not a
    bool); else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value)
    return None


def plain_spec(value: Any) -> Any:
    """A target, contrast or position as given, with numpy integers and 0-d integer tensors
    made ints (also inside a list or tuple of ids)."""
    index = as_index(value)
    if index is not None:
        return index
    if isinstance(value, (list, tuple)):
        items = [as_index(v) if as_index(v) is not None else v for v in value]
        return type(value)(items) if isinstance(value, tuple) else items
    return value


def check_position(position: Any) -> int | None:
    """``position`` as an int (``None`` stays ``None``).

    Raises
    ------
    TypeError
        For anything but an integer.
    """
    if position is None:
        return None
    index = as_index(position)
    if index is None:
        raise TypeError(f"position must be an int (a token index), not {position!r}")
    return index


def tensors(obj: Any, depth: int = 0) -> Iterator[Tensor]:
    """Tensors in ``obj`` (nested tuples, lists and dicts, e.g. a ``ModelOutput``)."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors(item, depth + 1)
    elif depth < 4 and isinstance(obj, Mapping):
        for item in obj.values():
            yield from tensors(item, depth + 1)


def main_output(output: Any) -> Tensor:
    """The tensor a model output stands for: itself, ``.logits``, else its first tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    for t in tensors(output):
        return t
    raise TypeError(f"the model returned no tensor ({type(output).__name__})")


def output_target(output: Any, target: TargetSpec) -> Target:
    """The explained tensor and initial relevance of ``target`` on a model ``output``.

    Parameters
    ----------
    output : Any
        The model's output; ``out`` below is :func:`main_output` of it.
    target : int, sequence of int, callable, Tensor or None
        An int ``t`` explains ``out[..., -1, t]`` for outputs with a sequence dimension and
        ``out[..., t]`` otherwise; a tuple indexes ``out`` directly; a callable ``f(output)``
        returns the explained tensor; a tensor is the initial relevance of ``out`` itself;
        ``None`` explains the largest output (at the last position for sequences). The initial
        relevance of an explained tensor is its value.

    Returns
    -------
    Target
    """
    target = plain_spec(target)
    if callable(target) and not isinstance(target, Tensor):
        y = target(output)
        if not isinstance(y, Tensor):
            raise TypeError("a target callable must return a tensor")
        return Target(y, y.detach())
    out = main_output(output)
    if isinstance(target, Tensor):
        if target.shape != out.shape:
            raise ValueError(f"initial relevance of shape {tuple(target.shape)} does not match "
                             f"the output's {tuple(out.shape)}")
        return Target(out, target.to(out.dtype).to(out.device))
    if target is None:
        last = out[..., -1, :] if out.dim() >= 3 else out
        y = last.gather(-1, last.detach().argmax(-1, keepdim=True)).squeeze(-1)
    elif isinstance(target, int):
        if not 0 <= target < out.shape[-1]:
            raise IndexError(f"target {target} out of range for {out.shape[-1]} outputs "
                             f"(0 to {out.shape[-1] - 1})")
        y = out[..., -1, target] if out.dim() >= 3 else out[..., target]
    elif isinstance(target, (tuple, list)):
        y = out[tuple(target)]
    else:
        raise TypeError(f"target must be an index, a callable, a tensor or None, "
                        f"not {type(target).__name__}")
    return Target(y, y.detach())


# ============================================================================ ids and names


def token_name(tokenizer: Any, index: int) -> str:
    """``'word' (id i)`` with a tokenizer, ``id i`` without."""
    if tokenizer is None:
        return f"id {index}"
    word = clean_tokens(tokenizer.convert_ids_to_tokens([index]))[0]
    return f"{word!r} (id {index})"


def _check_index(index: Any, size: int, what: str) -> int:
    if as_index(index) is None:
        raise TypeError(f"{what} must be an int or text, not {type(index).__name__}")
    index = as_index(index)
    if not 0 <= index < size:
        noun = "vocabulary of" if "token" in what else "model's"
        unit = "tokens" if "token" in what else "classes"
        raise ValueError(f"{what} {index} is outside the {noun} {size} {unit}")
    return index


def token_ids(spec: Any, tokenizer: Any, size: int, what: str, *,
              several: bool = True) -> list[int]:
    """Token ids of a target or contrast: an id, a token, a text or a list of ids.

    Parameters
    ----------
    spec : int, str or list of int
        An id, a token as the tokenizer spells it (``"Ġcat"``), a text, or a list of ids.
    tokenizer : tokenizer or None
        Needed for text.
    size : int
        The vocabulary size.
    what : str
        ``"target"`` or ``"contrast"``, for messages.
    several : bool
        Whether a text may give several tokens (a continuation); when ``False`` such a text is
        an error naming its pieces and the single-token form of the text, if there is one.

    Raises
    ------
    ValueError
        For ids outside a vocabulary of ``size``, an empty or unknown text, or a text of
        several tokens when ``several`` is ``False``.
    """
    if isinstance(spec, str):
        if tokenizer is None:
            raise ValueError(f"a text {what} needs a tokenizer")
        if not spec:
            raise ValueError(f"the {what} text is empty")
        vocab = tokenizer.get_vocab()
        if spec in vocab:
            ids = [vocab[spec]]
        else:
            ids = _encode(tokenizer, spec)
            unk = getattr(tokenizer, "unk_token_id", None)
            if not ids or (unk is not None and unk in ids):
                raise ValueError(f"{what} {spec!r} is not in the vocabulary"
                                 + (" (the tokenizer maps it to its unknown token)" if ids else ""))
        if len(ids) > 1 and not several:
            raise ValueError(several_tokens(spec, ids, tokenizer, what))
        return [_check_index(i, size, f"{what} token") for i in ids]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"the {what} continuation is empty")
        return [_check_index(i, size, f"{what} token") for i in spec]
    return [_check_index(spec, size, f"{what} token")]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decoded_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """What each token adds to the decoded text of the tokens before it (``['Par', 'is']``);
    the tokens with their markers read (:func:`~lrp_explicit.tokens.clean_tokens`) where the
    tokenizer cannot decode."""
    ids = list(ids)
    marked = clean_tokens(tokenizer.convert_ids_to_tokens(ids))
    out = []
    for k in range(len(ids)):
        try:
            before, upto = (tokenizer.decode(ids[:j], skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
                            for j in (k, k + 1))
        except (AttributeError, TypeError, ValueError, KeyError, IndexError):
            return marked
        ok = upto.startswith(before) and "\ufffd" not in upto[len(before):]
        out.append(upto[len(before):] if ok else marked[k])
    return out


def several_tokens(spec: str, ids: Sequence[int], tokenizer: Any, what: str,
                   hint: bool = True) -> str:
    """The message for a text target or contrast that the tokenizer splits into several tokens:
    its pieces, and the single-token form of the text if there is one (``"Paris" → ['Par',
    'is']; did you mean ' Paris'?``)."""
    message = f"{what} {spec!r} is {len(ids)} tokens {decoded_pieces(tokenizer, ids)!r}"
    unk = getattr(tokenizer, "unk_token_id", None)
    for form in dict.fromkeys([" " + spec.lstrip(), spec.strip(), spec.lstrip()]):
        if form and form != spec:
            one = _encode(tokenizer, form)
            if len(one) == 1 and one[0] != unk:
                message += f"; did you mean {form!r} (one token)?"
                break
    else:
        message += "; give one token"
    if hint and what == "target":
        message += " — or pass continuation=True to explain the sum of its tokens' logits"
    return message


def class_id(spec: Any, config: Any, size: int, what: str) -> int:
    """A class index from an index or a label name of ``config`` (case-insensitive)."""
    if isinstance(spec, str):
        labels = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
        labels.update({str(k): int(v)
                       for k, v in (getattr(config, "label2id", None) or {}).items()})
        folded = {k.lower(): v for k, v in labels.items()}
        if spec in labels or spec.lower() in folded:
            return labels.get(spec, folded.get(spec.lower()))  # type: ignore[return-value]
        raise ValueError(f"{what} {spec!r} is not a label of the model; labels: "
                         f"{', '.join(sorted(labels, key=labels.get)) or 'none'}")
    return _check_index(spec, size, what)


def class_name(config: Any, index: int) -> str:
    """``class <label> (i)`` where the config names the class, else ``class i``."""
    labels = getattr(config, "id2label", None) or {}
    name = labels.get(index, labels.get(str(index)))
    return f"class {name} ({index})" if name is not None else f"class {index}"


def resolve_ids(target: Any, task: str, size: int, tokenizer: Any, config: Any,
                prediction: int, *, continuation: bool = False) -> int | list[int]:
    """The target id (``prediction`` when ``target`` is None), or a list of ids for a causal
    LM's continuation.

    A list of ids is a continuation; so is a text (of one token or more) when
    ``continuation`` is true. Without it, a text the tokenizer splits into several tokens is an
    error that names the pieces (:func:`several_tokens`).
    """
    if continuation and task != "causal-lm":
        raise ValueError(f"continuation=True is for a causal LM; a {task} model explains one "
                         "token or class")
    if target is None:
        if continuation:
            raise ValueError("continuation=True needs a target: the text or token ids of the "
                             "continuation")
        return prediction
    if task not in ("causal-lm", "masked-lm"):
        return class_id(target, config, size, "target class")
    causal = task == "causal-lm"
    ids = token_ids(target, tokenizer, size, "target", several=not causal or continuation
                    or isinstance(target, (list, tuple)))
    if len(ids) == 1 and not isinstance(target, (list, tuple)) and not continuation:
        return ids[0]
    if not causal:
        if isinstance(target, str):
            raise ValueError(several_tokens(target, ids, tokenizer, "target", hint=False)
                             + " (a masked LM explains one)")
        raise ValueError(f"target {target!r} is {len(ids)} tokens; a masked LM explains one")
    return ids


def explained_row(logits: Tensor, task: str | None, item: Prepared, tokenizer: Any,
                  position: int | None) -> tuple[int, ...]:
    """Index of the explained logit vector: ``(0,)``, or ``(0, position)`` per token (the
    last token, or the mask token of a masked LM, unless ``position`` is given)."""
    if logits.dim() != 3:
        return (0,)
    length = logits.shape[1]
    position = check_position(position)
    if position is None:
        position = _mask_position(item, tokenizer) if task == "masked-lm" else length - 1
    if not -length <= position < length:
        raise ValueError(f"position {position} outside the {length} tokens")
    return (0, position % length)


def _mask_position(item: Prepared, tokenizer: Any) -> int:
    mask = getattr(tokenizer, "mask_token_id", None)
    if item.ids is None or mask is None:
        raise ValueError("a masked LM explains the [MASK] position: give text with the mask "
                         "token and the tokenizer, or position=")
    where = (item.ids[0] == mask).nonzero().flatten()
    if where.numel() == 0:
        raise ValueError(f"the input has no mask token ({tokenizer.mask_token}); add one or "
                         "pass position=")
    return int(where[0])


def logit_relevance(logits: Tensor, row: tuple[int, ...], index: int, contrast: Any,
                    name: Callable[[int], str], contrast_id: Callable[[Any], int],
                    out: Tensor | None = None) -> tuple[Tensor, str]:
    """Initial relevance of ``logits`` for logit ``index`` of ``row``, and the contrast's part
    of the label.

    Parameters
    ----------
    logits : Tensor
        The model's logits.
    row : tuple of int
        Index of the explained logit vector (:func:`explained_row`).
    index : int
        The explained logit; its initial relevance is its value ``z_t``.
    contrast : int, str or None
        Another logit ``c`` (initial relevance ``−z_c``), or :data:`SOFTMAX` (``−z_j/N`` for
        every logit ``j``, added to ``z_t`` for the target).
    name, contrast_id : callable
        Name of a logit; id of a contrast specification.
    out : Tensor, optional
        A zero tensor of ``logits``' shape to write into (e.g. a view of a batch's initial
        relevance); a new one by default.
    """
    relevance = torch.zeros_like(logits) if out is None else out
    z = logits[row].detach()
    if isinstance(contrast, str) and contrast.lower() == SOFTMAX:
        relevance[row] = -z / z.shape[-1]
        suffix = " vs all (softmax-style 1, −1/N)"
    elif contrast is not None:
        other = contrast_id(contrast)
        if other == index:
            raise ValueError(f"the contrast is the target itself ({name(index)})")
        relevance[row + (other,)] = -z[other]
        suffix = f" vs {name(other).replace('class ', '')}"
    else:
        suffix = ""
    relevance[row + (index,)] = z[index]
    return relevance, suffix
