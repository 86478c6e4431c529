"""The result of :func:`lrp_explicit.explain`: relevance per token or pixel, and its heatmaps."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from .. import heatmaps

__all__ = ["Explanation"]


@dataclass
class Explanation:
    """What :func:`explain` returns: the relevance of each token (or pixel) for one score.

    Attributes
    ----------
    tokens : list of str or None
        Tokens as the tokenizer spells them (token ids as text without a tokenizer); ``None``
        for images. :attr:`words` gives them cleaned for display.
    relevance : Tensor
        One value per token ``(tokens,)``, or per pixel ``(H, W)`` (summed over the channels),
        on the CPU in the model's dtype.
    score : float
        The explained score: the logit, the logit difference of a contrast, the
        contrast-weighted sum of the softmax-style initialisation, the summed logits of a
        continuation, or the cosine similarity.
    target : int, list of int or None
        The explained token or class id (a list for a continuation; ``None`` for a similarity).
    label : str
        The target in words, e.g. ``"next token ' Paris' (id 6342)"``.
    task : str
        One of :data:`TASKS`.
    contrast : int, str or None
        The contrasted id, ``"softmax"`` or ``None``.
    prediction : int or None
        The model's own choice (arg max) at the explained position.
    segments : list of int or None
        The part each token belongs to: the text of a pair (similarity), or prompt and
        continuation.
    segment_names : list of str or None
        A caption per segment.
    image : Tensor or None
        For images: the input as ``(H, W, 3)`` in [0, 1] (rescaled for display).
    latent : dict of str to Tensor
        Relevance at the outputs of the modules asked for with ``record=`` (batch dimension
        removed); a module that runs again (the second text of a pair) adds ``#1``, ``#2`` ….
    composite, model : str
        Names shown in the heatmaps.
    """

    tokens: list[str] | None
    relevance: Tensor
    score: float
    target: int | list[int] | None
    label: str
    task: str
    contrast: int | str | None = None
    prediction: int | None = None
    segments: list[int] | None = None
    segment_names: list[str] | None = None
    image: Tensor | None = None
    latent: dict[str, Tensor] = field(default_factory=dict)
    composite: str = ""
    model: str = ""

    def __repr__(self) -> str:
        size = len(self.tokens) if self.tokens is not None else tuple(self.relevance.shape)
        return (f"Explanation({self.task}, {self.label}, score={self.score:.4g}, "
                f"{'tokens' if self.tokens is not None else 'pixels'}={size})")

    def __str__(self) -> str:
        return self.to_terminal(color=False)

    @property
    def words(self) -> list[str] | None:
        """The tokens as they read (tokenizer markers removed, see
        :func:`lrp_explicit.heatmaps.clean_tokens`)."""
        return None if self.tokens is None else heatmaps.clean_tokens(self.tokens)

    @property
    def title(self) -> str:
        """The target and the score, as heatmaps show them."""
        name = "cosine" if self.task == "similarity" else "score"
        return f"{self.label} · {name} {self.score:.4g}"

    @property
    def subtitle(self) -> str:
        """Model, composite and the total relevance."""
        total = float(self.relevance.double().sum())
        parts = [p for p in (self.model, self.composite) if p]
        return " · ".join(parts + [f"total relevance {total:.4g}"])

    def to_html(self) -> str:
        """A self-contained HTML page; see :func:`lrp_explicit.heatmaps.html_page`."""
        return heatmaps.html_page(self.tokens, self.relevance, self.title,
                                  subtitle=self.subtitle, segments=self.segments,
                                  segment_names=self.segment_names, image=self.image)

    def to_terminal(self, color: bool | None = None, width: int = 64) -> str:
        """Text with ANSI colours; ``color=None`` colours only a terminal without ``NO_COLOR``."""
        if color is None:
            color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        return heatmaps.terminal(self.tokens, self.relevance, self.title, color=color,
                                 segments=self.segments, width=width)

    def to_png(self, path: str | os.PathLike | None = None, dpi: int = 150) -> bytes:
        """PNG bytes drawn with matplotlib; written to ``path`` if given."""
        data = heatmaps.png(self.tokens, self.relevance, self.title, segments=self.segments,
                            image=self.image, dpi=dpi)
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def to_latex(self) -> str:
        """A LaTeX document for ``xelatex`` or ``pdflatex`` (text explanations)."""
        return heatmaps.latex(self.tokens, self.relevance, self.title, segments=self.segments)

    def to_pdf(self, path: str | os.PathLike, backend: str | None = None) -> Path:
        """Compile :meth:`to_latex` into ``path``; needs ``xelatex`` or ``pdflatex`` on PATH
        (:class:`lrp_explicit.heatmaps.RenderError` otherwise)."""
        return heatmaps.pdf(self.to_latex(), path, backend)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (relevance as nested lists)."""
        return {"task": self.task, "label": self.label, "score": self.score,
                "target": self.target, "contrast": self.contrast, "prediction": self.prediction,
                "tokens": self.tokens, "words": self.words, "segments": self.segments,
                "relevance": self.relevance.double().tolist(), "composite": self.composite,
                "model": self.model,
                "latent": {k: list(v.shape) for k, v in self.latent.items()}}

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the heatmap; the format follows the suffix unless given.

        Parameters
        ----------
        path : path-like
            ``.html``, ``.png``, ``.pdf``, ``.tex``, ``.json`` or ``.txt`` (plain text).
        format : str, optional
            One of ``html``, ``png``, ``pdf``, ``tex``, ``json``, ``txt``.
        """
        path = Path(path)
        kind = (format or path.suffix.lstrip(".") or "html").lower()
        kind = {"htm": "html", "latex": "tex", "text": "txt", "terminal": "txt"}.get(kind, kind)
        writers: dict[str, Callable[[], None]] = {
            "html": lambda: path.write_text(self.to_html(), encoding="utf-8"),
            "png": lambda: path.write_bytes(self.to_png()),
            "pdf": lambda: self.to_pdf(path),
            "tex": lambda: path.write_text(self.to_latex(), encoding="utf-8"),
            "json": lambda: path.write_text(json.dumps(self.to_dict(), indent=1),
                                            encoding="utf-8"),
            "txt": lambda: path.write_text(self.to_terminal(color=False) + "\n",
                                           encoding="utf-8"),
        }
        if kind not in writers:
            raise ValueError(f"unknown heatmap format {kind!r}; use one of {sorted(writers)}")
        writers[kind]()
        return path


