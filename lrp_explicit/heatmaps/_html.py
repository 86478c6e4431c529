"""HTML: fragments with scoped styles (notebooks, pages of several heatmaps) and whole pages."""
from __future__ import annotations

import base64
import html
import io
import itertools
import math
import json
import secrets
from typing import Any, Sequence

import torch
from torch import Tensor

from ._colours import (colours, hex_colour, ink_on, matrix_parts, normalise, number, ramp,
                       scale_of)
from ._text import check_lengths, chunks, groups, label, visible

_PROCESS = secrets.token_hex(4)
_COUNTER = itertools.count(1)


def new_id() -> str:
    """An element id unique in this process and, with a random part, across processes."""
    return f"lrp-{_PROCESS}-{next(_COUNTER)}"


# every selector starts with ROOT (the fragment's own id): nothing applies outside the fragment
_CSS = """
ROOT { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: .6em 0 1em 0;
       max-width: 60em; line-height: 1.4; }
ROOT .lrp-title { font-weight: 600; font-size: 1.05em; margin: 0 0 .15em 0; }
ROOT .lrp-meta { opacity: .75; font-size: .85em; margin: 0 0 .5em 0; }
ROOT .lrp-label { opacity: .7; font-size: .8em; margin-top: .5em; }
ROOT .lrp-text { font-size: 1.15em; line-height: 2; white-space: pre-wrap;
                 overflow-wrap: break-word; margin: .1em 0 .4em 0; }
ROOT .lrp-tok { padding: .12em .06em; border-radius: .2em; cursor: default; }
ROOT .lrp-nonfinite { background: repeating-linear-gradient(45deg, #d33 0 2px, transparent 2px
                      6px); outline: 1px dashed #d33; }
ROOT .lrp-tok:hover, ROOT td.lrp-cell:hover { outline: 2px solid currentColor; }
ROOT .lrp-value { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: .8em;
                  opacity: .8; min-height: 1.3em; margin-top: .2em; }
ROOT .lrp-legend { display: flex; align-items: center; gap: .5em; font-size: .8em;
                   opacity: .85; margin-top: .5em; }
ROOT .lrp-bar { width: 12em; height: .8em; border: 1px solid rgba(128, 128, 128, .5);
                background: linear-gradient(to right, GRADIENT); }
ROOT .lrp-images { display: flex; gap: 1.5em; align-items: flex-start; }
ROOT .lrp-images img { width: 16em; image-rendering: pixelated;
                       border: 1px solid rgba(128, 128, 128, .5); }
ROOT .lrp-scroll { overflow-x: auto; max-width: 100%; }
ROOT table.lrp-table { border-collapse: collapse; font-size: .85em; margin: 0; }
ROOT th.lrp-col { vertical-align: bottom; padding: 0 0 .3em 0; font-weight: normal; }
ROOT th.lrp-col span { writing-mode: vertical-rl; transform: rotate(180deg); white-space: pre;
                       display: inline-block; max-height: 9em; overflow: hidden;
                       text-overflow: ellipsis; }
ROOT th.lrp-row { text-align: right; white-space: pre; font-weight: normal;
                  padding: 0 .5em 0 0; }
ROOT td.lrp-cell { width: 1.3em; min-width: 1.3em; height: 1.3em; padding: 0;
                   border: 1px solid rgba(128, 128, 128, .18); }
ROOT td.lrp-blank { border-color: transparent; }
"""

_SCRIPT = """(() => {
  const root = document.getElementById(ROOT_ID);
  if (!root) return;
  const out = root.querySelector(".lrp-value");
  const idle = out.textContent;
  root.querySelectorAll("[data-relevance]").forEach(el => {
    el.addEventListener("mouseenter", () => {
      out.textContent = el.dataset.label + ": " + el.title; });
    el.addEventListener("mouseleave", () => { out.textContent = idle; });
  });
})();"""

_HOVER = "hover over a token for its relevance"


def _style(uid: str, cmap: Any) -> str:
    gradient = ", ".join(hex_colour(c) for c in ramp(cmap, 11))
    return "<style>" + _CSS.replace("ROOT", "#" + uid).replace("GRADIENT", gradient) + "</style>"


def _head(uid: str, title: str, subtitle: str | None, cmap: Any, kind: str) -> list[str]:
    parts = [f'<div class="lrp-heatmap lrp-{kind}" id="{uid}">', _style(uid, cmap),
             f'<div class="lrp-title">{html.escape(visible(title, lines=False))}</div>']
    if subtitle:
        parts.append(f'<div class="lrp-meta">{html.escape(visible(subtitle, lines=False))}'
                     '</div>')
    return parts


def _legend(scale: float, text: str) -> str:
    return (f'<div class="lrp-legend"><span>{number(-scale)}</span><div class="lrp-bar"></div>'
            f'<span>{number(scale)}</span><span>{html.escape(text)}</span></div>')


