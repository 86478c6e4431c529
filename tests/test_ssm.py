"""State-space and linear-attention layers under MambaLRP (Rezaei Jafari et al., NeurIPS 2024):
Mamba and Falcon-Mamba (``MambaMixer``, sequential scan), Mamba 2 (chunked SSD), Qwen3-Next and
Qwen3.5 (gated delta-net, chunked), built from tiny float64 configs with the stock transformers
classes.

Shown: the family is found and the parameters are held where they are made; the forward under
both composites is bit-exact; CP-LRP with every bias zeroed conserves the explained logit; the
relevance equals the independent MambaLRP-modified Gradient×Input of ``tests/gxi_ssm.py``, also
for a one-token decode step with a cache (the recurrent paths); ``lrp_explicit.check`` is clean
in strict mode; the generic composite (no parameters held) gives a different relevance.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf

import lrp_explicit
from lrp_explicit import composites
from lrp_explicit.audit.bias import zero_bias
from lrp_explicit.rules import NormRule, Rule, StopRule
from lrp_explicit.rules.ssm import GatedNormRule, HeldParametersRule
from gxi_ssm import Float64Inside, reference_relevance

VARIANTS = ["attnlrp", "cp-lrp"]
VOCAB = 61


def _mamba():
    return tf.MambaForCausalLM(tf.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
        intermediate_size=64, conv_kernel=4, time_step_rank=4, residual_in_fp32=False))


def _falcon_mamba():
    return tf.FalconMambaForCausalLM(tf.FalconMambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
        intermediate_size=64, conv_kernel=4, time_step_rank=4, residual_in_fp32=False))


def _mamba2():
    return tf.Mamba2ForCausalLM(tf.Mamba2Config(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
        head_dim=16, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=4, time_step_rank=4,
        residual_in_fp32=False))


def _qwen3_next():
    config = tf.Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"])
    config._experts_implementation = "eager"  # grouped_mm takes no float64
    config._attn_implementation = "eager"
    return tf.Qwen3NextForCausalLM(config)


def _qwen3_5():
    config = tf.Qwen3_5TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention"])
    config._attn_implementation = "eager"
    return tf.Qwen3_5ForCausalLM(config)


def _eager(config, model_class):
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # grouped_mm takes no float64
    return model_class(config)


def _jamba():  # layer 0: Mamba mixer, layer 1: attention with a MoE
    return _eager(tf.JambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4), tf.JambaForCausalLM)


_MAMBA2_HYBRID = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
                      mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4)


def _bamba():
    return _eager(tf.BambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, attn_layer_indices=[1], **_MAMBA2_HYBRID),
        tf.BambaForCausalLM)


def _granitemoehybrid():
    return _eager(tf.GraniteMoeHybridConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
        num_experts_per_tok=1, shared_intermediate_size=16, layer_types=["mamba", "attention"],
        **_MAMBA2_HYBRID), tf.GraniteMoeHybridForCausalLM)


def _nemotron_h():  # Mamba 2 mixer, attention, MLP
    return _eager(tf.NemotronHConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, hybrid_override_pattern="M*-",
        mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8, conv_kernel=4,
        expand=2, chunk_size=4), tf.NemotronHForCausalLM)


def _zamba2():
    return _eager(tf.Zamba2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, attention_head_dim=16, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, mamba_headdim=16, n_mamba_heads=4,
        chunk_size=4, layers_block_type=["mamba", "hybrid"], hybrid_layer_ids=[1],
        use_mem_rope=False), tf.Zamba2ForCausalLM)


def _falcon_h1():  # µP multipliers on in_proj's sections; a gated norm (mamba_rms_norm)
    return _eager(tf.FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, mamba_d_ssm=64,
        mamba_rms_norm=True, **_MAMBA2_HYBRID), tf.FalconH1ForCausalLM)


def _zamba():  # per-head x_proj weights; two hybrid layers share one transformer block
    return _eager(tf.ZambaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, attention_hidden_size=64,
        attention_head_dim=32, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        n_mamba_heads=2, layers_block_type=["linear_attention", "hybrid", "hybrid"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2), tf.ZambaForCausalLM)


_DELTA_MOE = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
    linear_value_head_dim=8, linear_conv_kernel_dim=4,
    layer_types=["linear_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
    eos_token_id=2)


def _qwen3_5_moe():
    return _eager(tf.Qwen3_5MoeTextConfig(**_DELTA_MOE), tf.Qwen3_5MoeForCausalLM)


def _lara_mini():
    return _eager(tf.LaraMiniConfig(**_DELTA_MOE), tf.LaraMiniForCausalLM)


def _olmo_hybrid():
    return _eager(tf.OlmoHybridConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        tf.OlmoHybridForCausalLM)


BUILDERS = {"mamba": _mamba, "falcon_mamba": _falcon_mamba, "mamba2": _mamba2,
            "qwen3_next": _qwen3_next, "qwen3_5": _qwen3_5, "jamba": _jamba, "bamba": _bamba,
            "granitemoehybrid": _granitemoehybrid, "nemotron_h": _nemotron_h, "zamba2": _zamba2,
            "falcon_h1": _falcon_h1, "olmo_hybrid": _olmo_hybrid, "zamba": _zamba,
            "qwen3_5_moe": _qwen3_5_moe, "lara_mini": _lara_mini}
FAMILY = {"mamba": "mamba", "falcon_mamba": "mamba", "mamba2": "mamba2",
          "qwen3_next": "qwen3_next", "qwen3_5": "qwen3_next", "jamba": "jamba", "bamba": "bamba",
          "granitemoehybrid": "granitemoehybrid", "nemotron_h": "nemotron_h", "zamba2": "zamba2",
          "falcon_h1": "falcon_h1", "olmo_hybrid": "olmo_hybrid", "zamba": "zamba",
          "qwen3_5_moe": "qwen3_next", "lara_mini": "lara_mini"}
#: how many mixers each model has, and whether they end in a gated norm
MIXER_COUNT = {"qwen3_next": 1, "qwen3_5": 1, "jamba": 1, "bamba": 1, "granitemoehybrid": 1,
               "nemotron_h": 1, "zamba2": 2, "olmo_hybrid": 1, "zamba": 3, "qwen3_5_moe": 1,
               "lara_mini": 1}
GATED = {"mamba2", "qwen3_next", "qwen3_5", "bamba", "granitemoehybrid", "nemotron_h", "zamba2",
         "falcon_h1", "olmo_hybrid", "qwen3_5_moe", "lara_mini"}
#: The stock modeling code computes parts of each layer in float32 whatever the model's dtype
#: (Mamba's discretised input ``hidden_states.float()``, Mamba 2's chunked scan, the gated
#: delta rule, the residual stream where ``residual_in_fp32``), so relevance passing there is
#: rounded to float32 (2⁻²⁴ ≈ 6e-8 relative per element; Σ|R| is about 8 × |ΣR| here):
#: conservation of the stock models is bounded by that, exact conservation is shown with those
#: casts kept in float64 (:class:`Float64Inside`).
STOCK_CONSERVATION = 1e-6


#: The ε of the ε-rules moves relevance by about ε/|z| where a sum z comes near zero; in this
#: Qwen3.5 model (CP-LRP) the default ε (1e-12) moves it by 1.2e-7 in float64 (1e-15 at
#: ε = 1e-20), which float32 rounding then lifts past 1e-6, so it is compared at a smaller ε.
EPSILON = {"qwen3_5": 1e-20}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BUILDERS[name]().to(torch.float64).eval()
    with torch.no_grad():  # a spread of inputs, not the tiny initialisation only
        for param_name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in param_name:
                param.normal_(0.0, 0.3)
    return model


def embeddings(model, length: int = 11, batch: int = 1, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return model.get_input_embeddings()(ids).detach()


def score(output) -> torch.Tensor:
    """The largest logit at the last position, one per sample."""
    return output.logits[:, -1].max(-1).values


def explain(model, x, variant, family=None, epsilon=None):
    options = {"family": family} if family else {}
    comp = composites.get(variant, model, strict=True, epsilon=epsilon, **options)
    with comp.context(model):
        x = x.clone().requires_grad_(True)
        output = model(inputs_embeds=x, use_cache=False)
        y = score(output)
        y.backward(y.detach())
    return x.grad, output, y.detach(), comp


def relative_error(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_is_found_and_mixers_are_held(name):
    model = build(name)
    assert composites.family_of(model) == FAMILY[name]
    comp = composites.get("cp-lrp", model)
    x = embeddings(model)
    with comp.context(model):
        model(inputs_embeds=x.requires_grad_(), use_cache=False)
        # single-input norms are found by the automatic detector (no family entry)
        norms = [m for m in model.modules()
                 if isinstance(m, Rule) and type(m.module).__name__.endswith("RMSNorm")]
        assert norms and all(isinstance(m, NormRule) for m in norms)
        mixers = [m for m in model.modules() if isinstance(m, HeldParametersRule)]
        assert len(mixers) == MIXER_COUNT.get(name, 2)
        for mixer in mixers:
            children = mixer.child_rules()
            for held in mixer.held.children:
                assert isinstance(children[held], StopRule)
            if name in GATED:
                norm = children["o_norm" if name == "olmo_hybrid" else "norm"]
                assert isinstance(norm, GatedNormRule) and norm.hold_gate  # CP-LRP


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_is_bit_exact(name, variant):
    model = build(name)
    x = embeddings(model, batch=2)
    plain = model(inputs_embeds=x, use_cache=False).logits
    _, output, _, _ = explain(model, x, variant)
    assert torch.equal(output.logits, plain)
    assert torch.equal(model(inputs_embeds=x, use_cache=False).logits, plain)  # removed cleanly


def conservation_error(model, x, float64_inside: bool) -> float:
    with zero_bias(model):
        if float64_inside:
            with Float64Inside():
                relevance, output, y, comp = explain(model, x, "cp-lrp")
            assert output.logits.dtype == torch.float64
        else:
            relevance, _, y, comp = explain(model, x, "cp-lrp")
    assert not comp.unruled
    return abs(float(relevance.sum() - y.sum())) / abs(float(y.sum()))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_cp_lrp_conserves_the_logit_without_biases(name):
    model = build(name)
    x = embeddings(model, batch=2)
    assert conservation_error(model, x, float64_inside=True) < 1e-8
    assert conservation_error(model, x, float64_inside=False) < STOCK_CONSERVATION


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_equal_to_mambalrp_modified_gradient_x_input(name, variant):
    model = build(name)
    x = embeddings(model, batch=2)
    relevance, _, _, comp = explain(model, x, variant, epsilon=EPSILON.get(name))
    reference = reference_relevance(model, variant, x, score, use_cache=False)
    assert torch.isfinite(relevance).all() and not comp.unruled
    assert relative_error(relevance, reference) < 1e-6


@pytest.mark.parametrize("name", ["mamba", "mamba2", "qwen3_next"])
def test_generic_composite_does_not_hold_the_parameters(name):
    """Without the family knowledge Δ, B, C (or β, g) take relevance: a different explanation."""
    model = build(name)
    x = embeddings(model)
    reference = reference_relevance(model, "cp-lrp", x, score, use_cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generic, _, _, _ = explain(model, x, "cp-lrp", family="generic")
    assert relative_error(generic, reference) > 1e-3


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_check_is_clean_in_strict_mode(name, variant):
    model = build(name)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    result = lrp_explicit.check(model, ids, variant, strict=True)
    assert result.ok, result


def _decode_step(model, prefix, leaf):
    """One token after a cached prefix: the recurrent paths (``mamba_selective_state_update``,
    ``mamba2_selective_state_update``, ``torch_recurrent_gated_delta_rule``); the cached state
    is a constant that absorbs its share."""
    with torch.no_grad():
        first = model(inputs_embeds=prefix, use_cache=True)
    key = "cache" if "cache" in first else "past_key_values"
    return model(inputs_embeds=leaf, use_cache=True, **{key: first[key]})


@pytest.mark.parametrize("name", ["mamba", "mamba2", "qwen3_next"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step_with_a_cache(name, variant):
    model = build(name)
    x = embeddings(model, length=6, batch=2)
    prefix, last = x[:, :-1], x[:, -1:]
    plain = _decode_step(model, prefix, last).logits
    comp = composites.get(variant, model, strict=True)
    with comp.context(model):
        leaf = last.clone().requires_grad_(True)
        output = _decode_step(model, prefix, leaf)
        y = score(output)
        y.backward(y.detach())
    assert torch.equal(output.logits, plain) and not comp.unruled
    reference = reference_relevance(model, variant, last, score,
                                    run=lambda m, leaf: _decode_step(m, prefix, leaf))
    assert relative_error(leaf.grad, reference) < 1e-6


def test_solve_triangular_is_linear_in_its_right_hand_side():
    """``X = U⁻¹ V`` with ``U`` held constant: ``R_V = V ⊙ U⁻ᵀ (R ⊘ X)`` (the ε-rule of a linear
    map, by hand), nothing to ``U`` though it is on the relevance path."""
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(2, 6, 6, generator=generator, dtype=torch.float64).tril(-1) \
        + torch.eye(6, dtype=torch.float64)
    v = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    relevance = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    u_leaf, v_leaf = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    for variant in VARIANTS:
        u_leaf.grad = v_leaf.grad = None
        with composites.get(variant, _mamba()).op_rules():
            x = torch.linalg.solve_triangular(u_leaf, v_leaf, upper=False, unitriangular=True)
        assert torch.equal(x, torch.linalg.solve_triangular(u, v, upper=False, unitriangular=True))
        x.backward(relevance)
        expected = v * torch.linalg.solve_triangular(u.mT, relevance / x.detach(), upper=True,
                                                     unitriangular=True)
        assert u_leaf.grad is None
        assert torch.allclose(v_leaf.grad, expected, rtol=1e-9, atol=1e-12)
        assert abs(float(v_leaf.grad.sum() - relevance.sum())) < 1e-9 * float(relevance.abs().sum())


@pytest.mark.parametrize("name", ["mamba", "mamba2", "qwen3_next"])
def test_float32_relevance_is_close_to_float64(name):
    """The rules are dtype-agnostic: a float32 model gives the float64 relevance to float32
    precision (measured ≤ 8e-7 of the largest relevance)."""
    reference, *_ = explain(build(name), embeddings(build(name)), "cp-lrp")
    model = build(name).to(torch.float32)
    x = embeddings(model)
    relevance, output, _, _ = explain(model, x, "cp-lrp")
    assert torch.equal(output.logits, model(inputs_embeds=x, use_cache=False).logits)
    assert relative_error(relevance.double(), reference) < 1e-5


@pytest.mark.parametrize("family", [None, "auto"])
def test_an_unknown_mixer_is_refused_before_any_work(family):
    """A mixer class the family knowledge does not list (here a subclass, whose forward may
    differ) would let its parameters take relevance silently: registration refuses it, by the
    family's composite and by the automatic one."""
    model = build("mamba")
    mixer = model.backbone.layers[1].mixer
    mixer.__class__ = type("CustomMixer", (type(mixer),), {})
    plain = model(inputs_embeds=embeddings(model), use_cache=False).logits
    with pytest.raises(NotImplementedError, match="CustomMixer"):
        composites.get("attnlrp", model, family=family).register(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    assert torch.equal(model(inputs_embeds=embeddings(model), use_cache=False).logits, plain)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_automatic_composite_equals_the_family(name, variant):
    """``family="auto"`` holds the mixers' parameters as the family does (float64, 1e-10)."""
    model = build(name)
    x = embeddings(model, batch=2)
    family, _, _, _ = explain(model, x, variant)
    automatic, _, _, comp = explain(model, x, variant, family="auto")
    assert "auto" in comp.name
    assert relative_error(automatic, family) <= 1e-10
