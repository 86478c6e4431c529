"""inseq with the methods of :mod:`lrp_explicit.integrations.inseq` (``"attnlrp"``, ``"cp-lrp"``).

A tiny LLaMA built from a config (float64) and a word-level tokenizer built here with the
``tokenizers`` library (nothing is downloaded) go through ``inseq.load_model``; inseq generates
two tokens and attributes each step. Each step's attribution must equal the toolkit's own
explanation of that prefix (``explain(model, prefix, target=token)``) and the matching row of the
generation matrix (``explain(model, prompt, generate=2)``) to 1e-6 relative; inseq's
aggregation, HTML view and save / load must work on it. ``import lrp_explicit`` must not import
inseq.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import lrp_explicit

PROMPT = "w5 w12 w7 w33"
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def test_import_lrp_explicit_does_not_import_inseq():
    code = "import sys, lrp_explicit; print('inseq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def inseq():
    module = pytest.importorskip(
        "inseq", reason='needs inseq: pip install "lrp-explicit[inseq]" (or the test extra)')
    import lrp_explicit.integrations.inseq  # noqa: F401  (registers the methods)

    return module


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer of ``w0 … w59`` and four special tokens, no BOS added (inseq
    checks that the decoded generation starts with the prompt text)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>",
                                                pad_token="<pad>")


@pytest.fixture(scope="module")
def llm():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).double().eval()


def attribute_two_steps(inseq, llm, tokenizer, method):
    model = inseq.load_model(llm, method, tokenizer=tokenizer)
    assert model.default_attributed_fn_id == "logit"  # the LRP convention
    out = model.attribute(PROMPT, generation_args={"max_new_tokens": 2, "min_new_tokens": 2},
                          show_progress=False)
    return model, out


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_methods_are_registered_by_name(inseq, method):
    assert method in inseq.list_feature_attribution_methods()


@pytest.mark.filterwarnings("error::lrp_explicit.errors.UnruledOpWarning")
@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_each_step_equals_explain_of_its_prefix_and_the_generation_matrix(inseq, llm, tokenizer,
                                                                          method):
    _, out = attribute_two_steps(inseq, llm, tokenizer, method)
    seq = out.sequence_attributions[0]
    ids = [t.id for t in seq.target]
    prompt = tokenizer(PROMPT)["input_ids"]
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 2
    assert (seq.attr_pos_start, seq.attr_pos_end) == (len(prompt), len(prompt) + 2)
    scores = seq.target_attributions  # (tokens, steps): column j explains token len(prompt)+j
    assert scores.shape == (len(ids), 2)
    generation = lrp_explicit.explain(llm, torch.tensor([prompt]), generate=2,
                                      composite=method)
    assert generation.ids == ids  # the same greedy tokens
    for step in range(2):
        position = len(prompt) + step
        got = scores[:position, step]
        alone = lrp_explicit.explain(llm, torch.tensor([ids[:position]]), target=ids[position],
                                     composite=method)
        assert alone.relevance.dtype == torch.float64
        assert relative_error(got, alone.relevance) < 1e-6
        assert relative_error(got, generation.relevance[step, :position]) < 1e-6
        assert torch.isnan(scores[position:, step]).all()  # not seen by this prediction


def test_a_left_padded_batch_gives_each_prompt_its_own_relevance(inseq, llm, tokenizer):
    model = inseq.load_model(llm, "attnlrp", tokenizer=tokenizer)
    out = model.attribute([PROMPT, "w8 w9"], show_progress=False,
                          generation_args={"max_new_tokens": 2, "min_new_tokens": 2})
    assert [len(s.target) for s in out.sequence_attributions] == [6, 4]
    for seq in out.sequence_attributions:
        ids = [t.id for t in seq.target]  # inseq drops the padding from the tokens
        for step, position in enumerate(range(seq.attr_pos_start, seq.attr_pos_end)):
            alone = lrp_explicit.explain(llm, torch.tensor([ids[:position]]),
                                         target=ids[position])
            assert relative_error(seq.target_attributions[:position, step],
                                  alone.relevance) < 1e-6


def test_cp_lrp_differs_from_attnlrp(inseq, llm, tokenizer):
    a = attribute_two_steps(inseq, llm, tokenizer, "attnlrp")[1]
    c = attribute_two_steps(inseq, llm, tokenizer, "cp-lrp")[1]
    first_a = a.sequence_attributions[0].target_attributions[:4, 0]
    first_c = c.sequence_attributions[0].target_attributions[:4, 0]
    assert relative_error(first_c, first_a) > 1e-3


def test_step_scores_aggregation_view_save_and_load(inseq, llm, tokenizer, tmp_path):
    model = inseq.load_model(llm, "attnlrp", tokenizer=tokenizer)
    out = model.attribute(PROMPT, generation_args={"max_new_tokens": 2, "min_new_tokens": 2},
                          step_scores=["probability"], show_progress=False)
    seq = out.sequence_attributions[0]
    # inseq's step scores beside our relevance: the probabilities explain(generate=2) reports
    prompt = tokenizer(PROMPT)["input_ids"]
    generation = lrp_explicit.explain(llm, torch.tensor([prompt]), generate=2)
    assert torch.allclose(seq.step_scores["probability"].double(),
                          torch.tensor(generation.probabilities, dtype=torch.float64),
                          rtol=1e-6, atol=0)
    # per-token scores: inseq's default aggregation leaves them as they are
    assert torch.equal(torch.nan_to_num(seq.aggregate().target_attributions),
                       torch.nan_to_num(seq.target_attributions))
    html = out.show(display=False, return_html=True)
    assert isinstance(html, str) and "w33" in html
    path = tmp_path / "attnlrp.json"
    out.save(path)
    back = inseq.FeatureAttributionOutput.load(path)
    assert back.info["attribution_method"] == "attnlrp"
    assert torch.equal(torch.nan_to_num(back.sequence_attributions[0].target_attributions),
                       torch.nan_to_num(seq.target_attributions))


def test_default_attributed_function_comes_back_when_unhooked(inseq, llm, tokenizer):
    model = inseq.load_model(llm, "attnlrp", tokenizer=tokenizer)
    assert model.default_attributed_fn_id == "logit"
    model.attribution_method.unhook()
    assert model.default_attributed_fn_id == "probability"  # inseq's default
    model.attribution_method.hook()
    assert model.default_attributed_fn_id == "logit"


def test_another_attributed_function_is_explained_under_the_rules(inseq, llm, tokenizer):
    """``attributed_fn="probability"``: the softmax runs under the composite's rules (no unruled
    op) and the relevance differs from the logit's."""
    model = inseq.load_model(llm, "attnlrp", tokenizer=tokenizer)
    args = dict(generation_args={"max_new_tokens": 2, "min_new_tokens": 2},
                show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrp_explicit.UnruledOpWarning)
        prob = model.attribute(PROMPT, attributed_fn="probability", **args)
    logit = model.attribute(PROMPT, **args)
    p = prob.sequence_attributions[0].target_attributions[:4, 0]
    q = logit.sequence_attributions[0].target_attributions[:4, 0]
    assert torch.isfinite(p).all() and relative_error(p, q) > 1e-3


def test_options_go_to_the_composite_and_unknown_ones_fail(inseq, llm, tokenizer):
    model = inseq.load_model(llm, "attnlrp", tokenizer=tokenizer, epsilon=1e-3)
    assert model.attribution_method.composite.epsilon == 1e-3
    with pytest.raises(TypeError):
        inseq.load_model(llm, "attnlrp", tokenizer=tokenizer, no_such_option=1)


def test_encoder_decoder_models_are_refused(inseq, tokenizer):
    import transformers

    config = transformers.T5Config(vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32,
                                   num_layers=1, num_heads=2, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=2)
    t5 = transformers.T5ForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="decoder-only"):
        inseq.load_model(t5, "attnlrp", tokenizer=tokenizer)
