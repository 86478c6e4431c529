"""Latent units: names, relevance per unit, conditional relevance, units as targets,
interventions and ablation (lrp_explicit.latent, explain(condition=…, target={…}),
lrp_explicit.intervene, lrp_explicit.ablate).

The references are written here: a truncated model (the LLaMA cut at the unit, built from the
model's own modules) explained by the pipeline, the ε-rule of a linear layer written out, and
hooks of the tests' own for the forward values."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lrp_explicit
from lrp_explicit import latent
from lrp_explicit.pipeline import Target, attribute, prepare, resolve_composite
from families import BY_NAME

ROOT = Path(__file__).resolve().parents[1]
COMPOSITES = ["attnlrp", "cp-lrp"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def llama():
    # sdpa: the fused attention rule runs in float64 (the eager LLaMA softmax runs in float32)
    return BY_NAME["llama"].build(attn="sdpa")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(1))


# ============================================================================ names


def test_unit_layers_are_named_and_placed():
    llama = BY_NAME["llama"].build()
    sites = {s.name: s for s in latent.unit_layers(llama)}
    assert list(sites)[:3] == ["model.layers.0.self_attn", "model.layers.0.mlp.act_fn",
                               "model.layers.0"]
    neuron = sites["model.layers.0.mlp.act_fn"]
    assert (neuron.kind, neuron.module, neuron.at, neuron.size) == (
        "neuron", "model.layers.0.mlp.down_proj", "input", 48)
    head = sites["model.layers.1.self_attn"]
    assert (head.kind, head.module, head.at, head.heads) == (
        "head", "model.layers.1.self_attn.o_proj", "input", 4)
    assert (sites["model.layers.1"].kind, sites["model.layers.1"].at) == ("dim", "output")
    gpt2 = {s.name: s for s in latent.unit_layers(BY_NAME["gpt2"].build())}
    assert gpt2["transformer.h.0.attn"].module == "transformer.h.0.attn.c_proj"
    assert gpt2["transformer.h.0.mlp.act"].module == "transformer.h.0.mlp.c_proj"
    bert = {s.name: s for s in latent.unit_layers(BY_NAME["bert"].build())}
    assert bert["bert.encoder.layer.1.attention"].module == \
        "bert.encoder.layer.1.attention.output.dense"
    assert bert["bert.encoder.layer.1.intermediate.intermediate_act_fn"].module == \
        "bert.encoder.layer.1.output.dense"
    # BERT's inner attention names the same heads
    inner = latent.find_site(BY_NAME["bert"].build(), "bert.encoder.layer.1.attention.self",
                             heads=True)
    assert (inner.module, inner.heads) == ("bert.encoder.layer.1.attention.output.dense", 4)


def test_unit_errors_are_one_line(llama, ids):
    with pytest.raises(ValueError, match=r"no module 'model.layers.0.mlp.act' .*did you mean "
                                         r"'model.layers.0.mlp.act_fn'"):
        lrp_explicit.explain(llama, ids, condition={"model.layers.0.mlp.act": [1]})
    with pytest.raises(IndexError, match=r"unit 48 out of range for model.layers.0.mlp.act_fn "
                                         r"\(48 units, 0 to 47\)"):
        lrp_explicit.explain(llama, ids, target={"model.layers.0.mlp.act_fn": 48})
    with pytest.raises(IndexError, match=r"unit 4 out of range .*\(4 heads"):
        lrp_explicit.explain(llama, ids, condition={"model.layers.0.self_attn": {"heads": [4]}})
    with pytest.raises(ValueError, match="model.layers.0.mlp .*has no attention output "
                                         "projection"):
        lrp_explicit.explain(llama, ids, condition={"model.layers.0.mlp": {"heads": [0]}})
    with pytest.raises(IndexError, match=r"unit 40 out of range for model.layers.0 \(32 units"):
        lrp_explicit.explain(llama, ids, condition={"model.layers.0": [40]})
    with pytest.raises(ValueError, match="contrast"):
        lrp_explicit.explain(llama, ids, target={"model.layers.0.mlp.act_fn": 3}, contrast=5)


# ============================================================================ unit relevance


class _Inputs:
    """The tests' own observer: the input of chosen modules and the relevance there."""

    def __init__(self, names):
        self.names, self.x, self.grad, self.handles = names, {}, {}, []

    def install(self, model):
        for name in self.names:
            def pre(module, args, name=name):
                x = args[0]
                self.x[name] = x
                x.register_hook(lambda g: self.grad.__setitem__(name, g.detach().clone()))
            self.handles.append(model.get_submodule(name).register_forward_pre_hook(pre))

    def before_backward(self, y):
        pass

    def remove(self):
        for h in self.handles:
            h.remove()


