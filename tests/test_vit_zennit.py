"""Vision transformers with zennit rules in the same backward pass: composition with our rules,
the γ rule by hand, conservation, exact forward, clean removal, torchvision's
``nn.MultiheadAttention`` rule and the synthetic vision task."""
from __future__ import annotations

import contextlib
import re

import pytest
import torch
import transformers as tf
from torch import nn
from torchvision.models import VisionTransformer
from zennit.composites import LayerMapComposite
from zennit.core import Hook
from zennit.rules import Epsilon, Gamma

import lrp_explicit
from lrp_explicit import composites, dispatch, rules
from lrp_explicit import vision_task as vt
from gxi import reference_relevance

VARIANTS = ["attnlrp", "cp-lrp"]
EPS = 1e-12  # the float64 default of our rules, given to zennit too


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def hf_vit(attn: str = "eager") -> nn.Module:
    config = tf.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, image_size=16, patch_size=4, num_channels=3,
                          initializer_range=0.2, num_labels=3)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return tf.ViTForImageClassification(config).double().eval()


def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 2, 4, 32, 48, num_classes=3).double().eval()
    with torch.no_grad():  # torchvision starts the head at zero; biases at zero too
        for name, p in model.named_parameters():
            if name.endswith("bias") or name == "heads.head.weight":
                p.normal_(0.0, 0.3)
    return model


MODELS = {"hf-eager": lambda: hf_vit("eager"), "hf-sdpa": lambda: hf_vit("sdpa"),
          "torchvision": tv_vit}


def pixels(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if torch.is_tensor(out) else out.logits


def explain(model, comp, x, target=1):
    """Relevance of ``x`` for logit ``target`` (initialised with the logit) and the logits."""
    with comp.context(model):
        x = x.detach().clone().requires_grad_(True)
        out = logits(model, x)
        y = out[:, target]
        y.backward(y.detach())
    return x.grad, out.detach()


def zennit_map(linear=None, conv=None) -> LayerMapComposite:
    return LayerMapComposite([(nn.Linear, linear or Epsilon(EPS)),
                              (nn.Conv2d, conv or Epsilon(EPS))])


def hook_state(model: nn.Module) -> list:
    """Every hook, module type and parameter flag of ``model``: what must survive a removal."""
    state = []
    for name, m in model.named_modules():
        state.append((name, type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks),
                      dict(m._backward_hooks), dict(getattr(m, "_backward_pre_hooks", {}))))
    for name, p in model.named_parameters():
        state.append((name, id(p), p.requires_grad, getattr(p, "_backward_hooks", None),
                      getattr(p, "_post_accumulate_grad_hooks", None)))
    return state


