"""Issue 19: no exit path leaves a model or a process wrong.

Interrupts (a ``KeyboardInterrupt`` in the forward or the backward) leave no mode, frame or
global hook behind and plain gradients exact; hooks on modules that a rule wraps run; a model
with inference tensors or meta weights no hook loads is refused clearly and stays usable;
registration is all or nothing; wrapped models get their family's composite; bad input is
refused in one line naming the argument (exit 2 on the command line); ``state_dict()`` keys do
not change while registered. A seeded fuzz test runs random sequences of register / explain /
remove / interrupt / exception over several models in two threads.
"""
from __future__ import annotations

import copy
import io
import random
from collections import Counter
import threading
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn
from torch.utils.checkpoint import checkpoint

import lrp_explicit
from lrp_explicit import cli, composites, dispatch, rules
from lrp_explicit.composites import base as composite_base
from blocks import Block
from families import BY_NAME
from test_cli_audit import tiny_llama, word_tokenizer

IDS = torch.tensor([[5, 17, 3, 42, 9, 28]])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lrp_explicit.UnruledOpWarning)
        yield


@pytest.fixture(scope="module")
def llama():
    return BY_NAME["llama"].build(attn="sdpa")


def plain_gradients_are_exact() -> None:
    """Autograd outside any model computes gradients, not relevance."""
    a = torch.tensor(3.0, requires_grad=True)
    b = torch.tensor(-1.0, requires_grad=True)
    (a * b + a).backward()
    assert (a.grad.item(), b.grad.item()) == (0.0, 3.0)


def assert_clean(*models: nn.Module) -> None:
    """No mode, frame, global hook, binding or carrier is left; plain gradients are exact."""
    assert torch._C._len_torch_function_stack() == 0
    assert len(dispatch._state.frames) == 0
    assert not dispatch.hooks_installed()
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not dispatch._modules and not getattr(dispatch, "_tokens", {})
    for model in models:
        assert composites.carrier(model) is None
        assert not any(isinstance(m, rules.Rule) for m in model.modules())
    plain_gradients_are_exact()


def raising(exc: type[BaseException], when=lambda: True):
    def hook(*_):
        if when():
            raise exc("injected")
    return hook


# ============================================================================ 1. interrupts


