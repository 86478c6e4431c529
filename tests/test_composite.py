"""Composite behaviour on hand-written blocks: exact forward, equivalence with the modified
Gradient×Input formulation, conservation, register/remove, strict mode and threads."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrp_explicit
from lrp_explicit import composites, dispatch, rules
from blocks import Block, gxi_reference

VARIANTS = ["attnlrp", "cp-lrp"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def explain(model, x, target, variant, **forward_kwargs):
    """Register, explain ``target`` (relevance initialised with the logit), remove."""
    comp = composites.get(variant, model)
    with comp.context(model):
        x = x.detach().clone().requires_grad_(True)
        logits = model(x, **forward_kwargs)
        y = logits[:, target]
        y.backward(y.detach())
    return x.grad, logits.detach(), comp


def masks(batch: int, length: int, dtype=torch.float64):
    keep = torch.ones(batch, 1, length, length, dtype=torch.bool)
    keep[0, ..., :2] = False  # the first sample does not attend to its first two tokens
    additive = torch.zeros(batch, 1, length, length, dtype=dtype)
    additive.masked_fill_(~keep, torch.finfo(dtype).min)
    return {"none": {}, "bool": {"mask": keep}, "additive": {"mask": additive},
            "causal": {"causal": True}}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "causal"])
@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_equivalence_with_modified_gradient_x_input(variant, mask_kind, kv_heads, device):
    torch.manual_seed(0)
    block = Block(kv_heads=kv_heads).double().to(device)
    x = torch.randn(2, 7, 16, dtype=torch.float64, device=device)
    kwargs = {k: (v.to(device) if torch.is_tensor(v) else v)
              for k, v in masks(2, 7)[mask_kind].items()}
    relevance, _, comp = explain(block, x, 3, variant, **kwargs)
    reference = gxi_reference(block, x, 3, variant, **kwargs)
    assert not comp.unruled
    assert torch.isfinite(relevance).all()
    assert relative_error(relevance, reference) < 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_forward_is_exact(variant, dtype):
    torch.manual_seed(1)
    block = Block(kv_heads=2).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    mask = masks(2, 5, dtype)["additive"]["mask"]
    plain = block(x, mask=mask)
    with composites.get(variant, block).context(block):
        assert torch.equal(block(x.requires_grad_(), mask=mask), plain)
        assert torch.equal(block(x, causal=True), block.__call__(x, causal=True))
    assert torch.equal(block(x.detach(), mask=mask), plain)


def test_cp_lrp_conserves_without_biases():
    """CP-LRP has no non-conserving rule: without biases the input relevance sums to the logit."""
    torch.manual_seed(2)
    block = Block(bias=False).double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    relevance, logits, _ = explain(block, x, 1, "cp-lrp")
    total, explained = relevance.sum((1, 2)), logits[:, 1]
    assert torch.allclose(total, explained, rtol=1e-8, atol=0)
    # AttnLRP's softmax rule is not conserving: the same check fails there
    relevance, logits, _ = explain(block, x, 1, "attnlrp")
    assert not torch.allclose(relevance.sum((1, 2)), logits[:, 1], rtol=1e-4, atol=0)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_remove_restores_everything():
    torch.manual_seed(3)
    block = Block().double()
    block.train()
    block.norm2.eval()  # a mixed train/eval state must come back as it was
    block.q.weight.requires_grad_(False)
    before_modules = [(n, m) for n, m in block.named_modules()]
    before_flags = [(n, p.requires_grad) for n, p in block.named_parameters()]
    before_training = [(n, m.training) for n, m in block.named_modules()]
    before_state = state(block)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    plain = block.eval()(x)
    block.train()
    block.norm2.eval()

    comp = composites.get("attnlrp", block)
    comp.register(block)
    assert isinstance(block.q, rules.EpsilonRule) and isinstance(block.norm1, rules.NormRule)
    assert not any(p.requires_grad for p in block.parameters())
    assert all(not m.training for m in block.modules())
    assert dispatch.hooks_installed()
    out = block(x.requires_grad_())
    out[:, 0].sum().backward()
    comp.remove()

    assert [(n, id(m)) for n, m in block.named_modules()] == \
        [(n, id(m)) for n, m in before_modules]
    assert [(n, p.requires_grad) for n, p in block.named_parameters()] == before_flags
    assert [(n, m.training) for n, m in block.named_modules()] == before_training
    after = state(block)
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    assert not dispatch.hooks_installed()
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0
    block.eval()
    assert torch.equal(block(x.detach()), plain)
    assert composites.carrier(block) is None


def test_registering_twice_raises():
    block, other = Block(), Block()
    comp = composites.get("attnlrp", block)
    comp.register(block)
    try:
        with pytest.raises(lrp_explicit.CompositeError, match="already carries"):
            composites.get("cp-lrp", block).register(block)
        with pytest.raises(lrp_explicit.CompositeError, match="already registered"):
            comp.register(other)
    finally:
        comp.remove()
    comp.register(block)  # after remove() it can be registered again
    comp.remove()


def test_forward_that_raises_leaves_no_mode():
    block = Block()
    with composites.get("attnlrp", block).context(block):
        with pytest.raises(RuntimeError):
            block(torch.randn(2, 5, 7))  # wrong feature size
        assert torch._C._len_torch_function_stack() == 0
        assert not dispatch._state.frames
        out = block(torch.randn(2, 5, 16, requires_grad=True))  # still works afterwards
        assert out.grad_fn is not None


class CumprodMixer(nn.Module):
    def forward(self, x):
        return torch.cumprod(x, dim=1)


class WithCumprod(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.mixer = CumprodMixer()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.mixer(self.proj(x)).mean(1))


def test_strict_mode_names_the_unruled_op_and_module():
    model = WithCumprod()
    x = torch.randn(2, 3, 4, requires_grad=True)
    with composites.get("attnlrp", model, strict=True).context(model):
        with pytest.raises(lrp_explicit.UnruledOpError, match=r"cumprod.*'mixer'"):
            model(x)


def test_unruled_op_warns_once_and_is_counted():
    model = WithCumprod()
    comp = composites.get("attnlrp", model)
    with comp.context(model):
        with pytest.warns(lrp_explicit.UnruledOpWarning, match=r"cumprod.*'mixer'"):
            model(torch.randn(2, 3, 4, requires_grad=True))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randn(2, 3, 4, requires_grad=True))  # the second time is silent
    assert comp.unruled[("torch.cumprod", "mixer")] == 2


def test_ops_off_the_relevance_path_are_not_unruled():
    """cumprod on a constant (no grad) is fine even in strict mode."""
    model = WithCumprod()
    with composites.get("attnlrp", model, strict=True).context(model):
        model(torch.randn(2, 3, 4))  # the input does not require grad: nothing is on the path


def test_two_models_in_two_threads():
    torch.manual_seed(4)
    blocks = [Block().double(), Block(kv_heads=2).double()]
    inputs = [torch.randn(2, 6, 16, dtype=torch.float64) for _ in blocks]
    expected = [explain(b, x, 2, v)[0] for b, x, v in zip(blocks, inputs, VARIANTS)]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def worker(i):
        comp = composites.get(VARIANTS[i], blocks[i])
        with comp.context(blocks[i]):
            x = inputs[i].clone().requires_grad_()
            for _ in range(3):
                barrier.wait()
                x.grad = None
                y = blocks[i](x)[:, 2]
                y.backward(y.detach())
        results[i] = x.grad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


class Calls(nn.Module):
    """Runs a callback in the middle of its forward."""

    def __init__(self, callback):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.callback = callback

    def forward(self, x):
        self.callback()
        return self.lin(x).sum(-1)


class Scalar(nn.Module):
    """The bystander model, reduced to a scalar inside its own forward."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)[:, 0].sum()