def html_fragment(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
                  subtitle: str | None = None, segments: Sequence[int] | None = None,
                  segment_names: Sequence[str] | None = None, image: Tensor | None = None,
                  cmap: Any = None) -> str:
    """The heatmap as an HTML fragment: a ``<div>`` with its own scoped style, for notebooks
    (``_repr_html_``) and for pages holding several heatmaps.

    Every CSS selector starts with the fragment's id (a fresh one per call, unique also across
    processes), there is no rule for ``body`` or headings, every element id inside starts with
    that id, and the hover script looks only inside its own fragment: any number of fragments
    live on one page without restyling each other. Tokens of zero relevance are not painted and
    the text colour is inherited, so the fragment reads on light and dark notebook themes; a
    painted token gets black or white text, whichever contrasts more.

    Parameters
    ----------
    tokens : sequence of str or None
        Display pieces, each with its own leading whitespace (``" Paris"``; a ``"\\n"`` breaks
        the line after a ``↵``); shown as given. ``None`` for an image.
    relevance : Tensor
        One value per token, or ``(H, W)`` per pixel.
    title : str
        The heading (the target and the score).
    subtitle : str, optional
        A line under the heading (model, composite, totals).
    segments : sequence of int, optional
        The text each token belongs to; each text is shown as its own paragraph.
    segment_names : sequence of str, optional
        A caption per text.
    image : Tensor, optional
        ``(H, W, 3)`` values in [0, 1], shown next to a pixel heatmap.
    cmap : str or matplotlib Colormap, optional
        The colour map (:func:`colour_map`); the default is the diverging red–white–blue map.

    Returns
    -------
    str
        The fragment. Each token is a ``<span class="lrp-tok">`` whose background is its colour
        and whose ``title`` and ``data-relevance`` hold its value; hovering a token shows its
        value in a line under the text.
    """
    uid = new_id()
    scale = scale_of(relevance)
    norm = normalise(relevance)
    parts = _head(uid, title, subtitle, cmap, "text" if tokens is not None else "image")
    if tokens is None:
        parts.append(_image(uid, relevance, norm, image, cmap))
    else:
        flat_r = relevance.detach().reshape(-1).to("cpu", torch.float64).tolist()
        flat_v = norm.reshape(-1).tolist()
        check_lengths(tokens, len(flat_r))
        rgb = colours(norm.reshape(-1), cmap).tolist()
        for n, group in enumerate(groups(len(tokens), segments)):
            if segment_names and n < len(segment_names):
                parts.append(f'<div class="lrp-label">{html.escape(segment_names[n])}</div>')
            spans = []
            for i in group:
                value, v = flat_r[i], flat_v[i]
                style = "" if v == 0 else \
                    f' style="background:{hex_colour(rgb[i])};color:{hex_colour(ink_on(rgb[i]))}"'
                finite = math.isfinite(value)
                kind = "lrp-tok" if finite else "lrp-tok lrp-nonfinite"
                shown = f"{value:+.4g} ({v:+.2f})" if finite else \
                    ("nan" if value != value else f"{value:+}") + " (not finite)"
                attrs = (f'class="{kind}"{style} title="{shown}" '
                         f'data-label="{html.escape(label(tokens[i]))}" '
                         f'data-relevance="{value!r}" data-normalised="{v:.6f}"')
                for chunk in chunks(tokens[i]):
                    spans.append(f"{html.escape(chunk.lead)}<span {attrs}>"
                                 f"{html.escape(chunk.body)}</span>"
                                 + ("\n" if chunk.newline else ""))
            parts.append(f'<div class="lrp-text">{"".join(spans)}</div>')
        parts.append(f'<div class="lrp-value" id="{uid}-value">{_HOVER}</div>')
    parts.append(_legend(scale, "relevance: the colour scale runs to ± max |relevance|"))
    parts.append(f"<script>{_SCRIPT.replace('ROOT_ID', json.dumps(uid))}</script></div>")
    return "\n".join(parts)


def _image(uid: str, relevance: Tensor, norm: Tensor, image: Tensor | None, cmap: Any) -> str:
    from PIL import Image

    heat = _data_uri(Image.fromarray(colours(norm, cmap).numpy(), "RGB"))
    values = json.dumps([[float(f"{x:.4g}") for x in row]
                         for row in relevance.detach().to("cpu", torch.float64).tolist()])
    shown = ""
    if image is not None:
        pixels = (image.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8)
        shown = f'<img src="{_data_uri(Image.fromarray(pixels.numpy(), "RGB"))}" alt="input">'
    return (f'<div class="lrp-images">{shown}<img id="{uid}-heat" class="lrp-heat" src="{heat}" '
            f'alt="relevance" title="hover for the relevance of a pixel"></div>'
            f'<div class="lrp-value" id="{uid}-value">hover over the heatmap for a pixel\'s '
            f"relevance</div><script>(() => {{ const R = {values};\n"
            f"const root = document.getElementById({json.dumps(uid)});\n"
            "const img = root.querySelector('.lrp-heat'), out = root.querySelector('.lrp-value');\n"
            "img.addEventListener('mousemove', e => { const b = img.getBoundingClientRect();\n"
            "  const y = Math.floor((e.clientY - b.top) / b.height * R.length);\n"
            "  const x = Math.floor((e.clientX - b.left) / b.width * R[0].length);\n"
            "  if (R[y] !== undefined && R[y][x] !== undefined) out.textContent = "
            "`pixel (${y}, ${x}): ${R[y][x]}`; }); })();</script>")


