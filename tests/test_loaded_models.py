"""Issue 13: the models researchers actually load.

PEFT adapters (relevance equal to the merged model's, adapters untouched, unverified kinds
refused), accelerate's offloaded and dispatched models (equal relevance, hooks kept), quantised
linears (torchao, optimum-quanto: the ε-rule on the layer's own output), grad-free contexts
(``no_grad``, ``inference_mode``) and compiled models (no warning, equal relevance).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lrp_explicit
from lrp_explicit import composites, pipeline
from families import BY_NAME

IDS = torch.tensor([[5, 17, 3, 42, 9, 28]])
TARGET = 7


def snapshot(model: nn.Module) -> tuple:
    """Everything that must come back: module objects and modes, parameter flags by name,
    accelerate's hooks and forwards, parameter values."""
    modules = [(n, id(m), type(m), m.training, m.__dict__.get("_hf_hook"),
                m.__dict__.get("forward")) for n, m in model.named_modules()]
    params = [(n, p.requires_grad, p.device.type, p.dtype) for n, p in model.named_parameters()]
    # quantised weights (tensor subclasses) are compared as objects: they lack aten.equal
    values = {n: p.detach().clone() if type(p) in (torch.Tensor, nn.Parameter) else p
              for n, p in model.named_parameters() if not p.is_meta}
    return modules, params, values


def assert_untouched(model: nn.Module, before: tuple) -> None:
    modules, params, values = snapshot(model)
    assert modules == before[0]
    assert params == before[1]
    assert values.keys() == before[2].keys()
    assert all(values[k] is before[2][k] if type(values[k]) not in (torch.Tensor, nn.Parameter)
               else torch.equal(values[k], before[2][k]) for k in values)
    assert composites.carrier(model) is None
    assert not lrp_explicit.dispatch.hooks_installed()


def relevance(model: nn.Module, ids: torch.Tensor = IDS, **kwargs) -> torch.Tensor:
    return lrp_explicit.explain(model, ids, target=TARGET, **kwargs).relevance


@pytest.fixture(scope="module")
def llama():
    return BY_NAME["llama"].build()


# ============================================================================ PEFT adapters

peft = pytest.importorskip("peft")
PROJECTIONS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _lora(**kw):
    return peft.LoraConfig(r=4, target_modules=PROJECTIONS, init_lora_weights=False, **kw)


ADAPTERS = {
    "lora": lambda: _lora(),
    "rslora": lambda: _lora(use_rslora=True),
    "dora": lambda: _lora(use_dora=True),
    "lora-embedding-lm_head": lambda: peft.LoraConfig(
        r=4, target_modules=["embed_tokens", "lm_head", "o_proj"], init_lora_weights=False),
    "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                  feedforward_modules=["down_proj"], init_ia3_weights=False),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=PROJECTIONS, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=PROJECTIONS, init_weights=False),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                    init_weights=False),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"],
                                    init_weights=False),
    "oft": lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj", "v_proj"],
                                  init_weights=False),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=20, target_modules=PROJECTIONS,
                                              init_weights=False),
    "randlora": lambda: peft.RandLoraConfig(r=4, target_modules=PROJECTIONS),
    "shira": lambda: peft.ShiraConfig(r=4, target_modules=PROJECTIONS, init_weights=False),
    "vblora": lambda: peft.VBLoRAConfig(r=4, target_modules=PROJECTIONS, vector_length=8,
                                        num_vectors=16),
    "miss": lambda: peft.MissConfig(r=4, target_modules=PROJECTIONS, init_weights=False),
    "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm"]),
}


def _adapted(config, family: str = "llama", seed: int = 0):
    model = BY_NAME[family].build(seed=seed)
    adapted = peft.get_peft_model(model, config).double()
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # adapters that start as zero or identity: make them matter
        for _, p in adapted.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return adapted


VARIANTS_OF_LORA = {"rslora", "dora", "lora-embedding-lm_head"}


def test_every_verified_kind_is_tested():
    kinds = {"lora" if name in VARIANTS_OF_LORA else name for name in ADAPTERS}
    assert kinds == set(composites.adapters.VERIFIED_ADAPTERS)


