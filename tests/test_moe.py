"""Mixture-of-Experts families (Mixtral, Qwen3-MoE) and the op rules their experts need.

The MoE block runs through the op table: router ``F.linear`` (ε), softmax (Gradient×Input, or
held constant in CP-LRP), ``topk``, ``w / Σw`` (denominator constant), the experts (ε-linear,
gate product, routing-weight product) and their per-token sum: ``index_add_`` in the "eager"
experts, ``torch._grouped_mm`` + an ε-sum in the default "grouped_mm", ``torch.bmm`` + an ε-sum
in "batched_mm". Float64 checks use "eager" (the grouped kernel has no float64), "batched_mm"
and transformers' own grouped fallback op; the default implementation is checked in float32
and bfloat16 against the float64 relevance of the same weights.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from lrp_explicit import composites
from lrp_explicit import ops
from gxi import reference_relevance

D = torch.float64
EPS = 1e-12
VARIANTS = ["attnlrp", "cp-lrp"]
SIZE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, initializer_range=0.2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mixtral": (tf.MixtralConfig, "Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (tf.Qwen3MoeConfig, "Qwen3Moe",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       head_dim=8, decoder_sparse_step=1, norm_topk_prob=True)),
}
NAMES = list(FAMILIES)


def moe_integration(feature: str | None = None):
    """transformers' MoE integration (pluggable experts implementations, transformers 5), or a
    skip where this release lacks it or its ``feature``: in transformers 4 the experts are a
    list of MLP modules (the eager path, tested above), and the grouped-mm fallback op came
    after 5.0."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:
        pytest.skip(f"transformers {tf.__version__} has no experts implementations "
                    "(transformers 5)")
    if feature is not None and not hasattr(moe, feature):
        pytest.skip(f"transformers {tf.__version__}: the MoE integration has no {feature}")
    return moe


def build(name, attn="eager", experts="eager", dtype=D, head="ForCausalLM", **extra):
    """A tiny random model; ``experts=None`` keeps transformers' default implementation."""
    config_cls, prefix, moe = FAMILIES[name]
    config = config_cls(**SIZE, **{**moe, **extra})
    config._attn_implementation = attn
    if experts is not None:
        config._experts_implementation = experts
    torch.manual_seed(0)
    return getattr(tf, prefix + head)(config).to(dtype).eval()


def inputs(model, batch=2, length=6):
    ids = torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(1))
    return model.get_input_embeddings()(ids).detach()


def score(output):
    return output[0][:, -1, 5]


def explain(model, x, variant, **options):
    comp = composites.get(variant, model, strict=True, **options)
    with comp.context(model):
        xx = x.detach().clone().requires_grad_(True)
        output = model(inputs_embeds=xx)
        y = score(output)
        y.backward(y.detach())
    return xx.grad, output[0].detach(), y.detach(), comp


