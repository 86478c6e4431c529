"""The terminal: heatmaps drawn with rich (colour systems, NO_COLOR / FORCE_COLOR, wrapping)."""
from __future__ import annotations

import io
import math
import os
import sys
from typing import Any, Sequence

import torch
from torch import Tensor

from ._colours import RGB, colours, ink_on, matrix_parts, normalise, number, ramp, scale_of
from ._text import check_lengths, chunks, groups, label, visible

#: ``color=`` values naming a colour system, as rich names them.
COLOR_SYSTEMS = ("truecolor", "256", "standard")


def _probe() -> Any:
    from rich.console import Console

    return Console(file=sys.stdout if sys.stdout is not None else io.StringIO())


def resolve(color: bool | str | None, width: int | None) -> tuple[str | None, int]:
    """The colour system (``None``: plain text) and the width a rendering gets.

    ``color=None`` decides as rich does for standard output: colour only on a terminal (or in
    Jupyter), never with ``NO_COLOR``, always with ``FORCE_COLOR`` (``NO_COLOR`` wins when both
    are set), with as many colours as ``COLORTERM`` / ``TERM`` announce. ``True`` forces
    colour (24-bit unless ``COLORTERM`` / ``TERM`` announce fewer), ``False`` plain text; a
    name of :data:`COLOR_SYSTEMS` picks that system. ``width=None`` is the terminal's width
    (rich: ``COLUMNS``, the terminal's size, else 80).
    """
    probe = None
    if width is None:
        probe = _probe()
        width = probe.width
    if not isinstance(width, int) or isinstance(width, bool) or width < 20:
        raise ValueError(f"width must be an int of at least 20 columns, got {width!r}")
    if color is None:
        probe = probe or _probe()
        system = None if probe.no_color else probe.color_system
    elif color is True:
        from rich.console import Console

        announced = os.environ.get("COLORTERM", "") or os.environ.get("TERM", "") not in ("",
                                                                                          "dumb")
        forced = Console(file=io.StringIO(), force_terminal=True)
        system = (forced.color_system if announced else None) or "truecolor"
    elif color is False:
        system = None
    elif color in COLOR_SYSTEMS:
        system = str(color)
    else:
        raise ValueError(f"color must be None, True, False or one of {COLOR_SYSTEMS}, got "
                         f"{color!r}")
    if system == "windows":
        system = "standard"
    return system, width


def _console(system: str | None, width: int) -> Any:
    from rich.console import Console

    return Console(file=io.StringIO(), width=width, color_system=system,
                   force_terminal=system is not None, force_jupyter=False,
                   force_interactive=False, no_color=False, highlight=False, markup=False,
                   emoji=False, legacy_windows=False, soft_wrap=False, tab_size=4, _environ={})


class _Painter:
    """rich styles for colours, converted to the colour system here (rich caches the ANSI codes
    of equal styles across consoles, so a style must already hold the colour it prints as)."""

    def __init__(self, system: str | None):
        from rich.color import ColorSystem

        self.system = system
        self._target = {"truecolor": ColorSystem.TRUECOLOR, "256": ColorSystem.EIGHT_BIT,
                        "standard": ColorSystem.STANDARD}.get(system or "")

    def colour(self, rgb: RGB) -> tuple[Any, RGB]:
        """A rich Color for ``rgb`` in the target system and the RGB it shows as."""
        from rich.color import Color

        c = Color.from_rgb(*rgb)
        if self.system == "standard":
            c = Color.from_ansi(_chromatic(rgb))
        elif self._target is not None and self._target != c.system:
            c = c.downgrade(self._target)
        shown = c.get_truecolor()
        return c, (shown.red, shown.green, shown.blue)

    def background(self, rgb: RGB) -> Any:
        """Background ``rgb`` with black or white text, whichever contrasts more with the
        background as it shows in this colour system."""
        from rich.color import Color
        from rich.style import Style

        bg, shown = self.colour(rgb)
        fg = Color.from_rgb(*ink_on(shown))
        if self._target is not None and self._target != fg.system:
            fg = fg.downgrade(self._target)
        return Style(bgcolor=bg, color=fg)

    def halves(self, top: RGB, bottom: RGB) -> Any:
        from rich.style import Style

        return Style(color=self.colour(top)[0], bgcolor=self.colour(bottom)[0])


_HUES = (1, 3, 2, 6, 4, 5)  # ANSI red, yellow, green, cyan, blue, magenta: hues 0°, 60° … 300°


def _chromatic(rgb: RGB) -> int:
    """The 16-colour palette entry of a colour's hue (bright for a light colour): a light tint
    becomes its hue, not white or grey, so that the sign stays visible with 16 colours."""
    import colorsys

    hue, light, sat = colorsys.rgb_to_hls(*(c / 255.0 for c in rgb))
    if sat < 1e-3:  # a grey has no hue
        return 7 if light >= 0.5 else 8
    return _HUES[round(hue * 6) % 6] + (8 if light > 0.6 else 0)


