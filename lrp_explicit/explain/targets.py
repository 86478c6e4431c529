"""Targets of :func:`lrp_explicit.explain`: token and class ids from ids, tokens, texts or
labels, and the initial relevance of the logits (with a contrast or the softmax-style
initialisation)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .. import heatmaps
from .inputs import _Item

#: ``contrast=SOFTMAX``: initial relevance ``z_t`` for the target's logit and ``−z_j/N`` for
#: every other logit ``z_j`` (the weights 1 and −1/N of a softmax-style explanation).
SOFTMAX = "softmax"


def _token_name(tokenizer: Any, index: int) -> str:
    if tokenizer is None:
        return f"id {index}"
    word = heatmaps.clean_tokens(tokenizer.convert_ids_to_tokens([index]))[0]
    return f"{word!r} (id {index})"


def _check_index(index: Any, size: int, what: str) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"{what} must be an int or text, not {type(index).__name__}")
    if not 0 <= index < size:
        noun = "vocabulary of" if "token" in what else "model's"
        unit = "tokens" if "token" in what else "classes"
        raise ValueError(f"{what} {index} is outside the {noun} {size} {unit}")
    return index


def _token_ids(spec: Any, tokenizer: Any, size: int, what: str) -> list[int]:
    """Token ids of a target or contrast: an id, a token, a text or a list of ids."""
    if isinstance(spec, str):
        if tokenizer is None:
            raise ValueError(f"a text {what} needs a tokenizer")
        if not spec:
            raise ValueError(f"the {what} text is empty")
        vocab = tokenizer.get_vocab()
        if spec in vocab:
            ids = [vocab[spec]]
        else:
            ids = list(tokenizer(spec, add_special_tokens=False)["input_ids"])
            unk = getattr(tokenizer, "unk_token_id", None)
            if not ids or (unk is not None and unk in ids):
                raise ValueError(f"{what} {spec!r} is not in the vocabulary"
                                 + (" (the tokenizer maps it to its unknown token)" if ids else ""))
        return [_check_index(i, size, f"{what} token") for i in ids]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"the {what} continuation is empty")
        return [_check_index(i, size, f"{what} token") for i in spec]
    return [_check_index(spec, size, f"{what} token")]


def _class_id(spec: Any, config: Any, size: int, what: str) -> int:
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


def _class_name(config: Any, index: int) -> str:
    labels = getattr(config, "id2label", None) or {}
    name = labels.get(index, labels.get(str(index)))
    return f"class {name} ({index})" if name is not None else f"class {index}"


def _row(logits: Tensor, task: str, item: _Item, tokenizer: Any,
         position: int | None) -> tuple[int, ...]:
    """Index of the explained logit vector: ``(0,)``, or ``(0, position)`` per token."""
    if logits.dim() != 3:
        return (0,)
    length = logits.shape[1]
    if position is None:
        position = _mask_position(item, tokenizer) if task == "masked-lm" else length - 1
    if not -length <= position < length:
        raise ValueError(f"position {position} outside the {length} tokens")
    return (0, position % length)


def _resolve(target: Any, task: str, size: int, tokenizer: Any, config: Any,
             prediction: int) -> int | list[int]:
    """The target id, or a list of ids for a causal LM's continuation."""
    if target is None:
        return prediction
    if task not in ("causal-lm", "masked-lm"):
        return _class_id(target, config, size, "target class")
    ids = _token_ids(target, tokenizer, size, "target")
    if len(ids) == 1 and not isinstance(target, (list, tuple)):
        return ids[0]
    if task != "causal-lm":
        raise ValueError(f"target {target!r} is {len(ids)} tokens; a masked LM explains one")
    return ids


def _initial(logits: Tensor, row: tuple[int, ...], index: int, contrast: Any, name: Callable,
             contrast_id: Callable[[Any], int]) -> tuple[Tensor, str]:
    """The initial relevance of the logits and the contrast's part of the label."""
    relevance = torch.zeros_like(logits)
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


def _mask_position(item: _Item, tokenizer: Any) -> int:
    mask = getattr(tokenizer, "mask_token_id", None)
    if item.ids is None or mask is None:
        raise ValueError("a masked LM explains the [MASK] position: give text with the mask "
                         "token and the tokenizer, or position=")
    where = (item.ids == mask).nonzero().flatten()
    if where.numel() == 0:
        raise ValueError(f"the input has no mask token ({tokenizer.mask_token}); add one or "
                         "pass position=")
    return int(where[0])


