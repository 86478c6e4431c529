"""Knowledge neurons: the MLP neurons and attention heads LRP finds most relevant for a
prediction, tested by switching them off.

The model is the faithfulness benchmark's tiny LLaMA (2 layers, width 64, 128 MLP neurons and
4 heads per layer), trained here on CPU on subject–verb agreement
(:mod:`lrp_explicit.evaluation.text`): after a subject (``noun7`` or ``noun7s``), fillers and
*attractors* (nouns of the other number), it predicts ``is`` or ``are``. For held-out sentences
the example

1. explains the logit difference ``logit(predicted verb) − logit(other verb)`` with AttnLRP and
   reads the relevance of every neuron and head (``Explanation.units``);
2. sets the ``k`` most relevant MLP neurons (over both layers) to zero, and, as the baseline,
   ``k`` neurons drawn at random (:func:`lrp_explicit.ablate`), and reports the change of the
   explained logit difference; the same for heads;
3. for one sentence, shows its most relevant units, which tokens make the top neuron fire
   (the neuron as the target) and which tokens' relevance flows through it (a condition);
4. plots the mean change against ``k`` (``--plot``).

Run it with::

    python examples/knowledge_neurons.py                   # --steps 300 --samples 40
    python examples/knowledge_neurons.py --plot knowledge_neurons.png
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import lrp_explicit
except ModuleNotFoundError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lrp_explicit
from lrp_explicit.evaluation import text

NEURONS = "*mlp.act_fn"
HEADS = "*self_attn"


def words(ids: list[int]) -> str:
    return " ".join(text.VOCAB[i] for i in ids)


def train(steps: int, seed: int) -> tuple[torch.nn.Module, float]:
    val = text.make_samples(300, masked=False, attractors=True, seed=10)
    model, info = text.train("llama", steps=steps, seed=seed, val=val)
    return model.double().eval(), info["val_accuracy"]


def explain_sentence(model: torch.nn.Module, ids: list[int]) -> lrp_explicit.Explanation:
    """The predicted verb's logit minus the other verb's, explained with AttnLRP."""
    with torch.no_grad():
        two = model(torch.tensor([ids])).logits[0, -1, text.VERBS]
    verb, other = (int(v) for v in (text.VERBS[two.argmax()], text.VERBS[1 - two.argmax()]))
    return lrp_explicit.explain(model, torch.tensor([ids]), target=verb, contrast=other)


def study(model: torch.nn.Module, sentences: list[list[int]], pattern: str, ks: list[int],
          draws: int, seed: int) -> dict[str, np.ndarray]:
    """Changes of the explained logit difference, top-k and random-k, for every sentence."""
    top, rand, flips_top, flips_rand = [], [], [], []
    for n, ids in enumerate(sentences):
        e = explain_sentence(model, ids)
        result = lrp_explicit.ablate(model, torch.tensor([ids]), pattern, ks, draws=draws,
                                     seed=seed + n, explanation=e)
        top.append(result.top_change)
        rand.append(result.random_change)
        flips_top.append([t < 0 for t in result.top])
        flips_rand.append([float(np.mean([r < 0 for r in rs])) for rs in result.random])
    return {"top": np.array(top), "random": np.array(rand),
            "flip_top": np.array(flips_top, dtype=float), "flip_random": np.array(flips_rand)}


def report(name: str, ks: list[int], got: dict[str, np.ndarray], base: float) -> None:
    print(f"\n{name}: change of the logit difference (mean over {len(got['top'])} sentences, "
          f"mean difference {base:.3g}) and how often the prediction flips")
    print(f"{'k':>4}  {'top-k':>9}  {'random-k':>9}  {'flips top':>10}  {'flips random':>12}")
    for j, k in enumerate(ks):
        print(f"{k:>4}  {got['top'][:, j].mean():>+9.3f}  {got['random'][:, j].mean():>+9.3f}"
              f"  {got['flip_top'][:, j].mean():>10.0%}  {got['flip_random'][:, j].mean():>12.0%}")
    j = len(ks) - 1
    verdict = "more" if got["top"][:, j].mean() < got["random"][:, j].mean() else "NOT more"
    print(f"removing the {ks[j]} most relevant {name.lower()} lowers the logit difference "
          f"{verdict} than removing {ks[j]} random ones")


def show_one(model: torch.nn.Module, ids: list[int]) -> None:
    e = explain_sentence(model, ids)
    verb, other = text.VOCAB[e.target], text.VOCAB[e.contrast]
    print(f"\nsentence: {words(ids)}  →  {verb!r} over {other!r} (logit difference "
          f"{e.score:.3f})")
    print("most relevant units:")
    for unit in e.top_units("*", 5):
        print(f"  {unit}")
    best = e.top_units(NEURONS, 1)[0]
    fire = lrp_explicit.explain(model, torch.tensor([ids]), target=best.spec)
    through = lrp_explicit.explain(model, torch.tensor([ids]), target=e.target,
                                   contrast=e.contrast, condition=best.spec)
    print(f"tokens that make {best.layer}[{best.index}] fire (activation "
          f"{fire.score:.3f}) and tokens whose relevance flows through it:")
    for k, i in enumerate(ids):
        print(f"  {text.VOCAB[i]:>8}  {float(fire.relevance[k]):+8.4f}  "
              f"{float(through.relevance[k]):+8.4f}")


def plot(path: str, ks: dict[str, list[int]],
         results: dict[str, dict[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4),
                             squeeze=False)
    for ax, (name, got) in zip(axes[0], results.items()):
        x = ks[name]
        for key, colour, label in (("top", "#c0392b", "most relevant"),
                                   ("random", "#7f8c8d", "random")):
            mean = got[key].mean(0)
            sem = got[key].std(0) / np.sqrt(len(got[key]))
            ax.plot(x, mean, "o-", color=colour, label=f"{label} {name.lower()}")
            ax.fill_between(x, mean - sem, mean + sem, color=colour, alpha=0.2)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(k) for k in x])
        ax.set_xlabel("units set to zero (k)")
        ax.set_ylabel("change of logit difference")
        ax.set_title(name)
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"\nplot written to {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--samples", type=int, default=40,
                        help="held-out sentences (default 40)")
    parser.add_argument("--draws", type=int, default=5,
                        help="random sets per k (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--plot", help="PNG file for the plot")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, accuracy = train(args.steps, args.seed)
    print(f"trained {args.steps} steps at most: held-out accuracy {accuracy:.1%} "
          f"({time.perf_counter() - start:.0f} s)")
    held = text.make_samples(args.samples, masked=False, attractors=True, seed=2024)
    sentences = [list(map(int, s.ids)) for s in held]
    ks = {"Neurons": [1, 4, 16, 64], "Heads": [1, 2]}
    results = {}
    for name, pattern in (("Neurons", NEURONS), ("Heads", HEADS)):
        results[name] = study(model, sentences, pattern, ks[name], args.draws, args.seed)
    base = float(np.mean([explain_sentence(model, ids).score for ids in sentences]))
    for name in results:
        report(name, ks[name], results[name], base)
    show_one(model, sentences[0])
    if args.plot:
        plot(args.plot, ks, results)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
