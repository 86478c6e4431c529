"""The automatic composite (``family="auto"``): rules found from the model itself.

The proof that it finds the right rules is equality with the composites the families registered
by hand before it existed (their module tables are written out below, independently of the
detection): AttnLRP and CP-LRP, float64, every registered family, ≤ 1e-10 relative.
"""
from __future__ import annotations

import importlib
import warnings
from functools import partial

import pytest
import torch
import transformers as tf
from torch import nn

import lrp_explicit
from lrp_explicit import composites, rules
from lrp_explicit.composites import auto, detect, generic, hf
from lrp_explicit.composites.variants import variant
from lrp_explicit.errors import UnruledOpError
from families import FAMILIES, inputs, score

VARIANTS = ["attnlrp", "cp-lrp"]
D = torch.float64

#: The module rules each family registered by hand (lrp_explicit 0.2.0), beyond the shared
#: Hugging Face table: the norm classes, with the kind of their rule.
HAND = {
    "llama": [("llama", "LlamaRMSNorm", "rms")],
    "mistral": [("mistral", "MistralRMSNorm", "rms")],
    "qwen2": [("qwen2", "Qwen2RMSNorm", "rms")],
    "qwen3": [("qwen3", "Qwen3RMSNorm", "rms")],
    "phi3": [("phi3", "Phi3RMSNorm", "rms")],
    "gemma": [("gemma2", "Gemma2RMSNorm", "rms"), ("gemma3", "Gemma3RMSNorm", "rms")],
    "mixtral": [("mixtral", "MixtralRMSNorm", "rms")],
    "qwen3_moe": [("qwen3_moe", "Qwen3MoeRMSNorm", "rms")],
    "t5": [("t5", "T5LayerNorm", "rms")],
    "llava": [("llama", "LlamaRMSNorm", "rms"), ("mistral", "MistralRMSNorm", "rms"),
              ("qwen2", "Qwen2RMSNorm", "rms")],
    "gpt2": [], "bert": [], "vit": [], "clip": [],
}


def hand_composite(name: str, family: str, plain_pytorch: bool = False):
    """The family's composite as it was registered by hand: a fixed module table, no detection."""
    cp_lrp = name == "cp-lrp"

    def table(cp: bool) -> dict:
        if plain_pytorch:
            return generic.module_rules(cp)
        found = dict(hf.base_rules(cp))
        for module, cls, kind in HAND[family]:
            source = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
            found[getattr(source, cls)] = partial(rules.NormRule, kind=kind)
        return found

    return variant(family, cp_lrp, table, validate=hf.check_experts_implementation,
                   detect=False)()


def relevance(model, comp, leaves: dict, run, select) -> dict:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    with comp.context(model):
        y = select(run(model, leaves)).sum()
        y.backward(y.detach())
    return {k: v.grad for k, v in leaves.items()}


def assert_equal_relevance(model, family, leaves, run, select, plain_pytorch=False):
    for name in VARIANTS:
        expected = relevance(model, hand_composite(name, family, plain_pytorch), leaves, run,
                             select)
        comp = composites.get(name, model, family="auto")
        got = relevance(model, comp, leaves, run, select)
        for key in leaves:
            scale = expected[key].abs().max()
            assert scale > 0
            error = float((got[key] - expected[key]).abs().max() / scale)
            assert error <= 1e-10, (family, name, key, error)


def call(model, leaves):
    return model(**leaves)


# ---------------------------------------------------------------------------- equality


HF_CASES = [(f.name, attn) for f in FAMILIES for attn in f.attn]


@pytest.mark.parametrize("name,attn", HF_CASES)
def test_equals_the_hand_registered_family(name, attn):
    fam = next(f for f in FAMILIES if f.name == name)
    model = fam.build(attn=attn)
    x, key = inputs(fam, model, batch=2)
    family = composites.family_of(model)
    assert_equal_relevance(model, family, {key: x}, call, score)


@pytest.mark.parametrize("kind", ["flan-t5", "t5"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_equals_the_hand_registered_t5(kind, attn):
    gated = kind == "flan-t5"
    config = tf.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                         num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                         feed_forward_proj="gated-gelu" if gated else "relu",
                         tie_word_embeddings=not gated, decoder_start_token_id=0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(config).to(D).eval()
    g = torch.Generator().manual_seed(1)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        leaves = {"inputs_embeds": embed(torch.randint(3, 64, (2, 6), generator=g)),
                  "decoder_inputs_embeds": embed(torch.randint(3, 64, (2, 4), generator=g))}
    assert_equal_relevance(model, "t5", leaves, call, lambda o: o.logits[:, -1, 5])


MOE = {
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       head_dim=8, decoder_sparse_step=1, norm_topk_prob=True)),
}


