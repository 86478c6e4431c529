"""Every op the model zoo meets has its rule, and no rule crashes (issue 26, point 3).

Each handler is checked against a hand-written float64 formula of its rule (the forward equals
the plain op bit for bit); the crashes found in the zoo are reproduced on the real
transformers model classes built from tiny configurations: in-place updates of tensors a rule
saved (Falcon, gpt-oss, XLM, CTRL, GIT, RoCBERT), routers that return a tuple (Llama 4,
PhiMoE) and foreign autograd Functions (BLOOM's ``GeLUFunction``, RecurrentGemma's
``SqrtBoundDerivative``).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import lrp_explicit
from lrp_explicit import composites
from lrp_explicit.audit.bias import zero_bias

D = torch.float64
EPS = 1e-12


def s(z):
    """The stabiliser of the rules: z + ε·sign(z), sign(0) = +1."""
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, dtype=D)


def dispatched(fn, tensors, on_path=None, variant="attnlrp", relevance=None):
    """``fn`` of leaves under the composite's op rules (strict: an unruled op raises); the
    output, the leaves' relevance and the relevance the output was given."""
    on_path = on_path or [True] * len(tensors)
    leaves = [t.clone().requires_grad_(p) for t, p in zip(tensors, on_path)]
    with composites.get(variant, strict=True).op_rules():
        out = fn(*leaves)
    relevance = torch.randn_like(out) if relevance is None else relevance
    out.backward(relevance)
    return out.detach(), [leaf.grad for leaf in leaves], relevance


def close(got, want, rtol=1e-10):
    assert got is not None
    assert torch.allclose(got, want, rtol=rtol, atol=1e-13), (got - want).abs().max()


# ---------------------------------------------------------------------------- convolutions


@pytest.mark.parametrize("form", ["conv1d", "conv2d"])
def test_functional_convolution_is_the_epsilon_rule(form):
    """R_x = x ⊙ Jᵀ(R ⊘ s(z)) with the weight constant; the bias absorbs its share."""
    if form == "conv1d":  # a depthwise causal convolution, as in Mamba's slow path
        x, w, b = randn(2, 6, 9), randn(6, 1, 4), randn(6)
        kwargs = dict(padding=3, groups=6)
        fn = lambda t: F.conv1d(t, w, b, **kwargs)  # noqa: E731
        transpose = torch.nn.grad.conv1d_input
    else:
        x, w, b = randn(2, 3, 7, 6), randn(4, 3, 3, 3), randn(4)
        kwargs = dict(padding=1, stride=2)
        fn = lambda t: F.conv2d(t, w, b, **kwargs)  # noqa: E731
        transpose = torch.nn.grad.conv2d_input
    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(out, fn(x))
    g = relevance / s(out)
    close(grad, x * transpose(x.shape, w, g, **kwargs))
    # what the input does not get, the bias took: Σ R_x + Σ b·g = Σ R (up to ε)
    bias_share = (b.view(1, -1, *[1] * (out.dim() - 2)) * g).sum()
    assert torch.allclose(grad.sum() + bias_share, relevance.sum(), rtol=1e-9)


def test_functional_convolution_with_keyword_operands():
    """Bailing-hybrid's causal convolution passes weight and bias by keyword."""
    x, w, b = randn(1, 4, 6), randn(4, 1, 3), randn(4)

    def fn(t):
        return F.conv1d(t, weight=w, bias=b, padding=2, groups=4)[..., :6]

    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(out, fn(x))
    full = torch.zeros(1, 4, 8, dtype=D)
    full[..., :6] = relevance
    z = F.conv1d(x, w, b, padding=2, groups=4)
    close(grad, x * torch.nn.grad.conv1d_input(x.shape, w, full / s(z), padding=2, groups=4))


def test_convolution_with_both_operands_on_the_path_is_uniform():
    x, w = randn(2, 3, 8), randn(5, 3, 3)
    out, (gx, gw), relevance = dispatched(lambda t, k: F.conv1d(t, k), [x, w])
    g = relevance / s(out)
    close(gx, 0.5 * x * torch.nn.grad.conv1d_input(x.shape, w, g))
    close(gw, 0.5 * w * torch.nn.grad.conv1d_weight(x, w.shape, g))


# ---------------------------------------------------------------------------- running sums


@pytest.mark.parametrize("form", [lambda t: torch.cumsum(t, dim=1), lambda t: t.cumsum(-2),
                                  lambda t: torch.cumsum(t, 1, dtype=D)])
