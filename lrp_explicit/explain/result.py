"""The results of :func:`lrp_explicit.explain`: :class:`Explanation` (relevance per token or
pixel), :class:`ExplanationBatch` (a list of them) and :class:`GenerationExplanation` (the
relevance of the context for each generated token); their views (HTML, notebook, terminal,
PNG, LaTeX/PDF) and their records (:meth:`Explanation.save` to ``*.lrp``,
:func:`lrp_explicit.load`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, SupportsIndex, overload

from torch import Tensor

from .. import heatmaps
from ..latent import Unit, top_units
from ..tokens import clean_tokens
from . import store
from .units import LatentView, layer_rows, overall_rows, rows_of
from .words import TokenText, sum_words, word_groups

__all__ = ["Explanation", "ExplanationBatch", "GenerationExplanation"]

#: Heatmap formats of ``save`` (by suffix); ``lrp`` is the record (:mod:`.store`).
_ALIASES = {"htm": "html", "latex": "tex", "text": "txt", "terminal": "txt"}


def _kind(path: Path, format: str | None) -> str:
    kind = (format or path.suffix.lstrip(".") or "html").lower()
    return _ALIASES.get(kind, kind)


def _write(path: Path, kind: str, writers: dict[str, Callable[[], Any]]) -> Path:
    if kind not in writers:
        raise ValueError(f"unknown heatmap format {kind!r} for {path.name}; use one of "
                         f"{', '.join(sorted(writers))} (lrp: a record that "
                         "lrp_explicit.load reads back)")
    writers[kind]()
    return path


def _token_text_meta(text: TokenText | None) -> dict[str, Any] | None:
    return None if text is None else {"pieces": text.pieces, "words": text.words,
                                      "special": text.special}


def _token_text_of(meta: dict[str, Any] | None) -> TokenText | None:
    return None if meta is None else TokenText(list(meta["pieces"]), list(meta["words"]),
                                               [bool(s) for s in meta["special"]])


def _latent_record(latent: dict[str, Tensor], prefix: str
                   ) -> tuple[list[str], dict[str, Tensor]]:
    names = list(latent)
    return names, {f"{prefix}latent:{i}": latent[k] for i, k in enumerate(names)}


def _latent_of(names: Sequence[str], tensors: dict[str, Tensor], prefix: str
               ) -> dict[str, Tensor]:
    return {name: tensors[f"{prefix}latent:{i}"] for i, name in enumerate(names)}


def _units_record(units: dict[str, Tensor], prefix: str) -> tuple[list[str], dict[str, Tensor]]:
    names = list(units)
    return names, {f"{prefix}units:{i}": units[k].contiguous() for i, k in enumerate(names)}


def _units_of(names: Sequence[str], tensors: dict[str, Tensor], prefix: str
              ) -> dict[str, Tensor]:
    return {name: tensors[f"{prefix}units:{i}"] for i, name in enumerate(names)}


class _TokenViews:
    """Pieces, words and word relevance of a result with ``tokens``, ``token_text`` and a
    relevance whose last dimension is the tokens."""

    tokens: list[str] | None
    token_text: TokenText | None
    relevance: Tensor

    @property
    def pieces(self) -> list[str] | None:
        """The text of each token with the whitespace before it, as the heatmaps show it:
        slices of the input text where the tokenizer gives offsets (``"".join`` of the pieces
        of the non-special tokens is the text), else what each token adds to the decoded text,
        else the tokens with their markers read (:func:`lrp_explicit.tokens.clean_tokens`)."""
        if self.tokens is None:
            return None
        if self.token_text is not None:
            return list(self.token_text.pieces)
        return clean_tokens(self.tokens)

    @property
    def special(self) -> list[bool] | None:
        """Which tokens the tokenizer added (``[CLS]``, ``<s>`` …); all ``False`` when unknown."""
        if self.tokens is None:
            return None
        if self.token_text is not None:
            return list(self.token_text.special)
        return [False] * len(self.tokens)

    @property
    def word_index(self) -> list[int] | None:
        """The word each token belongs to (0, 1, …): the tokenizer's ``word_ids()`` where known,
        else a piece that starts with whitespace starts a word; a special token is a word of
        its own."""
        if self.tokens is None:
            return None
        if self.token_text is not None:
            return list(self.token_text.words)
        out: list[int] = []
        for k, piece in enumerate(self.pieces or []):
            starts = k == 0 or piece[:1].isspace() or piece == ""
            out.append(out[-1] + 1 if out and starts else (out[-1] if out else 0))
        return out

    @property
    def words(self) -> list[str] | None:
        """The text of each word (its tokens' pieces joined, the whitespace before it
        included); ``None`` for images."""
        pieces, index = self.pieces, self.word_index
        if pieces is None or index is None:
            return None
        return ["".join(pieces[k] for k in group) for group in word_groups(index)]

    @property
    def word_relevance(self) -> Tensor | None:
        """The relevance of each word: the sum of its tokens' relevance (over the last
        dimension of :attr:`relevance`)."""
        index = self.word_index
        return None if index is None else sum_words(self.relevance, index, dim=-1)

    @property
    def text(self) -> str | None:
        """The input text rebuilt from the pieces of the tokens that are not special (the
        texts of a pair one after the other)."""
        pieces, special = self.pieces, self.special
        if pieces is None or special is None:
            return None
        return "".join(p for p, s in zip(pieces, special) if not s)


@dataclass
class Explanation(_TokenViews):
    """What :func:`explain` returns: the relevance of each token (or pixel) for one score.

    Attributes
    ----------
    tokens : list of str or None
        Tokens as the tokenizer spells them (token ids as text without a tokenizer); ``None``
        for images. :attr:`pieces` gives them as they read, :attr:`words` joins them into
        words.
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
    ids : list of int or None
        The token ids (with a continuation appended); ``None`` for embeddings and pixels.
    token_text : TokenText or None
        The text of each token and the words (see :mod:`lrp_explicit.explain.words`);
        ``None``: read from the tokens.
    units : dict of str to Tensor
        The relevance of every latent unit, summed over the tokens: per MLP neuron, per
        attention head and per residual-stream dimension of each block, by layer name
        (:mod:`lrp_explicit.latent`); :meth:`top_units` ranks them. For a conditional
        explanation, the units before the condition's earliest layer (their relevance that
        flows through the condition).
    unit_kinds : dict of str to str
        The kind of each layer of :attr:`units`: ``"neuron"``, ``"head"`` or ``"dim"``.
    condition : dict or None
        The condition (``explain(..., condition=…)``): the relevance is the part that flows
        through these units.
    version : str
        The version of lrp_explicit that computed the explanation.
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
    ids: list[int] | None = None
    token_text: TokenText | None = None
    units: dict[str, Tensor] = field(default_factory=dict)
    unit_kinds: dict[str, str] = field(default_factory=dict)
    condition: dict[str, Any] | None = None
    version: str = field(default_factory=store.library_version)

    def __repr__(self) -> str:
        size = len(self.tokens) if self.tokens is not None else tuple(self.relevance.shape)
        return (f"Explanation({self.task}, {self.label}, score={self.score:.4g}, "
                f"{'tokens' if self.tokens is not None else 'pixels'}={size})")

    def __str__(self) -> str:
        return self.to_terminal(color=False)

    @property
    def word_segments(self) -> list[int] | None:
        """The segment of each word (that of its first token)."""
        if self.segments is None or self.word_index is None:
            return None
        return [self.segments[group[0]] for group in word_groups(self.word_index)]

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

    def _view(self, words: bool) -> tuple[list[str] | None, Tensor, list[int] | None]:
        """Display pieces, relevance and segments per token, or per word."""
        if not words:
            return self.pieces, self.relevance, self.segments
        if self.tokens is None:
            raise ValueError("words=True needs tokens; this explanation is of pixels")
        return self.words, self.word_relevance, self.word_segments  # type: ignore[return-value]

    # ------------------------------------------------------------------ views

    def to_html(self, words: bool = False, cmap: Any = None) -> str:
        """A self-contained HTML page; see :func:`lrp_explicit.heatmaps.html_page`.

        Parameters
        ----------
        words : bool
            One box per word (the summed relevance of its tokens) instead of per token.
        cmap : str or matplotlib colormap, optional
            The colour map (default: the diverging red–blue one).
        """
        tokens, relevance, segments = self._view(words)
        return heatmaps.html_page(tokens, relevance, self.title, subtitle=self.subtitle,
                                  segments=segments, segment_names=self.segment_names,
                                  image=self.image, cmap=cmap)

    def to_html_fragment(self, words: bool = False, cmap: Any = None) -> str:
        """An HTML fragment with scoped style and unique ids (any number fit on one page);
        see :func:`lrp_explicit.heatmaps.html_fragment`."""
        tokens, relevance, segments = self._view(words)
        return heatmaps.html_fragment(tokens, relevance, self.title, subtitle=self.subtitle,
                                      segments=segments, segment_names=self.segment_names,
                                      image=self.image, cmap=cmap)

    def _repr_html_(self) -> str:
        """The notebook view: :meth:`to_html_fragment`."""
        return self.to_html_fragment()

    def to_terminal(self, color: bool | None = None, width: int | None = None,
                    words: bool = False, cmap: Any = None) -> str:
        """The heatmap as terminal text; see :func:`lrp_explicit.heatmaps.terminal`.

        Parameters
        ----------
        color : bool, optional
            ``None``: colour when the output supports it (``NO_COLOR`` and ``FORCE_COLOR``
            are honoured).
        width : int, optional
            Line width (default: the terminal's).
        words : bool
            One entry per word instead of per token.
        cmap : optional
            The colour map.
        """
        tokens, relevance, segments = self._view(words)
        return heatmaps.terminal(tokens, relevance, self.title, color=color,
                                 segments=segments, width=width, cmap=cmap)

    def to_png(self, path: str | os.PathLike | None = None, dpi: int = 150,
               words: bool = False, cmap: Any = None) -> bytes:
        """PNG bytes drawn with matplotlib; written to ``path`` if given."""
        tokens, relevance, segments = self._view(words)
        data = heatmaps.png(tokens, relevance, self.title, segments=segments,
                            image=self.image, dpi=dpi, cmap=cmap, subtitle=self.subtitle)
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def to_latex(self, words: bool = False, cmap: Any = None) -> str:
        """A LaTeX document for ``xelatex`` or ``pdflatex`` (text explanations)."""
        tokens, relevance, segments = self._view(words)
        return heatmaps.latex(tokens, relevance, self.title, segments=segments, cmap=cmap,
                              subtitle=self.subtitle)

    def to_pdf(self, path: str | os.PathLike, backend: str | None = None,
               words: bool = False, cmap: Any = None) -> Path:
        """Compile :meth:`to_latex` into ``path``; needs ``xelatex`` or ``pdflatex`` on PATH
        (:class:`lrp_explicit.heatmaps.RenderError` otherwise)."""
        return heatmaps.pdf(self.to_latex(words, cmap), path, backend)

    # ------------------------------------------------------------------ latent units

    def top_units(self, pattern: str = "*", k: int = 10, absolute: bool = False) -> list[Unit]:
        """The ``k`` most relevant units of the layers matching ``pattern``, best first.

        Parameters
        ----------
        pattern : str
            ``fnmatch`` pattern of unit layers (``"*mlp.act_fn"``: the MLP neurons,
            ``"*self_attn"``: the heads, ``"model.layers.3"``: the residual stream after block
            3; the layers are the keys of :attr:`units`).
        k : int
            How many.
        absolute : bool
            Rank by absolute relevance (else the largest positive first).

        Returns
        -------
        list of Unit
            Each with its layer, kind, index and relevance; ``unit.spec`` is a condition or a
            unit target.
        """
        return top_units(self.units, pattern, k, self.unit_kinds, absolute=absolute)

    def latent_view(self, k: int = 5, pattern: str = "*") -> LatentView:
        """The latent view: the ``k`` units of largest absolute relevance of each layer
        matching ``pattern``; shows itself in a notebook, ``to_html()``, ``to_terminal()``.
        """
        return LatentView(layer_rows(self.units, self.unit_kinds, pattern, k), self.title,
                          self.subtitle)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (relevance as nested lists, per token and per word)."""
        word_relevance = self.word_relevance
        return {"task": self.task, "label": self.label, "score": self.score,
                "target": self.target, "contrast": self.contrast, "prediction": self.prediction,
                "tokens": self.tokens, "ids": self.ids, "pieces": self.pieces,
                "segments": self.segments, "relevance": self.relevance.double().tolist(),
                "words": self.words,
                "word_relevance": None if word_relevance is None
                else word_relevance.double().tolist(),
                "composite": self.composite, "model": self.model, "version": self.version,
                "latent": {k: list(v.shape) for k, v in self.latent.items()},
                "units": {k: list(v.shape) for k, v in self.units.items()},
                "top_units": [u._asdict() for u in self.top_units("*", 20, absolute=True)]
                if self.units else [],
                "condition": self.condition}

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the explanation; the format follows the suffix unless given.

        Parameters
        ----------
        path : path-like
            ``name.lrp``: a record folder that :func:`lrp_explicit.load` reads back with every
            value (tensors in safetensors, the rest in JSON; see
            :mod:`lrp_explicit.explain.store`). A heatmap: ``.html``, ``.png``, ``.pdf``,
            ``.tex``, ``.json`` (the fields of :meth:`to_dict`) or ``.txt`` (plain text).
        format : str, optional
            One of ``lrp``, ``html``, ``png``, ``pdf``, ``tex``, ``json``, ``txt``.

        Returns
        -------
        Path
        """
        path = Path(path)
        kind = _kind(path, format)
        return _write(path, kind, {
            "lrp": lambda: store.write(path, "explanation", *self._record("")),
            "html": lambda: path.write_text(self.to_html(), encoding="utf-8"),
            "png": lambda: path.write_bytes(self.to_png()),
            "pdf": lambda: self.to_pdf(path),
            "tex": lambda: path.write_text(self.to_latex(), encoding="utf-8"),
            "json": lambda: path.write_text(json.dumps(store.jsonable(self.to_dict()),
                                                       indent=1), encoding="utf-8"),
            "txt": lambda: path.write_text(self.to_terminal(color=False) + "\n",
                                           encoding="utf-8"),
        })

    # ------------------------------------------------------------------ records

    def _record(self, prefix: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        names, tensors = _latent_record(self.latent, prefix)
        unit_names, unit_tensors = _units_record(self.units, prefix)
        tensors.update(unit_tensors)
        tensors[f"{prefix}relevance"] = self.relevance
        if self.image is not None:
            tensors[f"{prefix}image"] = self.image
        meta = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("relevance", "image", "latent", "token_text", "units")}
        meta.update(latent=names, image=self.image is not None, units=unit_names,
                    token_text=_token_text_meta(self.token_text))
        return store.jsonable(meta), tensors

    @classmethod
    def _from_record(cls, meta: dict[str, Any], tensors: dict[str, Tensor],
                     prefix: str = "") -> "Explanation":
        values = {f.name: meta[f.name] for f in fields(cls)
                  if f.name in meta and f.name not in ("relevance", "image", "latent",
                                                       "token_text", "units")}
        return cls(**values, relevance=tensors[f"{prefix}relevance"],
                   image=tensors[f"{prefix}image"] if meta.get("image") else None,
                   latent=_latent_of(meta.get("latent", []), tensors, prefix),
                   units=_units_of(meta.get("units", []), tensors, prefix),
                   token_text=_token_text_of(meta.get("token_text")))