@pytest.mark.parametrize("name", list(MOE))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_equals_the_hand_registered_moe_families(name, attn):
    config_cls, head, extra = MOE[name]
    config = config_cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                        initializer_range=0.2, **extra)
    config._attn_implementation = attn
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = head(config).to(D).eval()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        leaves = {"inputs_embeds": model.get_input_embeddings()(ids)}
    assert_equal_relevance(model, name, leaves, call, lambda o: o.logits[:, -1, 5])


VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_equals_the_hand_registered_clip(attn):
    config = tf.CLIPConfig(text_config=dict(TEXT, num_key_value_heads=None, eos_token_id=63,
                                            max_position_embeddings=16, projection_dim=16),
                           vision_config=dict(VISION, projection_dim=16), projection_dim=16)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = tf.CLIPModel(config).to(D).eval()
    ids = torch.tensor([[1, 7, 9, 12, 63]])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=D)
    assert_equal_relevance(model, "clip", {"pixel_values": pixels},
                           lambda m, xs: m(input_ids=ids, **xs), lambda o: o.logits_per_image)


@pytest.mark.parametrize("text", ["llama", "qwen2", "qwen3"])
def test_equals_the_hand_registered_llava(text):
    """LLaVA with a language model the family table knew (llama, qwen2) and with one it refused
    before (qwen3: its norm class was not in the table; the detection finds it)."""
    configs = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}
    image, features = 63, 16
    config = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION),
                            text_config=configs[text](**TEXT), image_token_id=image,
                            projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(config).to(D).eval()
    ids = torch.cat([torch.tensor([1]), torch.full((features,), image), torch.tensor([5, 9, 4])])
    with torch.no_grad():
        leaves = {"inputs_embeds": model.get_input_embeddings()(ids[None]),
                  "pixel_values": torch.randn(1, 3, 16, 16, dtype=D,
                                              generator=torch.Generator().manual_seed(1))}
    if text == "qwen3":  # the table of 0.2.0 did not know Qwen3's norm: add it for the reference
        HAND["llava"].append(("qwen3", "Qwen3RMSNorm", "rms"))
    try:
        assert_equal_relevance(model, "llava", leaves,
                               lambda m, xs: m(**xs, use_cache=False),
                               lambda o: o.logits[:, -1, 5])
    finally:
        HAND["llava"][3:] = []


def test_equals_the_torchvision_vit_family():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 2, 4, 32, 48, num_classes=3).to(D).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head with zeros
    assert composites.family_of(model) == "torchvision-vit"
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=D)
    assert_equal_relevance(model, "torchvision-vit", {"x": pixels},
                           lambda m, xs: m(xs["x"]), lambda o: o[:, 1], plain_pytorch=True)


def test_a_missing_norm_rule_is_seen():
    """The comparison can fail: the hand table without LLaMA's norm class (each norm seen op by
    op, as the old generic composite did) is far from the automatic composite."""
    fam = next(f for f in FAMILIES if f.name == "llama")
    model = fam.build()
    x, key = inputs(fam, model)
    saved = HAND["llama"]
    HAND["llama"] = []
    try:
        wrong = relevance(model, hand_composite("attnlrp", "llama"), {key: x}, call, score)[key]
    finally:
        HAND["llama"] = saved
    right = relevance(model, composites.get("attnlrp", model, family="auto"), {key: x}, call,
                      score)[key]
    assert float((wrong - right).abs().max() / right.abs().max()) > 1e-2


# ---------------------------------------------------------------------------- classify


class HandLayerNorm(nn.Module):
    """A LayerNorm written with mean and var, under a name that does not say so."""

    def __init__(self, width):
        super().__init__()
        self.gain, self.shift = nn.Parameter(torch.rand(width) + 0.5), nn.Parameter(
            torch.randn(width))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) \
            * self.gain + self.shift


