"""Two notebook fragments (``html_fragment``, as ``_repr_html_`` returns them) on one page, in a
real headless Chromium: both render with their own colours, neither's style reaches the other or
the page, and hovering a token of one updates only that fragment's value line. A screenshot of
the page is checked for both fragments' colours; ``LRP_UPDATE_SNAPSHOTS=1`` also writes it to
``docs/two_heatmaps.png``.

Skipped only when no Chromium or Chrome is installed (Debian: ``apt-get install chromium``)."""
from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrp_explicit import heatmaps

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome",
                                          "google-chrome-stable", "chrome") if shutil.which(n)),
               None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium or Chrome installed")

DOCS = Path(__file__).resolve().parents[1] / "docs"

FIRST = (["The", " capital", " of", " France", " is", " Paris", ".", "\n", "Its", " river",
          " is", " the", " Se", "ine", "."],
         torch.tensor([0.25, 2.0, -0.5, 4.0, 0.0, 1.0, -1.0, 0.5, 0.0, -2.0, 0.125, 0.0, 3.0,
                       1.5, -4.0]),
         "next token ' Paris' (id 6342) · score 17.25", "tiny-llama · attnlrp · total 4.31")
SECOND = (["[CLS]", " the", " cat", " sat", " on", " the", " mat", " [SEP]"],
          torch.tensor([0.0, 0.3, 2.5, -0.8, 0.1, -0.2, 1.2, 0.0]),
          "class 'animal' (id 1) · score 3.1", "tiny-bert · cp-lrp")

PROBE = """<script>
(() => {
  const out = {fragments: []};
  const style = el => getComputedStyle(el);
  const values = () => [...document.querySelectorAll("div.lrp-heatmap .lrp-value")]
    .map(v => v.textContent);
  document.querySelectorAll("div.lrp-heatmap").forEach(root => {
    const tokens = [...root.querySelectorAll("span.lrp-tok")];
    const box = root.getBoundingClientRect();
    out.fragments.push({
      id: root.id, top: box.top, height: box.height, width: box.width,
      tokens: tokens.map(t => ({text: t.textContent, background: style(t).backgroundColor,
                                padding: style(t).paddingLeft,
                                height: t.getBoundingClientRect().height})),
      title: getComputedStyle(root.querySelector(".lrp-title")).fontWeight,
      value: root.querySelector(".lrp-value").textContent,
    });
  });
  // elements with the fragments' class names, outside any fragment: no style reaches them
  const outside = document.getElementById("outside-token");
  const title = document.getElementById("outside-title");
  out.outside = {padding: getComputedStyle(outside).paddingLeft,
                 background: getComputedStyle(outside).backgroundColor,
                 radius: getComputedStyle(outside).borderTopLeftRadius,
                 weight: getComputedStyle(title).fontWeight};
  // hover a token of the second fragment
  const second = document.querySelectorAll("div.lrp-heatmap")[1];
  const cat = [...second.querySelectorAll("span.lrp-tok")].find(t => t.textContent === "cat");
  cat.dispatchEvent(new MouseEvent("mouseenter"));
  out.afterHover = values();
  cat.dispatchEvent(new MouseEvent("mouseleave"));
  out.afterLeave = values();
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def page(probe: bool) -> str:
    fragments = [heatmaps.html_fragment(t, r, title, subtitle=sub)
                 for t, r, title, sub in (FIRST, SECOND)]
    if probe:
        fragments.append('<span class="lrp-tok" id="outside-token">outside</span>'
                         '<div class="lrp-title" id="outside-title">outside</div>' + PROBE)
    return heatmaps.html_document(fragments, "two heatmaps")


def chromium(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-extensions", "--force-device-scale-factor=1"]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=120)


def rgb(css: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", css)[:3])


def test_two_fragments_render_independently(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(page(probe=True), encoding="utf-8")
    done = chromium("--virtual-time-budget=5000", "--dump-dom", path.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, flags=re.S)
    assert found, done.stderr[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    first, second = probe["fragments"]
    assert first["id"] != second["id"]
    assert first["height"] > 50 and second["height"] > 50 and second["top"] >= first["top"] + \
        first["height"]  # both drawn, one below the other
    for fragment, (tokens, relevance, _, _) in zip((first, second), (FIRST, SECOND)):
        shown = [t["text"] for t in fragment["tokens"]]
        assert shown == [p.strip() or "↵" for p in tokens]
        for token, value in zip(fragment["tokens"], (relevance / relevance.abs().max()).tolist()):
            if value == 0:  # unpainted
                assert token["background"] == "rgba(0, 0, 0, 0)"
            else:
                assert rgb(token["background"]) == heatmaps.colour(value)
            assert token["padding"] != "0px" and token["height"] > 0  # its own style applies
        assert int(fragment["title"]) >= 600
    # the fragments' styles stay inside them
    assert probe["outside"] == {"padding": "0px", "background": "rgba(0, 0, 0, 0)",
                                "radius": "0px", "weight": "400"}
    idle = "hover over a token for its relevance"
    assert probe["afterHover"] == [idle, "cat: +2.5 (+1.00)"]
    assert probe["afterLeave"] == [idle, idle]


def test_screenshot_shows_both_fragments(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(page(probe=False), encoding="utf-8")
    shot = tmp_path / "shot.png"
    done = chromium("--window-size=900,420", f"--screenshot={shot}", path.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (420, 900)

    def rows_with(colour) -> np.ndarray:  # rows with a run of the colour (a token's box)
        return np.nonzero((np.abs(pixels - np.array(colour)).max(-1) <= 2).sum(1) > 5)[0]

    red, blue = heatmaps.colour(1.0), heatmaps.colour(-1.0)
    first_red = rows_with(red)  # "France" in the first fragment, "cat" in the second
    first_blue = rows_with(blue)  # the final "." of the first fragment (a narrow box)
    assert len(first_red) and len(first_blue)
    assert first_red.max() - first_red.min() > 60  # red in both fragments, far apart
    if os.environ.get("LRP_UPDATE_SNAPSHOTS") == "1":
        (DOCS / "two_heatmaps.png").write_bytes(shot.read_bytes())
    img = Image.open(io.BytesIO(shot.read_bytes()))
    assert img.format == "PNG"
