"""Conservation audit: ledger, block-boundary conservation on tiny LLaMA/GPT-2/BERT, absorber
attribution, unruled ops and custom Functions, NaN location, zero_bias, assert_conserves,
rendering and leaving the model as it was."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn
from transformers import activations as hf_activations
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import lrp_explicit
from lrp_explicit import composites, dispatch, rules
from lrp_explicit import functional as lf
from lrp_explicit.audit import ABSORBERS, UnruledOp
from lrp_explicit.testing import assert_conserves
from blocks import Block

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- tiny HF models

SIZE = dict(initializer_range=0.2)
FAMILIES = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        attention_bias=True, mlp_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **SIZE)), "model.layers.?", "model.layers.{}.self_attn"),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1,
        eos_token_id=2, **SIZE)), "transformer.h.?", "transformer.h.{}.attn"),
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3, **SIZE)),
        "bert.encoder.layer.?", "bert.encoder.layer.{}.attention"),
}


def hf_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[name][0]().double().eval()
    with torch.no_grad():  # non-zero biases, so that zero_bias has something to do
        for pname, param in model.named_parameters():
            if pname.endswith("bias"):
                param.uniform_(-0.3, 0.3)
    return model


def hf_composite(variant: str, model: nn.Module) -> lrp_explicit.Composite:
    """The generic composite plus the HF classes it does not know (see the task notes)."""
    comp = composites.get(variant, model, family="generic")
    comp.module_rules[LlamaRMSNorm] = rules.NormRule
    comp.module_rules[Conv1D] = rules.EpsilonRule
    for cls in (hf_activations.NewGELUActivation, hf_activations.GELUActivation):
        comp.module_rules[cls] = rules.IdentityRule
    return comp


def embeddings(model: nn.Module, batch: int = 1, length: int = 6) -> torch.Tensor:
    ids = torch.randint(3, 40, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


def plain_logit(model: nn.Module, emb: torch.Tensor, target: int) -> float:
    """The explained logit from a plain forward, without composite or audit."""
    with torch.no_grad():
        logits = model(inputs_embeds=emb).logits
    return float((logits[:, -1, target] if logits.dim() == 3 else logits[:, target]).sum())


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------- block boundaries


@pytest.mark.parametrize("family", FAMILIES)
def test_cp_lrp_conserves_at_every_block_boundary(family):
    model = hf_model(family)
    _, blocks, _ = FAMILIES[family]
    emb = embeddings(model)
    with lrp_explicit.zero_bias(model):
        logit = plain_logit(model, emb, 1)
        report = lrp_explicit.audit(model, {"inputs_embeds": emb}, 1,
                                    hf_composite("cp-lrp", model), record=[blocks])
    assert not report.unruled and report.first_nonfinite is None
    assert rel(report.explained, logit) < 1e-12
    names = sorted(report.recorded)
    assert names == [blocks.replace("?", str(i)) for i in range(2)]
    for name in names:
        total = float(report.recorded[name].sum())  # computed here from the recorded tensor
        assert rel(total, logit) < 1e-8, (name, total, logit)
        assert rel(report[name].relevance_at_output, total) < 1e-12
        assert abs(report[name].absorbed) < 1e-8 * abs(logit)
    inputs = float(report.input_relevance["inputs_embeds"].sum())
    assert rel(report.input_total, inputs) < 1e-12
    # GPT-2 and BERT: the position (and token-type) embeddings are constant operands of the
    # embedding sum, before the first block; that is all the model does not conserve
    assert abs(report.absorbed - report.absorbed_by.get("constant", 0.0)) < 1e-8 * abs(logit)
    assert (family == "llama") == (abs(report.absorbed) < 1e-8 * abs(logit))
    if family != "llama":  # and it happens in the code that sums the embeddings
        scope = report["transformer" if family == "gpt2" else "bert.embeddings"]
        assert rel(scope.own_absorbed_by["constant"], report.absorbed) < 1e-8


@pytest.mark.parametrize("family", FAMILIES)
def test_block_boundaries_do_not_conserve_with_biases(family):
    """The previous test is not vacuous: with the biases in place the boundaries differ."""
    model = hf_model(family)
    _, blocks, _ = FAMILIES[family]
    emb = embeddings(model)
    report = lrp_explicit.audit(model, {"inputs_embeds": emb}, 1,
                                hf_composite("cp-lrp", model), record=[blocks])
    totals = [float(t.sum()) for t in report.recorded.values()]
    assert rel(totals[0], report.explained) > 1e-4
    assert report.absorbed_by["bias"] != 0


@pytest.mark.parametrize("family", FAMILIES)
def test_attnlrp_loses_relevance_in_softmax_only(family):
    model = hf_model(family)
    _, blocks, attention = FAMILIES[family]
    emb = embeddings(model)
    with lrp_explicit.zero_bias(model):
        report = lrp_explicit.audit(model, {"inputs_embeds": emb}, 1,
                                    hf_composite("attnlrp", model), record=[blocks])
    tol = 1e-8 * report.scale
    for i in range(2):
        block = report[blocks.replace("?", str(i))]
        assert abs(block.absorbed) > 1e3 * tol  # AttnLRP does not conserve …
        assert abs(block.absorbed - block.absorbed_by["softmax"]) < tol  # … only in softmax
        assert all(abs(v) < tol for k, v in block.absorbed_by.items() if k != "softmax")
        assert abs(block.unaccounted) < tol
        attn = report[attention.format(i)]  # and that softmax is inside the attention module
        assert abs(attn.absorbed_by["softmax"] - block.absorbed_by["softmax"]) < tol
    others = {k: v for k, v in report.absorbed_by.items() if k not in ("softmax", "constant")}
    assert all(abs(v) < tol for v in others.values()), others
    if family == "llama":  # no position embeddings: the whole model loses only in softmax
        assert abs(report.absorbed - report.absorbed_by["softmax"]) < tol
    assert report.check(rtol=1e-8).ok


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_audit_does_not_change_the_explanation(family, variant):
    """Aliases and hooks leave the relevance as a plain explanation computes it (CP-LRP gate
    tags survive the aliases; only the order of gradient accumulation may differ)."""
    model = hf_model(family)
    emb = embeddings(model, batch=2)
    report = lrp_explicit.audit(model, {"inputs_embeds": emb}, 2, hf_composite(variant, model),
                                record=["*"])
    comp = hf_composite(variant, model)
    with comp.context(model):
        x = emb.clone().requires_grad_()
        logits = model(inputs_embeds=x).logits
        y = logits[:, -1, 2] if logits.dim() == 3 else logits[:, 2]
        y.backward(y.detach())
    got = report.input_relevance["inputs_embeds"]
    assert torch.allclose(got, x.grad, rtol=0, atol=1e-14 * float(x.grad.abs().max()))
    assert report.explained == pytest.approx(float(y.detach().sum()), rel=1e-15)
    assert len(report.recorded) >= 20


# ---------------------------------------------------------------------------- the ledger


def test_totals_and_attribution_on_a_block_with_biases():
    torch.manual_seed(0)
    block = Block(bias=True).double()
    with torch.no_grad():
        block.norm2.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    report = lrp_explicit.audit(block, x, 1, "cp-lrp", record=["o", "head"])
    tol = 1e-10 * report.scale
    # the report's totals, recomputed here from the relevance tensors
    assert report.explained == pytest.approx(float(block(x)[:, 1].sum().detach()), rel=1e-14)
    assert report.input_total == pytest.approx(float(report.input_relevance["input"].sum()),
                                               rel=1e-14)
    assert report["head"].relevance_at_output == pytest.approx(report.explained, rel=1e-14)
    assert report["o"].relevance_at_output == \
        pytest.approx(float(report.recorded["o"].sum()), rel=1e-12)
    assert abs(report.unaccounted) < tol
    assert report.absorbed == pytest.approx(sum(report.absorbed_by.values()), abs=tol)
    # every biased module absorbs exactly by its bias; CP-LRP stops q, k and the gate
    for name in ("v", "o", "up", "down", "head", "norm2"):
        row = report[name]
        assert abs(row.absorbed) > 1e3 * tol
        assert row.absorbed == pytest.approx(row.absorbed_by["bias"], abs=tol)
    for name in ("q", "k", "gate", "act"):
        assert report[name].relevance_at_output == 0 == report[name].relevance_at_input
    assert report["<root>"].absorbed == pytest.approx(report.absorbed, abs=tol)
    assert report["down"].rule == "EpsilonRule" and report["down"].type == "Linear"
    assert report["<root>"].rule == "ops"


class PositionSum(nn.Module):
    """Adds a constant position embedding (a buffer) before a linear head."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.randn(5, 8, dtype=torch.float64))
        self.head = nn.Linear(8, 3, bias=False).double()

    def forward(self, x):
        return self.head((x + self.pos).mean(1))