class ExplanationBatch(list):
    """What :func:`explain` returns for a batch: a list of results (indexing, ``len`` and
    iteration as a list) that shows itself as one page and saves as one record."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        super().__init__(items)

    @overload
    def __getitem__(self, index: SupportsIndex) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> "ExplanationBatch": ...

    def __getitem__(self, index: Any) -> Any:
        got = super().__getitem__(index)
        return ExplanationBatch(got) if isinstance(index, slice) else got

    def __repr__(self) -> str:
        return f"ExplanationBatch({list.__repr__(self)})"

    def to_html_fragment(self, words: bool = False, cmap: Any = None) -> str:
        """The fragments of all results, one after the other."""
        return "\n".join(self._fragments(words, cmap))

    def _fragments(self, words: bool, cmap: Any) -> list[str]:
        return [e.to_html_fragment(words=words, cmap=cmap) for e in self]

    def _repr_html_(self) -> str:
        """The notebook view: every result's fragment."""
        return self.to_html_fragment()

    def to_html(self, words: bool = False, cmap: Any = None) -> str:
        """One HTML page with every result."""
        return heatmaps.html_document(self._fragments(words, cmap),
                                      f"{len(self)} explanations")

    def to_terminal(self, color: bool | None = None, width: int | None = None,
                    words: bool = False, cmap: Any = None) -> str:
        """Every result's terminal view, separated by blank lines."""
        return "\n\n".join(e.to_terminal(color=color, width=width, words=words, cmap=cmap)
                           for e in self)

    def __str__(self) -> str:
        return self.to_terminal(color=False)

    def top_units(self, pattern: str = "*", k: int = 10, absolute: bool = False
                  ) -> list[Any]:
        """Each result's :meth:`Explanation.top_units` (for a generation, its list per
        generated token)."""
        return [e.top_units(pattern, k, absolute=absolute) for e in self]

    def latent_view(self, k: int = 5, pattern: str = "*") -> LatentView:
        """The latent views of all results in one (rows captioned ``[i] …``)."""
        rows = [(f"[{i}] {caption}", units) for i, e in enumerate(self)
                for caption, units in e.latent_view(k, pattern).rows]
        return LatentView(rows, f"{len(self)} results")

    def to_dict(self) -> list[dict[str, Any]]:
        """Each result's :meth:`Explanation.to_dict`."""
        return [e.to_dict() for e in self]

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the batch: ``name.lrp`` a record (:func:`lrp_explicit.load` reads it back as
        an :class:`ExplanationBatch`), ``.html`` one page, ``.json`` a list of
        :meth:`Explanation.to_dict`, ``.txt`` the terminal views."""
        path = Path(path)
        return _write(path, _kind(path, format), {
            "lrp": lambda: store.write(path, "batch", *self._record()),
            "html": lambda: path.write_text(self.to_html(), encoding="utf-8"),
            "json": lambda: path.write_text(json.dumps(store.jsonable(self.to_dict()),
                                                       indent=1), encoding="utf-8"),
            "txt": lambda: path.write_text(self.to_terminal(color=False) + "\n",
                                           encoding="utf-8"),
        })

    def _record(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        items, tensors = [], {}
        for i, e in enumerate(self):
            if type(e) not in _KIND_OF:
                kinds = ", ".join(sorted(c.__name__ for c in _KIND_OF))
                raise ValueError(f"item {i} is a {type(e).__name__}; a record holds {kinds} "
                                 "results")
            meta, own = e._record(f"{i}/")
            items.append({"kind": _KIND_OF[type(e)], **meta})
            tensors.update(own)
        return {"items": items}, tensors

    @classmethod
    def _from_record(cls, meta: dict[str, Any], tensors: dict[str, Tensor]
                     ) -> "ExplanationBatch":
        return cls(_CLASS_OF[item["kind"]]._from_record(item, tensors, f"{i}/")
                   for i, item in enumerate(meta["items"]))


@dataclass
class GenerationExplanation(_TokenViews):
    """What ``explain(model, prompt, generate=N)`` returns: the relevance of every context
    token for each generated token.

    Row ``i`` of :attr:`relevance` is the explanation of generated token ``i`` (at position
    ``prompt_length + i``) from the tokens before it: exactly what
    ``explain(model, ids[:prompt_length + i], target=generated[i])`` gives, zero from position
    ``prompt_length + i`` on (nothing there is seen by that prediction).

    Attributes
    ----------
    tokens : list of str
        The prompt's and the generated tokens, as the tokenizer spells them.
    ids : list of int
        Their ids.
    relevance : Tensor
        ``(generated, tokens)``: ``relevance[i, j]`` is the relevance of token ``j`` for
        generated token ``i``; on the CPU in the model's dtype.
    prompt_length : int
        The number of prompt tokens.
    probabilities : list of float
        The model's probability (softmax of its logits, in float64) of each generated token.
    scores : list of float
        The explained score of each generated token (its logit, or with ``contrast`` the
        logit difference or the softmax-style sum).
    labels : list of str
        Each generated token in words (``"next token ' Paris' (id 6342)"``, with the contrast).
    contrast : int, str or None
        The contrast token's id, ``"softmax"`` or ``None``.
    latent : dict of str to Tensor
        Relevance at the recorded modules' outputs, one row per generated token.
    composite, model : str
        Names shown in the views.
    generation : dict
        The generation options (``max_new_tokens``, ``do_sample`` … as given to
        ``model.generate``).
    token_text : TokenText or None
        The text of each token and the words.
    units : dict of str to Tensor
        The relevance of every latent unit for each generated token, ``(generated, units)``
        per layer (see :attr:`Explanation.units`).
    unit_kinds : dict of str to str
        The kind of each layer of :attr:`units`.
    version : str
        The version of lrp_explicit that computed it.
    """

    tokens: list[str]
    ids: list[int]
    relevance: Tensor
    prompt_length: int
    probabilities: list[float]
    scores: list[float]
    labels: list[str]
    contrast: int | str | None = None
    latent: dict[str, Tensor] = field(default_factory=dict)
    composite: str = ""
    model: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    token_text: TokenText | None = None
    units: dict[str, Tensor] = field(default_factory=dict)
    unit_kinds: dict[str, str] = field(default_factory=dict)
    version: str = field(default_factory=store.library_version)

    task = "generation"

    def __repr__(self) -> str:
        return (f"GenerationExplanation({self.generated_text!r}, generated={len(self.generated)}"
                f", tokens={len(self.tokens)})")

    def __str__(self) -> str:
        return self.to_terminal(color=False)

    def __len__(self) -> int:
        return len(self.generated)

    @property
    def generated(self) -> list[int]:
        """The ids of the generated tokens."""
        return list(self.ids[self.prompt_length:])

    @property
    def generated_tokens(self) -> list[str]:
        """The generated tokens as the tokenizer spells them."""
        return list(self.tokens[self.prompt_length:])

    @property
    def generated_pieces(self) -> list[str]:
        """The generated tokens as they read."""
        return (self.pieces or [])[self.prompt_length:]

    @property
    def generated_text(self) -> str:
        """The generated text."""
        return "".join(self.generated_pieces)

    @property
    def title(self) -> str:
        """What the views show as their heading."""
        suffix = {None: "", "softmax": " · softmax-style contrast"}.get(
            self.contrast if not isinstance(self.contrast, int) else -1,
            f" · contrast id {self.contrast}")
        return f"generated {self.generated_text!r} ({len(self.generated)} tokens){suffix}"

    @property
    def subtitle(self) -> str:
        """Model, composite and the mean probability of the generated tokens."""
        parts = [p for p in (self.model, self.composite) if p]
        mean = sum(self.probabilities) / max(len(self.probabilities), 1)
        return " · ".join(parts + [f"mean probability {mean:.3g}"])

    def row(self, i: int) -> Explanation:
        """The explanation of generated token ``i`` alone (its context: the tokens before it)."""
        m = len(self.generated)
        if not -m <= i < m:
            raise IndexError(f"generated token {i} of {m}")
        i %= m
        end = self.prompt_length + i
        text = self.token_text
        return Explanation(
            tokens=self.tokens[:end], relevance=self.relevance[i, :end], score=self.scores[i],
            target=self.generated[i], label=self.labels[i], task="causal-lm",
            contrast=self.contrast, latent={k: v[i, :end] if v.dim() >= 2 else v[i]
                                            for k, v in self.latent.items()},
            units=rows_of(self.units, i), unit_kinds=dict(self.unit_kinds),
            composite=self.composite, model=self.model, ids=self.ids[:end],
            token_text=None if text is None else TokenText(
                text.pieces[:end], text.words[:end], text.special[:end]),
            version=self.version)

    def top_units(self, pattern: str = "*", k: int = 10, absolute: bool = False
                  ) -> list[list[Unit]]:
        """For each generated token, the ``k`` most relevant units of the layers matching
        ``pattern`` (see :meth:`Explanation.top_units`)."""
        return [top_units(rows_of(self.units, i), pattern, k, self.unit_kinds,
                          absolute=absolute) for i in range(len(self.generated))]

    def latent_view(self, k: int = 5, pattern: str = "*") -> LatentView:
        """The latent view per generated token: its ``k`` units of largest absolute relevance
        over the layers matching ``pattern``."""
        rows = [(f"{i}: {piece.strip() or repr(piece)}", rows_of(self.units, i))
                for i, piece in enumerate(self.generated_pieces)]
        return LatentView(overall_rows(rows, self.unit_kinds, pattern, k), self.title,
                          self.subtitle)

    def _matrix(self, words: bool) -> tuple[list[str], list[str], Tensor]:
        rows = self.generated_pieces
        if words:
            return rows, self.words or [], self.word_relevance  # type: ignore[return-value]
        return rows, self.pieces or [], self.relevance

    # ------------------------------------------------------------------ views

    def to_html_fragment(self, words: bool = False, cmap: Any = None) -> str:
        """The matrix as an HTML table fragment (rows: generated tokens, columns: the
        context); see :func:`lrp_explicit.heatmaps.matrix_html`."""
        rows, columns, matrix = self._matrix(words)
        return heatmaps.matrix_html(rows, columns, matrix, self.title, subtitle=self.subtitle,
                                    cmap=cmap)

    def _repr_html_(self) -> str:
        """The notebook view: :meth:`to_html_fragment`."""
        return self.to_html_fragment()

    def to_html(self, words: bool = False, cmap: Any = None) -> str:
        """A page with the matrix (:meth:`to_html_fragment`)."""
        return heatmaps.html_document([self.to_html_fragment(words, cmap)], self.title)

    def to_terminal(self, color: bool | None = None, width: int | None = None,
                    words: bool = False, cmap: Any = None) -> str:
        """The matrix as terminal text; see :func:`lrp_explicit.heatmaps.matrix_terminal`."""
        rows, columns, matrix = self._matrix(words)
        return heatmaps.matrix_terminal(rows, columns, matrix, self.title, color=color,
                                        width=width, cmap=cmap)

    def to_png(self, path: str | os.PathLike | None = None, dpi: int = 150,
               words: bool = False, cmap: Any = None) -> bytes:
        """The matrix as PNG bytes; written to ``path`` if given."""
        rows, columns, matrix = self._matrix(words)
        data = heatmaps.matrix_png(rows, columns, matrix, self.title, cmap=cmap, dpi=dpi,
                                   subtitle=self.subtitle)
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the matrix as nested lists)."""
        return {"task": self.task, "tokens": self.tokens, "ids": self.ids,
                "pieces": self.pieces, "prompt_length": self.prompt_length,
                "generated": self.generated, "probabilities": self.probabilities,
                "scores": self.scores, "labels": self.labels, "contrast": self.contrast,
                "relevance": self.relevance.double().tolist(), "words": self.words,
                "composite": self.composite, "model": self.model,
                "generation": self.generation, "version": self.version}

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write the result: ``name.lrp`` a record (:func:`lrp_explicit.load` reads it back),
        ``.html`` the matrix page, ``.png`` the matrix, ``.json`` :meth:`to_dict`, ``.txt``
        the terminal view."""
        path = Path(path)
        return _write(path, _kind(path, format), {
            "lrp": lambda: store.write(path, "generation", *self._record("")),
            "html": lambda: path.write_text(self.to_html(), encoding="utf-8"),
            "png": lambda: path.write_bytes(self.to_png()),
            "json": lambda: path.write_text(json.dumps(store.jsonable(self.to_dict()),
                                                       indent=1), encoding="utf-8"),
            "txt": lambda: path.write_text(self.to_terminal(color=False) + "\n",
                                           encoding="utf-8"),
        })

    # ------------------------------------------------------------------ records

    def _record(self, prefix: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        names, tensors = _latent_record(self.latent, prefix)
        unit_names, unit_tensors = _units_record(self.units, prefix)
        tensors.update(unit_tensors)
        tensors[f"{prefix}relevance"] = self.relevance
        meta = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("relevance", "latent", "token_text", "units")}
        meta.update(latent=names, units=unit_names,
                    token_text=_token_text_meta(self.token_text))
        return store.jsonable(meta), tensors

    @classmethod
    def _from_record(cls, meta: dict[str, Any], tensors: dict[str, Tensor],
                     prefix: str = "") -> "GenerationExplanation":
        values = {f.name: meta[f.name] for f in fields(cls)
                  if f.name in meta and f.name not in ("relevance", "latent", "token_text",
                                                       "units")}
        return cls(**values, relevance=tensors[f"{prefix}relevance"],
                   latent=_latent_of(meta.get("latent", []), tensors, prefix),
                   units=_units_of(meta.get("units", []), tensors, prefix),
                   token_text=_token_text_of(meta.get("token_text")))


_KIND_OF = {Explanation: "explanation", GenerationExplanation: "generation"}
_CLASS_OF = {v: k for k, v in _KIND_OF.items()}
store.register_reader("explanation", lambda meta, t: Explanation._from_record(meta, t))
store.register_reader("generation", lambda meta, t: GenerationExplanation._from_record(meta, t))
store.register_reader("batch", ExplanationBatch._from_record)