def plain_gradient(model, x):
    x = x.clone().requires_grad_()
    model(x).backward()
    return x.grad


def test_model_without_composite_is_untouched_inside_another_forward():
    torch.manual_seed(5)
    bystander = Scalar(Block().double())
    x_b = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = plain_gradient(bystander, x_b)
    seen = {}

    def run_bystander():  # runs while the registered model's forward is in progress
        seen["nested"] = plain_gradient(bystander, x_b)
        thread = threading.Thread(target=lambda: seen.update(thread=plain_gradient(bystander, x_b)))
        thread.start()
        thread.join()

    model = Calls(run_bystander).double()
    with composites.get("attnlrp", model, strict=True).context(model):
        model(torch.randn(2, 16, dtype=torch.float64, requires_grad=True))
    assert torch.equal(seen["nested"], expected)
    assert torch.equal(seen["thread"], expected)


def test_op_rules_context_applies_rules_outside_forward():
    """Pooling done after the model: plain autograd would copy relevance to every token."""
    torch.manual_seed(6)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    comp = composites.get("attnlrp")
    with comp.op_rules():
        y = x.sum(0)
    y.backward(y.detach())
    assert torch.allclose(x.grad.sum(0), y.detach(), rtol=1e-10)
    assert torch.allclose(x.grad, x.detach() * (y / (y + 1e-12)).detach(), rtol=1e-10)