def test_cumsum_is_the_epsilon_rule_of_every_partial_sum(form):
    x = randn(2, 5, 3)
    out, (grad,), relevance = dispatched(form, [x])
    assert torch.equal(out, form(x))
    g = relevance / s(out)
    want = torch.zeros_like(x)
    for i in range(x.shape[1]):  # R_s = x_s ⊙ Σ_{t≥s} R_t ⊘ s(z_t), written out
        for t in range(i, x.shape[1]):
            want[:, i] += x[:, i] * g[:, t]
    close(grad, want)


# ---------------------------------------------------------------------------- batched products


def test_baddbmm_adds_with_the_epsilon_rule_and_multiplies_uniformly():
    c, m1, m2 = randn(1, 4, 5), randn(3, 4, 2), randn(3, 2, 5)
    fn = lambda a, p, q: a.baddbmm(p, q, beta=0.5, alpha=0.25)  # noqa: E731 (BLOOM's form)
    out, (gc, g1, g2), relevance = dispatched(fn, [c, m1, m2])
    assert torch.equal(out, fn(c, m1, m2))
    g = relevance / s(out)
    close(gc, (0.5 * c * g).sum(0, keepdim=True))
    close(g1, 0.5 * 0.25 * m1 * (g @ m2.mT))
    close(g2, 0.5 * 0.25 * m2 * (m1.mT @ g))
    # a constant bias (ALiBi) absorbs its share, a constant key leaves all to the query
    out, (gc, g1, g2), relevance = dispatched(torch.baddbmm, [c, m1, m2],
                                              on_path=[False, True, False])
    g = relevance / s(out)
    assert gc is None and g2 is None
    close(g1, m1 * (g @ m2.mT))


@pytest.mark.parametrize("name", ["addbmm", "addmm"])
def test_addbmm_and_addmm_take_the_epsilon_rule(name):
    if name == "addbmm":
        c, m1, m2 = randn(4, 5), randn(3, 4, 2), randn(3, 2, 5)
    else:
        c, m1, m2 = randn(5), randn(4, 2), randn(2, 5)
    fn = getattr(torch, name)
    out, (gc, g1, g2), relevance = dispatched(fn, [c, m1, m2], on_path=[True, True, False])
    assert torch.equal(out, fn(c, m1, m2))
    g = relevance / s(out)
    close(gc, (c * g).sum_to_size(c.shape))
    close(g1, m1 * (g @ m2.mT))  # g (4, 5) broadcasts over the batch of addbmm
    assert torch.allclose(gc.sum() + g1.sum(), relevance.sum(), rtol=1e-9)


# ---------------------------------------------------------------------------- layout


LAYOUT = [
    ("tensor_split", lambda t: torch.tensor_split(t, [1, 3], dim=1)[1] * 2.0),
    ("Tensor.tensor_split", lambda t: t.tensor_split(2, dim=0)[0].sum(-1)),
    ("unbind", lambda t: torch.unbind(t, 1)[2]),
    ("chunk", lambda t: t.chunk(2, -1)[1]),
    ("hsplit", lambda t: torch.hsplit(t, 2)[0]),
    ("split_with_sizes", lambda t: t.split_with_sizes([1, 3], 1)[1]),
    ("copy_", lambda t: torch.zeros(3, 4, dtype=D).copy_(t)),
    ("scatter", lambda t: torch.full((3, 4), -1.0, dtype=D).scatter(
        1, torch.tensor([[0], [2], [1]]), t[:, :1])),
    ("take_along_dim", lambda t: torch.take_along_dim(t, torch.tensor([[1], [0], [3]]), 1)),
]


def test_scatter_with_a_reduction_is_no_layout():
    index = torch.tensor([[0], [2], [1]])
    with pytest.raises(lrp_explicit.UnruledOpError, match="scatter"):
        dispatched(lambda t: torch.zeros(3, 4, dtype=D).scatter(1, index, t[:, :1],
                                                                 reduce="add"), [randn(3, 4)])