def _render(renderables: Sequence[Any], system: str | None, width: int) -> str:
    console = _console(system, width)
    for r in renderables:
        console.print(r, overflow="fold", crop=True)
    lines = console.file.getvalue().rstrip("\n").split("\n")
    return "\n".join(line.rstrip(" ") for line in lines)  # a painted space ends in a reset


def _scale_line(scale: float, data: Tensor, painter: _Painter, cmap: Any, width: int,
                what: str = "relevance") -> Any:
    from rich.style import Style
    from rich.text import Text

    d = data.detach().to("cpu", torch.float64)
    finite = torch.isfinite(d)
    bad = int((~finite).sum())
    d = d[finite]
    span = f"min {float(d.min()):.4g}, max {float(d.max()):.4g}" if d.numel() \
        else "no finite values"
    if bad:
        span += f"; {bad} NaN or infinite (shown as such, not coloured)"
    text = Text()
    if painter.system is None:
        text.append(f"(values: {what} / {scale:.4g}, the largest |{what}|; {span})")
        return text
    left, right = number(-scale), number(scale)
    cells = max(8, min(32, width - len(left) - len(right) - 4 - 30))
    text.append("scale ", Style(dim=True))
    text.append(left + " ")
    for rgb in ramp(cmap, cells):
        text.append(" ", Style(bgcolor=painter.colour(rgb)[0]))
    text.append(" " + right)
    text.append(f"  {what}: {span}", Style(dim=True))
    return text


def terminal(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
             color: bool | str | None = None, segments: Sequence[int] | None = None,
             width: int | None = None, cmap: Any = None, faint: float = 0.05) -> str:
    """The heatmap as text for a terminal, drawn with rich.

    Tokens of zero relevance keep the terminal's own background and text colour, and so do
    tokens whose normalised relevance is below ``faint`` in size (their colour would differ
    from the map's white centre by a few percent: invisible on a light terminal, a glaring
    white box on a dark one). Every other token is painted with its colour and black or white
    text, whichever contrasts more, so the text reads on dark and light terminals. Lines wrap
    between words, never inside one (a word longer than the line is folded); a ``"\\n"`` in a
    piece breaks the line after a ``↵``. The last line is the scale: the colour ramp from
    ``−max |relevance|`` to ``+max |relevance|`` with its end values, and the data's minimum
    and maximum.

    Parameters
    ----------
    tokens : sequence of str or None
        Display pieces, each with its own leading whitespace (shown as given), or ``None`` for
        a pixel heatmap.
    relevance : Tensor
        One value per token, or ``(H, W)``.
    title : str
        First line.
    color : bool, str or None
        ``None`` (default): decide as rich does from the environment — colour on a terminal or
        in Jupyter, plain text when output is redirected, never with ``NO_COLOR``, always with
        ``FORCE_COLOR`` (``NO_COLOR`` wins), 24-bit / 256 / 16 colours as ``COLORTERM`` and
        ``TERM`` announce. ``True`` forces colour, ``False`` gives plain text, and
        ``"truecolor"``, ``"256"`` or ``"standard"`` pick a colour system. Plain text writes
        every token's normalised value after it, e.g. ``cat(+0.82)``, and a pixel heatmap in
        signs and shades.
    segments : sequence of int, optional
        The text each token belongs to (one paragraph per text).
    width : int, optional
        Columns (at least 20); by default the terminal's width (``COLUMNS``, else 80). No line
        of the result is wider.
    cmap : str or matplotlib Colormap, optional
        The colour map (:func:`colour_map`).
    faint : float
        Normalised relevance below this size is not painted (0: paint every non-zero value).

    Returns
    -------
    str
        The rendering, with ANSI escape codes when coloured, without a final newline.
    """
    from rich.style import Style
    from rich.text import Text

    system, width = resolve(color, width)
    painter = _Painter(system)
    norm = normalise(relevance)
    out: list[Any] = [Text(visible(title, lines=False), Style(bold=True))]
    if tokens is None:
        out += _image(norm, painter, cmap, width)
    else:
        flat = norm.reshape(-1).tolist()
        raw = relevance.detach().to("cpu", torch.float64).reshape(-1).tolist()
        check_lengths(tokens, len(flat))
        rgb = colours(norm.reshape(-1), cmap).tolist()
        for group in groups(len(tokens), segments):
            text = Text(overflow="fold")
            for i in group:
                v = flat[i]
                style = painter.background(tuple(rgb[i])) if system and v != 0 and \
                    abs(v) >= faint else None
                parts = chunks(tokens[i])
                last = max((k for k, c in enumerate(parts) if c.body), default=-1)
                for k, chunk in enumerate(parts):
                    text.append(chunk.lead)
                    body = chunk.body
                    if system is None and body and not body.strip():
                        body = "␣" * len(body)
                    if body:
                        text.append(body, style)
                    if not math.isfinite(raw[i]) and k == last:  # never shown as zero
                        shown = "nan" if raw[i] != raw[i] else f"{raw[i]:+}"
                        text.append(f"({shown})", Style(bold=True) if system else None)
                    elif system is None and k == last:
                        text.append(f"({v:+.2f})")
                    if chunk.newline:
                        text.append("\n")
            out.append(text)
    out.append(_scale_line(scale_of(relevance), relevance, painter, cmap, width))
    return _render(out, system, width)


