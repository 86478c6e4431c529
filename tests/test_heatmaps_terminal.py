"""The terminal views drawn with rich: snapshots at 80 columns (24-bit, 256 and 16 colours, plain
text), lines never wider than the width, words never broken, zero relevance unpainted, the
scale line, and the colour decision from the environment (NO_COLOR, FORCE_COLOR, a terminal
or not, COLORTERM / TERM, COLUMNS).

The snapshots in ``tests/snapshots/`` are compared exactly; ``LRP_UPDATE_SNAPSHOTS=1`` rewrites
them (and nothing else does)."""
from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len
from rich.text import Text

from lrp_explicit import heatmaps

SNAPSHOTS = Path(__file__).parent / "snapshots"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: A text of display pieces: words split into pieces ("unbe" "liev" "ably"), zero relevance,
#: both signs, a newline piece and a long line that must wrap at 80 columns.
PIECES = ["The", " capital", " of", " France", " is", " Paris", ",", " an", " unbe", "liev",
          "ably", " beautiful", " city", " on", " the", " river", " Se", "ine", ".", "\n",
          "Its", " museums", " attract", " millions", " of", " visitors", " every", " year",
          ",", " and", " its", " cafés", " are", " famous", " all", " over", " the", " world",
          " for", " their", " atmosphere", "."]
RELEVANCE = torch.tensor([0.1, 1.6, -0.2, 3.2, 0.0, 0.8, 0.0, 0.05, -0.4, -0.8, -1.2, 0.6,
                          0.3, 0.0, 0.0, 0.9, 2.4, 1.2, -0.1, 0.2, 0.0, -1.6, 0.4, 0.2, 0.0,
                          -3.2, 0.1, -0.05, 0.0, 0.0, 0.2, 1.0, 0.0, 0.7, -0.3, 0.0, 0.0, 0.5,
                          0.0, -0.6, 2.0, 0.1])
TITLE = "next token ' Paris' (id 6342) · score 17.25"
ROWS = [" Paris", ",", " an"]
COLUMNS = ["The", " capital", " of", " France", " is", " Paris", ","]
MATRIX = torch.tensor([[0.5, 2.0, -0.25, 4.0, 0.0, 0.0, 0.0],
                       [0.25, 1.0, 0.0, 2.0, -1.0, 0.5, 0.0],
                       [0.0, -0.5, 0.0, 1.0, 0.25, -2.0, 1.0]])

