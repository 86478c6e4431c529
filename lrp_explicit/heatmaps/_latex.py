"""LaTeX: a cropped ``standalone`` document with coloured boxes, and its compilation to PDF."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import RenderError
from ..tokens import NEWLINE_MARK
from ._colours import colours, ink_on, normalise, ramp, scale_of
from ._text import check_lengths, chunks, groups, visible

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&",
                  "#": r"\#", "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%",
                  "~": r"\textasciitilde{}", NEWLINE_MARK: r"$\hookleftarrow$",
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
                  "\t": r"\ ", "\u00a0": "~"}

#: The widest a line of the document runs before it wraps.
TEXT_WIDTH = "16cm"


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``↵`` becomes an arrow)."""
    return "".join(_LATEX_ESCAPES.get(c, c) for c in text)


def latex(tokens: Sequence[str], relevance: Tensor, title: str, *,
          segments: Sequence[int] | None = None, cmap: Any = None,
          subtitle: str | None = None) -> str:
    """A LaTeX document with every token on a box of its colour.

    The document uses the ``standalone`` class with ``varwidth``: the page is cropped to its
    content (a small border), lines wrap between words at :data:`TEXT_WIDTH` at most, and a
    legend under the text shows the colour scale from ``−max |relevance|`` to
    ``+max |relevance|``. Tokens of zero relevance have no box. It compiles with ``pdflatex``
    or ``xelatex`` (:func:`pdf`); it needs the ``standalone``, ``varwidth`` and ``xcolor``
    packages (Debian: ``texlive-latex-extra``).

    Parameters
    ----------
    tokens : sequence of str
        Display pieces, each with its own leading whitespace; a ``"\\n"`` breaks the line after
        a ``↵``.
    relevance : Tensor
        One value per token.
    title : str
        The heading.
    segments : sequence of int, optional
        The text each token belongs to (one paragraph per text).
    cmap : str or matplotlib Colormap, optional
        The colour map (:func:`colour_map`).
    subtitle : str, optional
        A line under the heading.

    Returns
    -------
    str
        The document.

    Raises
    ------
    RenderError
        For an image explanation (no tokens).
    """
    if tokens is None:
        raise RenderError("LaTeX heatmaps are for text; save an image explanation as PNG or HTML")
    norm = normalise(relevance).reshape(-1)
    check_lengths(tokens, norm.numel())
    rgb = colours(norm, cmap).tolist()
    flat = norm.tolist()
    raw = relevance.detach().to("cpu", torch.float64).reshape(-1).tolist()
    body = []
    for group in groups(len(tokens), segments):
        boxes = []
        for i in group:
            r, g, b = rgb[i]
            fr, fg, fb = ink_on((r, g, b))
            for chunk in chunks(tokens[i]):
                if chunk.lead and boxes:
                    boxes.append(" ")
                text = latex_escape(chunk.body) if chunk.body.strip() else \
                    r"\ " * len(chunk.body)
                if chunk.body and flat[i] != 0:
                    boxes.append(f"\\colorbox[RGB]{{{r},{g},{b}}}{{\\textcolor[RGB]"
                                 f"{{{fr},{fg},{fb}}}{{\\strut {text}}}}}")
                elif chunk.body:
                    boxes.append(f"\\zerotok{{{text}}}")
                if chunk.body and not math.isfinite(raw[i]):  # never shown as zero
                    shown = "nan" if raw[i] != raw[i] else f"{raw[i]:+}"
                    boxes.append(f"\\textsuperscript{{\\textcolor{{red}}{{{shown}}}}}")
                if chunk.newline:
                    boxes.append("\\newline\n")
        body.append("".join(boxes) + "\\par\\medskip")
    scale = scale_of(relevance)
    legend = "".join(f"\\colorbox[RGB]{{{r},{g},{b}}}{{\\rule{{0pt}}{{1.8ex}}\\hspace{{0.7em}}}}"
                     for r, g, b in ramp(cmap, 15))
    head = [r"\documentclass[border=6pt,varwidth=" + TEXT_WIDTH + "]{standalone}",
            r"\usepackage{iftex}",
            r"\ifPDFTeX\usepackage[T1]{fontenc}\usepackage[utf8]{inputenc}"
            r"\IfFileExists{lmodern.sty}{\usepackage{lmodern}}{}\usepackage{textcomp}\fi",
            r"\usepackage{amssymb}",
            r"\usepackage{xcolor}",
            r"\setlength{\fboxsep}{1.5pt}",
            r"\setlength{\parindent}{0pt}",
            r"\newcommand{\zerotok}[1]{\hspace{\fboxsep}\strut #1\hspace{\fboxsep}}",
            r"\begin{document}",
            r"\raggedright",
            r"\textbf{" + latex_escape(visible(title, lines=False)) + r"}\par"]
    if subtitle:
        head.append(r"{\small\color{darkgray}" + latex_escape(visible(subtitle, lines=False))
                    + r"}\par")
    head.append(r"\medskip")
    return "\n".join([
        *head, *body,
        r"{\footnotesize\setlength{\fboxsep}{0pt}" + (f"{-scale:+.3g}" if scale else "0")
        + r"\," + legend + r"\," + (f"{scale:+.3g}" if scale else "0")
        + r"\quad relevance}\par",
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

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    RenderError
        If neither program is on ``PATH``, or compiling fails (with the first LaTeX error).
    """
    names = [backend] if backend else ["xelatex", "pdflatex"]
    program = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if program is None:
        raise RenderError(f"a PDF heatmap needs {' or '.join(names)} on PATH (e.g. Debian's "
                          "texlive-xetex or texlive-latex-extra); save as .tex or .html "
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
