"""Stock transformers families: registry lookup for every head, exact forward, equivalence with
the modified Gradient×Input reference, padded batches, bfloat16, gradient checkpointing, remove."""
from __future__ import annotations

import inspect

import pytest
import torch

from lrp_explicit import composites
from lrp_explicit import functional as lf
from families import BY_NAME, FAMILIES, inputs, score
from gxi import reference_relevance

VARIANTS = ["attnlrp", "cp-lrp"]
CASES = [(f.name, attn) for f in FAMILIES for attn in f.attn]


def relative_error(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


def explain(model, x, input_name, variant, select=score, **kwargs):
    comp = composites.get(variant, model, strict=True)
    with comp.context(model):
        x = x.detach().clone().requires_grad_(True)
        output = model(**{input_name: x}, **kwargs)
        y = select(output)
        y.backward(y.detach())
    return x.grad, output, comp


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_every_head_is_found_and_runs_exactly(name):
    family = BY_NAME[name]
    for head in family.classes():
        model = family.build(head)
        x, key = inputs(family, model)
        plain = model(**{key: x})[0]
        for variant in VARIANTS:
            comp = composites.get(variant, model)
            assert composites.family_of(model) not in ("generic",)
            with comp.context(model):
                out = model(**{key: x.clone().requires_grad_()})[0]
                assert torch.equal(out, plain), f"{head.__name__} {variant}"
                out.float().sum().backward()
        assert torch.equal(model(**{key: x})[0], plain)


@pytest.mark.parametrize("name,attn", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_equivalence_with_modified_gradient_x_input(name, attn, variant):
    family = BY_NAME[name]
    model = family.build(attn=attn)
    x, key = inputs(family, model, batch=2)
    relevance, _, comp = explain(model, x, key, variant)
    reference = reference_relevance(model, variant, x, lambda o: score(o), input_name=key)
    assert torch.isfinite(relevance).all()
    assert relative_error(relevance, reference) < 1e-6
    assert not comp.unruled


def test_variants_differ():
    """The two variants give different relevance (the test models are not degenerate)."""
    family = BY_NAME["llama"]
    model = family.build()
    x, key = inputs(family, model)
    a = explain(model, x, key, "attnlrp")[0]
    b = explain(model, x, key, "cp-lrp")[0]
    assert relative_error(a, b) > 1e-2


def padded(family, model, side, lengths=(7, 4)):
    """Per-sample embeddings, and the padded batch with its mask and position ids."""
    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(3)
    samples = [embed(torch.randint(3, 64, (1, n), generator=gen)).detach() for n in lengths]
    width = max(lengths)
    pad = embed(torch.zeros(1, 1, dtype=torch.long)).detach()
    rows, masks = [], []
    for sample, n in zip(samples, lengths):
        filler = pad.expand(1, width - n, -1)
        rows.append(torch.cat([filler, sample] if side == "left" else [sample, filler], 1))
        ones, zeros = torch.ones(1, n, dtype=torch.long), torch.zeros(1, width - n,
                                                                          dtype=torch.long)
        masks.append(torch.cat([zeros, ones] if side == "left" else [ones, zeros], 1))
    mask = torch.cat(masks)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return samples, torch.cat(rows), mask, positions


# the attention kinds each text family has; left padding only for causal models
PADDED_CASES = [(f.name, attn, side) for f in FAMILIES if not f.vision
                for attn in ("eager", "sdpa") if attn in f.attn
                for side in ("left", "right") if side == "right" or f.causal]


@pytest.mark.parametrize("name,attn,side", PADDED_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_each_sample_alone(name, attn, side, variant):
    family = BY_NAME[name]
    # transformers' eager attention of the LLaMA-like families takes its softmax in float32: in
    # float64 the masked scores (about -1.8e308) become -inf there and fully masked rows (left
    # padding) NaN, in the stock model itself. Those cases run in float32, where round-off
    # allows ~1e3 ulp (1e-4) instead of float64's 1e-6.
    dtype, tolerance = torch.float64, 1e-6
    if attn == "eager" and side == "left":
        probe = family.build(attn=attn)
        _, batch, mask, positions = padded(family, probe, side)
        if not torch.isfinite(probe(inputs_embeds=batch, attention_mask=mask,
                                    position_ids=positions)[0]).all():
            dtype, tolerance = torch.float32, 1e-4
    model = family.build(attn=attn, dtype=dtype)
    samples, batch, mask, positions = padded(family, model, side)
    lengths = [s.shape[1] for s in samples]
    width = batch.shape[1]
    last = [width - 1 if side == "left" else n - 1 for n in lengths]

    def select(output):  # the logit at each sample's last real token
        return output[0][torch.arange(len(last)), last, 5]

    kwargs = {"attention_mask": mask}
    if family.causal:
        kwargs["position_ids"] = positions
    relevance, _, _ = explain(model, batch, "inputs_embeds", variant, select, **kwargs)
    assert torch.isfinite(relevance).all()
    for i, (sample, n) in enumerate(zip(samples, lengths)):
        alone, _, _ = explain(model, sample, "inputs_embeds", variant,
                              lambda o: o[0][:, -1 if family.causal else n - 1, 5])
        rows = slice(width - n, width) if side == "left" else slice(0, n)
        assert relative_error(relevance[i, rows], alone[0]) < tolerance
        outside = relevance[i, slice(0, width - n) if side == "left" else slice(n, width)]
        assert (outside.abs() <= tolerance * 1e-3 * alone.abs().max()).all()


def pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_correlates_with_float64(name, variant):
    family = BY_NAME[name]
    model = family.build(attn=family.attn[-1])
    x, key = inputs(family, model)
    exact, _, _ = explain(model, x, key, variant)
    low, _, _ = explain(model.to(torch.bfloat16), x.to(torch.bfloat16), key, variant)
    assert torch.isfinite(low).all()
    assert pearson(low, exact) >= 0.95
    if not family.vision:  # the per-token relevance users look at
        assert pearson(low.sum(-1), exact.sum(-1)) >= 0.95


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_float16_relevance_is_finite(name):
    family = BY_NAME[name]
    model = family.build(attn=family.attn[-1], dtype=torch.float16)
    x, key = inputs(family, model)
    relevance, _, _ = explain(model, x, key, "attnlrp")
    assert torch.isfinite(relevance).all()


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "bert", "vit"])
def test_gradient_checkpointing_gives_the_same_relevance(name, monkeypatch):
    family = BY_NAME[name]
    model = family.build(attn=family.attn[-1])
    x, key = inputs(family, model)
    calls = []  # calls of the ε-add rule: the recomputation in the backward must use it too
    forward = lf.AddEpsilonFunction.forward
    monkeypatch.setattr(lf.AddEpsilonFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or forward(*a)))

    # checkpointing turns the key-value cache off; without it in both runs the attention sees
    # the same key and value tensors (transformers 4's cache copies them: the summation order
    # of sdpa, and the last bit, would differ)
    options = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters \
        else {}

    def run():
        comp = composites.get("attnlrp", model, strict=True)
        with comp.context(model):
            model.train()  # transformers checkpoints only in training mode (dropout is 0 here)
            xx = x.clone().requires_grad_(True)
            y = score(model(**{key: xx}, **options))
            y.backward(y.detach())
        assert not comp.unruled
        return xx.grad

    expected = run()
    plain_calls = len(calls)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls.clear()
    assert torch.equal(run(), expected)
    assert len(calls) > plain_calls, "no layer was recomputed under the rules"


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_remove_restores_forward_and_state(name):
    family = BY_NAME[name]
    model = family.build()
    x, key = inputs(family, model)
    plain = model(**{key: x})[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, id(m)) for n, m in model.named_modules()]
    explain(model, x, key, "attnlrp")
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(model(**{key: x})[0], plain)


def test_options_reach_family_composites():
    from lrp_explicit.ops import CPLRP_OPS

    model = BY_NAME["llama"].build()
    comp = composites.get("attnlrp", model, epsilon=1e-3, strict=True,
                          ops={"softmax": CPLRP_OPS["softmax"]})
    assert comp.epsilon == 1e-3 and comp.strict and comp.ops["softmax"] is CPLRP_OPS["softmax"]
    assert "llama" in comp.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_forward_exact_and_equivalent(name, variant):
    family = BY_NAME[name]
    model = family.build(attn=family.attn[-1]).cuda()
    x, key = inputs(family, model, batch=2)
    x = x.cuda()
    plain = model(**{key: x})[0]
    relevance, output, _ = explain(model, x, key, variant)
    assert torch.equal(output[0].detach(), plain)
    reference = reference_relevance(model, variant, x, score, input_name=key)
    assert relative_error(relevance, reference) < 1e-6
    low, _, _ = explain(model.to(torch.bfloat16), x.to(torch.bfloat16), key, variant)
    assert torch.isfinite(low).all() and pearson(low, relevance) >= 0.95