class Scaler(nn.Module):
    """An RMS norm with a ``(1 + w)`` scale, written with pow / mean / rsqrt."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.w)


class Squash(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 3.0


class InverseStd(nn.Module):
    """The inverse standard deviation of each row: modeling code multiplies the input by it."""

    def forward(self, x):
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Gated(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x, gate=None):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return x if gate is None else x * gate


@pytest.mark.parametrize("module,kind", [
    (nn.LayerNorm(12), "layer"),
    (nn.RMSNorm(12), "rms"),
    (HandLayerNorm(12), "layer"),
    (Scaler(12), "rms"),
    (nn.LayerNorm(12, elementwise_affine=False), "layer"),
    (InverseStd(), "statistic"),
    (Squash(), "elementwise"),
    (nn.Tanh(), "elementwise"),
    (nn.Linear(12, 12), None),
    (nn.Softmax(-1), None),  # not element-wise, not scale-invariant
    (nn.GroupNorm(3, 12), None),  # normalises over groups of channels, not the last dimension
    (Gated(12), None),  # a second argument: not a one-input norm
])
def test_classify_from_the_module_itself(module, kind):
    assert detect.classify(module.to(D)) == kind
    assert detect.classify(module.float()) == kind


@pytest.mark.parametrize("module,cls,kind", [
    ("llama", "LlamaRMSNorm", "rms"), ("gemma2", "Gemma2RMSNorm", "rms"),
    ("t5", "T5LayerNorm", "rms"), ("olmo", "OlmoLayerNorm", "layer"),
    ("cohere", "CohereLayerNorm", "layer"),
])
def test_classify_transformers_norms(module, cls, kind):
    source = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    norm = getattr(source, cls)(24).to(D)
    for p in norm.parameters():  # trained weights are not all ones
        nn.init.normal_(p, 0.5, 0.2)
    assert detect.classify(norm) == kind


def test_a_statistic_module_is_held_constant():
    """``x * inverse_std(x)`` with the statistic held constant gives x the identity rule (the
    constant-std rule of an RMSNorm); seen op by op it would be a uniform product instead."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stat, self.proj = InverseStd(), nn.Linear(12, 3, bias=False)

        def forward(self, x):
            return self.proj(x * self.stat(x))

    model = Block().to(D)
    x = torch.randn(1, 12, dtype=D, generator=torch.Generator().manual_seed(0))
    got = relevance(model, composites.get("attnlrp", model), {"x": x}, lambda m, xs: m(xs["x"]),
                    lambda o: o[:, 1])["x"]
    h = x * InverseStd()(x)
    z = h @ model.proj.weight.T
    r_h = h * (model.proj.weight[1] * (z[:, 1:2] / (z[:, 1:2] + 1e-12 * z[:, 1:2].sign())))
    torch.testing.assert_close(got, r_h, rtol=1e-10, atol=0)  # the identity through the scaling


def test_saturated_tanh_is_not_a_norm():
    """tanh of a large input is ±1 whatever the scale: the probe must not call it a norm."""
    assert detect._norm_kind(nn.Tanh(), 12, D, torch.device("cpu"),
                           torch.Generator().manual_seed(0)) is None


def test_meta_weights_are_judged_by_name():
    with torch.device("meta"):
        norm = nn.RMSNorm(8)
        other = nn.Linear(8, 8)
    assert detect.classify(norm) == "rms" and detect.classify(other) is None


def test_a_users_norm_in_a_plain_model_takes_the_norm_rule():
    model = nn.Sequential(nn.Linear(6, 12), HandLayerNorm(12), nn.Linear(12, 2)).to(D)
    comp = composites.get("attnlrp", model)
    with comp.context(model):
        assert isinstance(model[1], rules.NormRule) and model[1].kind == "layer"
    assert type(model[1]) is HandLayerNorm


# ---------------------------------------------------------------------------- default


def opt(attn="eager"):
    config = tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                          num_attention_heads=4, max_position_embeddings=32,
                          word_embed_proj_dim=32, dropout=0.0)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return tf.OPTForCausalLM(config).to(D).eval()