def relative_error(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# -------------------------------------------------------------------------------- the op rules


def s(z):
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("form", ["torch", "method"])
def test_index_add_is_an_epsilon_sum(form):
    a, src = leaves(torch.randn(4, 3, dtype=D), torch.randn(5, 3, dtype=D))
    index = torch.tensor([0, 2, 2, 3, 0])  # repeated rows sum several contributions
    with composites.get("attnlrp", strict=True).op_rules():
        if form == "torch":
            z = torch.index_add(a, 0, index, src, alpha=2.0)
        else:
            z = a.index_add(0, index, src, alpha=2.0)
    assert torch.equal(z, torch.index_add(a.detach(), 0, index, src.detach(), alpha=2.0))
    relevance = torch.randn_like(z)
    z.backward(relevance)
    g = relevance / s(z.detach())
    torch.testing.assert_close(a.grad, a.detach() * g, rtol=1e-12, atol=0)
    torch.testing.assert_close(src.grad, 2.0 * src.detach() * g[index], rtol=1e-12, atol=0)
    # conservation: every unit of relevance lands on exactly one contribution
    total = a.grad.sum() + src.grad.sum()
    assert abs(float(total - relevance.sum())) < 1e-9 * float(relevance.abs().sum())


def test_index_add_along_another_dim_with_a_constant_operand():
    a, src = torch.randn(3, 4, dtype=D), leaves(torch.randn(3, 2, dtype=D))[0]
    index = torch.tensor([3, 1])
    with composites.get("attnlrp", strict=True).op_rules():
        z = a.index_add(1, index, src)
    relevance = torch.randn_like(z)
    z.backward(relevance)
    g = relevance / s(z.detach())
    torch.testing.assert_close(src.grad, src.detach() * g[:, index], rtol=1e-12, atol=0)


def test_index_add_inplace_loop_conserves_like_the_experts():
    """``final.index_add_(0, tokens, out)`` per expert into zeros: the contributions share the
    relevance of each token in proportion (one flat ε-sum), and nothing is lost or doubled."""
    tokens, hidden = 5, 3
    parts = [(torch.tensor([0, 1, 3]), torch.randn(3, hidden, dtype=D)),
             (torch.tensor([1, 2, 4]), torch.randn(3, hidden, dtype=D)),
             (torch.tensor([0, 2, 3, 4]), torch.randn(4, hidden, dtype=D))]
    sources = leaves(*(p for _, p in parts))
    with composites.get("attnlrp", strict=True).op_rules():
        final = torch.zeros(tokens, hidden, dtype=D)
        for (index, _), src in zip(parts, sources):
            final.index_add_(0, index, src)
        out = final * 1.0  # a later op reads the updated tensor
    expected = torch.zeros(tokens, hidden, dtype=D)
    for index, p in parts:
        expected.index_add_(0, index, p)
    assert torch.equal(out, expected)
    relevance = torch.randn_like(out)
    out.backward(relevance)
    g = relevance / s(expected)
    for (index, p), src in zip(parts, sources):
        torch.testing.assert_close(src.grad, p * g[index], rtol=1e-9, atol=1e-12)
    total = sum(src.grad.sum() for src in sources)
    assert abs(float(total - relevance.sum())) < 1e-9 * float(relevance.abs().sum())


def test_index_add_inplace_on_a_path_tensor():
    a, src = leaves(torch.randn(4, 3, dtype=D), torch.randn(2, 3, dtype=D))
    index = torch.tensor([1, 1])
    with composites.get("attnlrp", strict=True).op_rules():
        z = a * 1.0
        z.index_add_(0, index, src, alpha=-1.0)
        z.index_add_(0, index, src)  # updated again: the first call's saved output must hold
    relevance = torch.randn_like(z)
    z.backward(relevance)
    total = a.grad.sum() + src.grad.sum()
    assert abs(float(total - relevance.sum())) < 1e-9 * float(relevance.abs().sum())


def test_chained_inplace_adds():
    a, b = leaves(torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D))
    with composites.get("attnlrp", strict=True).op_rules():
        z = a * 1.0
        z += b
        z += b
    relevance = torch.randn_like(z)
    z.backward(relevance)
    g = relevance / s(z.detach())
    torch.testing.assert_close(a.grad, a.detach() * g, rtol=1e-9, atol=0)
    torch.testing.assert_close(b.grad, 2 * b.detach() * g, rtol=1e-9, atol=1e-15)


def _grouped_case(dtype):
    x = torch.randn(12, 8, dtype=dtype)
    w = torch.randn(3, 8, 4, dtype=dtype)
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)  # the second group is empty
    return x, w, offs


def _grouped_expected(x, w, offs, relevance, z):
    g = relevance / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0).to(z.dtype))
    r, start = torch.zeros_like(x), 0
    for i, end in enumerate(offs.tolist()):
        r[start:end] = x[start:end] * (g[start:end] @ w[i].mT)
        start = end
    return r


@pytest.mark.parametrize("op", ["torch._grouped_mm", "transformers fallback"])
def test_grouped_mm_is_the_epsilon_rule_of_its_input(op):
    if op == "torch._grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("torch without _grouped_mm")
        func, dtype = (lambda a, b, o: torch._grouped_mm(a, b, offs=o)), torch.float32
    else:
        moe_integration()  # importing it registers the op
        if not hasattr(torch.ops.transformers, "grouped_mm_fallback"):
            pytest.skip(f"transformers {tf.__version__} has no grouped_mm_fallback op")
        ops.name_transformers_ops()
        func, dtype = torch.ops.transformers.grouped_mm_fallback, D
    x, w, offs = _grouped_case(dtype)
    xx = x.clone().requires_grad_(True)
    with composites.get("attnlrp", strict=True, epsilon=1e-6).op_rules():
        z = func(xx, w, offs)
    assert torch.equal(z, func(x, w, offs))
    relevance = torch.randn_like(z)
    z.backward(relevance)
    expected = _grouped_expected(x.double(), w.double(), offs, relevance.double(),
                                 z.detach().double())
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    assert relative_error(xx.grad.double(), expected) < tolerance


# ------------------------------------------------------------------------------- the families


@pytest.mark.parametrize("name", NAMES)
def test_every_head_is_found_and_runs_exactly(name):
    for head in ["Model", "ForSequenceClassification", "ForTokenClassification"]:
        model = build(name, head=head)
        assert composites.family_of(model) == name
        x = inputs(model)
        plain = model(inputs_embeds=x)[0]
        for variant in VARIANTS:
            with composites.get(variant, model, strict=True).context(model):
                out = model(inputs_embeds=x.clone().requires_grad_())[0]
                assert torch.equal(out, plain), f"{head} {variant}"
                out.sum().backward()
        assert torch.equal(model(inputs_embeds=x)[0], plain)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_equivalence_with_modified_gradient_x_input(name, attn, variant):
    model = build(name, attn=attn)
    x = inputs(model)
    plain = model(inputs_embeds=x)[0]
    relevance, out, y, comp = explain(model, x, variant)
    assert torch.equal(out, plain)  # exact forward with the composite registered
    assert not comp.unruled  # strict mode raised nothing
    reference = reference_relevance(model, variant, x, score)
    assert torch.isfinite(relevance).all()
    assert relative_error(relevance, reference) < 1e-6
    if variant == "cp-lrp":  # bias-free model, routing weights constant: relevance conserved
        assert abs(float(relevance.sum() - y.sum())) < 1e-6 * float(y.abs().sum())
    assert torch.equal(model(inputs_embeds=x)[0], plain)  # remove() restored the forward


