"""Heatmaps of relevance: HTML, PNG, terminal and LaTeX/PDF renderings.

Every renderer takes the relevance as it is and normalises it to [−1, 1] by the largest absolute
value (:func:`normalise`); positive relevance is red, negative blue, zero white
(:func:`colour`). Text renderers take the tokens as the tokenizer spells them and clean them for
display (:func:`clean_tokens`: ``Ġ``, ``▁`` and ``##`` become spaces or word joins). The
functions here know nothing about models: :class:`lrp_explicit.Explanation` calls them.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .errors import RenderError
from .tokens import NEWLINE_MARK as _NEWLINE_MARK, clean_tokens

__all__ = ["clean_tokens", "normalise", "colour", "colours", "colour_map", "ink", "html_page", "terminal", "png", "latex", "pdf",
           "RenderError"]

RGB = tuple[int, int, int]

#: Ends of the diverging scale (ColorBrewer RdBu): +1 and −1; 0 is white.
POSITIVE: RGB = (178, 24, 43)
NEGATIVE: RGB = (33, 102, 172)
WHITE: RGB = (255, 255, 255)


# ============================================================================ tokens and colours


def normalise(relevance: Tensor) -> Tensor:
    """``relevance / max |relevance|`` in float64 (all zeros stay zeros)."""
    r = relevance.detach().to("cpu", torch.float64)
    r = torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0)
    scale = r.abs().max() if r.numel() else torch.tensor(0.0)
    return r / scale if scale > 0 else torch.zeros_like(r)


@functools.lru_cache(maxsize=1)
def colour_map() -> Any:
    """The diverging colour map of relevance (a matplotlib ``LinearSegmentedColormap``):
    :data:`NEGATIVE` at −1, white at 0, :data:`POSITIVE` at +1; call it on ``(v + 1) / 2``."""
    from matplotlib.colors import LinearSegmentedColormap

    stops = [tuple(c / 255 for c in rgb) for rgb in (NEGATIVE, WHITE, POSITIVE)]
    # 2¹⁶ + 1 entries: dyadic values (0, ±1/2, ±1/4 …) fall exactly on an entry
    return LinearSegmentedColormap.from_list("lrp_relevance", stops, N=(1 << 16) + 1)


def colours(values: Tensor) -> Tensor:
    """:func:`colour` of every normalised value, as a ``uint8`` tensor of shape
    ``values.shape + (3,)`` (one vectorised look-up in the colour map)."""
    v = values.detach().to("cpu", torch.float64).clamp(-1.0, 1.0)
    rgba = colour_map()(((v.reshape(-1) + 1.0) / 2.0).numpy())
    rgb = (torch.from_numpy(rgba[:, :3]) * 255.0).round().to(torch.uint8)
    return rgb.reshape(*v.shape, 3)


def colour(value: float) -> RGB:
    """The colour of a normalised value in [−1, 1]: white at 0, red above, blue below."""
    return tuple(int(c) for c in colours(torch.tensor(float(value))))  # type: ignore[return-value]


def ink(value: float) -> RGB:
    """Text colour readable on :func:`colour` of ``value``."""
    return (255, 255, 255) if abs(value) > 0.6 else (0, 0, 0)


def _hex(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _split_space(text: str) -> tuple[str, str]:
    body = text.lstrip(" ")
    return text[:len(text) - len(body)], body or text


def _lines(tokens: Sequence[str], segments: Sequence[int] | None) -> list[list[int]]:
    """Token indices grouped by segment (one text per group)."""
    if not segments:
        return [list(range(len(tokens)))]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(segments):
        groups.setdefault(int(s), []).append(i)
    return [groups[k] for k in sorted(groups)]


# ============================================================================ HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em;
       color: #222; background: #fff; max-width: 56em; }
h1 { font-size: 1.15em; margin: 0 0 .3em 0; }
p.meta { color: #555; margin: 0 0 1em 0; font-size: .9em; }
div.text { font-size: 1.25em; line-height: 2.1; margin: .2em 0 .8em 0; }
div.label { color: #777; font-size: .8em; margin-top: .6em; }
span.tok { padding: .12em .08em; border-radius: .2em; white-space: pre-wrap; cursor: default; }
span.tok:hover { outline: 2px solid #222; }
div.legend { display: flex; align-items: center; gap: .5em; font-size: .85em; color: #555;
             margin-top: 1.2em; }
div.bar { width: 12em; height: .9em; border: 1px solid #ccc;
          background: linear-gradient(to right, NEG, #ffffff, POS); }
div.images { display: flex; gap: 1.5em; align-items: flex-start; }
div.images img { width: 18em; image-rendering: pixelated; border: 1px solid #ccc; }
#value { font-family: ui-monospace, monospace; font-size: .85em; color: #444;
         min-height: 1.4em; margin-top: .4em; }
""".replace("NEG", _hex(NEGATIVE)).replace("POS", _hex(POSITIVE))