def test_an_unregistered_type_takes_the_automatic_composite_with_one_warning():
    model = opt()
    assert composites.family_of(model) == "auto"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comp = composites.get("attnlrp", model)
    lines = [w for w in caught if issubclass(w.category, auto.AutoCompositeWarning)]
    assert len(lines) == 1 and "'opt'" in str(lines[0].message)
    assert "\n" not in str(lines[0].message)
    assert comp.strict and "auto" in comp.name
    ids = torch.tensor([[2, 5, 9, 11, 7]])
    with pytest.warns(auto.AutoCompositeWarning, match="'opt'"):
        e = lrp_explicit.explain(model, ids)
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert e.score == pytest.approx(float(logits.max()))
    assert torch.isfinite(torch.as_tensor(e.relevance)).all()
    assert lrp_explicit.check(model, ids, family="auto").ok


def test_registered_families_are_not_the_automatic_composite():
    model = next(f for f in FAMILIES if f.name == "llama").build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", auto.AutoCompositeWarning)
        comp = composites.get("attnlrp", model)
    assert comp.name == "attnlrp (llama)" and not comp.strict


def test_an_unruled_op_is_refused_naming_op_and_module():
    """Strict by default: a call without rule stops the forward with the op and the module."""
    model = opt()
    comp = composites.get("attnlrp", model, family="auto", ops={"softmax": None})
    ids = torch.tensor([[2, 5, 9]])
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    with comp.context(model):
        with pytest.raises(UnruledOpError, match=r"softmax.*self_attn"):
            model(inputs_embeds=x)
    plain = composites.get("attnlrp", model, family="auto", ops={"softmax": None}, strict=False)
    with plain.context(model), pytest.warns(lrp_explicit.errors.UnruledOpWarning):
        model(inputs_embeds=x)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_is_exact_under_the_automatic_composite(attn):
    model = opt(attn)
    ids = torch.tensor([[2, 5, 9, 11, 7], [2, 8, 3, 1, 6]])
    with torch.no_grad():
        plain = model(ids).logits
    for name in VARIANTS:
        with composites.get(name, model, family="auto").context(model):
            assert torch.equal(model(ids).logits, plain)


def _norm_relevance(norm, x, head):
    model = nn.Sequential(norm, head).to(D)
    comp = composites.get("attnlrp", model, family="generic")
    return relevance(model, comp, {"x": x}, lambda m, xs: m(xs["x"]), lambda o: o[:, 0])["x"]


@pytest.mark.parametrize("kind", ["hand", "nemotron"])
def test_a_layer_norm_of_another_form_takes_the_rule_of_its_own_affine_map(kind):
    """The LayerNorm rule needs the weight of the affine map after the normalisation: read from
    the module's own forward, not from an attribute (a user's ``gain``, Nemotron's ``1 + w``).
    The reference is ``nn.LayerNorm`` holding that effective weight and bias."""
    torch.manual_seed(0)
    width = 12
    if kind == "hand":
        norm = HandLayerNorm(width)
        weight, bias = norm.gain.detach(), norm.shift.detach()
    else:
        from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

        norm = NemotronLayerNorm1P(width, dtype=D)
        nn.init.normal_(norm.weight, 0.0, 0.3)
        nn.init.normal_(norm.bias, 0.0, 0.3)
        weight, bias = norm.weight.detach() + 1, norm.bias.detach()
    reference = nn.LayerNorm(width, eps=1e-5, dtype=D)
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    head = nn.Linear(width, 2, bias=False, dtype=D)
    norm = norm.to(D)
    x = torch.randn(3, width, dtype=D, generator=torch.Generator().manual_seed(1))
    got = _norm_relevance(norm, x, head)
    want = _norm_relevance(reference, x, head)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    plain = nn.LayerNorm(width, dtype=D)  # the raw weight would be wrong: the test can fail
    with torch.no_grad():
        plain.weight.copy_(weight - 1 if kind == "nemotron" else torch.ones(width))
        plain.bias.copy_(bias)
    assert (_norm_relevance(plain, x, head) - want).abs().max() > 1e-3


def test_a_channels_first_layer_norm_is_refused_by_name():
    class ChannelsFirst(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.transpose(1, -1)).transpose(1, -1)

    model = nn.Sequential(nn.Conv2d(3, 6, 1), ChannelsFirst(6), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 2)).to(D)
    x = torch.randn(1, 3, 4, 4, dtype=D)
    comp = composites.get("attnlrp", model)
    with comp.context(model), pytest.raises(lrp_explicit.CompositeError,
                                            match=r"ChannelsFirst normalises over \(6,\)"):
        model(x.requires_grad_())