def zennit_hooks(model: nn.Module) -> int:
    return sum(isinstance(getattr(h, "__self__", None), Hook)
               for m in model.modules()
               for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain model's logits as an explanation computes them: frozen parameters, the input
    on the relevance path. (With parameters that require grad, ``F.linear`` on the transposed
    input of ``nn.MultiheadAttention`` may take another kernel and differ in the last bit.)"""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        return logits(model, x.clone().requires_grad_()).detach()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------- composition


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_zennit_epsilon_composes_with_our_epsilon(model_name, variant):
    model = MODELS[model_name]()
    x = pixels()
    ours, _ = explain(model, composites.get(variant, model, strict=True), x)
    comp = composites.get(variant, model, strict=True, zennit=zennit_map())
    combined, _ = explain(model, comp, x)
    assert not comp.unruled
    assert torch.isfinite(combined).all() and ours.abs().sum() > 0
    assert relative_error(combined, ours) < 1e-6
    # zennit's rules do act: γ on the same layers changes the relevance
    gamma, _ = explain(model, composites.get(variant, model, zennit=zennit_map(Gamma(0.5))), x)
    assert relative_error(gamma, ours) > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_multihead_attention_rule_matches_modified_gradient_x_input(variant):
    model = tv_vit()
    x = pixels()
    ours, _ = explain(model, composites.get(variant, model, strict=True), x)
    reference = reference_relevance(model, variant, x, lambda out: out[:, 1], input_name="x")
    assert relative_error(ours, reference) < 1e-6


def _mha_masks(batch: int = 2, length: int = 5) -> dict[str, dict]:
    """Mask arguments of ``nn.MultiheadAttention`` (``True`` / −inf: not attended)."""
    torch.manual_seed(5)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[1, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    scattered = torch.rand(length, length) > 0.6
    scattered.fill_diagonal_(False)
    per_head = torch.randn(batch * 4, length, length, dtype=torch.float64)
    return {
        "padding": dict(key_padding_mask=padding),
        "padding_additive": dict(key_padding_mask=torch.zeros(batch, length, dtype=torch.float64)
                                 .masked_fill(padding, float("-inf"))),
        "causal": dict(attn_mask=causal, is_causal=True),
        "causal_and_padding": dict(attn_mask=causal, is_causal=True,
                                   key_padding_mask=causal.new_zeros(batch, length)
                                   .masked_fill(padding, float("-inf"))),
        "bool": dict(attn_mask=scattered),
        "bool_and_padding": dict(attn_mask=scattered, key_padding_mask=padding),
        "per_head_additive": dict(attn_mask=per_head),
    }


class _MaskedAttention(nn.Module):
    """Self-attention with a residual and a head, the masks fixed: a model for the tests."""

    def __init__(self, need_weights: bool, masks: dict, batch_first: bool = True):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)
        self.need_weights, self.masks = need_weights, masks

    def forward(self, x):
        out, _ = self.attention(x, x, x, need_weights=self.need_weights, **self.masks)
        return self.head(out + x)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", list(_mha_masks()))
@pytest.mark.parametrize("variant", VARIANTS)
def test_multihead_attention_rule_with_masks(masks, need_weights, variant):
    """Masked self-attention: the forward is exact and the relevance equals the independent
    modified Gradient×Input (masks as one additive mask there); masked keys get no relevance
    through the attention."""
    torch.manual_seed(4)
    model = _MaskedAttention(need_weights, _mha_masks()[masks]).double().eval()
    model.requires_grad_(False)  # as while explaining (see reference_forward)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    plain = model(x.clone().requires_grad_()).detach()
    comp = composites.get(variant, model, strict=True)
    with comp.context(model):
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        y = out[:, 1, 0]  # one logit per sample, relevance initialised with it
        y.backward(y.detach())
    assert torch.equal(out.detach(), plain)
    assert not comp.unruled
    reference = reference_relevance(model, variant, x, lambda o: o[:, 1, 0], input_name="x")
    ours = (leaf.grad).detach()
    assert torch.isfinite(ours).all()
    assert relative_error(ours, reference) < 1e-6


def test_transformer_encoder_with_padding_and_causal_masks():
    """A stock ``nn.TransformerEncoder`` (it calls the attention with ``need_weights=False`` and
    the ``is_causal`` hint) explained with padding and causal masks: forward exact, relevance
    equal to the modified Gradient×Input."""
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    padding = torch.zeros(2, 6, dtype=torch.float64)
    padding[0, 4:] = float("-inf")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, x):
            return self.encoder(x, mask=causal, src_key_padding_mask=padding, is_causal=True)

    model = Model().requires_grad_(False)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    plain = model(x.clone().requires_grad_()).detach()
    comp = composites.get("attnlrp", model, strict=True)
    with comp.context(model):
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        y = out[:, 2, 0]
        y.backward(y.detach())
    assert torch.equal(out.detach(), plain)
    reference = reference_relevance(model, "attnlrp", x, lambda o: o[:, 2, 0], input_name="x")
    assert relative_error(leaf.grad, reference) < 1e-6
    # padded positions of sample 0 are never attended: no relevance reaches them via attention;
    # position 2 of sample 0 cannot see positions 3.. (causal), so they get none at all
    assert leaf.grad[0, 3:].abs().max() == 0


def test_torchvision_vit_is_its_own_family_and_mha_needs_the_rule():
    model = tv_vit()
    assert composites.family_of(model) == "torchvision-vit"
    comp = composites.get("attnlrp", model)
    with comp.context(model):
        attention = model.encoder.layers[0].self_attention
        assert isinstance(attention, rules.MultiheadAttentionRule)
        assert not attention.hold_weights
    with composites.get("cp-lrp", model).context(model):
        assert model.encoder.layers[0].self_attention.hold_weights
    # without the rule, the op table sees one call it has no rule for
    table = {k: v for k, v in comp.module_rules.items() if k is not nn.MultiheadAttention}
    bare = lrp_explicit.Composite(table, strict=True)
    with bare.context(model), pytest.raises(dispatch.UnruledOpError,
                                            match="multi_head_attention_forward"):
        logits(model, pixels().requires_grad_())


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("hold", [False, True])
def test_multihead_attention_rule_forward_is_exact(need_weights, batch_first, hold):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval().requires_grad_(
        False)
    rule = rules.MultiheadAttentionRule(mha, hold_weights=hold)
    for x in (torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)):
        x = x.requires_grad_()
        plain = mha(x, x, x, need_weights=need_weights)
        out = rule(x, x, x, need_weights=need_weights)
        assert torch.equal(out[0], plain[0])
        assert (out[1] is None) == (plain[1] is None)
        if plain[1] is not None:
            assert torch.equal(out[1], plain[1])
    with pytest.raises(NotImplementedError, match="cross-attention"):
        rule(x, x.detach().clone(), x)
    with pytest.raises(RuntimeError, match="is_causal"):
        rule(x, x, x, is_causal=True)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        rules.MultiheadAttentionRule(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- the γ rule


def gamma_by_hand(x, weight, bias, relevance, gamma, eps):
    """Generalised γ rule: positive outputs are explained by the positive contributions
    (``x⁺`` through ``W + γW⁺``, ``x⁻`` through ``W + γW⁻``, bias ``b + γb⁺``), negative
    outputs by the negative ones, each stabilised with ``eps`` (sign(0) = +1)."""
    up_w, down_w = weight + gamma * weight.clamp(min=0), weight + gamma * weight.clamp(max=0)
    up_b, down_b = bias + gamma * bias.clamp(min=0), bias + gamma * bias.clamp(max=0)
    pos, neg = x.clamp(min=0), x.clamp(max=0)
    z = x @ weight.T + bias
    total = torch.zeros_like(x)
    for selected, w_pos, w_neg, b in ((z > 0, up_w, down_w, up_b), (z < 0, down_w, up_w, down_b)):
        denominator = pos @ w_pos.T + neg @ w_neg.T + b
        denominator = denominator + eps * torch.where(denominator >= 0, 1.0, -1.0)
        share = relevance * selected / denominator
        total = total + pos * (share @ w_pos) + neg * (share @ w_neg)
    return total


def recording(module: nn.Module, store: dict):
    """Hooks that record the relevance at ``module``'s input (what it alone passes back) and at
    its output; registered after the composite, the input alias runs before zennit's hook."""

    def pre(mod, args):
        alias = args[0].view_as(args[0])
        store["x"] = alias.detach()
        alias.register_hook(lambda g: store.__setitem__("R_in", g))
        return (alias, *args[1:])

    def post(mod, args, out):
        out.register_hook(lambda g: store.__setitem__("R_out", g))

    return [module.register_forward_pre_hook(pre, prepend=True),
            module.register_forward_hook(post)]


def hf_fc1(model: nn.Module) -> nn.Module:
    """The first MLP Linear of the second ViT layer: ``vit.layers.1.mlp.fc1`` in recent
    transformers 5 releases, ``vit.encoder.layer.1.intermediate.dense`` in older ones."""
    modules = dict(model.named_modules())
    return modules.get("vit.layers.1.mlp.fc1") or modules["vit.encoder.layer.1.intermediate.dense"]


LAYERS = {  # (model, the Linear layer whose input relevance is checked)
    "hf-fc1": ("hf-eager", hf_fc1),
    "torchvision-mlp": ("torchvision", lambda m: m.encoder.layers[1].mlp[0]),
    # the out-projection of nn.MultiheadAttention is zennit's too (the rule calls it)
    "torchvision-out_proj": ("torchvision", lambda m: m.encoder.layers[0].self_attention.out_proj),
}


@pytest.mark.parametrize("where", list(LAYERS))
@pytest.mark.parametrize("gamma", [0.1, 2.0])
def test_zennit_gamma_on_a_linear_equals_the_formula(where, gamma):
    model_name, select = LAYERS[where]
    model = MODELS[model_name]()
    layer = select(model)
    zen = LayerMapComposite([(nn.Linear, Gamma(gamma, stabilizer=EPS))])
    comp = composites.get("attnlrp", model, strict=True, zennit=zen)
    store: dict = {}
    with comp.context(model):
        handles = recording(layer, store)
        x = pixels().requires_grad_()
        y = logits(model, x)[:, 1]
        y.backward(y.detach())
        for h in handles:
            h.remove()
    assert store["R_out"].abs().sum() > 0
    weight, bias = layer.weight.detach(), layer.bias.detach()
    expected = gamma_by_hand(store["x"], weight, bias, store["R_out"], gamma, EPS)
    assert relative_error(store["R_in"], expected) < 1e-10
    plain_epsilon = gamma_by_hand(store["x"], weight, bias, store["R_out"], 0.0, EPS)
    assert relative_error(store["R_in"], plain_epsilon) > 1e-3  # γ made a difference


# ---------------------------------------------------------------------------- conservation


@contextlib.contextmanager
def constants_zeroed(model: nn.Module):
    """Biases, class token and position embeddings at zero: nothing absorbs relevance."""
    names = ("class_token", "pos_embedding", "cls_token", "position_embeddings")
    saved = [(p, p.detach().clone()) for n, p in model.named_parameters()
             if n.rsplit(".", 1)[-1] in names]
    with torch.no_grad():
        for p, _ in saved:
            p.zero_()
    try:
        with lrp_explicit.zero_bias(model):
            yield model
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


@pytest.mark.parametrize("model_name", ["hf-sdpa", "torchvision"])
@pytest.mark.parametrize("use_zennit", [False, True])
def test_cp_lrp_conserves_end_to_end_without_biases(model_name, use_zennit):
    model = MODELS[model_name]()
    with constants_zeroed(model):
        comp = composites.get("cp-lrp", model, strict=True,
                              zennit=zennit_map() if use_zennit else None)
        relevance, out = explain(model, comp, pixels())
    total = relevance.sum((1, 2, 3))
    assert relative_error(total, out[:, 1]) < 1e-8
    # the constants do absorb relevance when they are not zero
    relevance, out = explain(model, composites.get("cp-lrp", model), pixels())
    assert relative_error(relevance.sum((1, 2, 3)), out[:, 1]) > 1e-3


# ---------------------------------------------------------------------------- register/remove


@pytest.mark.parametrize("model_name", ["hf-sdpa", "torchvision"])
def test_exact_forward_and_clean_removal(model_name):
    model = MODELS[model_name]()
    x = pixels()
    before = hook_state(model)
    plain = reference_forward(model, x)
    zen = zennit_map(Gamma(0.25), Gamma(0.5))
    comp = composites.get("attnlrp", model, zennit=zen)
    comp.register(model)
    assert zennit_hooks(model) > 0
    out = logits(model, x.clone().requires_grad_())
    assert torch.equal(out, plain)
    # zennit's layers keep their class and get no rule of ours; the rest does
    assert all(type(m) in (nn.Linear, nn.Conv2d, nn.modules.linear.NonDynamicallyQuantizableLinear)
               for m in model.modules() if id(m) in comp.zennit_modules)
    assert any(isinstance(m, rules.Rule) for m in model.modules())
    assert not any(isinstance(m, rules.EpsilonRule) for m in model.modules())
    comp.remove()
    assert hook_state(model) == before
    assert zennit_hooks(model) == 0 and not dispatch.hooks_installed()
    assert torch.equal(reference_forward(model, x), plain)
    with torch.no_grad():
        assert torch.equal(logits(model, x), logits(model, x))


def test_register_remove_orders():
    model = tv_vit()
    before = hook_state(model)
    zen = zennit_map()
    first = composites.get("cp-lrp", model, zennit=zen)
    second = composites.get("attnlrp", model, zennit=zen)
    first.register(model)
    with pytest.raises(composites.CompositeError, match="already"):
        second.register(model)  # the model carries a composite
    first.remove()
    first.remove()  # twice: a no-op
    assert hook_state(model) == before
    # the user removes the zennit composite first, then ours: nothing is left either
    second.register(model)
    zen.remove()
    second.remove()
    assert hook_state(model) == before
    # a zennit composite registered by the user elsewhere is refused, nothing changes
    other = tv_vit()
    zen.register(other)
    with pytest.raises(composites.CompositeError, match="zennit composite"):
        composites.get("attnlrp", model, zennit=zen).register(model)
    assert hook_state(model) == before
    zen.remove()
    # a context that raises removes both
    with pytest.raises(RuntimeError, match="boom"):
        with composites.get("attnlrp", model, zennit=zen).context(model):
            raise RuntimeError("boom")
    assert hook_state(model) == before and zennit_hooks(model) == 0
    with pytest.raises(TypeError, match="zennit composite"):
        composites.get("attnlrp", model, zennit=[Epsilon()])


class Opaque(nn.Module):
    """A linear layer whose forward uses an op without any LRP rule."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

    def forward(self, x):
        return torch.cumprod(x, -1) @ self.weight


def test_dispatch_never_enters_a_zennit_module():
    model = nn.Sequential(nn.Linear(4, 4), Opaque(), nn.GELU(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(dispatch.UnruledOpError, match="cumprod"):
        with composites.get("attnlrp", strict=True).context(model):
            model(x.clone().requires_grad_())
    zen = LayerMapComposite([(Opaque, Epsilon(EPS))])
    comp = composites.get("attnlrp", strict=True, zennit=zen)
    relevance, out = explain(model, comp, x, target=0)
    assert not comp.unruled and torch.isfinite(relevance).all()
    assert isinstance(model[0], nn.Linear) and not isinstance(model[1], rules.Rule)


# ---------------------------------------------------------------------------- the vision task


def test_vision_task_batches_and_relevance_mass_accuracy():
    images, labels, boxes = vt.make_batch(16, seed=0)
    again, labels2, boxes2 = vt.make_batch(16, seed=0)
    assert torch.equal(images, again) and torch.equal(labels, labels2)
    assert images.shape == (16, 3, 32, 32) and labels.max() < len(vt.CLASSES)
    mask = vt.box_mask(boxes)
    assert (mask.sum((1, 2)) == vt.GLYPH ** 2).all()
    # the target glyph is drawn inside its box: its pixels are brighter than the background
    assert ((images.amax(1) > 0.5) & mask).sum((1, 2)).min() >= 5
    inside = mask.double()
    ones = torch.ones(16, dtype=torch.float64)
    assert torch.allclose(vt.relevance_mass_accuracy(inside, boxes), ones)
    assert torch.equal(vt.relevance_mass_accuracy(-inside, boxes), 0 * ones)
    uniform = vt.relevance_mass_accuracy(torch.ones(16, 32, 32), boxes)
    assert torch.allclose(uniform, torch.full((16,), vt.RANDOM_BASELINE, dtype=torch.float64))
    with pytest.raises(ValueError):
        vt.relevance_mass_accuracy(torch.ones(16, 32), boxes)


def test_vision_task_training_is_seeded_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = vt.TaskConfig(num_layers=1, hidden_dim=16, mlp_dim=32, num_heads=2, steps=40,
                           batch_size=32, lr=3e-3)
    first = vt.load_model(config, verbose=False)
    assert list(tmp_path.rglob("*.pt"))  # cached under the user's cache directory
    again = vt.train(config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))
    cached = vt.load_model(config, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 cached.state_dict().values()))


def test_vision_task_evaluate_on_an_untrained_model():
    config = vt.TaskConfig(num_layers=1, hidden_dim=16, mlp_dim=32, num_heads=2)
    model = vt.build_model(config)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.5)
    methods = {"gxi": ("gxi", None), "attnlrp γ": ("attnlrp", (0.25, 0.25))}
    table = vt.evaluate(model, n=6, methods=methods)
    assert set(table) == {"gxi", "attnlrp γ", "random", "accuracy"}
    assert all(0.0 <= row["rma"] <= 1.0 for row in table.values())
    images, labels, _ = vt.make_batch(3, seed=0)
    maps = vt.explain(model, images, labels, "attnlrp", gamma=(0.25, 0.25))
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0
    with pytest.raises(ValueError, match="method"):
        vt.explain(model, images, labels, "lime")
    with pytest.raises(ValueError, match="gamma"):
        vt.explain(model, images, labels, "gxi", gamma=(1.0, 1.0))


def _sweep_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "vit_gamma_sweep.py"
    spec = importlib.util.spec_from_file_location("vit_gamma_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gamma_sweep_example_without_weights_fails_clearly(tmp_path, monkeypatch, capsys):
    sweep = _sweep_module()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing to find
    with pytest.raises(FileNotFoundError, match="never downloads"):
        sweep.find_vit_b_16_weights(None)
    assert sweep.main(["--vit-b-16", "--image", str(tmp_path / "cat.jpg")]) == 2
    assert "vit_b_16 weights were not found" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.pth"))  # nothing was downloaded
    # the heatmap of one grid cell, on a tiny model
    model = tv_vit()
    relevance = sweep.heatmap(model, pixels(1), 1, "attnlrp", 0.25, 0.1)
    assert relevance.shape == (16, 16) and torch.isfinite(relevance).all()


def test_readme_section_runs_as_shown():
    from pathlib import Path

    # the guide's page docs/vision.md (formerly the README's section)
    text = (Path(__file__).resolve().parents[1] / "docs" / "vision.md").read_text(encoding="utf-8")
    assert text.startswith("# Vision Transformers with zennit\n")
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "docs/vision.md", "exec"), namespace)
    assert namespace["heatmap"].shape == (32, 32)
    assert zennit_hooks(namespace["model"]) == 0
    assert "](vit_gamma_sweep.png)" in text
    assert (Path(__file__).resolve().parents[1] / "docs" / "vit_gamma_sweep.png").is_file()