@pytest.mark.parametrize("name,fn", LAYOUT, ids=[c[0] for c in LAYOUT])
def test_layout_ops_pass_through_in_strict_mode(name, fn):
    x = randn(3, 4)
    out, (grad,), relevance = dispatched(fn, [x])
    plain = x.clone().requires_grad_()
    fn(plain).backward(relevance)
    assert torch.equal(out, fn(x))
    if name == "Tensor.tensor_split":  # the sum is the ε-reduction: R_x = x ⊙ R ⊘ s(Σx)
        z = x[:2].sum(-1, keepdim=True)
        want = torch.zeros_like(x)
        want[:2] = x[:2] * relevance[:, None] / s(z)
        close(grad, want)
    elif name == "tensor_split":  # ×2 is the identity
        assert torch.equal(grad, plain.grad / 2)
    else:
        assert torch.equal(grad, plain.grad)


# ---------------------------------------------------------------------------- element-wise


@pytest.mark.parametrize("name,fn", [
    ("expm1", torch.expm1), ("Tensor.expm1", lambda t: t.expm1()),
    ("log1p", lambda t: torch.log1p(t.abs())),
    ("clamp_min", lambda t: t.clamp_min(0.1)), ("nan_to_num", torch.nan_to_num),
    ("maximum const", lambda t: torch.maximum(t, torch.zeros(4, dtype=D))),
    ("minimum const", lambda t: torch.minimum(torch.full((3, 4), 0.5, dtype=D), t)),
    ("exp_ in place", lambda t: (t * 1).exp_()), ("clamp_ in place", lambda t: (t * 1).clamp_(-1)),
    ("relu_ in place", lambda t: F.relu_(t * 1)),
])
def test_element_wise_functions_take_the_identity(name, fn):
    x = randn(3, 4)
    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(out, fn(x))
    assert torch.equal(grad, relevance)


def test_maximum_of_two_path_tensors_routes_to_the_winner():
    a, b = randn(3, 4), randn(3, 4)
    b[0, 0] = a[0, 0]  # a tie: half each
    out, (ga, gb), relevance = dispatched(torch.maximum, [a, b])
    assert torch.equal(out, torch.maximum(a, b))
    tie = (a == b).to(D)
    close(ga, relevance * ((a > b).to(D) + 0.5 * tie))
    close(gb, relevance * ((b > a).to(D) + 0.5 * tie))


@pytest.mark.parametrize("dim,keepdim", [(-1, False), (1, True), ((0, 2), False)])
def test_logsumexp_shares_in_proportion_to_exp(dim, keepdim):
    x = randn(2, 3, 4)
    x[1, 2] = float("-inf")  # a fully masked row gets 0, not NaN
    fn = lambda t: torch.logsumexp(t, dim, keepdim=keepdim)  # noqa: E731
    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(out, fn(x))
    dims = (dim,) if isinstance(dim, int) else dim
    total = x.exp().sum(dims, keepdim=True)  # Σ exp(x) > 0: s(Σ) = Σ + ε
    r = relevance if keepdim else relevance.reshape(total.shape)
    close(grad, x.exp() * r / (total + EPS))
    assert torch.isfinite(grad).all()


def test_var_and_std_are_held_constant_as_a_norm_statistic():
    x = randn(3, 8)
    fn = lambda t: t * torch.rsqrt(t.var(-1, keepdim=True) + 1e-5)  # noqa: E731
    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(out, fn(x))
    assert torch.equal(grad, relevance)  # x times a constant: the identity
    fn = lambda t: t / t.std(-1, unbiased=False, keepdim=True)  # noqa: E731
    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(grad, relevance)


def test_var_mean_holds_the_variance_and_takes_the_epsilon_rule_of_the_mean():
    x = randn(3, 8)

    def fn(t):
        var, mean = torch.var_mean(t, -1, keepdim=True, correction=0)
        return (t - mean) * torch.rsqrt(var + 1e-5)

    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(out, fn(x))
    # R reaches x − μ unchanged (a constant factor); the ε-rule of the difference gives x its
    # direct share and −μ its share, which the ε-rule of the mean returns to every x_i
    mean = x.mean(-1, keepdim=True)
    g = relevance / s(x - mean)
    r_mean = (-mean * g).sum(-1, keepdim=True)
    close(grad, x * g + x / 8 * r_mean / s(mean))