@pytest.mark.parametrize("kind", list(ADAPTERS))
@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
def test_adapter_relevance_equals_the_merged_model(kind, composite):
    adapted = _adapted(ADAPTERS[kind]())
    merged = copy.deepcopy(adapted).merge_and_unload()
    # the adapter changes the function: otherwise equality would prove nothing
    with torch.no_grad():
        assert not torch.allclose(adapted(IDS).logits, _without_adapter(adapted, IDS))
        torch.testing.assert_close(adapted(IDS).logits, merged(IDS).logits, rtol=1e-10,
                                   atol=1e-10)
    before = snapshot(adapted)
    got = lrp_explicit.explain(adapted, IDS, target=TARGET, composite=composite)
    want = lrp_explicit.explain(merged, IDS, target=TARGET, composite=composite)
    assert got.task == "causal-lm"
    torch.testing.assert_close(got.relevance, want.relevance, rtol=0, atol=1e-6)
    assert got.score == pytest.approx(want.score, abs=1e-10)
    assert_untouched(adapted, before)


def _without_adapter(adapted, ids):
    with adapted.disable_adapter():
        return adapted(ids).logits


def test_lora_on_gpt2_conv1d_equals_the_merged_model():
    config = peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False,
                             fan_in_fan_out=True)
    adapted = _adapted(config, "gpt2")
    merged = copy.deepcopy(adapted).merge_and_unload()
    ids = IDS % 64
    torch.testing.assert_close(relevance(adapted, ids), relevance(merged, ids), rtol=0,
                               atol=1e-6)


def test_adapters_stay_usable_after_explaining():
    adapted = _adapted(ADAPTERS["lora"]())
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    lora_a = layer.lora_A["default"]
    trainable = [(n, p.requires_grad) for n, p in adapted.named_parameters()]
    assert any(f for _, f in trainable) and not all(f for _, f in trainable)
    expected = copy.deepcopy(adapted).merge_and_unload()
    lrp_explicit.explain(adapted, IDS, target=TARGET)
    assert adapted.base_model.model.model.layers[0].self_attn.q_proj is layer
    assert layer.lora_A["default"] is lora_a
    assert [(n, p.requires_grad) for n, p in adapted.named_parameters()] == trainable
    # training still works on the adapter, and it can still be merged
    adapted(IDS).logits.sum().backward()
    assert lora_a.weight.grad is not None
    merged = adapted.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected(IDS).logits)


REFUSED = {
    "adalora": (lambda: peft.AdaLoraConfig(r=4, target_modules=["q_proj"], total_step=10,
                                           init_lora_weights=False),
                r"module 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj' is a PEFT "
                r"'adalora' adapter layer \(SVDLinear\).*merge_and_unload"),
    "c3a": (lambda: peft.C3AConfig(block_size=8, target_modules=["v_proj"], init_weights=False),
            r"'base_model\.model\.model\.layers\.0\.self_attn\.v_proj' is a PEFT 'c3a'"),
    "prefix-tuning": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                      num_virtual_tokens=3),
                      r"prompt learning \(PREFIX_TUNING\)"),
    "prompt-tuning": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                      num_virtual_tokens=3),
                      r"prompt learning \(PROMPT_TUNING\)"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_unverified_adapters_are_refused_naming_the_module(kind):
    config, message = REFUSED[kind]
    adapted = _adapted(config())
    before = snapshot(adapted)
    with pytest.raises(lrp_explicit.CompositeError, match=message) as info:
        lrp_explicit.explain(adapted, IDS, target=TARGET)
    assert "\n" not in str(info.value)
    assert_untouched(adapted, before)


# ============================================================================ accelerate

