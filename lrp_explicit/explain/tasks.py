"""The tasks whose explanation has its own module: encoder–decoders
(:mod:`~lrp_explicit.explain.seq2seq`) and image–text models
(:mod:`~lrp_explicit.explain.multimodal`). :func:`lrp_explicit.explain` hands them over here
after resolving the composite."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from ..composites import Composite
from .multimodal import (IMAGE_TEXT_SIMILARITY, IMAGE_TEXT_TO_TEXT, explain_image_text,
                         explain_vision_language)
from .result import ExplanationBatch
from .seq2seq import SEQ2SEQ, explain_seq2seq

__all__ = ["OWN_TASKS", "explain_task"]

#: Tasks explained by their own module.
OWN_TASKS = (SEQ2SEQ, IMAGE_TEXT_SIMILARITY, IMAGE_TEXT_TO_TEXT)


def explain_task(task: str, model: nn.Module, inputs: Any, target: Any, composite: Composite,
                 contrast: Any, tokenizer: Any, *, position: int | None = None,
                 record: Sequence[str] = (), generate: int | None = None,
                 generation_kwargs: Mapping[str, Any] | None = None,
                 batch_size: int = 8, continuation: bool = False) -> Any:
    """Run the explanation of ``task`` (one of :data:`OWN_TASKS`) with the arguments of
    :func:`lrp_explicit.explain`."""
    if task == SEQ2SEQ:
        out = explain_seq2seq(model, inputs, target, composite, contrast, tokenizer,
                              position=position, record=record, generate=generate,
                              generation_kwargs=generation_kwargs, batch_size=batch_size)
        return ExplanationBatch(out) if isinstance(out, list) and generate is None else out
    if position is not None or continuation:
        raise ValueError(f"position= and continuation= do not apply to a {task} model")
    if task == IMAGE_TEXT_SIMILARITY:
        if generate is not None:
            raise ValueError("generate= needs a model that writes text; CLIP compares")
        return _batch(explain_image_text(model, inputs, target, composite, contrast,
                                         tokenizer, record=record, batch_size=batch_size))
    if task == IMAGE_TEXT_TO_TEXT:
        return _batch(explain_vision_language(model, inputs, target, composite, contrast,
                                              tokenizer, record=record, generate=generate,
                                              generation_kwargs=generation_kwargs,
                                              batch_size=batch_size))
    raise ValueError(f"no explanation module for task {task!r}")


def _batch(out: Any) -> Any:
    """A list of results as an :class:`ExplanationBatch` (one page, one record)."""
    return ExplanationBatch(out) if isinstance(out, list) else out
