"""Explain a tiny transformer classifier with AttnLRP and CP-LRP.

This is a complete, self-contained example that runs on a CPU in a few seconds:

1. It defines a small transformer classifier in plain PyTorch: a token embedding, two pre-norm
   blocks (``nn.RMSNorm`` -> ``F.scaled_dot_product_attention`` -> residual, ``nn.RMSNorm``
   -> SiLU-gated MLP -> residual), a final norm, token-mean pooling and a linear head.
2. It trains the model on a synthetic "needle in a haystack" task whose answer is known:
   every sequence is made of random filler words, and the class is 1 exactly when the key
   word ``needle`` occurs somewhere in it.
3. It explains the class-1 logit of one positive held-out sequence with
   ``lrp_explicit.composites.get("attnlrp", model)`` and with ``"cp-lrp"``, prints the
   relevance of every token (red: evidence for class 1, blue: against it), the conservation
   check (how much of the explained logit the input relevance adds up to) and whether the
   most relevant token is the needle.

The model is written with plain ``torch`` calls only, so the generic composites need no extra
code: ``nn.Linear``, ``nn.RMSNorm`` and ``nn.SiLU`` get module rules, while the attention,
the residual additions, the gate product and the mean pooling are ruled at the op level.

Run it with::

    python examples/explain_toy_transformer.py            # --steps 300 --seed 0
    python examples/explain_toy_transformer.py --no-color # plain text output
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import lrp_explicit
except ModuleNotFoundError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lrp_explicit

# ------------------------------------------------------------------------------------ the task

KEY = "needle"
FILLERS = ["hay", "straw", "barn", "cow", "field", "grass", "farm", "horse", "wheat", "rake",
           "fence", "sun", "mud", "goat", "seed"]
VOCAB = [KEY] + FILLERS          # token id 0 is the key word
KEY_ID = 0
SEQ_LEN = 12


def make_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of random filler words; in about half of them one position (chosen at
    random) holds the key word. Label 1 if the key word occurs, else 0."""
    tokens = torch.randint(1, len(VOCAB), (n, SEQ_LEN), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    where = torch.randint(0, SEQ_LEN, (n,), generator=generator)
    rows = labels.nonzero().squeeze(1)
    tokens[rows, where[rows]] = KEY_ID
    return tokens, labels


# ----------------------------------------------------------------------------------- the model


class Block(nn.Module):
    """Pre-norm transformer block: attention and a SiLU-gated MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.act = nn.SiLU()
        self.down = nn.Linear(hidden, dim, bias=False)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)       # bidirectional, no mask
        return self.o(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(self.act(self.gate(h)) * self.up(h))


class ToyTransformer(nn.Module):
    """Embedding -> blocks -> RMSNorm -> token mean -> linear head.

    The linear layers have no bias: a bias absorbs a share of the relevance in LRP, and
    without biases the input relevance sums (almost exactly) to the explained logit. There
    are no position embeddings either: whether the key word occurs does not depend on where.
    """

    def __init__(self, vocab: int, dim: int = 32, heads: int = 4, hidden: int = 64,
                 layers: int = 2, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, classes, bias=False)

    def forward(self, tokens: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(tokens) if inputs_embeds is None else inputs_embeds
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))       # token-mean pooling


def train(model: nn.Module, steps: int, generator: torch.Generator, batch: int = 64,
          lr: float = 3e-3) -> None:
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step in range(1, steps + 1):
        tokens, labels = make_batch(batch, generator)
        loss = F.cross_entropy(model(tokens), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == steps:
            print(f"  step {step:4d}  loss {loss.item():.4f}")
    model.eval()


# ----------------------------------------------------------------------------- the explanation


def explain(model: nn.Module, tokens: torch.Tensor, target: int, method: str) -> tuple[
        torch.Tensor, float]:
    """Per-token relevance of ``tokens`` (shape ``(1, T)``) for logit ``target``, and the
    value of that logit. The relevance is computed on the input embeddings and summed over
    the embedding dimension."""
    composite = lrp_explicit.composites.get(method, model, strict=True)  # strict: no op unruled
    inputs_embeds = model.embed(tokens).detach()
    with composite.context(model):
        x = inputs_embeds.requires_grad_()
        logit = model(inputs_embeds=x)[0, target]
        logit.backward(logit.detach())        # the relevance starts as the logit itself
    return x.grad[0].sum(-1), logit.item()


#: What to expect of the conservation check for each composite on this (bias-free) model.
NOTES = {
    "attnlrp": "AttnLRP's Gradient x Input rule for the softmax is not conservative: much of "
               "the relevance sent into the attention weights is absorbed there (when the "
               "weights hardly depend on the score differences), so the sum can fall short of "
               "the logit.",
    "cp-lrp": "CP-LRP holds the attention weights and the MLP gates constant; without biases "
              "the input relevance sums to the logit up to the epsilon-stabiliser.",
}


def colour(word: str, value: float, scale: float, enabled: bool) -> str:
    """``word`` on a background whose colour is red (positive) or blue (negative), the more
    saturated the larger ``|value| / scale``."""
    if not enabled:
        return word
    level = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    fade = int(255 * (1 - level))
    r, g, b = (255, fade, fade) if value >= 0 else (fade, fade, 255)
    return f"\033[48;2;{r};{g};{b}m\033[38;2;0;0;0m {word} \033[0m"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-color", action="store_true",
                        help="no ANSI colours (also off when stdout is not a terminal or "
                             "NO_COLOR is set)")
    args = parser.parse_args(argv)
    use_colour = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    model = ToyTransformer(len(VOCAB))

    print(f"Task: class 1 iff the word {KEY!r} occurs in a sequence of {SEQ_LEN} random words.")
    print(f"Training for {args.steps} steps (seed {args.seed}) ...")
    start = time.perf_counter()
    train(model, args.steps, data)
    print(f"  done in {time.perf_counter() - start:.1f} s")

    test_tokens, test_labels = make_batch(1000, data)
    with torch.no_grad():
        predictions = model(test_tokens).argmax(-1)
    accuracy = (predictions == test_labels).float().mean().item()
    print(f"Held-out accuracy: {accuracy:.1%} on {len(test_labels)} sequences")

    # One positive held-out sequence (correctly classified if there is one).
    positive = (test_labels == 1).nonzero().squeeze(1)
    correct = positive[predictions[positive] == 1]
    index = (correct if len(correct) else positive)[0].item()
    tokens = test_tokens[index:index + 1]
    words = [VOCAB[i] for i in tokens[0].tolist()]
    target = 1
    print(f"\nExplaining the class-{target} logit of held-out sequence #{index}:")
    print("  " + " ".join(words))

    results = {}
    for method in ("attnlrp", "cp-lrp"):
        results[method] = explain(model, tokens, target, method)

    print("\nPer-token relevance")
    print(f"  {'pos':>3}  {'token':<8} {'attnlrp':>10} {'cp-lrp':>10}")
    for pos, word in enumerate(words):
        marker = "  <- key" if tokens[0, pos].item() == KEY_ID else ""
        print(f"  {pos:>3}  {word:<8} {results['attnlrp'][0][pos].item():>10.4f} "
              f"{results['cp-lrp'][0][pos].item():>10.4f}{marker}")

    all_ok = True
    for method, (relevance, logit) in results.items():
        scale = relevance.abs().max().item()
        print(f"\n{method}:")
        print("  " + " ".join(colour(w, r, scale, use_colour)
                              for w, r in zip(words, relevance.tolist())))
        total = relevance.sum().item()
        print(f"  conservation: sum of input relevance {total:.4f} vs explained logit "
              f"{logit:.4f} (difference {total - logit:+.2e}, {total / logit:.1%} of the logit)")
        print(textwrap.fill(NOTES[method], 92, initial_indent="  note: ",
                            subsequent_indent="        "))
        top = int(relevance.argmax())
        is_key = tokens[0, top].item() == KEY_ID
        all_ok &= is_key
        print(f"  most relevant token: {words[top]!r} at position {top} -> "
              f"{'is' if is_key else 'is NOT'} the key token")

    print("\nResult: the key token is the most relevant token for "
          + ("both methods." if all_ok else "not every method (train longer?)."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
