"""``result.save("x.lrp")`` and ``lrp_explicit.load("x.lrp")``: every kind of result comes back
equal in every value (tensors bit for bit with their dtype, tokens, ids, pieces and words,
target, score, label, contrast, latent relevance, image, model and composite names, library
version); the record is a folder with JSON metadata and a safetensors file; heatmap suffixes
still write heatmaps; bad paths are clear errors."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import lrp_explicit
from bpe import bpe_gpt2, bpe_tokenizer
from families import BY_NAME
from test_explain import word_tokenizer
from test_heatmaps import parse


def assert_same(a, b):
    assert type(a) is type(b)
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name
        elif isinstance(x, dict) and any(isinstance(v, torch.Tensor) for v in x.values()):
            assert list(x) == list(y), f.name
            for key in x:
                assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key
        else:
            assert x == y, (f.name, x, y)
    assert a.pieces == b.pieces and a.words == b.words


@pytest.fixture(scope="module")
def gpt2():
    return bpe_gpt2()


def test_text_explanation_round_trip(gpt2, tmp_path):
    tok = bpe_tokenizer()
    e = lrp_explicit.explain(gpt2, "The capital of France is", tokenizer=tok, target=" Paris",
                             contrast="softmax", record=["transformer.h.?"])
    assert len(e.latent) == 2 and e.token_text is not None and e.ids is not None
    path = e.save(tmp_path / "one.lrp")
    assert path.is_dir() and sorted(p.name for p in path.iterdir()) == [
        "lrp.json", "tensors.safetensors"]
    meta = json.loads((path / "lrp.json").read_text())
    assert meta["format"] == "lrp_explicit" and meta["kind"] == "explanation"
    assert meta["version"] == lrp_explicit.__version__ == e.version
    assert meta["tokens"] == e.tokens and meta["score"] == e.score
    tensors = load_file(str(path / "tensors.safetensors"))
    assert torch.equal(tensors["relevance"], e.relevance)
    back = lrp_explicit.load(path)
    assert_same(e, back)
    # the view of the loaded result is the same
    assert back.to_dict() == e.to_dict()


def test_continuation_image_and_similarity_round_trip(gpt2, tmp_path):
    tok = bpe_tokenizer()
    cont = lrp_explicit.explain(gpt2, "The capital of", tokenizer=tok, target=" France is",
                                continuation=True)
    assert_same(cont, lrp_explicit.load(cont.save(tmp_path / "c.lrp")))
    vit = BY_NAME["vit"].build()
    pixels = torch.randn(1, 3, 16, 16, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    image = lrp_explicit.explain(vit, pixels, target=1, record=["vit.layers.0"])
    assert image.image is not None and image.tokens is None
    assert_same(image, lrp_explicit.load(image.save(tmp_path / "image.lrp")))
    bert = BY_NAME["bert"].build(tf.BertModel)
    words = word_tokenizer(["[UNK]", "[PAD]", "[MASK]"] + [f"w{i}" for i in range(61)])
    sim = lrp_explicit.explain(bert, ("w3 w4 w5", "w4 w9"), tokenizer=words)
    assert sim.task == "similarity" and sim.segments == [0, 0, 0, 1, 1]
    assert_same(sim, lrp_explicit.load(sim.save(tmp_path / "sim.lrp")))


def test_low_precision_relevance_keeps_its_dtype(tmp_path):
    model = BY_NAME["llama"].build(attn="sdpa", dtype=torch.bfloat16)
    e = lrp_explicit.explain(model, [5, 17, 3, 42], target=7)
    assert e.relevance.dtype == torch.bfloat16
    assert_same(e, lrp_explicit.load(e.save(tmp_path / "bf16.lrp")))


def test_batch_round_trip(gpt2, tmp_path):
    tok = bpe_tokenizer()
    batch = lrp_explicit.explain(gpt2, ["The capital of France is", "A cat sat on the"],
                                 tokenizer=tok, target=[" Paris", " cat"], progress=False,
                                 record=["transformer.h.0"])
    assert isinstance(batch, lrp_explicit.ExplanationBatch) and isinstance(batch, list)
    assert len(batch) == 2 and isinstance(batch[0], lrp_explicit.Explanation)
    assert isinstance(batch[:1], lrp_explicit.ExplanationBatch)
    back = lrp_explicit.load(batch.save(tmp_path / "batch.lrp"))
    assert isinstance(back, lrp_explicit.ExplanationBatch) and len(back) == 2
    for a, b in zip(batch, back):
        assert_same(a, b)
    data = json.loads(batch.save(tmp_path / "batch.json").read_text())
    assert [d["tokens"] for d in data] == [e.tokens for e in batch]
    # one page, one fragment per explanation, each with its own id; the notebook view too
    page = parse(batch.save(tmp_path / "batch.html").read_text())
    roots = [a["id"] for tag, a, _ in page.elements if "lrp-heatmap" in a.get("class", "")]
    assert len(roots) == 2 and len(set(roots)) == 2
    assert [t[2].strip() for t in page.tokens if t[0] == roots[0]] == [
        p.strip() for p in batch[0].pieces]
    assert len({a["id"] for _, a, _ in parse(batch._repr_html_()).elements
                if "lrp-heatmap" in a.get("class", "")}) == 2


def test_generation_round_trip(gpt2, tmp_path):
    tok = bpe_tokenizer()
    g = lrp_explicit.explain(gpt2, "The capital of France is", tokenizer=tok, generate=3,
                             contrast="softmax", record=["transformer.h.1"],
                             generation_kwargs={"repetition_penalty": 1.3})
    back = lrp_explicit.load(g.save(tmp_path / "gen.lrp"))
    assert_same(g, back)
    assert back.generation["repetition_penalty"] == 1.3 and back.contrast == "softmax"
    assert back.generated == g.generated and back.probabilities == g.probabilities
    both = lrp_explicit.explain(gpt2, ["The cat", "A mat"], tokenizer=tok, generate=2,
                                progress=False)
    again = lrp_explicit.load(both.save(tmp_path / "gens.lrp"))
    for a, b in zip(both, again):
        assert_same(a, b)


def test_heatmap_suffixes_and_bad_paths(tmp_path):
    e = lrp_explicit.Explanation(tokens=["a", "b"], relevance=torch.tensor([1.0, -1.0]),
                                 score=1.0, target=0, label="class 0", task="classification")
    data = json.loads(e.save(tmp_path / "h.json").read_text())
    assert data["relevance"] == [1.0, -1.0] and data["words"] == ["a", " b"]
    assert_same(e, lrp_explicit.load(e.save(tmp_path / "record", format="lrp")))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files \\(notes.txt\\)"):
        e.save(tmp_path / "full", format="lrp")
    with pytest.raises(ValueError, match="is a file; a record is a folder"):
        e.save(tmp_path / "h.json", format="lrp")
    with pytest.raises(FileNotFoundError, match="no record at"):
        lrp_explicit.load(tmp_path / "missing.lrp")
    with pytest.raises(ValueError, match="is not a record of lrp_explicit"):
        lrp_explicit.load(tmp_path / "full")
    e.save(tmp_path / "again.lrp")
    meta = json.loads((tmp_path / "again.lrp" / "lrp.json").read_text())
    meta["kind"] = "from-the-future"
    (tmp_path / "again.lrp" / "lrp.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="a record of kind 'from-the-future'"):
        lrp_explicit.load(tmp_path / "again.lrp")