def test_units_of_a_result_are_the_relevance_per_unit(llama, ids, tmp_path):
    """Neurons and heads: the ε-rule of the down and output projections written out from their
    recorded output relevance; dimensions: the recorded block output summed over tokens."""
    layer = "model.layers.1"
    e = lrp_explicit.explain(llama, ids, target=9, record=[f"{layer}.mlp.down_proj",
                                                           f"{layer}.self_attn.o_proj", layer])
    inputs = _Inputs([f"{layer}.mlp.down_proj", f"{layer}.self_attn.o_proj"])
    item = prepare(llama, ids)
    attribute(llama, item, lambda out: Target(out.logits[0, -1, 9], out.logits[0, -1, 9].detach()),
              resolve_composite("attnlrp", llama), observers=[inputs])
    for name, kind, heads in (("mlp.down_proj", "mlp.act_fn", 1), ("self_attn.o_proj",
                                                                     "self_attn", 4)):
        linear = llama.get_submodule(f"{layer}.{name}")
        x = inputs.x[f"{layer}.{name}"][0].detach()
        z = x @ linear.weight.T
        r = e.latent[f"{layer}.{name}"]
        eps = 1e-12
        expected = x * ((r / (z + eps * torch.where(z >= 0, 1.0, -1.0))) @ linear.weight)
        per_unit = expected.reshape(x.shape[0], heads, -1).sum(-1) if heads > 1 \
            else expected
        assert e.unit_kinds[f"{layer}.{kind}"] == ("head" if heads > 1 else "neuron")
        torch.testing.assert_close(e.units[f"{layer}.{kind}"], per_unit.sum(0), rtol=1e-10,
                                   atol=1e-14)
    torch.testing.assert_close(e.units[layer], e.latent[layer].sum(0), rtol=1e-12, atol=0)
    assert list(e.units) == [s.name for s in latent.unit_layers(llama)]
    top = e.top_units("*mlp.act_fn", 5)
    values = torch.cat([e.units["model.layers.0.mlp.act_fn"], e.units[f"{layer}.mlp.act_fn"]])
    assert [u.relevance for u in top] == sorted(values.tolist(), reverse=True)[:5]
    assert all(u.kind == "neuron" for u in top)
    assert all(float(e.units[u.layer][u.index]) == u.relevance for u in top)  # where it is
    assert {u.layer for u in e.top_units("*mlp.act_fn", 96)} == {
        "model.layers.0.mlp.act_fn", f"{layer}.mlp.act_fn"}
    assert top[0].spec == {top[0].layer: [top[0].index]}
    e.save(tmp_path / "e.lrp")
    again = lrp_explicit.load(tmp_path / "e.lrp")
    assert again.unit_kinds == e.unit_kinds and list(again.units) == list(e.units)
    assert all(torch.equal(again.units[k], e.units[k]) for k in e.units)
    assert e.to_dict()["top_units"][0]["layer"] in e.units
    heads = e.top_units("*self_attn", 2)
    assert heads[0].kind == "head" and str(heads[0]).startswith(f"{heads[0].layer}.head[")
    with pytest.raises(ValueError, match="matches no unit layer"):
        e.top_units("*nothing*")


def test_units_of_batches_and_generations(llama):
    """Each sample of a batch, and each generated token, gets its own units: those it gets
    alone."""
    a = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    b = torch.randint(3, 64, (1, 7), generator=torch.Generator().manual_seed(5))
    batch = lrp_explicit.explain(llama, [a, b], target=3, progress=False)
    for sample, e in zip((a, b), batch):
        alone = lrp_explicit.explain(llama, sample, target=3)
        for name in alone.units:
            torch.testing.assert_close(e.units[name], alone.units[name], rtol=1e-9, atol=1e-13)
    assert batch.top_units("*self_attn", 2) == [e.top_units("*self_attn", 2) for e in batch]
    g = lrp_explicit.explain(llama, a, generate=3, progress=False)
    assert g.units["model.layers.1.mlp.act_fn"].shape == (len(g.generated), 48)
    full = torch.tensor([g.ids])
    for i in range(len(g.generated)):
        row = lrp_explicit.explain(llama, full[:, :g.prompt_length + i], target=g.generated[i])
        torch.testing.assert_close(g.units["model.layers.1.mlp.act_fn"][i],
                                   row.units["model.layers.1.mlp.act_fn"], rtol=1e-9,
                                   atol=1e-13)
        assert [(u.layer, u.index) for u in g.top_units("*", 3)[i]] == \
            [(u.layer, u.index) for u in row.top_units("*", 3)]
    html, text = g.latent_view(k=2).to_html(), str(g.latent_view(k=2))
    assert html.count("lrp-units-row") == len(g.generated) and "model.layers." in text