RENDERINGS = {
    "terminal_truecolor.txt": lambda: heatmaps.terminal(PIECES, RELEVANCE, TITLE,
                                                        color="truecolor", width=80),
    "terminal_256.txt": lambda: heatmaps.terminal(PIECES, RELEVANCE, TITLE, color="256",
                                                  width=80),
    "terminal_standard.txt": lambda: heatmaps.terminal(PIECES, RELEVANCE, TITLE,
                                                       color="standard", width=80),
    "terminal_plain.txt": lambda: heatmaps.terminal(PIECES, RELEVANCE, TITLE, color=False,
                                                    width=80),
    "matrix_truecolor.txt": lambda: heatmaps.matrix_terminal(ROWS, COLUMNS, MATRIX, "generation",
                                                             color="truecolor", width=80),
    "matrix_plain.txt": lambda: heatmaps.matrix_terminal(ROWS, COLUMNS, MATRIX, "generation",
                                                         color=False, width=80),
}


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_snapshot(name):
    got = RENDERINGS[name]()
    path = SNAPSHOTS / name
    if os.environ.get("LRP_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(got + "\n", encoding="utf-8")
        pytest.skip(f"rewrote {path.name}")
    assert got + "\n" == path.read_text(encoding="utf-8")


def test_docs_figure_is_the_snapshot():
    """docs/terminal_heatmap.svg is the 24-bit snapshot as rich exports it (a dark terminal)."""
    from rich.console import Console
    from rich.terminal_theme import MONOKAI

    console = Console(record=True, file=io.StringIO(), width=80, force_terminal=True,
                      color_system="truecolor", _environ={})
    console.print(Text.from_ansi((SNAPSHOTS / "terminal_truecolor.txt").read_text("utf-8")))
    svg = console.export_svg(title="lrp_explicit.heatmaps.terminal", theme=MONOKAI)
    path = SNAPSHOTS.parents[1] / "docs" / "terminal_heatmap.svg"
    if os.environ.get("LRP_UPDATE_SNAPSHOTS") == "1":
        path.write_text(svg, encoding="utf-8")
        pytest.skip(f"rewrote {path.name}")
    assert path.read_text(encoding="utf-8") == svg


@pytest.mark.parametrize("color", ["truecolor", "256", "standard", False])
def test_width_words_and_zero(color):
    out = heatmaps.terminal(PIECES, RELEVANCE, TITLE, color=color, width=80)
    lines = out.splitlines()
    assert all(cell_len(ANSI.sub("", line)) <= 80 for line in lines)
    body = [ANSI.sub("", line) for line in lines[1:-1]]
    assert len(body) >= 3  # the newline piece breaks, and the long line wraps
    text = "".join(PIECES).replace("\n", "↵\n")
    if color is False:  # plain: every token with its normalised value
        norm = (RELEVANCE / 3.2).tolist()
        text = "".join(f"{p.replace(chr(10), '↵')}({v:+.2f})" + ("\n" if p == "\n" else "")
                       for p, v in zip(PIECES, norm))
    words = set(text.split())
    for line in body:  # no word is broken: every word of a line is a whole word of the text
        assert set(line.split()) <= words, line
    assert " ".join(" ".join(body).split()) == " ".join(text.split())  # and nothing is lost
    if color is False:
        assert "\x1b" not in out
        return
    # zero relevance, and relevance below 5 % of the largest, is not painted (the terminal's
    # own background); every other token has a background
    assert painted_tokens(out) == [abs(v) >= 0.05 for v in (RELEVANCE / 3.2).tolist()]
    everything = heatmaps.terminal(PIECES, RELEVANCE, TITLE, color=color, width=80, faint=0)
    assert painted_tokens(everything) == [v != 0 for v in RELEVANCE.tolist()]


def painted_tokens(out: str) -> list[bool]:
    """For each piece of PIECES, whether the rendering paints a background behind it."""
    spans = Text.from_ansi("\n".join(out.splitlines()[1:-1]))
    plain, start, painted = spans.plain, 0, []
    for piece in PIECES:
        word = piece.strip() or "↵"
        at = plain.index(word, start)
        start = at + len(word)
        styles = [s.style for s in spans.spans if s.start <= at < s.end]
        painted.append(any(getattr(s, "bgcolor", None) is not None for s in styles))
    return painted


def test_scale_line():
    out = heatmaps.terminal(["a", " b"], torch.tensor([2.0, -0.5]), "t", color="truecolor",
                            width=80)
    last = Text.from_ansi(out.splitlines()[-1])
    assert last.plain.startswith("scale -2 ") and "+2  relevance: min -0.5, max 2" in last.plain
    ramp = [s.style.bgcolor.triplet for s in last.spans if s.style.bgcolor is not None]
    assert tuple(ramp[0]) == heatmaps.colour(-1.0) and tuple(ramp[-1]) == heatmaps.colour(1.0)
    plain = heatmaps.terminal(["a", " b"], torch.tensor([2.0, -0.5]), "t", color=False, width=80)
    assert plain.splitlines() == ["t", "a(+1.00) b(-0.25)",
                                  "(values: relevance / 2, the largest |relevance|; min -0.5, "
                                  "max 2)"]


def test_fallback_colours_keep_the_sign():
    """16 colours: a light tint becomes its hue (bright red / bright blue), not white."""
    out = heatmaps.terminal(["a", " b", " c", " d"], torch.tensor([1.0, 0.2, -0.2, -1.0]), "t",
                            color="standard", width=80)
    codes = re.findall(r"\x1b\[(\d+);(\d+)m(\w)", out.splitlines()[1])
    assert [(bg, word) for _, bg, word in codes] == [("41", "a"), ("101", "b"), ("104", "c"),
                                                    ("44", "d")]
    eight = heatmaps.terminal(["a"], torch.tensor([1.0]), "t", color="256", width=80)
    assert "48;5;" in eight and "48;2;" not in eight
    true = heatmaps.terminal(["a"], torch.tensor([1.0]), "t", color="truecolor", width=80)
    assert "48;2;178;24;43" in true  # the red end of the default map, exact


# ------------------------------------------------------------------------ the environment

CLEAN = ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLORTERM", "COLUMNS", "TERM",
         "JUPYTER_COLUMNS", "TTY_INTERACTIVE")


@pytest.fixture
def env(monkeypatch):
    for name in CLEAN:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def render() -> str:
    return heatmaps.terminal(["a", " b"], torch.tensor([1.0, -1.0]), "t")


def test_redirected_output_is_plain_unless_forced(env):
    env.setattr(sys, "stdout", io.StringIO())
    assert "\x1b[" not in render() and "a(+1.00)" in render()
    env.setenv("FORCE_COLOR", "1")
    assert "\x1b[" in render()
    env.setenv("NO_COLOR", "1")  # NO_COLOR wins, as in rich
    assert "\x1b[" not in render()
    env.delenv("FORCE_COLOR")
    assert "\x1b[" not in render()