@pytest.fixture
def grouped_fallback(monkeypatch):
    """Make transformers' grouped experts use its own fallback op (which takes float64)."""
    moe = moe_integration("_can_use_grouped_mm")
    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *args: False)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("experts", ["batched_mm", "grouped_mm (fallback op)"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_other_experts_implementations_in_float64(name, experts, variant, request):
    if experts.startswith("grouped_mm"):
        request.getfixturevalue("grouped_fallback")
        experts = "grouped_mm"
    moe_integration()
    model = build(name, experts=experts)
    assert model.config._experts_implementation == experts
    x = inputs(model)
    plain = model(inputs_embeds=x)[0]
    relevance, out, _, comp = explain(model, x, variant)
    assert torch.equal(out, plain) and not comp.unruled
    reference = reference_relevance(model, variant, x, score)
    assert relative_error(relevance, reference) < 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_default_experts_implementation_correlates_with_float64(name, variant):
    moe_integration()
    exact_model = build(name)
    x = inputs(exact_model)
    exact = explain(exact_model, x, variant)[0]
    for dtype in (torch.float32, torch.bfloat16):
        model = build(name, experts=None, dtype=torch.float32)
        assert model.config._experts_implementation == "grouped_mm"  # transformers' default
        model.load_state_dict(exact_model.state_dict())
        model = model.to(dtype)
        xx = x.to(dtype)
        plain = model(inputs_embeds=xx)[0]
        # bfloat16 keeps the default ε of bfloat16 (1e-2); the float64 relevance it is compared
        # with takes the same ε, so that the test measures precision, not the choice of ε
        options = {"epsilon": 1e-2} if dtype == torch.bfloat16 else {}
        low, out, _, comp = explain(model, xx, variant, **options)
        assert torch.equal(out, plain) and not comp.unruled
        assert torch.isfinite(low).all()
        target = exact if not options else explain(exact_model, x, variant, **options)[0]
        assert pearson(low, target) >= 0.95, dtype
        assert pearson(low.sum(-1), target.sum(-1)) >= 0.95, dtype
        if dtype == torch.float32:
            reference = reference_relevance(model, variant, xx, score)
            assert relative_error(low, reference) < 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_float16_default_experts_is_exact_and_finite(name):
    model = build(name, experts=None, dtype=torch.float16)
    x = inputs(model)
    plain = model(inputs_embeds=x)[0]
    for variant in VARIANTS:
        relevance, out, _, comp = explain(model, x, variant)
        assert torch.equal(out, plain) and not comp.unruled
        assert torch.isfinite(relevance).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_qwen3_moe_without_renormalisation_and_with_a_dense_layer(variant):
    model = build("qwen3_moe", norm_topk_prob=False, mlp_only_layers=[1])
    assert type(model.model.layers[1].mlp).__name__ == "Qwen3MoeMLP"
    x = inputs(model)
    relevance, _, _, comp = explain(model, x, variant)
    assert not comp.unruled
    reference = reference_relevance(model, variant, x, score)
    assert relative_error(relevance, reference) < 1e-6


def test_variants_differ():
    model = build("mixtral")
    x = inputs(model)
    assert relative_error(explain(model, x, "attnlrp")[0], explain(model, x, "cp-lrp")[0]) > 1e-2


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_recomputes_the_experts_under_the_rules(name):
    model = build(name)
    x = inputs(model)
    expected = explain(model, x, "attnlrp")[0]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    comp = composites.get("attnlrp", model, strict=True)
    with comp.context(model):
        model.train()  # transformers checkpoints only in training mode (dropout is 0 here)
        xx = x.clone().requires_grad_(True)
        y = score(model(inputs_embeds=xx))
        y.backward(y.detach())
    assert torch.equal(xx.grad, expected)


def test_unsupported_experts_implementations_are_refused():
    import transformers as tf

    from lrp_explicit import composites

    config = tf.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                              num_local_experts=4, num_experts_per_tok=2)
    model = tf.MixtralForCausalLM(config)
    model.config._experts_implementation = "sonicmoe"
    with pytest.raises(NotImplementedError, match="sonicmoe"):
        composites.get("attnlrp", model).register(model)
    assert composites.carrier(model) is None  # nothing was changed
