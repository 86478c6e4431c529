"""``python -m lrp_explicit audit``: a local tiny LLaMA folder, with and without tokenizer; it says
which token it explained (the model's own arg max, or ``--target``) and that logit; low-precision
dtypes, ``--device``, hub-style names resolved as ``explain`` resolves them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from lrp_explicit import cli, composites

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, mlp_bias=True, initializer_range=0.2))


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "the", "cat", "sat", "on", "mat"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                      pad_token="[PAD]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``plain``: model only; ``tokenized``: model and tokenizer."""
    base = tmp_path_factory.mktemp("models")
    model = tiny_llama()
    for name in ("plain", "tokenized"):
        model.save_pretrained(base / name)
    word_tokenizer().save_pretrained(base / "tokenized")
    return {name: str(base / name) for name in ("plain", "tokenized")}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_audit_prints_a_table(folders, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # the table fits the terminal: two lines per module
    code, out, err = run(capsys, "audit", "--model", folders["plain"], "--ids", "3,7,9",
                         "--family", "generic")
    assert code == 0, err
    lines = out.splitlines()
    with torch.no_grad():
        logits = tf.LlamaForCausalLM.from_pretrained(folders["plain"])(
            input_ids=torch.tensor([[3, 7, 9]])).logits[0, -1]
    top = int(logits.argmax())  # no tokenizer in the folder: the token is named by its id
    assert lines[0] == f"explained: next token id {top} · logit {float(logits[top]):.6g}"
    assert lines[1] == "Conservation audit of LlamaForCausalLM with attnlrp (float32)"
    assert any(line.startswith("model.layers.1.mlp ") for line in lines)
    head = next(i for i, line in enumerate(lines) if line.startswith("lm_head "))
    assert lines[head + 1].split()[:3] == ["Linear", "·", "EpsilonRule"]
    assert max(len(line) for line in lines) <= 80


def test_audit_with_text_json_and_check(folders, capsys):
    code, out, err = run(capsys, "audit", "--model", folders["tokenized"], "--text",
                         "the cat sat on the mat", "--family", "generic", "--composite", "cp-lrp",
                         "--zero-bias", "--dtype", "float64", "--record", "model.layers.?",
                         "--target", "5", "--json", "--check")
    data = json.loads(out)
    assert data["target"]["id"] == 5 and data["target"]["name"] == "next token 'cat' (id 5)"
    assert data["target"]["logit"] == data["explained"]
    assert data["composite"] == "cp-lrp" and data["dtype"] == "float64"
    assert sorted(data["recorded"]) == ["model.layers.0", "model.layers.1"]
    assert data["recorded"]["model.layers.0"]["shape"] == [1, 6, 16]
    assert data["inputs"]["inputs_embeds"]["shape"] == [1, 6, 16]
    assert {m["name"] for m in data["modules"]} >= {"<target>", "<root>", "model.norm"}
    assert data["check"]["ok"] is (code == 0)
    assert data["absorbed"] == pytest.approx(data["explained"] - data["input_total"])
    blocks = [m for m in data["modules"] if m["name"].startswith("model.layers.")
              and m["name"].count(".") == 2]
    for block in blocks:  # CP-LRP with zero biases: the blocks conserve
        assert block["absorbed"] == pytest.approx(0, abs=1e-6 * data["scale"])


def test_audit_depth_and_check_text(folders, capsys):
    code, out, _ = run(capsys, "audit", "--model", folders["plain"], "--ids", "4 5 6",
                       "--family", "generic", "--depth", "3", "--check")
    assert code in (0, 1)
    assert "model.layers.0 " in out and "model.layers.0.mlp" not in out and "lm_head" in out
    assert "Check of LlamaForCausalLM with attnlrp" in out


@pytest.mark.parametrize("argv,message", [
    (["--model", "{missing}", "--ids", "1"], "no such model folder"),
    (["--model", "some-org/not-downloaded-model", "--ids", "1"],
     "--model some-org/not-downloaded-model: cannot load the model"),
    (["--model", "{plain}", "--ids", "1", "--device", "gpu7"], "--device gpu7: not a torch"),
    (["--model", "{empty}", "--ids", "1"], "no config.json"),
    (["--model", "{plain}"], "give the input with --text"),
    (["--model", "{plain}", "--text", "the cat"], "needs a tokenizer"),
    (["--model", "{plain}", "--ids", "1,x"], "--ids must be integers"),
    (["--model", "{plain}", "--ids", "99", "--family", "generic"], "out of range"),
    (["--model", "{plain}", "--ids", "3", "--family", "generic", "--target", "999"],
     "out of range"),
    (["--model", "{plain}", "--ids", "3", "--family", "generic", "--composite", "nope"],
     "no composite 'nope'"),
    (["--model", "{plain}", "--ids", "3", "--family", "generic", "--depth", "0"], "--depth"),
    (["--model", "{plain}", "--ids", "3", "--text", "a"], "not allowed with argument"),
    (["--ids", "3"], "required: --model"),
])
def test_bad_input_exits_2_with_one_line(folders, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub name is looked up in the cache only
    paths = dict(folders, missing=str(tmp_path / "missing"), empty=str(tmp_path))
    code, out, err = run(capsys, "audit", *[a.format(**paths) for a in argv])
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and err.startswith("lrp-explicit audit: error: "), err
    assert out == ""


def test_unknown_model_type_points_to_generic(folders, capsys, monkeypatch):
    def unknown(name, model, **options):
        raise composites.UnknownModelError("no family for 'llama' (long message …)")

    monkeypatch.setattr(composites, "get", unknown)
    code, out, err = run(capsys, "audit", "--model", folders["plain"], "--ids", "3")
    assert code == 2
    assert err.strip() == ("lrp-explicit audit: error: no composite family for model type "
                           "'llama'; try --family generic")


def test_parser_has_subcommands():
    parser = cli.build_parser()
    assert "audit" in cli.COMMANDS
    args = parser.parse_args(["audit", "--model", "x", "--ids", "1"])
    assert args.command == "audit" and args.model == "x" and args.composite == "attnlrp"


def test_python_dash_m_entry_point(folders):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ok = subprocess.run([sys.executable, "-m", "lrp_explicit", "audit", "--model",
                         folders["plain"], "--ids", "3,4", "--family", "generic"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "Conservation audit of LlamaForCausalLM" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lrp_explicit", "audit", "--model",
                          folders["plain"] + "-missing", "--ids", "3"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"lrp-explicit audit: error: --model {folders['plain']}-missing: no such model folder "
        "(give a local Hugging Face model folder or a hub name)"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_and_device(folders, capsys, dtype):
    code, out, err = run(capsys, "audit", "--model", folders["tokenized"], "--text",
                         "the cat sat on the", "--target", "8", "--dtype", dtype,
                         "--device", "cpu", "--family", "generic")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("explained: next token 'mat' (id 8) · logit ")
    assert lines[1] == f"Conservation audit of LlamaForCausalLM with attnlrp ({dtype})"


def test_hub_style_name_from_the_cache(folders, capsys, monkeypatch, tmp_path):
    """A hub name is resolved as explain resolves it: from the Hugging Face cache, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in Path(folders["tokenized"]).iterdir():
        (snapshot / name.name).write_bytes(name.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    code, out, err = run(capsys, "audit", "--model", "tiny-org/tiny-llama", "--text",
                         "the cat", "--family", "generic")
    assert code == 0, err
    assert out.splitlines()[1] == "Conservation audit of LlamaForCausalLM with attnlrp (float32)"