accelerate = pytest.importorskip("accelerate")
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _offloaded(kind: str, model: nn.Module, tmp_path) -> nn.Module:
    model = copy.deepcopy(model)
    if kind == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    if kind == "disk_offload":
        return accelerate.disk_offload(model, str(tmp_path / "disk"),
                                       execution_device=torch.device("cpu"))
    if kind == "dispatch_model":
        return accelerate.dispatch_model(model, device_map=DEVICE_MAP,
                                         offload_dir=str(tmp_path / "dispatch"))
    if kind == "dispatch_model-hooks":
        return accelerate.dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
    if kind == "from_pretrained":
        model.save_pretrained(tmp_path / "saved")
        return type(model).from_pretrained(tmp_path / "saved", device_map=DEVICE_MAP,
                                           offload_folder=str(tmp_path / "offload"),
                                           dtype=torch.float64)
    raise ValueError(kind)


OFFLOADS = ["cpu_offload", "disk_offload", "dispatch_model", "dispatch_model-hooks",
            "from_pretrained"]


@pytest.mark.parametrize("kind", OFFLOADS)
def test_offloaded_models_are_explained_and_keep_their_hooks(kind, llama, tmp_path):
    model = _offloaded(kind, llama, tmp_path)
    if kind != "dispatch_model-hooks":
        assert any(p.is_meta for p in model.parameters())
    assert any("_hf_hook" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        logits = model(IDS).logits
    # the plain model: the same weights loaded without device map (from_pretrained picks its
    # own attention implementation)
    plain = type(llama).from_pretrained(tmp_path / "saved", dtype=torch.float64) \
        if kind == "from_pretrained" else llama
    before = snapshot(model)
    for composite in ("attnlrp", "cp-lrp"):
        got = lrp_explicit.explain(model, IDS, target=TARGET, composite=composite)
        want = lrp_explicit.explain(plain, IDS, target=TARGET, composite=composite)
        assert torch.equal(got.relevance, want.relevance)
        assert got.relevance.device == IDS.device
        assert_untouched(model, before)
    result = lrp_explicit.check(model, IDS)
    assert result.ok, result
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits)


def test_offloaded_model_left_as_it_was_on_error(llama, tmp_path):
    model = _offloaded("dispatch_model", llama, tmp_path)
    before = snapshot(model)
    with pytest.raises(ValueError, match="target"):
        lrp_explicit.explain(model, IDS, target=10_000)
    assert_untouched(model, before)


def test_registered_forward_of_an_offloaded_model_is_exact(llama, tmp_path):
    model = _offloaded("disk_offload", llama, tmp_path)
    with torch.no_grad():
        plain = model(IDS).logits
    comp = composites.get("attnlrp", model)
    with comp.context(model):
        assert torch.equal(model(IDS).logits, plain)


def test_weights_on_meta_without_a_loading_hook_are_refused():
    model = BY_NAME["llama"].build()
    with torch.device("meta"):
        model.lm_head = nn.Linear(32, 64, bias=False, dtype=torch.float64)
    before = snapshot(model)
    with pytest.raises(lrp_explicit.CompositeError, match="'lm_head.weight' is on the meta "
                       "device.*no accelerate hook loads it"):
        lrp_explicit.explain(model, IDS, target=TARGET)
    assert_untouched(model, before)


def test_pipeline_places_inputs_on_the_execution_device(llama, tmp_path):
    model = _offloaded("cpu_offload", llama, tmp_path)
    prepared = pipeline.prepare(model, IDS)
    assert prepared.leaf.device.type == "cpu" and not prepared.leaf.is_meta


# ============================================================================ quantised linears


def _hand_epsilon(x, weight, z, relevance, eps):
    """ε-rule of a linear map with the given (dequantised) weight and output, in float64."""
    x, weight, z, relevance = (t.double() for t in (x, weight, z, relevance))
    s = z + eps * torch.where(z >= 0, 1.0, -1.0)
    return x * ((relevance / s) @ weight)


def _quantised_linear(library: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 8))
    if library == "torchao":
        ao = pytest.importorskip("torchao.quantization")
        ao.quantize_(layer, ao.Int8WeightOnlyConfig())
        weight = layer[0].weight.dequantize()
    else:
        quanto = pytest.importorskip("optimum.quanto")
        quanto.quantize(layer, weights=quanto.qint8)
        quanto.freeze(layer)
        weight = layer[0].weight.dequantize()
    return layer, weight


