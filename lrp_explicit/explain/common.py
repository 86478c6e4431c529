"""Names shared by the explanation entry points: the model's name and vocabulary, and the
names and ids of tokens and classes."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ..composites import unwrap
from ..pipeline.targets import class_id, class_name, token_ids, token_name

__all__ = ["model_name", "vocabulary", "namer", "contrast_id"]


def model_name(model: nn.Module) -> str:
    """The last part of the model's ``config._name_or_path``, else its class name."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    path = str(getattr(config, "_name_or_path", "") or "")
    return path.rstrip("/").split("/")[-1] or type(model).__name__


def vocabulary(model: nn.Module) -> int:
    """The number of logits of a language model's head."""
    model = unwrap(model)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if isinstance(weight, Tensor):
        return weight.shape[0]
    return int(model.config.vocab_size)


def namer(task: str | None, tokenizer: Any, config: Any) -> Callable[[int], str]:
    """``name(i)``: a token (``'x' (id i)``) for language models, a class otherwise."""
    if task in ("causal-lm", "masked-lm"):
        return lambda i: token_name(tokenizer, i)
    return lambda i: class_name(config, i)


def contrast_id(spec: Any, task: str | None, size: int, tokenizer: Any, config: Any) -> int:
    """The id of a contrast token (one token) or class."""
    if task in ("causal-lm", "masked-lm"):
        ids = token_ids(spec, tokenizer, size, "contrast", several=False)
        if len(ids) != 1:
            raise ValueError(f"contrast {spec!r} is {len(ids)} tokens; give one token")
        return ids[0]
    return class_id(spec, config, size, "contrast class")