def _data_uri(img: Any) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_document(fragments: Sequence[str], title: str = "") -> str:
    """A self-contained HTML page (no external resources) holding one or more fragments.

    Parameters
    ----------
    fragments : sequence of str
        Fragments from :func:`html_fragment` or :func:`matrix_html`, shown one below the other.
    title : str
        The page's ``<title>``.

    Returns
    -------
    str
        The page; the only page-wide style is the body's margin and font.
    """
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        "<style>body { margin: 1.5em 2em; color: #222; background: #fff; "
        "font-family: system-ui, sans-serif; }</style></head><body>",
        *fragments, "</body></html>"])


def html_page(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
              subtitle: str = "", segments: Sequence[int] | None = None,
              segment_names: Sequence[str] | None = None, image: Tensor | None = None,
              cmap: Any = None) -> str:
    """A self-contained HTML page showing one heatmap: :func:`html_fragment` in
    :func:`html_document`.

    Parameters
    ----------
    tokens, relevance, title, subtitle, segments, segment_names, image, cmap
        As for :func:`html_fragment`.

    Returns
    -------
    str
        The page.
    """
    return html_document([html_fragment(tokens, relevance, title, subtitle=subtitle or None,
                                        segments=segments, segment_names=segment_names,
                                        image=image, cmap=cmap)], title)


def matrix_html(rows: Sequence[str], columns: Sequence[str], matrix: Tensor, title: str, *,
                subtitle: str | None = None, cmap: Any = None) -> str:
    """A relevance matrix (generated tokens × context tokens) as an HTML heatmap table: a
    fragment like :func:`html_fragment` (scoped style, unique ids).

    Parameters
    ----------
    rows : sequence of str
        Display pieces of the generated tokens (one row each).
    columns : sequence of str
        Display pieces of the context tokens (prompt and generated tokens; one column each,
        labelled vertically).
    matrix : Tensor
        ``(len(rows), len(columns))``: ``matrix[i, j]`` the relevance of column ``j`` for row
        ``i``. Colours are normalised by the largest absolute value of the whole matrix. The
        run of exact zeros at the end of each row (the row's own position and later, which it
        cannot depend on) and non-finite cells are left blank.
    title : str
        The heading.
    subtitle : str, optional
        A line under it.
    cmap : str or matplotlib Colormap, optional
        The colour map (:func:`colour_map`).

    Returns
    -------
    str
        The fragment: ``<table class="lrp-table">``, each cell a ``<td class="lrp-cell">``
        with its colour, its value in ``title`` and ``data-relevance``; blank cells have class
        ``lrp-blank`` and no value.
    """
    m, blank = matrix_parts(rows, columns, matrix)
    scale = scale_of(m)
    norm = normalise(m)
    rgb = colours(norm, cmap).tolist()
    uid = new_id()
    parts = _head(uid, title, subtitle, cmap, "matrix")
    head = "".join(f'<th class="lrp-col" title="{html.escape(label(c))}">'
                   f"<span>{html.escape(label(c, 24))}</span></th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for j, c in enumerate(columns):
            if blank[i, j]:
                cells.append('<td class="lrp-cell lrp-blank"></td>')
                continue
            value, v = float(m[i, j]), float(norm[i, j])
            style = "" if v == 0 else f' style="background:{hex_colour(rgb[i][j])}"'
            cells.append(f'<td class="lrp-cell"{style} title="{value:+.4g} ({v:+.2f})" '
                         f'data-label="{html.escape(label(r))} ← {html.escape(label(c))}" '
                         f'data-relevance="{value!r}"></td>')
        body.append(f'<tr><th class="lrp-row" scope="row">{html.escape(label(r, 32))}</th>'
                    + "".join(cells) + "</tr>")
    parts.append(f'<div class="lrp-scroll"><table class="lrp-table"><thead><tr><th></th>{head}'
                 f'</tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    parts.append(f'<div class="lrp-value" id="{uid}-value">hover over a cell for its '
                 "relevance</div>")
    parts.append(_legend(scale, "rows: generated tokens · columns: context · colour scale "
                                "± max |relevance| of the matrix"))
    parts.append(f"<script>{_SCRIPT.replace('ROOT_ID', json.dumps(uid))}</script></div>")
    return "\n".join(parts)
