"""Biases set to zero for a ``with`` block: a model without biases conserves relevance exactly
under CP-LRP (and under AttnLRP up to the softmax), which is what the audit can then check."""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["zero_bias", "BIAS_PATTERNS", "is_bias"]

#: ``fnmatch`` patterns for the last component of bias parameter names.
BIAS_PATTERNS = ("bias", "*_bias")


def is_bias(name: str, patterns: Sequence[str] = BIAS_PATTERNS) -> bool:
    """True if the last component of parameter ``name`` matches one of ``patterns``."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(leaf, p) for p in patterns)


@contextlib.contextmanager
def zero_bias(model: nn.Module, patterns: Sequence[str] = BIAS_PATTERNS) -> Iterator[nn.Module]:
    """Set every bias parameter of ``model`` to zero inside a ``with`` block.

    On exit (also on error) the original values are copied back bit for bit, into the very same
    parameter objects. Buffers are never touched (GPT-2's causal-mask buffer, for example).

    Parameters
    ----------
    model : nn.Module
        The model; it may carry a composite.
    patterns : sequence of str
        ``fnmatch`` patterns for the last component of parameter names; the default matches
        ``bias`` (Linear, Conv, LayerNorm, GPT-2's Conv1D, BERT's prediction-head bias) and
        ``*_bias`` (``in_proj_bias``).

    Examples
    --------
    >>> with lrp_explicit.zero_bias(model):
    ...     report = lrp_explicit.audit(model, x, target=3, composite="cp-lrp")
    >>> abs(report.absorbed) < 1e-8 * abs(report.explained)
    True
    """
    saved = []
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_bias(name, patterns):
                    saved.append((param, param.detach().clone()))
                    param.zero_()
        yield model
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)