def test_latent_views(llama, ids):
    e = lrp_explicit.explain(llama, ids, target=9)
    view = e.latent_view(k=3)
    html = view.to_html()
    assert html.startswith("<!DOCTYPE html>") and html.count("lrp-units-row") == 6
    assert view._repr_html_().count("lrp-unit\"") == 18
    best = e.top_units("model.layers.1.mlp.act_fn", 1)[0]
    text = view.to_terminal(color=False, width=100)
    assert f"{best.index}" in text and "model.layers.1.mlp.act_fn" in text
    assert "\033[" not in text and "\033[" in view.to_terminal(color=True, width=100)


# ============================================================================ conditions


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("layer,heads", [("model.layers.0.mlp.act_fn", False),
                                         ("model.layers.1.self_attn", True)])
def test_conditional_relevance_is_linear(llama, ids, composite, layer, heads):
    """The conditional input relevances of all units of a layer sum to the relevance through
    the whole layer; a condition on no unit gives zero; a layer every path crosses (a block's
    output) gives back the unconditional relevance."""
    n = 4 if heads else 48
    one = (lambda j: {layer: {"heads": [j]}}) if heads else (lambda j: {layer: [j]})
    every = {layer: {"heads": list(range(n))}} if heads else {layer: list(range(n))}
    none = {layer: {"heads": []}} if heads else {layer: []}
    got = lrp_explicit.explain(llama, ids, target=9, composite=composite,
                               condition=[one(j) for j in range(n)] + [every, none])
    assert len(got) == n + 2
    total = sum(e.relevance for e in got[:n])
    assert rel_err(total, got[n].relevance) < 1e-8
    assert float(got[n].relevance.abs().max()) > 1e-3
    assert torch.count_nonzero(got[n + 1].relevance) == 0
    plain = lrp_explicit.explain(llama, ids, target=9, composite=composite)
    assert rel_err(got[n].relevance, plain.relevance) > 1e-2  # the residual path goes around
    dims = lrp_explicit.explain(llama, ids, target=9, composite=composite,
                                condition=[{"model.layers.0": list(range(k, k + 8))}
                                           for k in range(0, 32, 8)])
    assert rel_err(sum(e.relevance for e in dims), plain.relevance) < 1e-8
    assert got[0].condition == one(0) and got[0].score == plain.score


class _Cut(nn.Module):
    """LLaMA decoder layer cut at the neuron layer (the down projection's input) or at the
    heads (the output projection's input)."""

    def __init__(self, layer, kind):
        super().__init__()
        self.layer, self.kind = layer, kind
        if kind == "head":
            layer.self_attn.o_proj = nn.Identity()

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        block = self.layer
        h = block.input_layernorm(hidden_states)
        a, _ = block.self_attn(hidden_states=h, attention_mask=attention_mask,
                               position_embeddings=position_embeddings)
        if self.kind == "head":
            return a
        x = block.post_attention_layernorm(hidden_states + a)
        return block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)


def truncated(model, layer: int, kind: str) -> nn.Module:
    """The LLaMA base model whose output is the unit layer of block ``layer``."""
    base = copy.deepcopy(model.model)
    base.layers = nn.ModuleList([*base.layers[:layer], _Cut(base.layers[layer], kind)])
    base.norm = nn.Identity()
    return base


def explain_truncated(model, ids, layer, kind, columns, composite, initial=None):
    base = truncated(model, layer, kind)

    def target(out):
        y = out.last_hidden_state[0, -1, columns] if initial is None \
            else out.last_hidden_state
        return Target(y, y.detach() if initial is None else initial)

    return attribute(base, prepare(base, ids), target,
                     resolve_composite(composite, base)).relevance["inputs_embeds"][0].sum(-1)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("layer,kind,unit", [(1, "neuron", 17), (0, "neuron", 5),
                                             (1, "head", 2)])