def html_page(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
              subtitle: str = "", segments: Sequence[int] | None = None,
              segment_names: Sequence[str] | None = None, image: Tensor | None = None) -> str:
    """A self-contained HTML page (no external resources) showing the heatmap.

    Parameters
    ----------
    tokens : sequence of str or None
        Tokens as the tokenizer spells them (cleaned here); ``None`` for an image.
    relevance : Tensor
        One value per token, or ``(H, W)`` per pixel.
    title : str
        Page title and heading (the target and the score).
    subtitle : str
        A line under the heading (model, composite, totals).
    segments : sequence of int, optional
        The text each token belongs to; each text is shown as its own paragraph.
    segment_names : sequence of str, optional
        A caption per text.
    image : Tensor, optional
        ``(H, W, 3)`` values in [0, 1], shown next to a pixel heatmap.

    Returns
    -------
    str
        The page. Each token is a ``<span class="tok">`` whose background is its colour and whose
        ``title`` and ``data-relevance`` hold its value; hovering a token also shows its value
        in a line under the text.
    """
    norm = normalise(relevance)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="meta">{html.escape(subtitle)}</p>')
    if tokens is None:
        parts.append(_html_image(relevance, norm, image))
    else:
        words = clean_tokens(tokens)
        for n, group in enumerate(_lines(words, segments)):
            if segment_names and n < len(segment_names):
                parts.append(f'<div class="label">{html.escape(segment_names[n])}</div>')
            spans = []
            for i in group:
                value, v = float(relevance.reshape(-1)[i]), float(norm.reshape(-1)[i])
                space, body = _split_space(words[i])
                style = f"background:{_hex(colour(v))};color:{_hex(ink(v))}"
                spans.append(
                    f'{space}<span class="tok" style="{style}" title="{value:+.4g} ({v:+.2f})" '
                    f'data-relevance="{value!r}" data-normalised="{v:.6f}">'
                    f"{html.escape(body)}</span>")
            parts.append(f'<div class="text">{"".join(spans)}</div>')
        parts.append(f'<div id="value">{_HOVER}</div><script>{_TOKEN_SCRIPT}</script>')
    parts.append('<div class="legend"><span>−1</span><div class="bar"></div><span>+1</span>'
                 "<span>relevance / max |relevance|: red raises the score, blue lowers it"
                 "</span></div></body></html>")
    return "\n".join(parts)


_HOVER = "hover over a token for its relevance"
_TOKEN_SCRIPT = ("const out = document.getElementById('value');\n"
                 "document.querySelectorAll('span.tok').forEach(s => {\n"
                 "  s.addEventListener('mouseenter', () => { out.textContent = "
                 "`${s.textContent.trim()}: ${s.title}`; });\n"
                 "  s.addEventListener('mouseleave', () => { out.textContent = "
                 f"'{_HOVER}'; }});\n}});")


def _html_image(relevance: Tensor, norm: Tensor, image: Tensor | None) -> str:
    heat = _data_uri(_heat_pixels(norm))
    values = json.dumps([[float(f"{x:.4g}") for x in row] for row in relevance.tolist()])
    shown = f'<img src="{_data_uri(_image_pixels(image))}" alt="input">' if image is not None \
        else ""
    return (f'<div class="images">{shown}<img id="heat" src="{heat}" alt="relevance" '
            f'title="hover for the relevance of a pixel"></div><div id="value"></div>'
            f"<script>const R = {values};\n"
            "const img = document.getElementById('heat');\n"
            "img.addEventListener('mousemove', e => { const b = img.getBoundingClientRect();\n"
            "  const y = Math.floor((e.clientY - b.top) / b.height * R.length);\n"
            "  const x = Math.floor((e.clientX - b.left) / b.width * R[0].length);\n"
            "  if (R[y] !== undefined && R[y][x] !== undefined) document.getElementById('value')"
            ".textContent = `pixel (${y}, ${x}): ${R[y][x]}`; });</script>")


def _heat_pixels(norm: Tensor) -> "object":
    from PIL import Image

    return Image.fromarray(colours(norm).numpy(), "RGB")


def _image_pixels(image: Tensor) -> "object":
    from PIL import Image

    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def _data_uri(img: "object") -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ============================================================================ terminal


