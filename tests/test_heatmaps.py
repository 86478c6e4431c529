"""The views of ``lrp_explicit.heatmaps`` without a browser or a terminal: HTML fragments (scoped
styles, unique ids, several on one page), the generation matrix as an HTML table, PNG and in
text, text PNGs with a colour bar and a caption, LaTeX ``standalone`` documents (compiled where
LaTeX is installed), colour maps from matplotlib."""
from __future__ import annotations

import html.parser
import io
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from lrp_explicit import heatmaps
from lrp_explicit.heatmaps import _latex

PIECES = ["The", " capital", " of", " France", " is", " Paris", ".", "\n", "Its", " river",
          " is", " the", " Se", "ine", "."]
RELEVANCE = torch.tensor([0.25, 2.0, -0.5, 4.0, 0.0, 1.0, -1.0, 0.5, 0.0, -2.0, 0.125, 0.0,
                          3.0, 1.5, -4.0])


def shows(png: bytes, rgb, tolerance: int = 3) -> bool:
    """Whether some pixel of the PNG has colour ``rgb`` (up to ``tolerance`` per channel, for
    the 8-bit rounding of the colour bar's segments)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return bool((np.abs(pixels - np.array(rgb)).max(-1) <= tolerance).any())


def hex_of(value: float, cmap=None) -> str:
    return "#{:02x}{:02x}{:02x}".format(*heatmaps.colour(value, cmap))


class Page(html.parser.HTMLParser):
    """Every element with its attributes, the fragment it lies in, and the texts of styles and
    tokens."""

    def __init__(self):
        super().__init__()
        self.elements, self.styles, self.tokens, self.stack = [], [], [], []
        self._style = self._token = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        root = attrs["id"] if "lrp-heatmap" in classes else \
            next((r for r in reversed(self.stack) if r), None)
        self.elements.append((tag, attrs, root))
        self.stack.append(root if "lrp-heatmap" in classes else None)
        if tag == "style":
            self._style = [root, ""]
            self.styles.append(self._style)
        if tag == "span" and "lrp-tok" in classes:
            self._token = [root, attrs, ""]
            self.tokens.append(self._token)

    def handle_endtag(self, tag):
        self.stack.pop()
        if tag == "style":
            self._style = None
        if tag == "span":
            self._token = None

    def handle_data(self, data):
        if self._style is not None:
            self._style[1] += data
        if self._token is not None:
            self._token[2] += data


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    return parser


def selectors(css: str) -> list[str]:
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    assert "@" not in css  # no at-rules: every rule is a plain selector list
    return [s.strip() for block in re.findall(r"([^{}]+)\{[^{}]*\}", css)
            for s in block.split(",")]


# ------------------------------------------------------------------------------ HTML fragments


def test_two_fragments_on_one_page_have_unique_ids_and_scoped_styles():
    a = heatmaps.html_fragment(PIECES, RELEVANCE, "next token ' Paris' · score 9.5",
                               subtitle="tiny-llama · attnlrp")
    b = heatmaps.html_fragment(["A", " cat", " sat", " on", " the", " mat"],
                               torch.tensor([0.0, 1.0, -0.5, 0.1, 0.0, 0.3]), "second",
                               cmap="PiYG")
    m = heatmaps.matrix_html([" Paris", "."], ["The", " capital", " Paris"],
                             torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]), "matrix")
    page = parse(heatmaps.html_document([a, b, m], "three views"))
    roots = [attrs["id"] for tag, attrs, _ in page.elements
             if "lrp-heatmap" in (attrs.get("class") or "")]
    assert len(roots) == 3 and len(set(roots)) == 3
    ids = [attrs["id"] for _, attrs, _ in page.elements if "id" in attrs]
    assert len(ids) == len(set(ids))
    for tag, attrs, root in page.elements:  # every id inside a fragment starts with its own
        if "id" in attrs and root is not None:
            assert attrs["id"] == root or attrs["id"].startswith(root + "-"), attrs
    styled = [(root, css) for root, css in page.styles if root is not None]
    assert sorted(root for root, _ in styled) == sorted(roots)  # one style per fragment, inside
    for root, css in styled:
        found = selectors(css)
        assert found and all(s == f"#{root}" or s.startswith(f"#{root} ") or
                             s.startswith(f"#{root}:") for s in found), found
    # the page's own style (outside the fragments) is the only one touching body
    page_styles = [css for root, css in page.styles if root is None]
    assert len(page_styles) == 1 and selectors(page_styles[0]) == ["body"]
    # the hover scripts look only into their own fragment
    scripts = re.findall(r"<script>(.*?)</script>", a + b + m, flags=re.S)
    assert len(scripts) == 3
    for root, script in zip(roots, scripts):
        assert f'document.getElementById("{root}")' in script
        assert "document.querySelector" not in script


def test_fragment_tokens_colours_values_and_pieces():
    page = parse(heatmaps.html_fragment(PIECES, RELEVANCE, "t"))
    texts = [text for _, _, text in page.tokens]
    # pieces as given: leading whitespace outside the painted span, a newline as ↵ then a break
    assert texts == ["The", "capital", "of", "France", "is", "Paris", ".", "↵", "Its", "river",
                     "is", "the", "Se", "ine", "."]
    frag = heatmaps.html_fragment(PIECES, RELEVANCE, "t")
    assert re.search(r">↵</span>\n<span[^>]*>Its<", frag)  # a real line break (pre-wrap)
    norm = (RELEVANCE / 4.0).tolist()
    for (_, attrs, _), value, v in zip(page.tokens, RELEVANCE.tolist(), norm):
        assert float(attrs["data-relevance"]) == value
        assert attrs["title"] == f"{value:+.4g} ({v:+.2f})"
        if v == 0:  # zero: no background, the text colour inherited (light and dark themes)
            assert "style" not in attrs
        else:
            background, ink = attrs["style"].split(";")
            assert background == f"background:{hex_of(v)}"
            assert ink in ("color:#000000", "color:#ffffff")
    # the default map: red +1, blue −1, a quarter of the way from white at +0.25
    assert hex_of(1.0) == "#b2182b" and hex_of(-1.0) == "#2166ac" and hex_of(0.25) == "#ecc5ca"
    # ink by contrast: white on the dark ends, black on the light middle
    styles = {text: attrs.get("style", "") for _, attrs, text in page.tokens}
    assert styles["France"].endswith("color:#ffffff") and styles["ine"].endswith("color:#000000")


def test_segments_image_and_errors():
    frag = heatmaps.html_fragment(["[CLS]", " a", " b", "[SEP]", " c"],
                                  torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), "pair",
                                  segments=[0, 0, 0, 1, 1], segment_names=["first", "second"])
    assert frag.count('class="lrp-text"') == 2
    assert re.findall(r'class="lrp-label">(\w+)<', frag) == ["first", "second"]
    pixels = heatmaps.html_fragment(None, torch.tensor([[1.0, -1.0], [0.0, 0.5]]), "image",
                                    image=torch.rand(2, 2, 3))
    page = parse(pixels)
    assert [a.get("alt") for t, a, _ in page.elements if t == "img"] == ["input", "relevance"]
    with pytest.raises(ValueError, match="3 tokens but 2 relevance values"):
        heatmaps.html_fragment(["a", "b", "c"], torch.ones(2), "t")
    with pytest.raises(ValueError, match="'RdBuu' is not a matplotlib colour map; did you mean"):
        heatmaps.html_fragment(["a"], torch.ones(1), "t", cmap="RdBuu")


def test_cmap_comes_from_matplotlib():
    viridis = matplotlib.colormaps["viridis"]
    for v in (-1.0, -0.3, 0.0, 0.6, 1.0):
        expected = tuple(round(c * 255) for c in viridis((v + 1) / 2)[:3])
        assert heatmaps.colour(v, "viridis") == expected
        assert heatmaps.colour(v, viridis) == expected
    page = parse(heatmaps.html_fragment(["a", " b"], torch.tensor([1.0, -1.0]), "t",
                                        cmap="viridis"))
    assert [a["style"].split(";")[0] for _, a, _ in page.tokens] == \
        [f"background:{hex_of(1.0, 'viridis')}", f"background:{hex_of(-1.0, 'viridis')}"]
    # the legend's gradient is the map too
    css = "".join(css for _, css in page.styles)
    assert hex_of(-1.0, "viridis") in css and hex_of(1.0, "viridis") in css
    with pytest.raises(TypeError, match="cmap must be a matplotlib colour map name"):
        heatmaps.colour(0.5, 3)


def test_html_page_is_one_fragment_in_a_document():
    page = heatmaps.html_page(PIECES, RELEVANCE, "title <b>", subtitle="sub")
    assert page.startswith("<!DOCTYPE html>") and "<title>title &lt;b&gt;</title>" in page
    assert page.count('class="lrp-heatmap') == 1 and "sub" in page


# ------------------------------------------------------------------------------ matrix

ROWS = [" Paris", ".", " It"]
COLUMNS = ["The", " capital", " of", " France", " is", " Paris", "."]
MATRIX = torch.tensor([[0.5, 2.0, -0.25, 4.0, 0.0, 0.0, 0.0],
                       [0.25, 1.0, 0.0, 2.0, -1.0, 0.5, 0.0],
                       [0.0, -0.5, 0.0, 1.0, 0.25, -2.0, 1.0]])
#: own position and later: exact zeros at the end of each row
BLANK = [[False] * 4 + [True] * 3, [False] * 6 + [True], [False] * 7]


def test_matrix_html_cells_blanks_and_scope():
    frag = heatmaps.matrix_html(ROWS, COLUMNS, MATRIX, "generation", subtitle="3 tokens")
    page = parse(frag)
    cells = [(a, r) for t, a, r in page.elements if t == "td"]
    assert len(cells) == 21
    heads = re.findall(r'<th class="lrp-col"[^>]*><span>([^<]*)</span>', frag)
    assert heads == ["The", "capital", "of", "France", "is", "Paris", "."]
    rows = re.findall(r'<th class="lrp-row" scope="row">([^<]*)</th>', frag)
    assert rows == ["Paris", ".", "It"]
    for k, (attrs, _) in enumerate(cells):
        i, j = divmod(k, 7)
        value = float(MATRIX[i, j])
        if BLANK[i][j]:
            assert attrs["class"] == "lrp-cell lrp-blank" and "data-relevance" not in attrs
            continue
        assert float(attrs["data-relevance"]) == value
        if value == 0:  # a real zero (before the row's position): shown, unpainted
            assert "style" not in attrs
        else:
            assert attrs["style"] == f"background:{hex_of(value / 4.0)}"
    root = next(a["id"] for t, a, _ in page.elements if "lrp-matrix" in (a.get("class") or ""))
    assert all(s.startswith(f"#{root}") for _, css in page.styles for s in selectors(css))
    with pytest.raises(ValueError, match=r"matrix of shape \(3, 7\) for 2 rows and 7 columns"):
        heatmaps.matrix_html(ROWS[:2], COLUMNS, MATRIX, "t")


def test_matrix_png_has_a_colour_bar_and_blank_cells():
    fig = heatmaps.matrix_figure(ROWS, COLUMNS, MATRIX, "generation", subtitle="sub")
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    heat, bar = fig.axes
    data = heat.images[0].get_array()
    assert data.mask.tolist() == BLANK
    assert data.data.tolist() == MATRIX.tolist()
    assert heat.images[0].get_clim() == (-4.0, 4.0)
    assert [t.get_text() for t in heat.get_xticklabels()] == \
        ["The", "capital", "of", "France", "is", "Paris", "."]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["Paris", ".", "It"]
    assert heat.get_title(loc="left") == "generation\nsub"
    assert bar.get_ylabel() == "relevance"
    png = heatmaps.matrix_png(ROWS, COLUMNS, MATRIX, "generation", dpi=60)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert shows(png, heatmaps.colour(1.0)) and shows(png, heatmaps.colour(-1.0))  # cell, bar


def test_matrix_terminal_plain_blocks_and_width():
    text = heatmaps.matrix_terminal(ROWS, COLUMNS, MATRIX, "generation", color=False, width=80)
    lines = text.splitlines()
    assert lines[0] == "generation"
    assert lines[1].split() == ["context", "Paris", ".", "It"]
    # transposed: one line per context token, one column per generated token; blanks empty
    assert lines[2].split() == ["The", "+0.12", "+0.06", "+0.00"]
    assert lines[5].split() == ["France", "+1.00", "+0.50", "+0.25"]
    assert lines[6].split() == ["is", "-0.25", "+0.06"]  # row 0 is blank from "is" on
    assert lines[8].split() == ["."] + ["+0.25"]
    assert lines[-1].startswith("(values: relevance / 4, the largest |relevance|")
    many = [f" w{i}" for i in range(20)]
    wide = heatmaps.matrix_terminal(many, COLUMNS, torch.ones(20, 7), "t", color=False, width=60)
    assert max(len(line) for line in wide.splitlines()) <= 60
    # 7 columns of 7 cells beside the 7-cell labels fit 60 columns: blocks of 7, 7 and 6
    assert [line for line in wide.splitlines() if line.startswith("generated")] == \
        ["generated tokens 1–7 of 20", "generated tokens 8–14 of 20",
         "generated tokens 15–20 of 20"]


# ------------------------------------------------------------------------------ PNG


def test_text_png_caption_colour_bar_and_wrapping():
    long = PIECES * 6
    rel = RELEVANCE.repeat(6)
    fig = heatmaps.png_figure(long, rel, "next token ' Paris' · score 9.5 $x$",
                              subtitle="tiny-llama · attnlrp", dpi=72, width=4.0)
    assert len(fig.axes) == 1  # the colour bar (the text is drawn on the figure)
    bar = fig.axes[0]
    assert bar.get_xlabel() == "relevance"
    assert [t.get_text() for t in bar.get_xticklabels()] == ["-4", "0", "+4"]
    texts = [t for t in fig.texts]
    assert texts[0].get_text() == "next token ' Paris' · score 9.5 $x$"  # no mathtext
    assert texts[1].get_text() == "tiny-llama · attnlrp"
    bodies = [t.get_text() for t in texts[2:]]
    assert bodies == [p.strip() or "↵" for p in long]
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    lines = set()
    for t in texts[2:]:
        box = t.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1  # wrapped within the figure
        lines.add(t.get_position()[1])
    assert len(lines) > 7  # 6 newlines make 7 lines; more: long lines wrapped
    # no word is split over two lines: "Se" + "ine" stay on one line
    for k in range(2, len(texts) - 1):
        if texts[k].get_text() == "Se":
            assert texts[k].get_position()[1] == texts[k + 1].get_position()[1]
    # boxes: painted for non-zero relevance only
    for t, v in zip(texts[2:], (rel / 4).tolist()):
        patch = t.get_bbox_patch()
        assert (patch is None) == (v == 0)
    # a one-signed heatmap still shows both ends of the scale, in the colour bar
    png = heatmaps.png(["a", " b"], torch.tensor([1.0, 0.5]), "positive only", dpi=80)
    assert shows(png, heatmaps.colour(-1.0)) and shows(png, heatmaps.colour(1.0))
    assert not shows(heatmaps.png(["a", " b"], torch.tensor([1.0, 0.5]), "t", dpi=80,
                                  cmap="viridis"), heatmaps.colour(-1.0))


def test_pixel_png_has_a_colour_bar():
    fig = heatmaps.png_figure(None, torch.tensor([[1.0, -1.0], [0.0, 0.5]]), "image",
                              image=torch.rand(2, 2, 3), dpi=50)
    assert len(fig.axes) == 3  # input, relevance, colour bar
    assert fig.axes[1].images[0].get_clim() == (-1.0, 1.0)


# ------------------------------------------------------------------------------ LaTeX

LATEX = shutil.which("pdflatex") or shutil.which("xelatex")


def test_latex_is_a_cropped_standalone_document_with_a_legend(tmp_path):
    tokens = ["100%", " &", " <x_1>", " #~^", " zero", "\n", "next", " line"] * 8
    rel = torch.tensor([1.0, -0.5, 0.25, 0.0, 0.0, 0.5, -1.0, 0.75] * 8)
    tex = heatmaps.latex(tokens, rel, "t_1 & 50%", subtitle="model · attnlrp")
    assert tex.startswith(r"\documentclass[border=6pt,varwidth=16cm]{standalone}")
    assert r"\colorbox[RGB]{178,24,43}" in tex and r"\textless{}x\_1\textgreater{}" in tex
    assert r"t\_1 \& 50\%" in tex and r"\zerotok{zero}" in tex
    assert tex.count(r"$\hookleftarrow$}}\newline") == 8  # the newline token, then a break
    legend = tex.splitlines()[-2]
    assert legend.startswith(r"{\footnotesize") and legend.count(r"\colorbox") == 15
    assert "-1" in legend and "+1" in legend and "relevance" in legend
    with pytest.raises(heatmaps.RenderError, match="LaTeX heatmaps are for text"):
        heatmaps.latex(None, torch.ones(2, 2), "image")
    if not LATEX:
        pytest.skip("no pdflatex or xelatex on PATH: the source was checked, not compiled")
    short = heatmaps.pdf(heatmaps.latex(["a", " b"], torch.tensor([1.0, -1.0]), "t"),
                         tmp_path / "s.pdf")
    # a long paragraph; the special characters and newlines above compile
    words = [f" word{i}" for i in range(150)] + tokens
    long = heatmaps.pdf(heatmaps.latex(words, torch.cat([torch.linspace(-1, 1, 150), rel]),
                                       "t_1 & 50%", subtitle="model · attnlrp"),
                        tmp_path / "l.pdf")
    assert short.read_bytes()[:5] == b"%PDF-" and long.read_bytes()[:5] == b"%PDF-"
    if not shutil.which("pdfinfo"):
        pytest.skip("compiled; no pdfinfo (poppler-utils) on PATH to read the page size")
    # cropped to the content: a short text gives a small page, not a letter or A4 page
    w_short, h_short = _page_size(short)
    assert w_short < 200 and h_short < 100
    # the long paragraph wraps at 16 cm (453.5 pt) plus the 6 pt border on each side
    w_long, h_long = _page_size(long)
    assert 420 < w_long <= 453.6 + 12 + 0.5 and h_long > 4 * h_short


def _page_size(pdf) -> tuple[float, float]:
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True)
    size = re.search(r"Page size:\s+([\d.]+) x ([\d.]+) pts", info.stdout)
    return float(size.group(1)), float(size.group(2))


def test_latex_escapes():
    assert _latex.latex_escape("a_b & {c} ~ ^ \\ $ # % < > |") == (
        r"a\_b \& \{c\} \textasciitilde{} \textasciicircum{} \textbackslash{} \$ \# \% "
        r"\textless{} \textgreater{} \textbar{}")


# ------------------------------------------------------------------------------ the docs page


def test_views_page_runs_as_shown(tmp_path, monkeypatch, capsys):
    """docs/views.md: its Python block runs and prints the text block under it."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "views.md").read_text("utf-8")
    code = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    shown = re.findall(r"```text\n(.*?)```", page, flags=re.S)
    assert len(code) == 1 and len(shown) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code[0], "docs/views.md", "exec"), namespace)
    assert capsys.readouterr().out == shown[0]
    assert namespace["png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert namespace["page"].count('class="lrp-heatmap') == 2
    assert namespace["tex"].startswith(r"\documentclass")
    for figure in ("two_heatmaps.png", "terminal_heatmap.svg"):
        assert f"]({figure})" in page
        assert (Path(__file__).resolve().parents[1] / "docs" / figure).is_file()