def test_complex_rotation_takes_the_epsilon_rule_of_its_real_form():
    """Llama 4 rotates q and k by a complex constant: (a + ib)(p + iq) mixes re and im."""
    x, freqs = randn(3, 4, 2), torch.polar(torch.ones(4, dtype=D), randn(4))

    def fn(t):
        return torch.view_as_real(torch.view_as_complex(t) * freqs)

    out, (grad,), relevance = dispatched(fn, [x])
    assert torch.equal(out, fn(x))
    a, b, p, q = x[..., 0], x[..., 1], freqs.real, freqs.imag
    g_re, g_im = relevance[..., 0] / s(out[..., 0]), relevance[..., 1] / s(out[..., 1])
    # z_re = a p − b q, z_im = a q + b p: R_a = a (p g_re + q g_im), R_b = b (p g_im − q g_re)
    close(grad, torch.stack([a * (p * g_re + q * g_im), b * (p * g_im - q * g_re)], -1))


# ---------------------------------------------------------------------------- in-place updates


def test_in_place_update_of_a_saved_output_keeps_the_rule():
    """LayerNorm saves its output; ``y += b`` and ``y *= m`` afterwards (XLM, Falcon) must
    give the relevance of the same computation written out of place."""
    x, b = randn(3, 6), randn(3, 6)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=D)[:, None]

    def inplace(t, u):
        y = F.layer_norm(t, (6,))
        y += u
        y *= mask
        return F.linear(y, torch.ones(2, 6, dtype=D))

    def outofplace(t, u):
        y = F.layer_norm(t, (6,))
        y = y + u
        y = y * mask
        return F.linear(y, torch.ones(2, 6, dtype=D))

    relevance = randn(3, 2)
    out, grads, _ = dispatched(inplace, [x, b], relevance=relevance)
    ref, refs, _ = dispatched(outofplace, [x, b], relevance=relevance)
    assert torch.equal(out, ref)
    for got, want in zip(grads, refs):
        close(got, want, rtol=1e-12)


def test_in_place_update_of_a_saved_input_keeps_the_rule():
    """A rule that took ``h`` as input saved it; ``h`` updated in place afterwards (twice, and
    through a view) must not change that rule's relevance."""
    x = randn(3, 6)
    w = randn(2, 6)

    def inplace(t):
        h = F.layer_norm(t, (6,))
        q = F.linear(h, w)
        s = h.sum(-1, keepdim=True)
        h += 1.0
        h[:, :2] *= 3.0
        return torch.cat([q, s, h], -1)

    def outofplace(t):
        h = F.layer_norm(t, (6,))
        q = F.linear(h, w)
        s = h.sum(-1, keepdim=True)
        h = h + 1.0
        h = torch.cat([h[:, :2] * 3.0, h[:, 2:]], -1)
        return torch.cat([q, s, h], -1)

    relevance = randn(3, 9)
    out, (grad,), _ = dispatched(inplace, [x], relevance=relevance)
    ref, (want,), _ = dispatched(outofplace, [x], relevance=relevance)
    assert torch.equal(out, ref)
    close(grad, want, rtol=1e-12)


def test_augmented_assignment_on_the_explained_leaf_runs_out_of_place():
    """CTRL scales its input with ``inputs_embeds *= √d``: on the leaf that is explained
    autograd refuses an in-place update; the rebinding form gets the same value out of place,
    and the leaf keeps its value. A method call (whose result may be dropped) still raises."""
    x = randn(3, 4)
    leaf = x.clone().requires_grad_()
    with composites.get("attnlrp", strict=True).op_rules():
        y = leaf
        y *= 3.0
        y += 1.0
        out = y.sum()
    out.backward()
    assert torch.equal(leaf.detach(), x)
    assert torch.equal(y.detach(), x * 3.0 + 1.0)
    close(leaf.grad, 3 * x / s(3 * x + 1.0) * (3 * x + 1) / s(out.detach()))
    with pytest.raises(RuntimeError, match="leaf"):
        with composites.get("attnlrp").op_rules():
            leaf.mul_(2.0)


def test_alias_shares_storage_and_takes_in_place_updates():
    """The audit's aliases of module inputs and outputs: not views (an in-place update of a
    view would drop the ledger's tensor hook), sharing storage (the update is seen by every
    other holder, as for the plain model); a view without grad and for the explained leaf."""
    from lrp_explicit import functional as lf

    x = randn(3).requires_grad_()
    y = x * 2.0
    a = lf.alias(y)
    seen = []
    a.register_hook(seen.append)
    assert a._base is None and a.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    a.mul_(5.0)
    assert torch.equal(y.detach(), x.detach() * 10.0)
    a.sum().backward()
    assert torch.equal(seen[0], torch.full((3,), 5.0, dtype=D))  # the value before the update
    assert lf.alias(x)._base is x  # the leaf keeps autograd's protection
    with torch.no_grad():
        quiet = lf.alias(y)
    assert quiet.requires_grad  # a hook can still be registered on it


