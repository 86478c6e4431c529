"""Module-level rules and the registry."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrp_explicit
from lrp_explicit import composites, rules
from lrp_explicit import functional as lf

D = torch.float64


def s(z, eps=1e-12):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def relevance_through(module, *inputs, relevance=None):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = module(*leaves)
    relevance = torch.randn_like(out) if relevance is None else relevance
    out.backward(relevance)
    return out.detach(), [leaf.grad for leaf in leaves], relevance


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module.double()


def test_epsilon_rule_on_linear():
    lin = frozen(nn.Linear(4, 3))
    x = torch.randn(2, 4, dtype=D)
    out, (grad,), r = relevance_through(rules.EpsilonRule(lin), x)
    assert torch.equal(out, lin(x))
    assert torch.allclose(grad, x * ((r / s(out)) @ lin.weight), rtol=1e-12)


def test_epsilon_rule_on_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = frozen(Conv1D(3, 4))
    conv.bias.normal_()
    x = torch.randn(2, 5, 4, dtype=D)
    out, (grad,), r = relevance_through(rules.EpsilonRule(conv), x)
    assert torch.equal(out, conv(x))
    assert torch.allclose(grad, x * ((r / s(out)) @ conv.weight.T), rtol=1e-12)


def test_epsilon_rule_fallback_on_conv2d_uses_the_vjp():
    conv = frozen(nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 5, 5, dtype=D)
    out, (grad,), r = relevance_through(rules.EpsilonRule(conv), x)
    assert torch.equal(out, conv(x))
    expected = x * torch.nn.grad.conv2d_input(x.shape, conv.weight, r / s(out), padding=1)
    assert torch.allclose(grad, expected, rtol=1e-10)


class Product(nn.Module):
    def forward(self, a, b):
        return a @ b


class Gate(nn.Module):
    def forward(self, a, b):
        return a * b


def test_uniform_epsilon_rule_on_a_bilinear_module():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(4, 2, dtype=D)
    out, (ga, gb), r = relevance_through(rules.UniformEpsilonRule(Product()), a, b)
    g = r / s(out)
    assert torch.allclose(ga, 0.5 * a * (g @ b.T), rtol=1e-12)
    assert torch.allclose(gb, 0.5 * b * (a.T @ g), rtol=1e-12)


def test_uniform_rule_splits_equally():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    out, (ga, gb), r = relevance_through(rules.UniformRule(Gate()), a, b)
    assert torch.equal(ga, r / 2) and torch.equal(gb, r / 2)


def test_identity_and_softmax_rules():
    x = torch.randn(3, 4, dtype=D)
    out, (grad,), r = relevance_through(rules.IdentityRule(nn.GELU()), x)
    assert torch.equal(out, F.gelu(x)) and torch.equal(grad, r)
    out, (grad,), r = relevance_through(rules.SoftmaxRule(nn.Softmax(dim=-1)), x)
    sm = torch.softmax(x, -1)
    assert torch.equal(out, sm)
    assert torch.allclose(grad, x * (r - sm * r.sum(-1, keepdim=True)), rtol=1e-12)


class GemmaStyleRMSNorm(nn.Module):
    """An RMSNorm-like module with the (1 + w) scale, written as model code writes it."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class MyLayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.bias = nn.Parameter(torch.randn(dim))
        self.variance_epsilon = 1e-5

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.variance_epsilon) * self.weight + self.bias


@pytest.mark.parametrize("norm", [nn.RMSNorm(6), GemmaStyleRMSNorm(6)])
def test_norm_rule_rms(norm):
    norm = frozen(norm)
    rule = rules.NormRule(norm)
    assert rule.kind == "rms"
    x = torch.randn(2, 6, dtype=D)
    out, (grad,), r = relevance_through(rule, x)
    assert torch.equal(out, norm(x))
    assert torch.allclose(grad, r, rtol=1e-10)


@pytest.mark.parametrize("norm", [nn.LayerNorm(6), MyLayerNorm(6)])
def test_norm_rule_layer(norm):
    norm = frozen(norm)
    rule = rules.NormRule(norm)
    assert rule.kind == "layer"
    x = torch.randn(2, 6, dtype=D)
    out, (grad,), r = relevance_through(rule, x)
    assert torch.equal(out, norm(x))
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    g = r / s(out) * norm.weight / sigma
    assert torch.allclose(grad, x * (g - g.mean(-1, keepdim=True)), rtol=1e-9)