def test_constant_operand_is_the_absorber():
    torch.manual_seed(1)
    model = PositionSum()
    report = lrp_explicit.audit(model, torch.randn(2, 5, 8, dtype=torch.float64), 0, "cp-lrp")
    root = report["<root>"]
    assert root.own_absorbed == pytest.approx(root.own_absorbed_by["constant"], abs=1e-10)
    assert abs(root.own_absorbed) > 1e-3
    assert report.check().ok  # constant operands are documented absorbers


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False).double()

    def forward(self, x):
        return self.proj(x)


def test_target_callable_runs_under_op_rules():
    """Pooling in the target is an ε-sum (conserving), not plain autograd."""
    torch.manual_seed(2)
    model = Pooled()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    report = lrp_explicit.audit(model, x, lambda out: out.sum((1, 2)), "cp-lrp")
    assert report.explained == pytest.approx(float(model(x).sum().detach()), rel=1e-14)
    assert abs(report["<target>"].absorbed) < 1e-10
    assert report.input_total == pytest.approx(report.explained, rel=1e-10)


def test_inputs_and_target_forms_agree():
    torch.manual_seed(3)
    block = Block(bias=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    base = lrp_explicit.audit(block, x, 2, "attnlrp").input_relevance["input"]

    leaf = x.clone().requires_grad_()
    by_callable = lrp_explicit.audit(block, lambda m: m(leaf), lambda out: out[:, 2], "attnlrp")
    assert list(by_callable.input_relevance) == ["input0"]
    assert torch.equal(by_callable.input_relevance["input0"], base)
    assert leaf.grad is not None and torch.equal(leaf.grad, base)

    logits = block(x).detach()
    initial = torch.zeros_like(logits)
    initial[:, 2] = logits[:, 2]
    by_tensor = lrp_explicit.audit(block, x, initial, "attnlrp")
    assert torch.allclose(by_tensor.input_relevance["input"], base, rtol=1e-12, atol=1e-15)
    by_tuple = lrp_explicit.audit(block, x, (slice(None), 2), "attnlrp")
    assert torch.equal(by_tuple.input_relevance["input"], base)

    model = hf_model("llama")
    ids = torch.tensor([[3, 7, 9, 4]])
    from_ids = lrp_explicit.audit(model, ids, 5, hf_composite("cp-lrp", model))
    from_dict = lrp_explicit.audit(model, {"input_ids": ids}, 5, hf_composite("cp-lrp", model))
    emb = model.get_input_embeddings()(ids).detach()
    from_emb = lrp_explicit.audit(model, {"inputs_embeds": emb}, 5, hf_composite("cp-lrp", model))
    for report in (from_ids, from_dict):
        assert torch.equal(report.input_relevance["inputs_embeds"],
                           from_emb.input_relevance["inputs_embeds"])


def test_bad_arguments():
    block = Block().double()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    comp = composites.get("cp-lrp", block)
    with pytest.raises(TypeError, match="composite name"):
        lrp_explicit.audit(block, x, 0, comp, epsilon=1e-3)
    with pytest.raises(IndexError, match="out of range"):
        lrp_explicit.audit(block, x, 99, "cp-lrp")
    with pytest.raises(ValueError, match="does not match"):
        lrp_explicit.audit(block, x, torch.ones(3), "cp-lrp")
    with pytest.raises(TypeError, match="get_input_embeddings"):
        lrp_explicit.audit(block, x.long(), 0, "cp-lrp")
    with pytest.raises(KeyError):
        lrp_explicit.audit(block, x, 0, "no-such-composite")
    assert_untouched(block)


class Keeps(nn.Module):
    def __init__(self, box):
        super().__init__()
        self.box = box

    def forward(self, x):
        y = 2 * x
        self.box["y"] = y  # read later by another module, bypassing this module's output
        return y


class Reads(nn.Module):
    def __init__(self, box):
        super().__init__()
        self.box = box

    def forward(self, h):
        return h + self.box["y"]


class SideChannel(nn.Module):
    def __init__(self):
        super().__init__()
        box: dict = {}
        self.a, self.b = Keeps(box), Reads(box)
        self.head = nn.Linear(4, 2, bias=False).double()

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_relevance_crossing_a_side_channel_is_unaccounted():
    torch.manual_seed(10)
    model = SideChannel()
    result = lrp_explicit.check(model, torch.randn(3, 4, dtype=torch.float64), "cp-lrp")
    report = result.report
    side = report["b"].unaccounted
    assert abs(side) > 1e-3
    assert report["a"].unaccounted == pytest.approx(-side, rel=1e-10)
    assert abs(report["<root>"].absorbed) < 1e-10  # the model as a whole conserves
    assert sorted(k.module for k in result.leaks) == ["a", "b"]
    assert all(not k.inherited for k in result.leaks)


# ---------------------------------------------------------------------------- check: unruled


class CumprodMixer(nn.Module):
    def forward(self, x):
        return torch.cumprod(x, dim=1)


class Square(torch.autograd.Function):
    """A user's custom autograd Function (no LRP rule)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class RowScale(torch.autograd.Function):
    """A user's custom autograd Function (no LRP rule); not element-wise, so not the identity
    that an element-wise foreign Function gets."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * (x * x).sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x * x).sum(-1, keepdim=True) + 2 * x * (grad * x).sum(-1, keepdim=True)


class RowScaleMixer(nn.Module):
    def forward(self, x):
        return RowScale.apply(x) + x


class Mixed(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.mixer = mixer
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.mixer(self.proj(x)).mean(1))


@pytest.mark.parametrize("mixer,op,node", [
    (CumprodMixer, "torch.cumprod", "autograd:CumprodBackward0"),
    (RowScaleMixer, "RowScale.apply", "function:RowScale"),
])
def test_check_names_the_unruled_op_and_strict_raises(mixer, op, node):
    torch.manual_seed(4)
    model = Mixed(mixer()).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    result = lrp_explicit.check(model, x, "cp-lrp")
    assert not result.ok
    assert result.unruled == [UnruledOp(op, "mixer", 1)]
    assert [leak.module for leak in result.leaks if not leak.inherited] == ["mixer"]
    assert node in result.leaks[0].absorbed_by
    assert re.search(rf"{re.escape(op)} in module 'mixer'", str(result))
    with pytest.raises(lrp_explicit.UnruledOpError, match=rf"{re.escape(op)}.*'mixer'"):
        lrp_explicit.check(model, x, "cp-lrp", strict=True)
    with pytest.raises(lrp_explicit.UnruledOpError, match=rf"{re.escape(op)}.*'mixer'"):
        lrp_explicit.audit(model, x, 0, "cp-lrp", strict=True)
    # a plain explanation with a strict composite raises too
    with composites.get("cp-lrp", model, strict=True).context(model):
        with pytest.raises(lrp_explicit.UnruledOpError, match=re.escape(op)):
            model(x.clone().requires_grad_())
    assert_untouched(model)


class SquareRule(rules.Rule):
    """A user-defined module rule implemented as a custom Function: not an unruled op."""

    def forward(self, x):
        return Square.apply(x) if x.requires_grad else x * x


class Squarer(nn.Module):
    def forward(self, x):
        return x * x


def test_custom_functions_inside_rules_are_not_reported():
    model = Mixed(Squarer()).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    comp = composites.get("cp-lrp", model)
    comp.module_rules[Squarer] = SquareRule
    result = lrp_explicit.check(model, x, comp, strict=True)  # strict: would raise if reported
    assert result.unruled == []
    assert result.report["mixer"].rule == "SquareRule"
    assert "function:Square" in result.report["mixer"].absorbed_by

    def square_handler(func, args, kwargs, epsilon):  # an op-table entry using the Function
        a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
        return Square.apply(a) if a is b else func(*args, **kwargs)

    model = Mixed(Squarer()).double()
    comp = lrp_explicit.Composite({nn.Linear: rules.EpsilonRule}, ops={"mul": square_handler},
                                  strict=True)
    assert lrp_explicit.check(model, x, comp, strict=True).unruled == []


def test_a_foreign_function_is_named_where_it_is_applied():
    """The Function's output leaves the module it ran in: still named there."""

    class Applies(nn.Module):
        def forward(self, x):
            return RowScale.apply(x)  # not element-wise (an element-wise one is the identity)

    model = Mixed(Applies()).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    result = lrp_explicit.check(model, x, "attnlrp")
    assert result.unruled == [UnruledOp("RowScale.apply", "mixer", 1)]
    assert "function:RowScale" in result.report["mixer"].own_absorbed_by


# ---------------------------------------------------------------------------- NaN location


class NaNGate(torch.autograd.Function):
    """Identity whose backward writes a NaN into the relevance."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, relevance):
        out = relevance.clone()
        out.view(-1)[0] = float("nan")
        return out


class BrokenRule(rules.Rule):
    """A faulty ε-rule for a Linear: NaN in the relevance of its input."""

    def forward(self, x):
        return lf.linear_epsilon(NaNGate.apply(x), self.module.weight, self.module.bias)


@pytest.mark.parametrize("layer", [0, 1])
def test_nan_in_the_backward_is_located_at_its_layer(layer):
    model = hf_model("llama")
    emb = embeddings(model)
    comp = hf_composite("cp-lrp", model)
    where = f"model.layers.{layer}.mlp.down_proj"
    comp.module_rules[where] = BrokenRule
    with lrp_explicit.zero_bias(model):
        report = lrp_explicit.audit(model, {"inputs_embeds": emb}, 1, comp)
    assert report.first_nonfinite == where
    assert report.first_nonfinite_op == "NaNGate"
    row = report[where]
    assert row.nonfinite_input and not row.nonfinite_output
    assert report[f"model.layers.{layer}"].nonfinite_input
    for later in ["lm_head", "model.norm"] + [f"model.layers.{i}" for i in range(layer + 1, 2)]:
        assert not (report[later].nonfinite_input or report[later].nonfinite_output), later
    if layer == 1:
        assert report["model.layers.0"].nonfinite_output
    result = report.check()
    assert result.first_nonfinite == where and not result.ok
    assert f"relevance first non-finite in '{where}'" in str(result)
    assert "NaN-in" in report.table()


@pytest.mark.parametrize("layer", [0, 1])
def test_nan_in_the_forward_is_located_at_its_layer(layer):
    model = hf_model("llama")
    emb = embeddings(model)
    where = f"model.layers.{layer}.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(where).weight[0, 0] = float("nan")
    report = lrp_explicit.audit(model, {"inputs_embeds": emb}, 1, hf_composite("cp-lrp", model))
    assert report.first_nonfinite_forward == where
    assert report.first_nonfinite == "<target>"  # the logit itself is NaN
    assert report.check().first_nonfinite_forward == where
    json.loads(report.to_json())  # strict JSON even with NaN inside


# ---------------------------------------------------------------------------- zero_bias


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.mha = nn.MultiheadAttention(3, 1)
        self.register_buffer("bias", torch.ones(3))  # a buffer named bias: not a parameter
        self.lin.weight.requires_grad_(False)


def test_zero_bias_zeroes_and_restores_exactly():
    torch.manual_seed(5)
    model = WithBuffer()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-1, 1)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in params.items()}
    biases = ["lin.bias", "norm.bias", "mha.in_proj_bias", "mha.out_proj.bias"]
    with lrp_explicit.zero_bias(model) as same:
        assert same is model
        for name in biases:
            assert torch.count_nonzero(params[name]) == 0, name
        assert torch.equal(model.bias, torch.ones(3))
        assert torch.equal(model.lin.weight, before["lin.weight"])
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_explicit.zero_bias(model):
            raise RuntimeError("boom")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in model.named_parameters())  # the very same objects
    assert {k: p.requires_grad for k, p in params.items()} == flags


# ---------------------------------------------------------------------------- assert_conserves


def test_assert_conserves_passes_on_a_conserving_model():
    torch.manual_seed(6)
    block = Block(bias=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    report = assert_conserves(block, x, 1, composite="cp-lrp", rtol=1e-8)
    assert report.explained == pytest.approx(report.input_total, rel=1e-8)
    assert_conserves(block, x, 1, composite="attnlrp", rtol=1e-8, allow=("softmax",))
    model = hf_model("llama")
    with lrp_explicit.zero_bias(model):
        assert_conserves(model, {"inputs_embeds": embeddings(model)}, 1,
                         composite=hf_composite("cp-lrp", model), rtol=1e-8)


def test_assert_conserves_names_the_offending_module():
    torch.manual_seed(7)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    biased = Block(bias=True).double()
    with pytest.raises(AssertionError, match=r"module 'head' \(Linear, rule EpsilonRule\).*bias"):
        assert_conserves(biased, x, 1, composite="cp-lrp", rtol=1e-8)
    assert_conserves(biased, x, 1, composite="cp-lrp", rtol=1e-8, allow=("bias",))

    block = Block(bias=False).double()
    with pytest.raises(AssertionError, match=r"module '<root>'.*softmax"):
        assert_conserves(block, x, 1, composite="attnlrp", rtol=1e-8)

    broken = composites.get("attnlrp", block)  # plain autograd (a gradient) through SiLU
    broken.module_rules[nn.SiLU] = rules.PassRule
    with pytest.raises(AssertionError) as info:
        assert_conserves(block, x, 1, composite=broken, rtol=1e-8, allow=("softmax",))
    message = str(info.value)
    assert "module 'act' (SiLU, rule PassRule)" in message
    assert "autograd:SiluBackward0" in message
    assert "'head'" not in message and "'down'" not in message

    with pytest.raises(AssertionError, match=r"torch\.cumprod.*module 'mixer'"):
        assert_conserves(Mixed(CumprodMixer()).double(), torch.randn(2, 3, 4).double(), 0)
    with pytest.raises(ValueError, match="unknown absorber"):
        assert_conserves(block, x, 1, allow=("sofmax",))


# ---------------------------------------------------------------------------- rendering


def test_report_renders_and_exports():
    torch.manual_seed(8)
    block = Block(bias=True).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    report = lrp_explicit.audit(block, x, 0, "attnlrp", record=["down"])
    assert str(report) == report.table()
    text = report.table(width=200)  # wide enough for one line per module
    assert text.splitlines()[0] == "Conservation audit of Block with attnlrp (float64)"
    for name, kind, rule in [("norm1", "RMSNorm", "NormRule"), ("down", "Linear", "EpsilonRule"),
                             ("<root>", "Block", "ops")]:
        assert re.search(rf"^{re.escape(name)}\s+{kind}\s+{rule}\s", text, re.M), name
    assert "softmax" in text and "bias" in text
    assert "norm1" not in report.table(depth=0) and "<target>" in report.table(depth=0)
    records = report.to_records()
    assert [r["name"] for r in records] == [r.name for r in report.modules]
    assert {"name", "type", "rule", "relevance_at_output", "relevance_at_input", "absorbed",
            "absorbed_by", "max_abs", "nonfinite_output", "nonfinite_input"} <= set(records[0])
    data = json.loads(report.to_json())
    assert data["explained"] == pytest.approx(report.explained)
    assert data["recorded"]["down"]["shape"] == [1, 4, 16]
    assert data["modules"][1]["name"] == "<root>"
    check = json.loads(json.dumps(report.check().to_dict()))
    assert check["ok"] is True
    assert set(ABSORBERS) == {"bias", "epsilon", "softmax", "constant"}


# ---------------------------------------------------------------------------- leaves no trace


def assert_untouched(model: nn.Module) -> None:
    for module in model.modules():
        assert not isinstance(module, rules.Rule)
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._forward_hooks_with_kwargs and not module._forward_pre_hooks_with_kwargs
    assert not dispatch.hooks_installed()
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0
    assert composites.carrier(model) is None


def test_audit_leaves_the_model_as_it_was_even_on_error():
    torch.manual_seed(9)
    block = Block().double()
    block.train()
    block.q.weight.requires_grad_(False)
    modules = [(n, id(m)) for n, m in block.named_modules()]
    flags = [(n, p.requires_grad) for n, p in block.named_parameters()]
    training = [(n, m.training) for n, m in block.named_modules()]
    state = {k: v.clone() for k, v in block.state_dict().items()}

    def same():
        assert [(n, id(m)) for n, m in block.named_modules()] == modules
        assert [(n, p.requires_grad) for n, p in block.named_parameters()] == flags
        assert [(n, m.training) for n, m in block.named_modules()] == training
        assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())
        assert_untouched(block)

    x = torch.randn(2, 5, 16, dtype=torch.float64)
    lrp_explicit.audit(block, x, 1, "attnlrp", record=["*"])
    same()
    with pytest.raises(RuntimeError):
        lrp_explicit.audit(block, torch.randn(2, 5, 7, dtype=torch.float64), 1, "attnlrp")
    same()

    def bad_target(out):
        raise ValueError("target failed")

    with pytest.raises(ValueError, match="target failed"):
        lrp_explicit.audit(block, x, bad_target, "attnlrp")
    same()
    comp = composites.get("attnlrp", block)
    comp.module_rules[nn.Linear] = BrokenRule
    assert lrp_explicit.audit(block, x, 1, comp).first_nonfinite == "head"
    same()

    def fails_in_backward(out):
        y = out[:, 1]
        y.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("backward failed")))
        return y

    with pytest.raises(RuntimeError, match="backward failed"):
        lrp_explicit.audit(block, x, fails_in_backward, "attnlrp")
    same()


def test_audit_with_a_registered_composite_keeps_it():
    block = Block(bias=False).double()
    comp = composites.get("cp-lrp", block)
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    with comp.context(block):
        report = lrp_explicit.audit(block, x, 0, comp)
        assert composites.carrier(block) is comp and isinstance(block.q, rules.EpsilonRule)
        assert not block._forward_hooks and not block.q._forward_pre_hooks
        with pytest.raises(lrp_explicit.CompositeError, match="carries"):
            lrp_explicit.audit(block, x, 0, "attnlrp")
    assert report.input_total == pytest.approx(report.explained, rel=1e-8)
    assert_untouched(block)


# ---------------------------------------------------------------------------- docs/audit.md


def test_readme_example_runs(capsys):
    """The example of the conservation guide (docs/audit.md) runs as shown."""
    text = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    section = text.split("# Verifying conservation in your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "docs/audit.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "Conservation audit of" in out and "OK" in out
