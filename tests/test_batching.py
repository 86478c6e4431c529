"""Batches in one backward pass: ``explain`` on a batch runs one forward and one backward per
chunk of ``batch_size`` samples, and each sample gets the relevance it gets alone (float64,
samples of different lengths padded on the right, whatever padding the caller used)."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import lrp_explicit
from families import BY_NAME

LENGTHS = (7, 4, 9, 5)


def ids_of(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 60, (length,), generator=g).tolist()


SAMPLES = [ids_of(n, i) for i, n in enumerate(LENGTHS)]


def padded(samples: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    """A dict batch padded on ``side`` with id 0 and its attention mask."""
    width = max(map(len, samples))
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for b, s in enumerate(samples):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, cols] = torch.tensor(s)
        mask[b, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Forwards:
    """Counts the forward passes of a model."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def assert_same(batched, alone, rtol=1e-10):
    assert len(batched) == len(alone)
    for b, a in zip(batched, alone):
        assert b.tokens == a.tokens and b.target == a.target and b.label == a.label
        assert b.relevance.shape == a.relevance.shape
        torch.testing.assert_close(b.relevance, a.relevance, rtol=rtol, atol=rtol * float(
            a.relevance.abs().max()))
        assert b.score == pytest.approx(a.score, rel=rtol)


@pytest.fixture(scope="module")
def llama():
    return BY_NAME["llama"].build(attn="sdpa")


@pytest.fixture(scope="module")
def bert():
    return BY_NAME["bert"].build(tf.BertForSequenceClassification, attn="sdpa")


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
def test_causal_lm_batch_of_different_lengths_equals_single_calls(llama, variant):
    targets = [7, 8, 9, 10]
    alone = [lrp_explicit.explain(llama, s, target=t, composite=variant)
             for s, t in zip(SAMPLES, targets)]
    with Forwards(llama) as forwards:
        batched = lrp_explicit.explain(llama, SAMPLES, target=targets, composite=variant,
                                       progress=False)
    assert forwards.count == 1  # one forward (and one backward) for the four samples
    assert_same(batched, alone)
    assert [len(e.relevance) for e in batched] == list(LENGTHS)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_padded_dict_batches_equal_single_calls(llama, bert, family, side):
    model = llama if family == "llama" else bert
    alone = [lrp_explicit.explain(model, s) for s in SAMPLES]
    batched = lrp_explicit.explain(model, padded(SAMPLES, side), progress=False)
    assert_same(batched, alone)


def test_batch_size_chunks_and_contrasts(llama):
    alone = [lrp_explicit.explain(llama, s, target=3, contrast=5) for s in SAMPLES]
    with Forwards(llama) as forwards:
        batched = lrp_explicit.explain(llama, SAMPLES, target=3, contrast=5, batch_size=3,
                                       progress=False)
    assert forwards.count == 2  # 3 + 1 samples
    assert_same(batched, alone)
    soft = lrp_explicit.explain(llama, SAMPLES, target=3, contrast="softmax", progress=False)
    assert_same(soft, [lrp_explicit.explain(llama, s, target=3, contrast="softmax")
                       for s in SAMPLES])


def test_continuations_of_different_lengths(llama):
    continuations = [[12, 40], [6], [30, 31, 32], [9, 9]]
    alone = [lrp_explicit.explain(llama, s, target=c) for s, c in zip(SAMPLES, continuations)]
    batched = lrp_explicit.explain(llama, SAMPLES, target=continuations, progress=False)
    assert_same(batched, alone)
    assert [e.segments.count(1) for e in batched] == [2, 1, 3, 2]


def test_classifier_batch_and_latent_records(bert):
    alone = [lrp_explicit.explain(bert, s, target=1, record=["bert.encoder.layer.0"])
             for s in SAMPLES]
    batched = lrp_explicit.explain(bert, SAMPLES, target=1, record=["bert.encoder.layer.0"],
                                   progress=False)
    assert_same(batched, alone)
    for b, a in zip(batched, alone):
        key = "bert.encoder.layer.0"
        assert b.latent[key].shape == a.latent[key].shape  # padding cut off
        torch.testing.assert_close(b.latent[key], a.latent[key], rtol=1e-10, atol=1e-12)


def test_sentence_encoder_pairs_in_one_pass():
    model = BY_NAME["bert"].build(tf.BertModel, attn="sdpa")
    pairs = [(SAMPLES[0], SAMPLES[1]), (SAMPLES[2], SAMPLES[3]), (SAMPLES[1], SAMPLES[2])]
    alone = [lrp_explicit.explain(model, p) for p in pairs]
    with Forwards(model) as forwards:
        batched = lrp_explicit.explain(model, pairs, progress=False)
    assert forwards.count == 2  # one forward per side of the pairs
    assert_same(batched, alone)
    assert [e.segments.count(0) for e in batched] == [7, 9, 4]


def test_images_stack_and_plain_models_of_other_shapes_fall_back():
    vit = BY_NAME["vit"].build()
    pixels = torch.randn(3, 3, 16, 16, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    alone = [lrp_explicit.explain(vit, x[None], target=1) for x in pixels]
    assert_same(lrp_explicit.explain(vit, pixels, target=1, progress=False), alone)

    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    xs = [torch.randn(1, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)]
    with Forwards(model) as forwards:  # different batch dimensions cannot be stacked
        out = lrp_explicit.explain(model, xs, target=0, progress=False)
    assert forwards.count == 2 and len(out) == 2


def test_bad_batch_size(llama):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        lrp_explicit.explain(llama, SAMPLES, batch_size=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_collated_padding_gets_no_relevance(llama, bert, family):
    """The pipeline's collated batch: zero embeddings after each sample, masked out; their
    relevance is exactly 0 and the real positions carry the whole explained score."""
    from lrp_explicit import pipeline

    model = llama if family == "llama" else bert
    items = [pipeline.prepare(model, s) for s in SAMPLES]
    batch = pipeline.collate(model, items)
    assert batch.lengths == list(LENGTHS) and batch.leaf.shape[:2] == (4, max(LENGTHS))
    assert batch.kwargs["attention_mask"].sum(1).tolist() == list(LENGTHS)
    comp = pipeline.resolve_composite("cp-lrp", model)

    def target(output):  # logit 1 at each sample's last real token (or the class logit)
        logits = output.logits
        if logits.dim() == 3:
            return logits[torch.arange(4), torch.tensor(LENGTHS) - 1, 1].sum()
        return logits[:, 1].sum()

    result = pipeline.attribute(model, batch, lambda out: (target(out), target(out).detach()),
                                comp)
    relevance = result.relevance["inputs_embeds"].sum(-1)
    for b, n in enumerate(LENGTHS):
        assert torch.all(relevance[b, n:] == 0)
    assert torch.all(relevance.abs().sum(1) > 0)