def test_a_terminal_gets_the_colours_it_announces(env):
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        env.setattr(sys, "stdout", tty)
        env.setenv("TERM", "xterm-256color")
        assert "48;5;" in render()
        env.setenv("COLORTERM", "truecolor")
        assert "48;2;" in render()
        env.setenv("NO_COLOR", "1")
        assert "\x1b[" not in render()
        env.delenv("NO_COLOR")
        env.delenv("COLORTERM")
        env.setenv("TERM", "dumb")
        assert "\x1b[" not in render()
    os.close(master)


def test_forced_colour_and_width_from_the_environment(env):
    env.setattr(sys, "stdout", io.StringIO())
    out = heatmaps.terminal(["a"], torch.tensor([1.0]), "t", color=True)
    assert "48;2;178;24;43" in out  # True without any announcement: 24-bit
    env.setenv("TERM", "xterm-256color")
    assert "48;5;" in heatmaps.terminal(["a"], torch.tensor([1.0]), "t", color=True)
    env.setenv("COLUMNS", "40")
    out = heatmaps.terminal(PIECES, RELEVANCE, TITLE, color=False)
    assert max(cell_len(line) for line in out.splitlines()) <= 40
    assert max(cell_len(line) for line in out.splitlines()) > 30
    with pytest.raises(ValueError, match="color must be None, True, False or one of"):
        heatmaps.terminal(["a"], torch.tensor([1.0]), "t", color="16")
    with pytest.raises(ValueError, match="width must be an int of at least 20 columns"):
        heatmaps.terminal(["a"], torch.tensor([1.0]), "t", width=5)


def test_pixel_heatmap_in_the_terminal():
    relevance = torch.zeros(8, 8)
    relevance[:4] = 1.0
    relevance[4:] = -1.0
    out = heatmaps.terminal(None, relevance, "image", color="truecolor", width=20)
    rows = out.splitlines()[1:5]  # two pixel rows per line; the scale line follows
    assert all(ANSI.sub("", r) == "▀" * 8 for r in rows)
    assert ANSI.sub("", out.splitlines()[5]).startswith("scale -1 ")
    assert "38;2;178;24;43;48;2;178;24;43" in rows[0]  # red above red
    assert "38;2;33;102;172;48;2;33;102;172" in rows[-1]
    plain = heatmaps.terminal(None, relevance, "image", color=False, width=20).splitlines()
    assert plain[1:5] == ["########"] * 2 + ["@@@@@@@@"] * 2
    assert plain[5] == "(values: relevance /"  # the scale line wraps at 20 columns


# ------------------------------------------------------------------------ the audit table


@pytest.fixture(scope="module")
def llama_report():
    import lrp_explicit
    from families import BY_NAME

    model = BY_NAME["llama"].build()
    return lrp_explicit.audit(model, {"input_ids": torch.tensor([[3, 7, 9, 4]])}, 1)


def test_audit_table_fits_the_width(llama_report, monkeypatch):
    report = llama_report
    names = [r.name for r in report.modules]
    assert max(len(n) for n in names) >= 39  # model.layers.0.post_attention_layernorm

    def numbers(x: float) -> str:
        return f"{x:.6g}"

    for width in (80, 100, 120, 200):
        text = report.table(width=width)
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width
        words = text.split()
        # nothing is cut: every name, output relevance, absorbed share and absorber value
        # (a long absorber kind such as autograd:ToCopyBackward0 may fold at 80 columns)
        for r in report.modules:
            assert r.name in words and numbers(r.relevance_at_output) in words, (width, r.name)
            assert numbers(r.absorbed) in words
            for kind, value in r.absorbed_by.items():
                if abs(value) > 1e-9 * report.scale:
                    assert kind in "".join(words) and numbers(value) in words
        head = next(i for i, line in enumerate(lines) if line.startswith("module"))
        if width == 200:  # one line per module, nine columns
            assert lines[head].split()[:3] == ["module", "type", "rule"]
            assert re.search(r"^lm_head\s+Linear\s+EpsilonRule\s", text, re.M)
        else:  # two lines per module: type and rule under the name
            at = lines.index(next(line for line in lines if line.startswith("lm_head ")))
            assert lines[at + 1].split()[:3] == ["Linear", "·", "EpsilonRule"]
            assert ("R at inputs" in lines[head] + lines[head + 1]) == (width >= 120)
            assert ("(R at inputs = R at output − absorbed" in text) == (width < 120)
    # by default, the terminal's width
    for name in CLEAN:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "100")
    assert str(report) == report.table(width=100)
    with pytest.raises(ValueError, match="width must be an int of at least 40 columns"):
        report.table(width=30)
