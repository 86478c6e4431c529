"""``explain(model, prompt, generate=N)`` on tiny float64 LLaMA and GPT-2 models.

- Row ``i`` of the matrix equals ``explain`` of the prefix before generated token ``i`` with
  that token as target (1e-6 relative to the row's largest value), with no contrast, a contrast
  token and the softmax-style contrast; the matrix is exactly zero from each row's own position
  on (the causal mask: nothing there is seen by the prediction).
- The generated tokens are greedy: each is the arg max of the logits of a plain forward pass of
  the model on its prefix; their probabilities are the softmax of those logits; the scores are
  the explained logits.
- Chunks of ``batch_size`` rows give the same matrix as one pass; recorded latent relevance has
  one row per generated token; generation options pass through to ``generate`` (sampling).
- The model is left as it was (also its train mode), and bad arguments are one-line errors.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import lrp_explicit
from bpe import bpe_gpt2, bpe_tokenizer
from families import BY_NAME
from test_explain import assert_untouched, snapshot

PROMPT = [5, 17, 3, 42, 9]
STEPS = 4


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    # sdpa: transformers' eager attention of LLaMA computes its softmax in float32
    attn = "sdpa" if request.param == "llama" else "eager"
    return BY_NAME[request.param].build(attn=attn)


def greedy(model, ids, steps):
    """Greedy continuation by plain forward passes: the arg max at the last position."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids


def assert_rows_equal_prefixes(model, g, **kwargs):
    n = g.prompt_length
    assert g.relevance.shape == (len(g.generated), len(g.ids))
    for i, token in enumerate(g.generated):
        alone = lrp_explicit.explain(model, g.ids[:n + i], target=token, **kwargs)
        scale = float(alone.relevance.abs().max())
        torch.testing.assert_close(g.relevance[i, :n + i], alone.relevance, rtol=0,
                                   atol=1e-6 * scale)
        assert g.scores[i] == pytest.approx(alone.score, rel=1e-6)
        assert g.labels[i] == alone.label
        # exactly zero on and after the generated token's own position
        assert torch.equal(g.relevance[i, n + i:], torch.zeros(len(g.ids) - n - i,
                                                               dtype=g.relevance.dtype))


@pytest.mark.parametrize("contrast", [None, 30, "softmax"])
def test_rows_equal_explain_of_each_prefix(model, contrast):
    before = snapshot(model)
    g = lrp_explicit.explain(model, PROMPT, generate=STEPS, contrast=contrast)
    assert isinstance(g, lrp_explicit.GenerationExplanation)
    assert g.prompt_length == len(PROMPT) and g.ids[:len(PROMPT)] == PROMPT
    assert g.ids == greedy(model, PROMPT, STEPS)
    if contrast == 30:
        assert 30 not in g.generated  # else it would be a clear error (tested below)
    assert_rows_equal_prefixes(model, g, contrast=contrast)
    assert g.contrast == contrast
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([g.ids])).logits[0].double()
    n = g.prompt_length
    expected = [float(torch.softmax(logits[n - 1 + i], -1)[t]) for i, t in enumerate(g.generated)]
    assert g.probabilities == pytest.approx(expected, rel=1e-9)
    if contrast is None:
        assert g.scores == pytest.approx([float(logits[n - 1 + i, t])
                                          for i, t in enumerate(g.generated)], rel=1e-9)
    assert_untouched(model, before)


def test_chunks_latent_and_a_row_as_an_explanation():
    model = BY_NAME["llama"].build(attn="sdpa")
    one = lrp_explicit.explain(model, PROMPT, generate=5, record=["model.layers.1"])
    chunked = lrp_explicit.explain(model, PROMPT, generate=5, batch_size=2, progress=False,
                                   record=["model.layers.1"])
    assert chunked.ids == one.ids
    torch.testing.assert_close(chunked.relevance, one.relevance, rtol=1e-12, atol=1e-14)
    latent = one.latent["model.layers.1"]
    assert latent.shape == (5, len(one.ids), model.config.hidden_size)
    torch.testing.assert_close(chunked.latent["model.layers.1"], latent, rtol=1e-12,
                               atol=1e-14)
    # the recorded relevance of row i is that of explain() on the prefix
    n = one.prompt_length
    alone = lrp_explicit.explain(model, one.ids[:n + 2], target=one.generated[2],
                                 record=["model.layers.1"])
    torch.testing.assert_close(latent[2, :n + 2], alone.latent["model.layers.1"], rtol=1e-9,
                               atol=1e-12)
    row = one.row(2)
    assert isinstance(row, lrp_explicit.Explanation) and row.target == one.generated[2]
    assert torch.equal(row.relevance, one.relevance[2, :n + 2]) and row.ids == one.ids[:n + 2]