@pytest.mark.parametrize("library", ["torchao", "optimum.quanto"])
def test_quantised_linear_takes_the_epsilon_rule_on_its_own_output(library):
    layer, weight = _quantised_linear(library)
    assert type(layer[0].weight) not in (torch.Tensor, nn.Parameter)
    x = torch.randn(3, 16)
    with torch.no_grad():
        z = layer(x)
    r = torch.randn(3, 8)
    comp = composites.get("attnlrp", layer, family="generic")
    with comp.context(layer):
        leaf = x.clone().requires_grad_(True)
        out = layer(leaf)
        assert torch.equal(out, z)  # the quantised kernel's own output
        out.backward(r)
    eps = lrp_explicit.functional.default_epsilon(torch.float32)
    want = _hand_epsilon(x, weight, z, r, eps)
    torch.testing.assert_close(leaf.grad.double(), want, rtol=1e-5, atol=1e-6)


def _quantisation_config(library: str):
    import transformers as tf
    if library == "torchao":
        ao = pytest.importorskip("torchao.quantization")
        return tf.TorchAoConfig(ao.Int8WeightOnlyConfig())
    pytest.importorskip("optimum.quanto")
    return tf.QuantoConfig(weights="int8")


def _dequantised(quantised: nn.Module, plain: nn.Module) -> nn.Module:
    """``plain`` with the dequantised weights of ``quantised`` (float, same kernels as usual)."""
    plain = copy.deepcopy(plain)
    with torch.no_grad():
        for name, module in quantised.named_modules():
            weight = module._parameters.get("weight")
            if weight is not None and type(weight) not in (torch.Tensor, nn.Parameter):
                plain.get_submodule(name).weight.copy_(weight.dequantize())
    return plain


@pytest.mark.parametrize("library", ["torchao", "optimum.quanto"])
def test_quantised_llama_from_pretrained_is_explained(library, tmp_path):
    float_model = BY_NAME["llama"].build(dtype=torch.float32)
    float_model.save_pretrained(tmp_path)
    model = type(float_model).from_pretrained(
        tmp_path, quantization_config=_quantisation_config(library), dtype=torch.float32)
    assert any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters())
    with torch.no_grad():
        plain = model(IDS).logits
    with composites.get("attnlrp", model).context(model):
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, plain)  # forward exact while registered
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrp_explicit.UnruledOpWarning)
        result = lrp_explicit.explain(model, IDS, target=TARGET)
    assert result.score == pytest.approx(float(plain[0, -1, TARGET]), rel=1e-6)
    # the rules saw the quantised weights: the float model holding the dequantised weights
    # gives the same relevance up to the kernels' rounding, the original float model does not
    reference = lrp_explicit.explain(_dequantised(model, float_model), IDS, target=TARGET)
    original = lrp_explicit.explain(float_model, IDS, target=TARGET)
    torch.testing.assert_close(result.relevance, reference.relevance, rtol=0, atol=2e-5)
    assert (result.relevance - original.relevance).abs().max() > 1e-3
    assert_untouched(model, before)


class _PackedWeight(torch.Tensor):
    """A weight tensor subclass of a library the rules know nothing of."""


def test_quantised_weights_of_an_unknown_library_are_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[2].weight = nn.Parameter(model[2].weight.detach().as_subclass(_PackedWeight))
    before = snapshot(model)
    with pytest.raises(lrp_explicit.CompositeError,
                       match=r"module '2' holds 'weight' as a _PackedWeight of 'test_loaded"):
        lrp_explicit.explain(model, torch.randn(1, 4), target=0)
    assert_untouched(model, before)


