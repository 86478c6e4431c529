"""PNG: text, pixel and matrix heatmaps drawn with matplotlib (without touching pyplot)."""
from __future__ import annotations

import io
import textwrap
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import RenderError
from ._colours import colour_map, colours, ink_on, matrix_parts, normalise, scale_of
from ._text import check_lengths, chunks, groups, label

_SIZE = 12.0       # token font size, points
_LINE = 25.0       # line height, points
_MARGIN = 16.0     # page margin, points
_PAD = 2.0         # box padding around a token, points
_BAR = 9.0         # colour bar height, points


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise RenderError("PNG heatmaps need matplotlib: pip install matplotlib") from err
    return Figure, FigureCanvasAgg


def _bytes(fig: Any, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def _colour_bar(fig: Any, cax: Any, scale: float, cmap: Any, orientation: str) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    s = scale if scale > 0 else 1.0
    bar = fig.colorbar(ScalarMappable(Normalize(-s, s), colour_map(cmap)), cax=cax,
                       orientation=orientation)
    bar.set_ticks([-s, 0.0, s], labels=[f"{-scale:+.3g}", "0", f"{scale:+.3g}"])
    bar.ax.tick_params(labelsize=8, length=2)
    bar.set_label("relevance" if scale > 0 else "relevance (all zero)", fontsize=8)
    bar.outline.set_linewidth(0.5)
    return bar


def _caption_lines(text: str, size: float, width_pt: float) -> list[str]:
    per_line = max(20, int(width_pt / (0.56 * size)))
    return textwrap.wrap(text, per_line) or [""]


#: Tokens drawn at most in a text PNG (its time grows with them: about a second per hundred).
MAX_TOKENS = 1000


def png(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
        segments: Sequence[int] | None = None, image: Tensor | None = None, dpi: int = 150,
        cmap: Any = None, subtitle: str | None = None, width: float = 9.0,
        max_tokens: int = MAX_TOKENS) -> bytes:
    """The heatmap as PNG bytes, drawn with matplotlib (pyplot's state is not touched).

    Text is laid out like text: tokens on boxes of their colour (none for zero relevance),
    lines wrapped between words (a word longer than the line is folded), a ``"\\n"`` breaking
    the line after a ``↵``. The caption (title, subtitle) is at the top and a colour bar in
    relevance units (``± max |relevance|``) at the bottom; a pixel heatmap has the bar at its
    side.

    Parameters
    ----------
    tokens, relevance, title, segments, image
        As for :func:`html_fragment`.
    dpi : int
        Resolution.
    cmap : str or matplotlib Colormap, optional
        The colour map (:func:`colour_map`).
    subtitle : str, optional
        A second caption line (model, composite, totals).
    width : float
        Figure width in inches; text wraps to it.
    max_tokens : int
        Draw at most this many tokens (the first ones; a last line says how many more there
        are, and the colours keep the scale of all of them). The HTML, terminal and ``.lrp``
        views hold every token.

    Returns
    -------
    bytes
        The PNG file.

    Raises
    ------
    RenderError
        If matplotlib is not installed.
    """
    fig = figure(tokens, relevance, title, segments=segments, image=image, dpi=dpi, cmap=cmap,
                 subtitle=subtitle, width=width, max_tokens=max_tokens)
    return _bytes(fig, dpi)


def figure(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
           segments: Sequence[int] | None = None, image: Tensor | None = None, dpi: int = 150,
           cmap: Any = None, subtitle: str | None = None, width: float = 9.0,
           max_tokens: int = MAX_TOKENS) -> Any:
    """The matplotlib ``Figure`` that :func:`png` saves, to adjust before saving.

    Parameters
    ----------
    tokens, relevance, title, segments, image, dpi, cmap, subtitle, width, max_tokens
        As for :func:`png`.

    Returns
    -------
    matplotlib.figure.Figure
        A text heatmap has one axes, its colour bar (the text is drawn on the figure); a pixel
        heatmap has the relevance (and the input, if given) and the colour bar. Save it with
        ``fig.savefig(path, dpi=dpi)``.
    """
    Figure, Canvas = _matplotlib()
    norm = normalise(relevance)
    scale = scale_of(relevance)
    if tokens is not None:
        check_lengths(tokens, norm.numel())
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        pieces, flat = list(tokens), norm.reshape(-1)
        if len(pieces) > max_tokens:  # the scale stays that of all tokens
            rest = len(pieces) - max_tokens
            pieces, flat = pieces[:max_tokens], flat[:max_tokens]
            segments = list(segments)[:max_tokens] if segments else segments
            note = (f"the first {max_tokens} of {len(tokens)} tokens; {rest} more not drawn "
                    "(the HTML, terminal and .lrp views hold all)")
            subtitle = f"{subtitle} · {note}" if subtitle else note
        return _text_figure(Figure, Canvas, pieces, flat, scale, title,
                            subtitle, segments, dpi, width, cmap)
    panels = 2 if image is not None else 1
    fig = Figure(figsize=(3.2 * panels + 1.0, 3.9), dpi=dpi, layout="constrained")
    Canvas(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if image is not None:
        axes[0].imshow(image.detach().cpu().float().clamp(0, 1).numpy())
        axes[0].set_title("input", fontsize=9)
    s = scale if scale > 0 else 1.0
    shown = axes[-1].imshow(relevance.detach().to("cpu", torch.float64).nan_to_num(0.0).numpy(),
                            cmap=colour_map(cmap), vmin=-s, vmax=s)
    axes[-1].set_title("relevance", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(shown, ax=list(axes), fraction=0.05, pad=0.02)
    bar.ax.tick_params(labelsize=8)
    fig.suptitle("\n".join(_caption_lines(title, 10, 72 * (3.2 * panels + 1.0))), fontsize=10,
                 parse_math=False)
    if subtitle:
        fig.supxlabel(subtitle, fontsize=8, color="#555555", parse_math=False)
    return fig


def _text_figure(Figure, Canvas, pieces, norm, scale, title, subtitle, segments, dpi, width,  # noqa: N803
                 cmap):
    """Lay the tokens out like text, each on a box of its colour; caption above, bar below."""
    from matplotlib.font_manager import FontProperties

    probe = Figure(dpi=72)
    renderer = Canvas(probe).get_renderer()
    font = FontProperties(size=_SIZE)
    cache: dict[str, float] = {}

    def measure(s: str) -> float:  # points (the probe's dpi is 72)
        if s not in cache:
            cache[s] = renderer.get_text_width_height_descent(s, font, ismath=False)[0]
        return cache[s]

    space_w = measure("a a") - measure("aa")
    page_w = width * 72.0
    max_w = page_w - 2 * _MARGIN
    title_lines = _caption_lines(title, 11, max_w)
    sub_lines = _caption_lines(subtitle, 9, max_w) if subtitle else []
    top = _MARGIN + 15 * len(title_lines) + 12 * len(sub_lines) + 10
    rgb = colours(norm, cmap).tolist()
    flat = norm.tolist()
    placed = []  # (x, y, text, token index) in points from the top left
    y = top + _LINE / 2
    paragraphs = groups(len(pieces), segments)
    for n, group in enumerate(paragraphs):
        # words: runs of chunks without whitespace between them
        words: list[list[tuple[str, int, bool]]] = []
        lead_of: list[bool] = []
        for i in group:
            for chunk in chunks(pieces[i]):
                if chunk.lead or not words or (words[-1] and words[-1][-1][2]):
                    words.append([])
                    lead_of.append(bool(chunk.lead))
                words[-1].append((chunk.body, i, chunk.newline))
        x = 0.0
        for word, lead in zip(words, lead_of):
            w = sum(measure(b) + 2 * _PAD for b, _, _ in word if b)
            gap = space_w if lead and x > 0 else 0.0
            if x > 0 and x + gap + w > max_w:
                x, y, gap = 0.0, y + _LINE, 0.0
            x += gap
            for body, i, newline in word:
                if body:
                    bw = measure(body) + 2 * _PAD
                    if x > 0 and x + bw > max_w:  # a word longer than the line: fold it
                        x, y = 0.0, y + _LINE
                    placed.append((x, y, body, i))
                    x += bw
                if newline:
                    x, y = 0.0, y + _LINE
        y += _LINE * (1.35 if n < len(paragraphs) - 1 else 1.0)
    bar_top = y + 6
    height = bar_top + _BAR + 34 + _MARGIN / 2
    fig = Figure(figsize=(width, height / 72.0), dpi=dpi)
    Canvas(fig)

    def fx(x: float) -> float:
        return x / page_w

    def fy(yy: float) -> float:
        return 1.0 - yy / height

    yy = _MARGIN
    for line in title_lines:
        fig.text(fx(_MARGIN), fy(yy), line, fontsize=11, weight="bold", va="top",
                 parse_math=False)
        yy += 15
    for line in sub_lines:
        fig.text(fx(_MARGIN), fy(yy), line, fontsize=9, color="#555555", va="top",
                 parse_math=False)
        yy += 12
    for x, yv, body, i in placed:
        v = flat[i]
        colour = tuple(c / 255 for c in rgb[i])
        box = None if v == 0 else dict(boxstyle="square,pad=0.15", linewidth=0, facecolor=colour)
        ink = tuple(c / 255 for c in ink_on(tuple(rgb[i]))) if v != 0 else (0.1, 0.1, 0.1)
        fig.text(fx(_MARGIN + x + _PAD), fy(yv), body, fontsize=_SIZE, va="center",
                 color=ink, bbox=box, parse_math=False)
    bar_w = min(220.0, max_w)
    cax = fig.add_axes((fx(_MARGIN), fy(bar_top + _BAR), bar_w / page_w, _BAR / height))
    _colour_bar(fig, cax, scale, cmap, "horizontal")
    return fig


def matrix_png(rows: Sequence[str], columns: Sequence[str], matrix: Tensor, title: str, *,
               cmap: Any = None, dpi: int = 150, subtitle: str | None = None) -> bytes:
    """A relevance matrix (generated tokens × context tokens) as PNG bytes (matplotlib).

    Rows are the generated tokens (labelled on the left), columns the context tokens
    (labelled below, vertically; at most about 80 labels, every k-th beyond), a colour bar in
    relevance units on the right, the caption on top. Colours are normalised by the largest
    absolute value of the matrix; the run of exact zeros at the end of each row (the row's own
    position and later) and non-finite cells are left blank.

    Parameters
    ----------
    rows, columns, matrix, title
        As for :func:`matrix_html`.
    cmap : str or matplotlib Colormap, optional
        The colour map (:func:`colour_map`).
    dpi : int
        Resolution.
    subtitle : str, optional
        A second caption line.

    Returns
    -------
    bytes
        The PNG file.
    """
    fig = matrix_figure(rows, columns, matrix, title, cmap=cmap, dpi=dpi, subtitle=subtitle)
    return _bytes(fig, dpi)


def matrix_figure(rows: Sequence[str], columns: Sequence[str], matrix: Tensor, title: str, *,
                  cmap: Any = None, dpi: int = 150, subtitle: str | None = None) -> Any:
    """The matplotlib ``Figure`` that :func:`matrix_png` saves, to adjust before saving.

    Parameters
    ----------
    rows, columns, matrix, title, cmap, dpi, subtitle
        As for :func:`matrix_png`.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the heatmap (blank cells masked) and its colour bar.
    """
    import numpy as np

    Figure, Canvas = _matplotlib()
    m, blank = matrix_parts(rows, columns, matrix)
    scale = scale_of(m)
    s = scale if scale > 0 else 1.0
    n_rows, n_cols = len(rows), len(columns)
    col_labels = [label(c, 18) for c in columns]
    row_labels = [label(r, 24) for r in rows]
    cell = 0.24
    side = 0.3 + 0.075 * max([len(t) for t in row_labels] + [4])
    below = 0.3 + 0.075 * max([len(t) for t in col_labels] + [4])
    fig_w = min(30.0, max(5.0, side + n_cols * cell + 1.2))
    fig_h = min(30.0, max(2.8, n_rows * cell + below + 0.9 + 0.2 * bool(subtitle)))
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, layout="constrained")
    Canvas(fig)
    ax = fig.subplots()
    shown_map = colour_map(cmap).with_extremes(bad=(1.0, 1.0, 1.0, 0.0))
    data = np.ma.masked_array(m.numpy(), mask=blank.numpy())
    shown = ax.imshow(data, cmap=shown_map, vmin=-s, vmax=s, aspect="auto",
                      interpolation="nearest")
    step_c = max(1, -(-n_cols // 80))
    step_r = max(1, -(-n_rows // 80))
    ax.set_xticks(range(0, n_cols, step_c), [col_labels[j] for j in range(0, n_cols, step_c)],
                  rotation=90, fontsize=8)
    ax.set_yticks(range(0, n_rows, step_r), [row_labels[i] for i in range(0, n_rows, step_r)],
                  fontsize=8)
    for t in ax.get_xticklabels() + ax.get_yticklabels():
        t.set_parse_math(False)
    ax.set_xlabel("context", fontsize=9)
    ax.set_ylabel("generated", fontsize=9)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    bar = fig.colorbar(shown, ax=ax, fraction=0.05, pad=0.02)
    bar.ax.tick_params(labelsize=8)
    bar.set_label("relevance" if scale > 0 else "relevance (all zero)", fontsize=8)
    caption = "\n".join(_caption_lines(title, 10, 72 * fig_w))
    if subtitle:
        caption += "\n" + subtitle
    ax.set_title(caption, fontsize=10, loc="left", parse_math=False)
    return fig