def terminal(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
             color: bool = True, segments: Sequence[int] | None = None,
             width: int = 64) -> str:
    """The heatmap as text for a terminal.

    Parameters
    ----------
    tokens : sequence of str or None
        Tokens (cleaned here), or ``None`` for a pixel heatmap.
    relevance : Tensor
        One value per token, or ``(H, W)``.
    title : str
        First line.
    color : bool
        24-bit ANSI background colours; without colour every token is followed by its
        normalised value, e.g. ``cat(+0.82)``, and a pixel heatmap by signs and shades.
    segments : sequence of int, optional
        The text each token belongs to (one line per text).
    width : int
        Columns of a pixel heatmap.
    """
    norm = normalise(relevance)
    lines = [title]
    if tokens is None:
        lines += _terminal_image(norm, color, width)
        return "\n".join(lines)
    words = clean_tokens(tokens)
    flat = norm.reshape(-1).tolist()
    for group in _lines(words, segments):
        line = []
        for i in group:
            space, body = _split_space(words[i])
            v = flat[i]
            if color:
                (r, g, b), (fr, fg, fb) = colour(v), ink(v)
                line.append(f"{space}\x1b[48;2;{r};{g};{b}m\x1b[38;2;{fr};{fg};{fb}m{body}\x1b[0m")
            else:
                line.append(f"{space}{body}({v:+.2f})")
        lines.append("".join(line).strip())
    return "\n".join(lines)


def _terminal_image(norm: Tensor, color: bool, width: int) -> list[str]:
    h, w = norm.shape
    cols = max(1, min(width, w))
    rows = max(2, round(h * cols / w / (1 if color else 2)))
    small = torch.nn.functional.adaptive_avg_pool2d(norm[None, None], (rows, cols))[0, 0]
    small = small / small.abs().max() if small.abs().max() > 0 else small
    out = []
    if color:  # two pixel rows per line: upper half block, foreground above, background below
        rgb = colours(small).tolist()
        for y in range(0, rows - 1, 2):
            cells = []
            for x in range(cols):
                (r1, g1, b1), (r2, g2, b2) = rgb[y][x], rgb[y + 1][x]
                cells.append(f"\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m▀")
            out.append("".join(cells) + "\x1b[0m")
        return out
    shades = " .:+#"
    for y in range(rows):
        out.append("".join(
            (shades[min(4, int(abs(v) * 5))] if v >= 0 else "-~=%@"[min(4, int(abs(v) * 5))])
            for v in small[y].tolist()))
    return out


# ============================================================================ PNG (matplotlib)


