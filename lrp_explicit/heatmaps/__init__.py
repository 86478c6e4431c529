"""Views of relevance: HTML fragments and pages, the terminal (rich), PNG (matplotlib) and
LaTeX/PDF, for token sequences, pixel maps and generation matrices.

Every renderer normalises the relevance it is given to [−1, 1] by the largest absolute value
(:func:`normalise`) and takes its colours from one matplotlib colour map (``cmap=``: any
matplotlib colour map name or object; the default is a diverging map with blue at −1, white at
0 and red at +1, :func:`colour_map`). Tokens of zero relevance are never painted. Text
renderers take *display pieces*: strings that carry their own leading whitespace
(``" Paris"``) and may hold ``"\\n"``, which breaks the line after a ``↵`` mark; the renderers
do not clean tokenizer markers (:func:`clean_tokens` does that, for callers holding raw
tokens). The functions here know nothing about models: the result objects of
:mod:`lrp_explicit.explain` call them.

========================  ====================================================================
text and pixels           :func:`html_fragment`, :func:`html_page`, :func:`terminal`,
                          :func:`png`, :func:`latex` (and :func:`pdf`)
generation matrix         :func:`matrix_html`, :func:`matrix_png`, :func:`matrix_terminal`
latent units              :func:`units_html`, :func:`units_terminal`
several views, one page   :func:`html_document`
========================  ====================================================================
"""
from __future__ import annotations

from ..errors import RenderError
from ..tokens import clean_tokens
from ._colours import NEGATIVE as NEGATIVE  # 0.1.0 module attributes, kept
from ._colours import POSITIVE as POSITIVE
from ._colours import WHITE as WHITE
from ._colours import colour, colour_map, colours, ink, normalise
from ._html import html_document, html_fragment, html_page, matrix_html
from ._image import figure as png_figure
from ._image import matrix_figure, matrix_png, png
from ._latex import latex, pdf
from ._terminal import COLOR_SYSTEMS, matrix_terminal, terminal
from ._units import units_html, units_terminal

__all__ = ["clean_tokens", "normalise", "colour", "colours", "colour_map", "ink",
           "html_fragment", "html_page", "html_document", "matrix_html", "terminal",
           "matrix_terminal", "png", "png_figure", "matrix_png", "matrix_figure", "latex", "pdf",
           "units_html", "units_terminal", "COLOR_SYSTEMS", "RenderError"]