def test_stop_and_pass_rules():
    lin = frozen(nn.Linear(4, 4))
    x = torch.randn(2, 4, dtype=D, requires_grad=True)
    out = rules.StopRule(lin)(x)
    assert torch.equal(out, lin(x)) and not out.requires_grad
    out, (grad,), r = relevance_through(rules.PassRule(lin), x.detach())
    assert torch.allclose(grad, r @ lin.weight)  # plain autograd: the gradient


def test_epsilon_from_composite_reaches_the_rules():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    comp = composites.get("attnlrp", model, epsilon=0.5)
    with comp.context(model):
        assert model[0].epsilon == 0.5 and comp.epsilon == 0.5
        x = torch.randn(4, 3, dtype=D, requires_grad=True)
        out = model(x)
        out.backward(out.detach())
    assert comp.strict is False
    # with a large ε relevance is visibly absorbed
    assert not torch.allclose(x.grad.sum(), out.sum(), rtol=1e-3)


def test_rule_with_its_own_epsilon_keeps_it():
    model = nn.Sequential(nn.Linear(3, 3)).double()
    comp = lrp_explicit.Composite({nn.Linear: functools.partial(rules.EpsilonRule, epsilon=0.1)},
                                  epsilon=0.5)
    with comp.context(model):
        assert model[0].epsilon == 0.1


def test_default_epsilon_follows_the_dtype():
    assert lf.default_epsilon(torch.float64) <= 1e-10
    assert lf.default_epsilon(torch.float32) < lf.default_epsilon(torch.bfloat16)
    assert lf.default_epsilon(torch.float32) < lf.default_epsilon(torch.float16)
    lin = nn.Linear(4, 2, bias=False).half()
    lin.weight.requires_grad_(False)
    lin.weight.data[0] = 0.0  # an output that is exactly 0
    x = torch.randn(3, 4, dtype=torch.float16, requires_grad=True)
    out = lf.linear_epsilon(x, lin.weight)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------ registry


def test_available_lists_the_generic_composites():
    assert {"attnlrp", "cp-lrp"} <= set(composites.available()["generic"])


def test_get_normalises_names_and_passes_options():
    comp = composites.get("CP_LRP", strict=True, epsilon=1e-3)
    assert comp.strict and comp.epsilon == 1e-3 and comp.name == "cp-lrp"
    assert composites.get("attnlrp") is not composites.get("attnlrp")  # a fresh one each time


def test_get_unknown_name_lists_what_exists():
    with pytest.raises(KeyError, match="attnlrp"):
        composites.get("no-such-composite")


def test_register_twice_raises_and_overwrite_replaces():
    def mine(**options):
        return lrp_explicit.Composite({nn.Linear: rules.EpsilonRule}, name="mine", **options)

    composites.register("mine", mine, family="test-family", model_types=["toy"])
    try:
        with pytest.raises(ValueError, match="already registered"):
            composites.register("mine", mine, family="test-family")
        composites.register("mine", mine, family="test-family", overwrite=True)
        assert composites.available()["test-family"] == ["mine"]

        class Config:
            model_type = "toy"

        model = nn.Linear(2, 2)
        model.config = Config()
        assert composites.family_of(model) == "test-family"
        assert composites.get("mine", model).name == "mine"
    finally:
        composites.unregister("mine", "test-family")


def test_unknown_hugging_face_model_takes_the_automatic_composite():
    from transformers import GPTNeoXConfig, GPTNeoXModel

    config = GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, vocab_size=50)
    model = GPTNeoXModel(config)
    with pytest.warns(composites.auto.AutoCompositeWarning, match="'gpt_neox'"):
        comp = composites.get("attnlrp", model)
    assert comp.name == "attnlrp (auto)" and comp.strict
    assert composites.get("attnlrp", model, family="generic").name == "attnlrp"


def test_composite_rejects_bad_tables():
    with pytest.raises(ValueError, match="unknown op names"):
        lrp_explicit.Composite({}, ops={"cumprod": lambda *a: None})
    with pytest.raises(TypeError, match="rule factory"):
        lrp_explicit.Composite({nn.Linear: "EpsilonRule"})


def test_removing_an_op_entry_makes_it_unruled():
    comp = lrp_explicit.Composite({}, ops={"mul": None}, strict=True)
    x = torch.randn(3, dtype=D, requires_grad=True)
    with pytest.raises(lrp_explicit.UnruledOpError, match="Tensor.mul"):
        with comp.op_rules():
            x * x


def test_rules_survive_deepcopy():
    import copy

    rule = rules.EpsilonRule(nn.Linear(2, 2))
    clone = copy.deepcopy(rule)
    assert clone.in_features == 2 and clone.module is not rule.module