def test_generation_options_pass_through_and_train_mode_is_kept():
    model = BY_NAME["llama"].build(attn="sdpa")
    model.train()
    before = snapshot(model)
    torch.manual_seed(3)
    g = lrp_explicit.explain(model, PROMPT, generate=6,
                             generation_kwargs={"do_sample": True, "top_k": 8})
    assert g.generation["do_sample"] is True and g.generation["top_k"] == 8
    assert g.generation["max_new_tokens"] == 6
    assert model.training and all(m.training for m in model.modules())
    assert_untouched(model, before)
    model.eval()
    assert_rows_equal_prefixes(model, g)
    # sampling: not the greedy choice everywhere (with this seed)
    assert g.ids != greedy(model, PROMPT, 6)


def test_text_prompt_with_a_bpe_tokenizer():
    # seed 3: this random model's three greedy tokens decode one by one ("\x05", "Fran", " e";
    # others begin with a lone byte of a multi-byte character, shown by its byte marker)
    tok, model = bpe_tokenizer(), bpe_gpt2(seed=3)
    text = "The capital of France is"
    g = lrp_explicit.explain(model, text, tokenizer=tok, generate=3)
    assert g.generated_pieces == ["\x05", "Fran", " e"]
    ids = tok(text)["input_ids"]
    assert g.ids[:len(ids)] == ids and g.prompt_length == len(ids)
    assert g.tokens == tok.convert_ids_to_tokens(g.ids)
    assert "".join(g.pieces[:len(ids)]) == text
    assert g.generated_text == tok.decode(g.generated)
    assert g.text == tok.decode(g.ids)
    assert_rows_equal_prefixes(model, g, tokenizer=tok)
    # words: the matrix columns summed per word
    words = g.word_relevance
    assert words.shape == (3, len(g.words))
    index = torch.tensor(g.word_index)
    for w in range(len(g.words)):
        torch.testing.assert_close(words[:, w], g.relevance[:, index == w].sum(1), rtol=1e-12,
                                   atol=1e-15)


def test_bad_arguments_are_clear_errors():
    model = BY_NAME["llama"].build(attn="sdpa")
    before = snapshot(model)
    g = lrp_explicit.explain(model, PROMPT, generate=3)
    bad = [
        (dict(generate=0), "generate must be a positive number of tokens"),
        (dict(generate=2, target=5), "generate= explains the tokens the model generates"),
        (dict(generate=2, position=1), "give no position"),
        (dict(generate=2, generation_kwargs={"max_new_tokens": 9}),
         "generation_kwargs may not set max_new_tokens"),
        (dict(generation_kwargs={"do_sample": True}), "generation_kwargs needs generate=N"),
        (dict(generate=3, contrast=g.generated[0]), "a token cannot be contrasted with itself"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            lrp_explicit.explain(model, PROMPT, **kwargs)
    assert_untouched(model, before)
    bert = BY_NAME["bert"].build(tf.BertForMaskedLM)
    with pytest.raises(ValueError, match="generate= needs a causal LM"):
        lrp_explicit.explain(bert, PROMPT, generate=2)


def test_a_batch_of_prompts():
    model = BY_NAME["gpt2"].build()
    both = lrp_explicit.explain(model, [PROMPT, PROMPT[:3]], generate=2, progress=False)
    assert isinstance(both, lrp_explicit.ExplanationBatch) and len(both) == 2
    alone = lrp_explicit.explain(model, PROMPT[:3], generate=2)
    assert both[1].ids == alone.ids and torch.equal(both[1].relevance, alone.relevance)


def test_views_of_a_generation(tmp_path):
    tok, model = bpe_tokenizer(), bpe_gpt2(seed=4)  # generates "oo|"
    g = lrp_explicit.explain(model, "The capital of France is", tokenizer=tok, generate=3)
    fragment = g._repr_html_()
    assert fragment.startswith("<div") and "<html" not in fragment
    assert 'class="lrp-heatmap' in fragment and "Fran" in fragment
    page = g.save(tmp_path / "g.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and fragment.split(">")[0].split("id=")[0] in page
    assert g.save(tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = g.to_terminal(color=False, width=80)
    assert text.splitlines()[0] == g.title
    words = g.to_terminal(color=False, width=200, words=True)
    assert "France" in words and "France" not in text  # a word of two tokens, shown as one
    with pytest.raises(ValueError, match="unknown heatmap format 'tex'"):
        g.save(tmp_path / "g.tex")