def test_unit_target_equals_the_truncated_model(llama, ids, composite, layer, kind, unit):
    """A unit as the target explains what a model cut at that unit explains for its output."""
    name = f"model.layers.{layer}." + ("mlp.act_fn" if kind == "neuron" else "self_attn")
    spec = {name: unit} if kind == "neuron" else {name: {"heads": [unit]}}
    columns = slice(unit, unit + 1) if kind == "neuron" else slice(8 * unit, 8 * unit + 8)
    e = lrp_explicit.explain(llama, ids, target=spec, composite=composite)
    reference = explain_truncated(llama, ids, layer, kind, columns, composite)
    assert rel_err(e.relevance, reference) < 1e-12
    with torch.no_grad():
        value = truncated(llama, layer, kind)(ids).last_hidden_state[0, -1, columns].sum()
    assert e.score == pytest.approx(float(value), rel=1e-12)
    assert e.target == spec and name in e.label


def test_weighted_unit_target_is_the_weighted_sum(llama, ids):
    name = "model.layers.1.mlp.act_fn"
    both = lrp_explicit.explain(llama, ids, target={name: {3: 2.0, 11: -0.5}})
    a = lrp_explicit.explain(llama, ids, target={name: 3})
    b = lrp_explicit.explain(llama, ids, target={name: 11})
    assert rel_err(both.relevance, 2.0 * a.relevance - 0.5 * b.relevance) < 1e-10
    assert both.score == pytest.approx(2.0 * a.score - 0.5 * b.score, rel=1e-12)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_condition_equals_the_truncated_model_from_the_layers_relevance(llama, ids, composite):
    """The relevance through neurons 3 and 17 of block 0: the relevance that reaches the
    layer (read by the tests' own hook) kept at the two neurons and explained by the model cut
    there."""
    name, down = "model.layers.0.mlp.act_fn", "model.layers.0.mlp.down_proj"
    inputs = _Inputs([down])
    attribute(llama, prepare(llama, ids),
              lambda out: Target(out.logits[0, -1, 9], out.logits[0, -1, 9].detach()),
              resolve_composite(composite, llama), observers=[inputs])
    mask = torch.zeros(48, dtype=torch.float64)
    mask[[3, 17]] = 1.0
    reference = explain_truncated(llama, ids, 0, "neuron", None, composite,
                                  initial=inputs.grad[down] * mask)
    e = lrp_explicit.explain(llama, ids, target=9, composite=composite,
                             condition={name: [3, 17]})
    assert rel_err(e.relevance, reference) < 1e-12
    # a condition on the whole last block (a cut above) changes nothing
    both = lrp_explicit.explain(llama, ids, target=9, composite=composite,
                                condition={name: [3, 17], "model.layers.1": list(range(32))})
    assert rel_err(both.relevance, e.relevance) < 1e-10
    # the units of a conditional result: those below the condition, through it
    assert set(e.units) == {"model.layers.0.self_attn"}
    assert float(e.units["model.layers.0.self_attn"].sum()) != 0.0


# ============================================================================ interventions


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in
             model.named_modules()})


def _same(model, before):
    params, hooks = before
    now = model.state_dict()
    assert list(now) == list(params)
    assert all(torch.equal(now[k], params[k]) and now[k].dtype == params[k].dtype
               for k in params)
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for n, m in model.named_modules()} == hooks