def png(tokens: Sequence[str] | None, relevance: Tensor, title: str, *,
        segments: Sequence[int] | None = None, image: Tensor | None = None,
        dpi: int = 150, width: float = 9.0) -> bytes:
    """The heatmap as PNG bytes, drawn with matplotlib (without touching pyplot's state).

    Parameters
    ----------
    tokens, relevance, title, segments, image
        As for :func:`html_page`.
    dpi : int
        Resolution.
    width : float
        Figure width in inches; text wraps to it.

    Raises
    ------
    RenderError
        If matplotlib is not installed (``pip install "lrp-explicit[viz]"``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise RenderError("PNG heatmaps need matplotlib: pip install matplotlib "
                          "(or the package's [viz] extra)") from err
    norm = normalise(relevance)
    if tokens is None:
        cmap = LinearSegmentedColormap.from_list(
            "lrp", [tuple(c / 255 for c in x) for x in (NEGATIVE, WHITE, POSITIVE)])
        panels = 2 if image is not None else 1
        fig = Figure(figsize=(3.2 * panels + 0.8, 3.6), dpi=dpi)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, panels, squeeze=False)[0]
        if image is not None:
            axes[0].imshow(image.detach().cpu().clamp(0, 1).numpy())
            axes[0].set_title("input", fontsize=9)
        shown = axes[-1].imshow(norm.numpy(), cmap=cmap, vmin=-1, vmax=1)
        axes[-1].set_title("relevance", fontsize=9)
        for ax in axes:
            ax.set_axis_off()
        fig.colorbar(shown, ax=list(axes), fraction=0.04, pad=0.03)
        fig.suptitle(title, fontsize=10)
    else:
        fig = _text_figure(Figure, FigureCanvasAgg, clean_tokens(tokens), norm.reshape(-1),
                           title, segments, dpi, width)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _text_figure(Figure, Canvas, words, norm, title, segments, dpi, width):  # noqa: N803
    """Lay the tokens out like text, each on a box of its colour."""
    size, pad, line_h, margin = 12, 2.0, 26.0, 14.0  # points / pixels at 72 dpi units
    scale = dpi / 72.0
    probe = Figure(dpi=dpi)
    renderer = Canvas(probe).get_renderer()
    text = probe.text(0, 0, "x", fontsize=size)

    def measure(s: str) -> float:
        text.set_text(s)
        return text.get_window_extent(renderer).width / scale

    space_w = measure("a a") - measure("aa")
    max_w = width * 72.0 - 2 * margin
    placed, y = [], line_h * 1.6  # (x, y, text, value) in points from the top left
    for group in _lines(words, segments):
        x = 0.0
        for i in group:
            lead, body = _split_space(words[i])
            w = measure(body) + 2 * pad
            gap = space_w if lead and x > 0 else 0.0
            if x > 0 and x + gap + w > max_w:
                x, y, gap = 0.0, y + line_h, 0.0
            placed.append((x + gap, y, body, float(norm[i])))
            x += gap + w + 0.6
        y += line_h * 1.25
    height = y + margin
    fig = Figure(figsize=(width, height / 72.0), dpi=dpi)
    Canvas(fig)
    fig.text(margin / (width * 72), 1 - (margin + 4) / height, title, fontsize=size - 1,
             weight="bold", va="top")
    for x, y, body, v in placed:
        fig.text((margin + x + pad) / (width * 72), 1 - y / height, body, fontsize=size,
                 va="center", color=tuple(c / 255 for c in ink(v)),
                 bbox=dict(boxstyle="square,pad=0.15", linewidth=0,
                           facecolor=tuple(c / 255 for c in colour(v))))
    return fig


# ============================================================================ LaTeX / PDF

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&",
                  "#": r"\#", "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%",
                  "~": r"\textasciitilde{}", _NEWLINE_MARK: r"$\hookleftarrow$",
                  "<": r"\textless{}", ">": r"\textgreater{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in text)


def latex(tokens: Sequence[str], relevance: Tensor, title: str, *,
          segments: Sequence[int] | None = None) -> str:
    """A LaTeX document (``xelatex`` or ``pdflatex``) with every token on a coloured box.

    Parameters
    ----------
    tokens, relevance, title, segments
        As for :func:`html_page`; text only.
    """
    if tokens is None:
        raise RenderError("LaTeX heatmaps are for text; save an image explanation as PNG or HTML")
    norm = normalise(relevance).reshape(-1)
    words = clean_tokens(tokens)
    body = []
    for group in _lines(words, segments):
        boxes = []
        for i in group:
            lead, text = _split_space(words[i])
            r, g, b = colour(norm[i])
            fr, fg, fb = ink(norm[i])
            boxes.append(("\\hspace{0.25em}" if lead and boxes else "")
                         + f"\\colorbox[RGB]{{{r},{g},{b}}}{{\\textcolor[RGB]{{{fr},{fg},{fb}}}"
                         f"{{\\strut {_latex_escape(text)}}}}}\\allowbreak{{}}")
        body.append("\\noindent " + "".join(boxes) + "\\par\\medskip")
    return "\n".join([
        r"\documentclass[11pt]{article}",
        r"\usepackage{iftex}",
        r"\ifPDFTeX\usepackage[T1]{fontenc}\usepackage[utf8]{inputenc}\usepackage{lmodern}\fi",
        r"\usepackage[margin=2cm]{geometry}",
        r"\usepackage{xcolor}",
        r"\setlength{\fboxsep}{1.5pt}",
        r"\pagestyle{empty}",
        r"\begin{document}",
        r"\noindent\textbf{" + _latex_escape(title) + r"}\par\bigskip",
        *body,
        r"\end{document}", ""])


def pdf(source: str, path: str | os.PathLike, backend: str | None = None) -> Path:
    """Compile LaTeX ``source`` into the PDF ``path`` with ``xelatex`` or ``pdflatex``.

    Parameters
    ----------
    source : str
        A document, e.g. from :func:`latex`.
    path : path-like
        Where the PDF goes.
    backend : {"xelatex", "pdflatex"}, optional
        The program; by default the first of the two found on ``PATH``.

    Raises
    ------
    RenderError
        If neither program is on ``PATH``, or compiling fails (with the first LaTeX error).
    """
    names = [backend] if backend else ["xelatex", "pdflatex"]
    program = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if program is None:
        raise RenderError(f"a PDF heatmap needs {' or '.join(names)} on PATH (e.g. Debian's "
                          "texlive-xetex or texlive-latex-recommended); save as .tex or .html "
                          "instead")
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "heatmap.tex").write_text(source, encoding="utf-8")
        done = subprocess.run([program, "-interaction=nonstopmode", "-halt-on-error",
                               "heatmap.tex"], cwd=tmp, capture_output=True, text=True,
                              errors="replace", timeout=120)
        made = Path(tmp) / "heatmap.pdf"
        if done.returncode != 0 or not made.is_file():
            error = next((line for line in done.stdout.splitlines() if line.startswith("!")),
                         f"exit code {done.returncode}")
            raise RenderError(f"{Path(program).name} failed: {error}")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, path)
    return path