# ============================================================================ grad-free contexts


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_entry_points_run_inside_grad_free_contexts(context, llama):
    want = lrp_explicit.explain(llama, IDS, target=TARGET)
    want_check = lrp_explicit.check(llama, IDS)
    want_audit = lrp_explicit.audit(llama, IDS, TARGET)
    before = snapshot(llama)
    manager = torch.no_grad if context == "no_grad" else torch.inference_mode
    with manager():
        ids = IDS.clone()  # an inference tensor under inference_mode
        got = lrp_explicit.explain(llama, ids, target=TARGET)
        result = lrp_explicit.check(llama, ids)
        report = lrp_explicit.audit(llama, ids, TARGET)
        embeds = llama.get_input_embeddings()(ids)  # inference tensor embeddings too
        from_embeds = lrp_explicit.explain(llama, {"inputs_embeds": embeds}, target=TARGET)
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    assert torch.equal(got.relevance, want.relevance)
    torch.testing.assert_close(from_embeds.relevance, want.relevance, rtol=0, atol=1e-12)
    assert result.ok and want_check.ok
    assert result.report.input_total == pytest.approx(want_check.report.input_total,
                                                      abs=1e-12)
    assert report.input_total == pytest.approx(want_audit.input_total, abs=1e-12)
    assert_untouched(llama, before)


# ============================================================================ compiled models


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_compiled_models_are_explained_without_warnings(how, llama):
    model = copy.deepcopy(llama)
    if how == "torch.compile":
        compiled = torch.compile(model)
    else:
        model.compile()
        compiled = model
    before = snapshot(compiled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lrp_explicit.explain(compiled, IDS, target=TARGET)
        result = lrp_explicit.check(compiled, IDS)
    assert [str(w.message) for w in caught] == []
    want = lrp_explicit.explain(llama, IDS, target=TARGET)
    assert torch.equal(got.relevance, want.relevance)
    assert result.ok
    assert_untouched(compiled, before)


def test_a_composite_registered_by_hand_runs_a_compiled_module_eagerly(llama):
    model = copy.deepcopy(llama)
    model.compile()
    compiled = model._compiled_call_impl
    comp = composites.get("attnlrp", model)
    embeds = llama.get_input_embeddings()(IDS).detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with comp.context(model):
            assert model._compiled_call_impl is None
            leaf = embeds.clone().requires_grad_(True)
            y = model(inputs_embeds=leaf).logits[0, -1, TARGET]
            y.backward(y.detach())
    assert [str(w.message) for w in caught] == []
    assert model._compiled_call_impl is compiled
    want = lrp_explicit.explain(llama, IDS, target=TARGET).relevance
    torch.testing.assert_close(leaf.grad.sum(-1)[0], want, rtol=0, atol=1e-12)


def _stance() -> str:
    import torch._dynamo.eval_frame as frames
    return frames._stance.stance


def test_concurrent_passes_over_compiled_models_leave_the_compiler_stance_alone(llama):
    import threading
    models = [torch.compile(copy.deepcopy(llama)) for _ in range(2)]
    want = lrp_explicit.explain(llama, IDS, target=TARGET).relevance
    seen, errors = [], []
    start = threading.Barrier(2)

    def run(model):
        try:
            start.wait()
            for _ in range(3):
                seen.append(lrp_explicit.explain(model, IDS, target=TARGET).relevance)
        except BaseException as err:  # noqa: B902 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(seen) == 6 and all(torch.equal(r, want) for r in seen)
    assert _stance() == "default"
    # a plain model's pass does not touch the stance at all
    with torch.compiler.set_stance("eager_on_recompile"):
        lrp_explicit.explain(llama, IDS, target=TARGET)
        assert _stance() == "eager_on_recompile"


def test_interleaved_passes_restore_the_stance_when_the_last_one_ends(llama):
    # thread A starts, thread B starts, A ends, B ends: nested set_stance contexts would leave
    # force_eager set after B (it restores what it saw when it started)
    from lrp_explicit.pipeline import core
    compiled = torch.compile(copy.deepcopy(llama))
    a, b = core._eager_if_compiled(compiled), core._eager_if_compiled(compiled)
    a.__enter__()
    b.__enter__()
    assert _stance() == "force_eager"
    a.__exit__(None, None, None)
    assert _stance() == "force_eager"  # B still runs
    b.__exit__(None, None, None)
    assert _stance() == "default"