def _watch(model, names):
    seen, handles = {}, []
    for name, at in names:
        module = model.get_submodule(name)
        if at == "input":
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: seen.__setitem__(name, a[0].detach().clone())))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, o.detach().clone())))
    return seen, handles


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_intervene_changes_the_forward_as_asked_and_restores_the_model(family):
    model = BY_NAME[family].build()
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    sites = latent.unit_layers(model)
    neuron = next(s for s in sites if s.kind == "neuron")
    head = next(s for s in sites if s.kind == "head")
    block = [s for s in sites if s.kind == "dim"][-1]
    names = [(neuron.module, "input"), (head.module, "input"), (block.module, "output")]
    before = _state(model)
    with torch.no_grad():
        seen, handles = _watch(model, names)
        plain = model(ids).logits
        old = dict(seen)
        for h in handles:
            h.remove()
        cases = [({neuron.name: {3: 0.0, 5: 2.5}}, neuron.module,
                  lambda new, o: (new[..., 3] == 0).all() and (new[..., 5] == 2.5).all()
                  and torch.equal(new[..., 6:], o[..., 6:])),
                 ({head.name: {"heads": {"scale": {1: 0.5}}}}, head.module,
                  lambda new, o: torch.equal(new[..., 8:16], o[..., 8:16] * 0.5)
                  and torch.equal(new[..., :8], o[..., :8])),
                 ({block.name: {"set": {0: 1.0}, "scale": {2: -1.0}}}, block.module,
                  lambda new, o: (new[..., 0] == 1).all() and torch.equal(new[..., 2], -o[..., 2])
                  and torch.equal(new[..., 3:], o[..., 3:]))]
        for changes, where, check in cases:
            with lrp_explicit.intervene(model, changes) as same:
                assert same is model
                seen, handles = _watch(model, names)
                changed = model(ids).logits
                for h in handles:
                    h.remove()
            assert check(seen[where], old[where]), changes
            assert not torch.equal(changed, plain)
        _same(model, before)
        assert torch.equal(model(ids).logits, plain)
        with pytest.raises(RuntimeError, match="boom"):
            with lrp_explicit.intervene(model, {neuron.name: {0: 0.0}}):
                model(ids)
                raise RuntimeError("boom")
        _same(model, before)
        with pytest.raises(IndexError, match="out of range"):
            with lrp_explicit.intervene(model, {neuron.name: {0: 0.0}, head.name:
                                                {"heads": {9: 0.0}}}):
                pass
        with pytest.raises(IndexError, match=r"unit 99 out of range for .*\(32 units"):
            with lrp_explicit.intervene(model, {block.name: {99: 0.0}}):
                model(ids)
        with pytest.raises(TypeError, match="mapping of unit to value"):
            with lrp_explicit.intervene(model, {neuron.name: [3]}):
                pass
        _same(model, before)
        assert torch.equal(model(ids).logits, plain)


def test_explain_inside_intervene(llama, ids):
    """An explanation of the changed model: its score is the changed logit, the set neuron has
    no relevance, and the model is restored."""
    name = "model.layers.1.mlp.act_fn"
    before = _state(llama)
    with lrp_explicit.intervene(llama, {name: {7: 0.0}, "model.layers.0.mlp.act_fn":
                                        {"scale": {4: 3.0}}}):
        e = lrp_explicit.explain(llama, ids, target=9)
        with torch.no_grad():
            logit = llama(ids).logits[0, -1, 9]
    assert e.score == pytest.approx(float(logit), rel=1e-12)
    assert float(e.units[name][7]) == 0.0
    assert float(e.units[name].abs().sum()) > 0
    _same(llama, before)


# ============================================================================ ablation


def test_ablation_reports_the_changes(llama, ids):
    result = lrp_explicit.ablate(llama, ids, "*mlp.act_fn", k=[1, 3], target=9, draws=2,
                                 seed=1)
    e = lrp_explicit.explain(llama, ids, target=9)
    assert result.base == pytest.approx(e.score, rel=1e-12)
    assert [u.index for u in result.units] == [u.index for u in e.top_units("*mlp.act_fn", 3)]
    with lrp_explicit.intervene(llama, latent.as_spec(result.units, 0.0)), torch.no_grad():
        assert result.top[1] == pytest.approx(float(llama(ids).logits[0, -1, 9]), rel=1e-12)
    assert len(result.random) == 2 and all(len(r) == 2 for r in result.random)
    assert "top-k change" in str(result)
    with pytest.raises(ValueError, match="more than the 96 units"):
        lrp_explicit.ablate(llama, ids, "*mlp.act_fn", k=97, target=9, draws=0)


@pytest.mark.slow
def test_knowledge_neurons_example_ablation_beats_random():
    """The example on its trained model (few steps and sentences here): removing the most
    relevant neurons lowers the explained logit difference more than removing random ones."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "knowledge_neurons.py"),
                           "--steps", "60", "--samples", "6", "--draws", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for k, what in ((64, "neurons"), (2, "heads")):
        assert f"removing the {k} most relevant {what} lowers the logit difference more" in out
    rows = re.findall(r"^\s+(\d+)\s+([+-][\d.]+)\s+([+-][\d.]+)", out, flags=re.M)
    changes = {int(k): (float(top), float(random)) for k, top, random in rows}
    assert changes[64][0] < changes[64][1] and changes[2][0] < changes[2][1], out