def _image(norm: Tensor, painter: _Painter, cmap: Any, width: int) -> list[Any]:
    from rich.text import Text

    h, w = norm.shape
    cols = max(1, min(width, w))
    rows = max(2, round(h * cols / w / (1 if painter.system else 2)))
    small = torch.nn.functional.adaptive_avg_pool2d(norm[None, None], (rows, cols))[0, 0]
    small = small / small.abs().max() if small.abs().max() > 0 else small
    lines = []
    if painter.system:  # two pixel rows per line: upper half block, foreground above
        rgb = colours(small, cmap).tolist()
        for y in range(0, rows - 1, 2):
            line = Text(no_wrap=True)
            for x in range(cols):
                line.append("▀", painter.halves(tuple(rgb[y][x]), tuple(rgb[y + 1][x])))
            lines.append(line)
        return lines
    for y in range(rows):
        lines.append(Text("".join(
            (" .:+#"[min(4, int(abs(v) * 5))] if v >= 0 else "-~=%@"[min(4, int(abs(v) * 5))])
            for v in small[y].tolist()), no_wrap=True))
    return lines


def matrix_terminal(rows: Sequence[str], columns: Sequence[str], matrix: Tensor, title: str, *,
                    color: bool | str | None = None, width: int | None = None,
                    cmap: Any = None, faint: float = 0.05) -> str:
    """A relevance matrix (generated tokens × context tokens) as text for a terminal.

    Terminal lines are short and a continuation usually is too, so the matrix is drawn
    transposed: one line per context token (its label on the left), one column per generated
    token (its label on top). Each cell holds the value normalised by the largest absolute
    value of the whole matrix (``+0.82``), painted with its colour when coloured; the run of
    exact zeros at the end of each row of ``matrix`` (the generated token's own position and
    later) and non-finite cells are blank. When the generated tokens do not fit the width they
    continue in further blocks below.

    Parameters
    ----------
    rows : sequence of str
        Display pieces of the generated tokens.
    columns : sequence of str
        Display pieces of the context tokens.
    matrix : Tensor
        ``(len(rows), len(columns))``: ``matrix[i, j]`` the relevance of context token ``j``
        for generated token ``i``.
    title : str
        First line.
    color, width, cmap, faint
        As for :func:`terminal`.

    Returns
    -------
    str
        The rendering, without a final newline; no line wider than ``width``.
    """
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    system, width = resolve(color, width)
    painter = _Painter(system)
    m, blank = matrix_parts(rows, columns, matrix)
    norm = normalise(m)
    rgb = colours(norm, cmap).tolist()
    side = min(16, max([len(label(c)) for c in columns] + [7]), width // 3)
    per_block = max(1, (width - side - 1) // 7)
    out: list[Any] = [Text(visible(title, lines=False), Style(bold=True))]
    for start in range(0, max(1, len(rows)), per_block):
        block = range(start, min(len(rows), start + per_block))
        table = Table(box=None, pad_edge=False, padding=(0, 1), show_edge=False,
                      header_style=Style(bold=True), collapse_padding=True)
        table.add_column("context", width=side, no_wrap=True, overflow="ellipsis")
        for i in block:
            table.add_column(label(rows[i], 5), width=5, no_wrap=True, justify="right",
                             overflow="ellipsis")
        for j, c in enumerate(columns):
            cells: list[Any] = [label(c, side)]
            for i in block:
                if blank[i, j]:
                    cells.append("")
                    continue
                v = float(norm[i, j])
                style = painter.background(tuple(rgb[i][j])) if system and v != 0 and \
                    abs(v) >= faint else None
                cells.append(Text(f"{v:+.2f}", style or ""))
            table.add_row(*cells)
        if len(rows) > per_block:
            out.append(Text(f"generated tokens {block.start + 1}–{block.stop} of {len(rows)}",
                            Style(dim=True)))
        out.append(table)
    out.append(_scale_line(scale_of(m), m, painter, cmap, width))
    return _render(out, system, width)