# ---------------------------------------------------------------------------- foreign Functions


class _ScaledTanh(torch.autograd.Function):
    """Element-wise, with a backward that is not the identity (as BLOOM's GeLUFunction)."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x) * 2.0

    @staticmethod
    def backward(ctx, grad):
        return grad * 7.0


class _Centre(torch.autograd.Function):
    """Not element-wise: every output depends on the whole row."""

    @staticmethod
    def forward(ctx, x):
        return x - x.mean(-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Block(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.linear = nn.Linear(4, 4, dtype=D)
        self.function = function

    def forward(self, x):
        return self.linear(self.function.apply(self.linear(x)))


def test_foreign_element_wise_function_takes_the_identity():
    model = _Block(_ScaledTanh).eval()
    x = randn(2, 3, 4)
    comp = composites.get("attnlrp", family="generic", strict=True)
    with comp.context(model):
        leaf = x.clone().requires_grad_()
        hidden = model.linear(leaf)
        out = model(leaf)
        out.backward(out.detach())
    # the reference: the same model with the Function replaced by the plain op under the
    # identity rule (an activation of the op table)
    model2 = _Block(_ScaledTanh).eval()
    model2.load_state_dict(model.state_dict())
    model2.function = type("Plain", (), {"apply": staticmethod(lambda t: torch.tanh(t) * 2.0)})
    with comp.context(model2):
        leaf2 = x.clone().requires_grad_()
        out2 = model2(leaf2)
        out2.backward(out2.detach())
    assert torch.equal(out, out2)
    close(leaf.grad, leaf2.grad, rtol=1e-12)
    assert hidden.shape == out.shape


def test_foreign_function_that_mixes_elements_stays_unruled_by_name():
    model = _Block(_Centre).eval()
    comp = composites.get("attnlrp", family="generic", strict=True)
    with pytest.raises(lrp_explicit.UnruledOpError, match=r"_Centre\.apply"):
        with comp.context(model):
            model(randn(2, 3, 4).requires_grad_())


# ---------------------------------------------------------------------------- the zoo's crashes


def _configs():
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    decoder = dict(small, intermediate_size=48, max_position_embeddings=64)
    return {
        "falcon": (tf.FalconForCausalLM, tf.FalconConfig(**small)),
        "gpt_oss": (tf.GptOssForCausalLM, tf.GptOssConfig(
            **small, intermediate_size=32, num_key_value_heads=2, head_dim=8,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"])),
        "xlm": (tf.XLMWithLMHeadModel, tf.XLMConfig(emb_dim=32, n_layers=2, n_heads=4,
                                                    vocab_size=64, max_position_embeddings=64)),
        "ctrl": (tf.CTRLLMHeadModel, tf.CTRLConfig(n_embd=32, dff=48, n_layer=2, n_head=4,
                                                   vocab_size=64, n_positions=64)),
        "git": (tf.GitForCausalLM, tf.GitConfig(**decoder, vision_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            image_size=32, patch_size=16))),
        "roc_bert": (tf.RoCBertForCausalLM, tf.RoCBertConfig(
            **decoder, is_decoder=True, shape_vocab_size=16, pronunciation_vocab_size=16,
            shape_embed_dim=8, pronunciation_embed_dim=8)),
        "llama4": (tf.Llama4ForCausalLM, tf.Llama4TextConfig(
            **decoder, intermediate_size_mlp=48, num_key_value_heads=2, head_dim=8,
            num_local_experts=4, pad_token_id=0)),
        "phimoe": (tf.PhimoeForCausalLM, tf.PhimoeConfig(**decoder, num_key_value_heads=2,
                                                         num_local_experts=4)),
        "bloom": (tf.BloomForCausalLM, tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4,
                                                      vocab_size=64)),
        # three layers: two recurrent blocks (SqrtBoundDerivative, baddbmm) and one attention
        "recurrent_gemma": (tf.RecurrentGemmaForCausalLM, tf.RecurrentGemmaConfig(
            **decoder | dict(num_hidden_layers=3), num_key_value_heads=1, head_dim=8,
            lru_width=32, attention_window_size=8, conv1d_width=4)),
    }


CONFIGS = _configs()
FAMILIES = ["generic"] + (["auto"] if "auto" in composites.available() else [])


def _build(name):
    cls, config = CONFIGS[name]
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # the grouped-mm kernel has no float64
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(config).to(D).eval()


def _leaf_forward(model, ids):
    embeds = model.get_input_embeddings()(ids).detach()
    return embeds, lambda leaf: model(inputs_embeds=leaf).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_zoo_models_that_crashed_inside_a_rule_are_explained(name, variant, family):
    model = _build(name)
    ids = torch.randint(3, 60, (1, 7))
    embeds, run = _leaf_forward(model, ids)
    with torch.no_grad():
        plain = run(embeds.clone())  # CTRL and GIT update their input in place
    comp = composites.get(variant, model, family=family, strict=True)
    with comp.context(model):
        leaf = embeds.clone().requires_grad_()
        logits = run(leaf)
        y = logits[0, -1].max()
        y.backward(y.detach())
    assert torch.equal(logits.detach(), plain)  # the forward is bit-exact
    assert torch.equal(leaf.detach(), embeds)  # the explained input is untouched
    assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    result = lrp_explicit.check(model, ids, variant, family=family, strict=True)
    assert result.ok, (result.unruled, result.leaks, result.first_nonfinite)


@pytest.mark.parametrize("name", ["falcon", "xlm", "ctrl", "bloom", "llama4"])
def test_cp_lrp_conserves_through_in_place_updates(name):
    """Independent of the ledger: with biases and position embeddings zeroed, CP-LRP gives
    the input exactly the logit (float64) also where outputs of rules are updated in place."""
    model = _build(name)
    for param_name, param in [*model.named_parameters(), *model.named_buffers()]:
        if param.is_floating_point() and ("position" in param_name or "pos_" in param_name):
            nn.init.zeros_(param)  # learned and sinusoidal (CTRL) position embeddings
    ids = torch.randint(3, 60, (1, 7))
    embeds, run = _leaf_forward(model, ids)
    comp = composites.get("cp-lrp", model, family="generic", strict=True)
    with zero_bias(model), comp.context(model):
        leaf = embeds.clone().requires_grad_()
        y = run(leaf)[0, -1].max()
        y.backward(y.detach())
    assert torch.allclose(leaf.grad.sum(), y.detach(), rtol=1e-8, atol=0)


# ---------------------------------------------------------------------------- vision layers


def test_batch_norm_in_eval_mode_is_the_epsilon_rule_of_its_affine_map():
    x, mean, var = randn(2, 3, 4, 4), randn(3), torch.rand(3, dtype=D) + 0.5
    weight, bias = randn(3), randn(3)
    out, (r_x,), relevance = dispatched(
        lambda t: F.batch_norm(t, mean, var, weight, bias, False, 0.1, 1e-5), [x])
    scale = (weight / torch.sqrt(var + 1e-5)).view(1, 3, 1, 1)
    close(out, F.batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5))
    close(r_x, x * scale * relevance / s(out))


def test_batch_norm_in_training_mode_has_no_rule():
    x = randn(4, 3, 2, 2)
    with pytest.raises(lrp_explicit.UnruledOpError, match="batch_norm"):
        dispatched(lambda t: F.batch_norm(t, None, None, None, None, True), [x])


def test_normalize_holds_the_norm_constant():
    x = randn(3, 5)
    out, (r_x,), relevance = dispatched(lambda t: F.normalize(t, dim=-1), [x])
    close(out, F.normalize(x, dim=-1))
    close(r_x, relevance)  # x / ‖x‖ with ‖x‖ constant: a scaling, the identity rule


def test_max_pooling_gives_each_window_to_its_winner_and_unfold_copies():
    x = randn(1, 2, 4, 4)
    out, (r_x,), relevance = dispatched(lambda t: F.max_pool2d(t, 2), [x])
    windows = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(1, 2, 2, 2, 4)
    winner = windows.argmax(-1)
    want = torch.zeros(1, 2, 2, 2, 4, dtype=D).scatter(-1, winner[..., None],
                                                        relevance[..., None])
    close(r_x, want.reshape(1, 2, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(1, 2, 4, 4))
    out, (r_x,), relevance = dispatched(lambda t: F.unfold(t, 2, stride=2), [x])
    close(r_x.sum(), relevance.sum())  # disjoint windows: every element copied once
    close(r_x, F.fold(relevance, (4, 4), 2, stride=2))