def test_module_name_patterns_take_precedence():
    block = Block()
    comp = lrp_explicit.Composite({nn.Linear: rules.EpsilonRule, "up": rules.StopRule})
    with comp.context(block):
        assert isinstance(block.up, rules.StopRule)
        assert isinstance(block.gate, rules.EpsilonRule)
        assert block.up.weight is block.up.module.weight  # attributes reach the original


def test_rule_attributes_fall_through_to_the_module():
    lin = nn.Linear(3, 2)
    rule = rules.EpsilonRule(lin)
    assert rule.in_features == 3 and rule.weight is lin.weight


def test_norm_rule_needs_a_kind_for_unknown_classes():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(TypeError, match="kind='layer' or kind='rms'"):
        rules.NormRule(Scale())


class Checkpointed(nn.Module):
    """Runs its block through ``torch.utils.checkpoint`` when ``enabled``."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.block = Block().double()
        self.enabled, self.reentrant = False, reentrant

    def forward(self, x):
        if self.enabled:
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.block(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_recomputation_in_the_backward_uses_the_rules(reentrant):
    torch.manual_seed(7)
    model = Checkpointed(reentrant)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    plain, _, _ = explain(model, x, 2, "attnlrp")
    model.enabled = True
    checkpointed, _, comp = explain(model, x, 2, "attnlrp")
    assert torch.equal(checkpointed, plain)
    assert not comp.unruled


STRAY_GELU = nn.GELU()  # a module object used as a function, as transformers' ``gelu``


class NewGELU(nn.Module):
    """tanh-approximated GELU written out with several functional calls."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))


STRAY_NEW_GELU = NewGELU()


class UsesStrayModules(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = act

    def forward(self, x):
        return self.act(self.lin(x))


@pytest.mark.parametrize("stray", [STRAY_GELU, STRAY_NEW_GELU])
def test_module_objects_called_but_not_owned_take_the_rules(stray):
    """A parameterless module the forward calls without owning it is part of the computation:
    with a module rule for its class it gets that rule (identity here), else the op rules."""
    torch.manual_seed(8)
    model = UsesStrayModules(lambda h: stray(h)).double()
    comp = lrp_explicit.Composite({nn.Linear: rules.EpsilonRule, nn.GELU: rules.IdentityRule,
                                   NewGELU: rules.IdentityRule}, strict=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    plain = model(x)
    with comp.context(model):
        xx = x.clone().requires_grad_()
        out = model(xx)
        assert torch.equal(out, plain)
        relevance = torch.randn_like(out)
        out.backward(relevance)
    lin = model.lin
    z = lin(x).detach()
    expected = x * ((relevance / (z + 1e-12 * torch.where(z >= 0, 1.0, -1.0))) @ lin.weight)
    assert torch.allclose(xx.grad, expected, rtol=1e-9)


def test_attention_mode_of_the_registry_composites(monkeypatch):
    """``attention="exact"`` selects the exact sdpa decomposition; the default is the fused
    backward; an unknown mode is refused."""
    from lrp_explicit import functional as lf

    model = nn.Sequential(nn.Linear(4, 4))
    fused = composites.get("attnlrp", model).ops["sdpa"]
    exact = composites.get("attnlrp", model, attention="exact").ops["sdpa"]
    held = composites.get("cp-lrp", model, attention="exact").ops["sdpa"]
    assert fused.__name__ == "sdpa_attnlrp" and exact.__name__ == "sdpa_attnlrp_exact"
    assert held.__name__ == "sdpa_cp_exact"
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    calls = []
    original = lf.AttentionFunction.apply
    monkeypatch.setattr(lf.AttentionFunction, "apply",
                        lambda *a: calls.append(a) or original(*a))
    exact(F.scaled_dot_product_attention, (q, k, v), {}, None)
    assert len(calls) == 1
    fused(F.scaled_dot_product_attention, (q, k, v), {}, None)
    assert len(calls) == 1  # the fused path does not decompose
    with pytest.raises(ValueError, match="attention must be one of"):
        composites.get("attnlrp", model, attention="flash")