def test_keyboard_interrupt_in_a_model_registered_by_hand(llama):
    """``register()`` without ``context()`` or the pipeline: the guard on the model's forward
    unwinds the thread's frames at once; the model stays registered and explains after."""
    comp = composites.get("attnlrp", llama)
    comp.register(llama)
    handle = llama.model.layers[1].mlp.register_forward_hook(raising(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            llama(inputs_embeds=llama.get_input_embeddings()(IDS).detach().requires_grad_())
        assert torch._C._len_torch_function_stack() == 0
        assert len(dispatch._state.frames) == 0
        plain_gradients_are_exact()
        assert composites.carrier(llama) is comp
    finally:
        handle.remove()
        comp.remove()
    assert_clean(llama)
    assert "forward" not in llama.__dict__  # the guard goes with the composite


def test_keyboard_interrupt_in_the_forward_of_explain_and_audit(llama):
    handle = llama.model.layers[1].mlp.register_forward_hook(raising(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            lrp_explicit.explain(llama, IDS)
        assert_clean(llama)
        with pytest.raises(KeyboardInterrupt):
            lrp_explicit.audit(llama, IDS, 3)
        assert_clean(llama)
        comp = composites.get("attnlrp", llama)
        with comp.context(llama):  # registered before: the pipeline itself drops the frames
            with pytest.raises(KeyboardInterrupt):
                lrp_explicit.explain(llama, IDS, composite=comp)
            assert torch._C._len_torch_function_stack() == 0
            assert len(dispatch._state.frames) == 0
            plain_gradients_are_exact()
        assert_clean(llama)
    finally:
        handle.remove()
    # and the model explains as before
    assert torch.isfinite(lrp_explicit.explain(llama, IDS).relevance).all()
    assert_clean(llama)


class Mix(nn.Module):
    """Functional code without a module rule (runs under the op rules)."""

    def forward(self, x):
        return x * 2 + x


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.mix = Mix()

    def forward(self, x):
        return self.lin(self.mix(x))


def test_keyboard_interrupt_in_a_registered_model_and_its_composite():
    """Outside the pipeline: ``context()`` (remove) drops the frames an interrupt left, and so
    does the next forward of the same model."""
    torch.manual_seed(0)
    model = nn.Sequential(Inner(), nn.Linear(8, 3)).double()
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    armed = [True]
    handle = model[0].mix.register_forward_hook(raising(KeyboardInterrupt, lambda: armed[0]))
    comp = composites.get("attnlrp", model)
    try:
        with pytest.raises(KeyboardInterrupt):
            with comp.context(model):
                model(x)
        assert_clean(model)
        comp.register(model)
        with pytest.raises(KeyboardInterrupt):
            model(x)
        armed[0] = False
        out = model(x)  # the next forward of the model clears what the interrupt left
        assert torch._C._len_torch_function_stack() == 0 and len(dispatch._state.frames) == 0
        assert out.grad_fn is not None
    finally:
        handle.remove()
        comp.remove()
    assert_clean(model)


class Checkpointed(nn.Module):
    """Recomputes ``inner`` in the backward pass (non-reentrant checkpointing)."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(checkpoint(self.inner, x, use_reentrant=False))


def test_keyboard_interrupt_in_the_backward():
    torch.manual_seed(0)
    model = Checkpointed().double()
    x = torch.randn(1, 8, dtype=torch.float64)
    calls = [0]

    def count(*_):
        calls[0] += 1

    counter = model.inner.mix.register_forward_hook(count)
    expected = lrp_explicit.explain(model, x, 1).relevance
    assert calls[0] == 2  # the forward and its recomputation in the backward
    counter.remove()

    calls[0] = 0

    def during_recomputation():
        calls[0] += 1
        return calls[0] == 2

    handle = model.inner.mix.register_forward_hook(raising(KeyboardInterrupt,
                                                           during_recomputation))
    try:
        with pytest.raises(KeyboardInterrupt):
            lrp_explicit.explain(model, x, 1)
    finally:
        handle.remove()
    assert_clean(model)
    assert torch.equal(lrp_explicit.explain(model, x, 1).relevance, expected)

    plain = nn.Sequential(Inner(), nn.Linear(8, 3)).double()
    expected = lrp_explicit.audit(plain, x, 1).input_relevance["input"]

    def stop(output):
        y = output[:, 1]
        y.register_hook(raising(KeyboardInterrupt))  # in the backward, before any rule
        return y

    with pytest.raises(KeyboardInterrupt):
        lrp_explicit.audit(plain, x, stop)
    assert_clean(plain)
    assert torch.equal(lrp_explicit.audit(plain, x, 1).input_relevance["input"], expected)


def test_frames_of_a_composite_removed_by_another_thread_are_dead():
    """A thread whose forward was interrupted while another thread removes the composite
    computes plain gradients (its frames are dead) and drops them at its next module call."""
    block, other = nn.Sequential(Block().double()), Block().double()
    comp = composites.get("attnlrp", block)
    keep = composites.get("attnlrp", other)  # keeps the global hooks installed
    comp.register(block)
    keep.register(other)
    hook = block[0].o.module.register_forward_hook(raising(KeyboardInterrupt))
    interrupted, removed, results = threading.Event(), threading.Event(), {}

    def worker():
        try:  # a submodule called on its own: the root's guard does not see this forward
            block[0](torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True))
        except KeyboardInterrupt:
            results["stale"] = len(dispatch._state.frames)
        interrupted.set()
        removed.wait(10)
        try:
            plain_gradients_are_exact()
            results["plain"] = True
        except AssertionError as err:
            results["plain"] = err
        nn.Identity()(torch.zeros(1))  # a module call: the thread clears its dead frames
        results["after"] = (len(dispatch._state.frames), torch._C._len_torch_function_stack())

    thread = threading.Thread(target=worker)
    thread.start()
    interrupted.wait(10)
    hook.remove()
    comp.remove()
    removed.set()
    thread.join(10)
    keep.remove()
    assert results["stale"] > 0
    assert results["plain"] is True
    assert results["after"] == (0, 0)
    assert_clean(block, other)


# ============================================================================ 2. user hooks


def test_hooks_on_wrapped_modules_change_the_explanation_as_they_change_the_model(llama):
    base = lrp_explicit.explain(llama, IDS, 3)

    def logit():
        with torch.no_grad():
            return float(llama(IDS).logits[0, -1, 3])

    assert base.score == pytest.approx(logit(), rel=1e-12)

    handle = llama.lm_head.register_forward_hook(lambda m, a, out: out * 0.5)
    try:
        hooked = lrp_explicit.explain(llama, IDS, 3)
        assert hooked.score == pytest.approx(logit(), rel=1e-12)
        assert hooked.score == pytest.approx(0.5 * base.score, rel=1e-12)
        torch.testing.assert_close(hooked.relevance, 0.5 * base.relevance, rtol=1e-9, atol=0)
    finally:
        handle.remove()

    handle = llama.lm_head.register_forward_hook(lambda m, a, out: out * 0)
    try:
        zeroed = lrp_explicit.explain(llama, IDS, 3)
        assert zeroed.score == 0.0 == logit()
        assert not zeroed.relevance.any()
    finally:
        handle.remove()

    steer = torch.randn(llama.config.hidden_size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
    down = llama.model.layers[0].mlp.down_proj
    seen = []
    handles = [down.register_forward_hook(lambda m, a, out: out + steer),
               down.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].sum())),
               llama.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
                   lambda m, args: (args[0] * 1.5,))]
    try:
        steered = lrp_explicit.explain(llama, IDS, 3)
        assert steered.score == pytest.approx(logit(), rel=1e-12)
        assert abs(steered.score - base.score) > 1e-3
        assert len(seen) == 1  # the backward hook saw the relevance at down_proj's output
        report = lrp_explicit.check(llama, IDS, target=3)
        assert report.ok, report
    finally:
        for handle in handles:
            handle.remove()
    assert lrp_explicit.explain(llama, IDS, 3).score == base.score


# ============================================================================ 3. inference mode


def test_a_model_made_under_inference_mode_is_refused_and_stays_usable():
    with torch.inference_mode():
        model = BY_NAME["llama"].build()
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model(IDS).logits
    with pytest.raises(lrp_explicit.CompositeError, match="inference") as info:
        lrp_explicit.explain(model, IDS)
    assert "\n" not in str(info.value) and "inference_mode" in str(info.value)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert_clean(model)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, before)
    # the recipe of the message makes it explainable
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    reference = BY_NAME["llama"].build()
    assert torch.equal(lrp_explicit.explain(model, IDS).relevance,
                       lrp_explicit.explain(reference, IDS).relevance)
    assert_clean(model)


def test_remove_never_stops_half_way():
    block = Block()
    comp = composites.get("attnlrp", block)
    comp.register(block)

    def broken():
        raise RuntimeError("undo step failed")

    comp._undo.insert(2, broken)  # after the rule wrappers' steps have been undone … or not
    with pytest.raises(lrp_explicit.CompositeError, match="undo step failed"):
        comp.remove()
    assert all(p.requires_grad for p in block.parameters())
    assert_clean(block)


# ============================================================================ 4. conflicts


def test_parent_and_submodule_registration_is_all_or_nothing(llama):
    sub = composites.get("attnlrp", llama.model)
    sub.register(llama.model)
    try:
        parent = composites.get("attnlrp", llama)
        with pytest.raises(lrp_explicit.CompositeError, match="module 'model' of "
                                                               "LlamaForCausalLM carries"):
            parent.register(llama)
        assert composites.carrier(llama) is None and parent.model is None
        assert isinstance(llama.lm_head, nn.Linear)  # nothing of the parent was bound
    finally:
        sub.remove()
    assert_clean(llama)
    parent.register(llama)  # both can be registered afterwards
    try:
        child = composites.get("attnlrp", llama.model)
        with pytest.raises(lrp_explicit.CompositeError, match="is part of LlamaForCausalLM"):
            child.register(llama.model)
    finally:
        parent.remove()
    child.register(llama.model)
    child.remove()
    assert_clean(llama)


# ============================================================================ 5. wrappers


class UserWrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(inputs_embeds=x).logits


def test_wrapped_llama_gets_the_llama_composite(llama):
    alone = lrp_explicit.explain(llama, IDS, 3)
    parallel = nn.DataParallel(llama)
    assert composites.get("attnlrp", parallel).name == "attnlrp (llama)"
    assert lrp_explicit.pipeline.task_of(parallel) == "causal-lm"
    wrapped = lrp_explicit.explain(parallel, IDS, 3)
    assert wrapped.task == "causal-lm" and wrapped.label == alone.label
    assert torch.equal(wrapped.relevance, alone.relevance)

    user = UserWrapper(llama)
    assert composites.family_of(user) == "llama"
    x = llama.get_input_embeddings()(IDS).detach()
    expected = lrp_explicit.audit(llama, x, 3).input_relevance["inputs_embeds"]
    got = lrp_explicit.audit(user, x, 3).input_relevance["input"]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert lrp_explicit.check(user, x, target=3).ok

    peft = pytest.importorskip("peft")
    # a LoRA adapter that starts at zero (the default): the function and relevance are the
    # model's own; adapters that change them are tested in test_loaded_models.py
    adapted = peft.get_peft_model(copy.deepcopy(llama),
                                  peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert composites.family_of(adapted) == "llama"
    assert lrp_explicit.pipeline.task_of(adapted) == "causal-lm"
    # (up to the ε of the ε-add that joins the zero path: 1e-12 relative)
    torch.testing.assert_close(lrp_explicit.explain(adapted, IDS, 3).relevance,
                               alone.relevance, rtol=1e-10, atol=0)

    compiled = torch.compile(llama)  # not run: only what it is
    assert composites.family_of(compiled) == "llama"
    assert lrp_explicit.pipeline.task_of(compiled) == "causal-lm"
    assert_clean(llama)


def test_a_wrapper_of_several_families_is_refused(llama):
    both = nn.Module()
    both.decoder = llama
    both.encoder = BY_NAME["bert"].build()
    with pytest.raises(composites.UnknownModelError,
                       match=r"LlamaForCausalLM at 'decoder' \(llama\), BertForMaskedLM at "
                             r"'encoder' \(bert\)"):
        composites.get("attnlrp", both)
    assert composites.get("attnlrp", both, family="generic").name == "attnlrp"


# ============================================================================ 6. offloading


def test_a_rule_never_computes_on_meta_weights():
    rule = rules.EpsilonRule(nn.Linear(4, 2, device="meta"))
    with pytest.raises(lrp_explicit.CompositeError, match="meta device"):
        rule(torch.randn(3, 4, requires_grad=True))
    model = nn.Sequential(nn.Linear(4, 2, device="meta"))
    with pytest.raises(lrp_explicit.CompositeError, match="meta device"):
        composites.get("attnlrp", model).register(model)
    assert_clean(model)


# ============================================================================ 7. bad input


def _float_embeddings(model):
    return model.get_input_embeddings()(IDS).detach()


BAD = [
    ("short mask", lambda m: {"input_ids": IDS, "attention_mask": torch.ones(1, 4, dtype=int)},
     {}, "attention_mask has shape (1, 4) but input_ids has (1, 6)"),
    ("short mask, batch", lambda m: {"input_ids": IDS.repeat(2, 1),
                                     "attention_mask": torch.ones(2, 4, dtype=int)},
     {}, "attention_mask has shape (2, 4)"),
    ("float64 into float32", lambda m: _float_embeddings(m).double(), {},
     "inputs_embeds is torch.float64 but the model computes in torch.float32"),
    ("hidden size", lambda m: _float_embeddings(m)[..., :8], {},
     "inputs_embeds has hidden size 8, the model's embeddings have 32"),
    ("float ids", lambda m: {"input_ids": IDS.float()}, {},
     "input_ids must be integer token ids"),
    ("float list", lambda m: [1.0, 2.5], {}, "token ids must be integers, got 1.0"),
    ("meta inputs", lambda m: _float_embeddings(m).to("meta"), {}, "meta device"),
    ("meta ids", lambda m: {"input_ids": IDS.to("meta")}, {}, "input_ids is on the meta device"),
    ("empty ids", lambda m: torch.zeros(1, 0, dtype=torch.long), {}, "input_ids has no tokens"),
    ("empty list", lambda m: [], {}, "inputs is"),
    ("empty embeddings", lambda m: torch.zeros(1, 0, 32), {}, "inputs_embeds is empty"),
    ("out of vocabulary", lambda m: torch.tensor([[5, 64, 99]]), {},
     "input_ids holds token ids outside the vocabulary of 64 (64, 99)"),
    ("position", lambda m: IDS, {"position": 1.5}, "position must be an int"),
]


# position= is an argument of explain only
CASES = [(entry, *bad) for bad in BAD for entry in ("explain", "audit", "check")
         if entry == "explain" or "position" not in bad[2]]


@pytest.mark.parametrize("entry,name,make,kwargs,message", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_refused_in_one_line_naming_the_argument(entry, name, make, kwargs,
                                                              message):
    model = BY_NAME["llama"].build(dtype=torch.float32)
    run = {"explain": lambda x: lrp_explicit.explain(model, x, **kwargs),
           "audit": lambda x: lrp_explicit.audit(model, x, 3),
           "check": lambda x: lrp_explicit.check(model, x)}[entry]
    with pytest.raises((TypeError, ValueError)) as info:
        run(make(model))
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert_clean(model)


def test_targets_as_numpy_ints_and_0d_tensors(llama):
    expected = lrp_explicit.explain(llama, IDS, 3)
    for target in (np.int64(3), torch.tensor(3), np.int32(3)):
        assert torch.equal(lrp_explicit.explain(llama, IDS, target).relevance,
                           expected.relevance)
        report = lrp_explicit.audit(llama, IDS, target)
        assert report.explained == pytest.approx(expected.score, rel=1e-12)
    assert lrp_explicit.explain(llama, IDS, 3, contrast=np.int32(5), position=np.int64(-1)) \
        .score == lrp_explicit.explain(llama, IDS, 3, contrast=5).score
    with pytest.raises(IndexError, match="target -1 out of range"):
        lrp_explicit.audit(llama, IDS, -1)  # as explain: no negative targets


def test_audit_takes_the_inputs_explain_takes():
    vit = BY_NAME["vit"].build()
    pixels = torch.randn(3, 16, 16, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    explained = lrp_explicit.explain(vit, pixels, 1)
    report = lrp_explicit.audit(vit, pixels, 1)
    torch.testing.assert_close(report.input_relevance["pixel_values"][0].sum(0),
                               explained.relevance, rtol=1e-10, atol=1e-12)


def test_state_dict_keys_do_not_change_while_registered(llama):
    plain = llama.state_dict()
    saved = {k: v.clone() for k, v in plain.items()}
    other = BY_NAME["llama"].build(attn="sdpa", seed=5)
    with composites.get("attnlrp", llama).context(llama):
        state = llama.state_dict()
        assert list(state) == list(plain)
        assert list(state._metadata) == list(plain._metadata)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        llama.load_state_dict(other.state_dict())  # a plain checkpoint loads while registered
        assert all(torch.equal(a, b) for a, b in zip(llama.state_dict().values(),
                                                     other.state_dict().values()))
        llama.load_state_dict(saved)
    buffer.seek(0)
    fresh = BY_NAME["llama"].build(attn="sdpa", seed=7)
    fresh.load_state_dict(torch.load(buffer))  # a checkpoint saved inside context() loads
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert all(torch.equal(llama.state_dict()[k], v) for k, v in saved.items())
    assert_clean(llama)


# ---------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("robust")
    tiny_llama().save_pretrained(base / "llama")
    word_tokenizer().save_pretrained(base / "llama")
    torch.manual_seed(0)
    bert = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=12, num_labels=2))
    bert.save_pretrained(base / "bert")
    word_tokenizer().save_pretrained(base / "bert")
    return {name: str(base / name) for name in ("llama", "bert")}


CLI_BAD = {
    "device meta": (["explain", "--model", "{llama}", "--text", "the cat", "--device", "meta"],
                    "--device meta: the meta device holds no values"),
    "device name": (["explain", "--model", "{llama}", "--text", "the cat", "--device", "gpu7"],
                    "--device gpu7: not a torch device"),
    "long text": (["explain", "--model", "{bert}", "--text", " ".join(["the cat"] * 7)],
                  "--text is 14 tokens long; BertForSequenceClassification takes at most 12"),
    "long text, audit": (["audit", "--model", "{bert}", "--text", " ".join(["the cat"] * 7)],
                         "--text is 14 tokens long"),
    "negative target": (["audit", "--model", "{llama}", "--ids", "3,4,5", "--target", "-1"],
                        "--target -1"),
    "record": (["audit", "--model", "{llama}", "--ids", "3,4,5", "--record", "model.layers.?",
                "--record", "nothing"], "--record ['nothing'] matches no module"),
    "output first": (["explain", "--model", "/nonexistent/model", "--text", "the cat", "-o",
                      "/nonexistent/folder/map.html"],
                     "--output /nonexistent/folder/map.html: no folder"),
}


@pytest.mark.parametrize("argv,message", CLI_BAD.values(), ids=list(CLI_BAD))
def test_cli_bad_input_exits_2_with_one_line(folders, capsys, argv, message):
    code = cli.main([a.format(**folders) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err


# ============================================================================ fuzz


def _models():
    torch.manual_seed(4)
    block = Block(bias=True).double()
    llama = BY_NAME["llama"].build(attn="sdpa")
    gpt2 = BY_NAME["gpt2"].build()
    bert = BY_NAME["bert"].build(tf.BertForSequenceClassification)
    inputs = {id(block): torch.randn(1, 4, 16, dtype=torch.float64)}
    for model in (llama, gpt2, bert):
        inputs[id(model)] = IDS[:, :4]
    return [block, llama, gpt2, bert], inputs


def _relevance(model, x, composite):
    if isinstance(model, Block):
        return lrp_explicit.audit(model, x, 1, composite).input_relevance["input"]
    return lrp_explicit.explain(model, x, 1, composite).relevance


def _fuzz(seed, models, inputs, expected, steps, failures, done):
    rng = random.Random(seed)
    registered: dict[int, composites.Composite] = {}
    try:
        for step in range(steps):
            model = rng.choice(models)
            x = inputs[id(model)]
            comp = registered.get(id(model))
            action = rng.choice(["register", "remove", "explain", "explain", "interrupt",
                                 "exception", "backward", "context"])
            if action == "register" and comp is None:
                comp = composites.get("attnlrp", model)
                comp.register(model)
                registered[id(model)] = comp
            elif action == "remove" and comp is not None:
                comp.remove()
                del registered[id(model)]
            elif action == "explain":
                got = _relevance(model, x, comp or "attnlrp")
                assert torch.allclose(got, expected[id(model)], rtol=1e-10, atol=1e-13), step
                done[action] += 1
            elif action in ("interrupt", "exception"):
                kind = KeyboardInterrupt if action == "interrupt" else RuntimeError
                inside = [m for m in model.modules() if m is not model
                          and not isinstance(m, rules.Rule)]
                victim = rng.choice(inside)
                hook = victim.register_forward_hook(raising(kind))
                try:
                    _relevance(model, x, comp or "attnlrp")
                    done["not called"] += 1  # the victim is not called in this forward
                except kind:
                    done[action] += 1
                finally:
                    hook.remove()
            elif action == "backward":
                def stop(output):
                    y = lrp_explicit.pipeline.main_output(output)[..., -1, 1] \
                        if not isinstance(output, torch.Tensor) else output[:, 1]
                    y.register_hook(raising(KeyboardInterrupt))
                    return y

                with pytest.raises(KeyboardInterrupt):
                    lrp_explicit.audit(model, x, stop, comp or "attnlrp")
                done[action] += 1
            elif action == "context" and comp is None:
                leaf = x if x.is_floating_point() else model.get_input_embeddings()(x).detach()
                key = {} if isinstance(model, Block) else {"inputs_embeds": leaf}
                hook = next(m for m in model.modules() if isinstance(m, nn.Linear)) \
                    .register_forward_hook(raising(KeyboardInterrupt))
                try:
                    with pytest.raises(KeyboardInterrupt):
                        with composites.get("cp-lrp", model).context(model):
                            model(**key) if key else model(leaf.detach().requires_grad_())
                    done[action] += 1
                finally:
                    hook.remove()
            assert len(dispatch._state.frames) == 0, (step, action)
            assert torch._C._len_torch_function_stack() == 0, (step, action)
            plain_gradients_are_exact()
    except BaseException as err:  # noqa: B902 - reported by the main thread
        failures.append((seed, err))
    finally:
        for comp in registered.values():
            comp.remove()
        try:
            assert len(dispatch._state.frames) == 0 and torch._C._len_torch_function_stack() == 0
            plain_gradients_are_exact()
        except AssertionError as err:
            failures.append((seed, err))


def test_fuzz_register_explain_remove_interrupt_in_two_threads():
    models, inputs = _models()
    expected = {id(m): _relevance(m, inputs[id(m)], "attnlrp") for m in models}
    before = [[(n, id(m), m.training) for n, m in model.named_modules()] for model in models]
    flags = [[p.requires_grad for p in model.parameters()] for model in models]
    failures: list = []
    done: Counter = Counter()
    threads = [threading.Thread(target=_fuzz, args=(seed, part, inputs, expected, 100,
                                                    failures, done))
               for seed, part in ((11, models[:2]), (12, models[2:]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert min(done[k] for k in ("explain", "interrupt", "exception", "backward",
                                 "context")) >= 5, done
    assert_clean(*models)
    assert not composite_base._carriers
    assert [[(n, id(m), m.training) for n, m in model.named_modules()]
            for model in models] == before
    assert [[p.requires_grad for p in model.parameters()] for model in models] == flags
