"""Latent units: rows of (unit, relevance) chips, in HTML and for the terminal.

A *row* is a caption (a unit layer's name, or a generated token) and its units, each a label
(``"17"``, ``"head 2"``) and a relevance; the colours are normalised by the largest absolute
relevance of all rows. The functions know nothing about models: the results of
:mod:`lrp_explicit.explain` build the rows (``latent_view``).
"""
from __future__ import annotations

import html
from typing import Any, Sequence

import torch

from ._colours import colours, hex_colour, ink_on, number
from ._html import _head, _legend, new_id
from ._terminal import _Painter, _render, resolve

Rows = Sequence[tuple[str, Sequence[tuple[str, float]]]]

_CSS = """<style>
#ROOT table.lrp-units { border-collapse: collapse; font-size: .9em; }
#ROOT th.lrp-units-name { text-align: right; font-weight: normal; white-space: nowrap;
                          padding: .15em .6em .15em 0; font-family: ui-monospace, monospace; }
#ROOT td.lrp-units-cells { padding: .15em 0; }
#ROOT span.lrp-unit { display: inline-block; margin: 0 .25em .15em 0; padding: .05em .4em;
                      border-radius: .25em; border: 1px solid rgba(128, 128, 128, .35);
                      font-family: ui-monospace, monospace; font-size: .9em; }
</style>"""


def _scale(rows: Rows) -> float:
    values = [abs(float(v)) for _, units in rows for _, v in units
              if float(v) == float(v) and abs(float(v)) != float("inf")]
    return max(values, default=0.0)


def _normalised(rows: Rows) -> tuple[float, list[list[float]]]:
    scale = _scale(rows)
    return scale, [[float(v) / scale if scale > 0 else 0.0 for _, v in units]
                   for _, units in rows]


def units_html(rows: Rows, title: str, *, subtitle: str | None = None,
               cmap: Any = None) -> str:
    """Units and their relevance as an HTML fragment (scoped style, unique id): one table row
    per caption, one coloured chip per unit.

    Parameters
    ----------
    rows : sequence of (str, sequence of (str, float))
        Captions and their units' labels and relevance, in the order shown.
    title : str
        The heading.
    subtitle : str, optional
        A line under it.
    cmap : str or matplotlib Colormap, optional
        The colour map (:func:`colour_map`).

    Returns
    -------
    str
        A ``<div>`` holding ``<table class="lrp-units">``: each row a ``<tr
        class="lrp-units-row">``, each unit a ``<span class="lrp-unit">`` with its value in
        ``title``.
    """
    scale, norm = _normalised(rows)
    uid = new_id()
    parts = _head(uid, title, subtitle, cmap, "units")
    parts.append(_CSS.replace("ROOT", uid))
    body = []
    for (caption, units), values in zip(rows, norm):
        rgb = colours(torch.tensor(values, dtype=torch.float64), cmap).tolist() if values \
            else []
        chips = []
        for (name, value), v, c in zip(units, values, rgb):
            colour = tuple(int(x) for x in c)
            style = "" if v == 0 else (f' style="background:{hex_colour(colour)};color:'
                                       f'{hex_colour(ink_on(colour))}"')
            chips.append(f'<span class="lrp-unit"{style} title="{number(float(value))}">'
                         f"{html.escape(str(name))} {float(value):+.3g}</span>")
        body.append(f'<tr class="lrp-units-row"><th class="lrp-units-name" scope="row">'
                    f"{html.escape(caption)}</th><td class=\"lrp-units-cells\">"
                    + "".join(chips) + "</td></tr>")
    parts.append(f'<table class="lrp-units"><tbody>{"".join(body)}</tbody></table>')
    parts.append(_legend(scale, "colour: relevance / largest |relevance|"))
    parts.append("</div>")
    return "\n".join(parts)


def units_terminal(rows: Rows, title: str, *, color: bool | str | None = None,
                   width: int | None = None, cmap: Any = None) -> str:
    """Units and their relevance as terminal text: per caption a line, then its units as
    ``label +value`` (painted with their colour when coloured), wrapped to ``width``.

    Parameters
    ----------
    rows, title, cmap
        As for :func:`units_html`.
    color : bool or str, optional
        As for :func:`terminal` (``None``: colour when the output supports it).
    width : int, optional
        Line width (default: the terminal's).

    Returns
    -------
    str
        The rendering, without a final newline.
    """
    from rich.style import Style
    from rich.text import Text

    system, width = resolve(color, width)
    painter = _Painter(system)
    scale, norm = _normalised(rows)
    out: list[Any] = [Text(title, Style(bold=True))]
    for (caption, units), values in zip(rows, norm):
        out.append(Text(caption, Style(underline=system is not None)))
        line = Text("  ")
        rgb = colours(torch.tensor(values, dtype=torch.float64), cmap).tolist() if values \
            else []
        for (name, value), v, c in zip(units, values, rgb):
            style = painter.background(tuple(int(x) for x in c)) if system and v != 0 else ""
            line.append(f"{name} {float(value):+.3g}", style)
            line.append("  ")
        out.append(line)
    out.append(Text(f"(colour: relevance / {scale:.4g}, the largest |relevance|)",
                    Style(dim=True)))
    return _render(out, system, width)
