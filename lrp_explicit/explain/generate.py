"""Explaining generated text: ``explain(model, prompt, generate=N)``.

The model generates with its own ``generate`` (greedy unless the generation options say
otherwise); then the prompt and the generated tokens run forward once, as a batch with one row
per generated token, and one backward pass gives every row its own relevance: row ``i``
explains the logit of generated token ``i`` at the position before it. No LRP rule mixes the
samples of a batch, and a causal model's logit at position ``p`` sees only tokens ``≤ p``, so
row ``i`` is exactly the explanation of the prefix before token ``i`` with that token as target
(the per-prefix :func:`~lrp_explicit.explain`), zero from its own position on. Long
generations run ``batch_size`` rows per pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..composites import Composite, unwrap
from ..pipeline import (SOFTMAX, Target, attribute, check_finite, main_output, prepare,
                        task_of)
from ..pipeline import progress as show_progress
from ..pipeline.inputs import check_length
from ..pipeline.targets import logit_relevance, token_name
from .common import contrast_id, model_name, vocabulary
from .result import GenerationExplanation
from .store import jsonable
from .units import UnitPlan, stacked
from .words import TokenText, extend_text, token_text

__all__ = ["explain_generation", "generate_tokens"]

#: Generation options that :func:`generate_tokens` sets itself.
_OWN = ("input_ids", "inputs", "inputs_embeds", "attention_mask")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) for the duration; each module's mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def generate_tokens(model: nn.Module, ids: Tensor, max_new_tokens: int,
                    options: Mapping[str, Any] | None = None,
                    device: torch.device | str | None = None) -> tuple[Tensor, dict[str, Any]]:
    """The tokens ``model.generate`` adds to the prompt ``ids`` (``(1, tokens)``).

    Parameters
    ----------
    model : nn.Module
        A model with ``generate`` (a Hugging Face causal LM), run in eval mode without grad.
    ids : Tensor
        The prompt's token ids.
    max_new_tokens : int
        At most this many tokens are generated (fewer when the model ends the text).
    options : mapping, optional
        More arguments of ``generate`` (``do_sample``, ``temperature``, ``top_k``, …);
        greedy decoding (``do_sample=False``) unless they say otherwise.
    device : torch.device, optional
        Where the prompt goes (default: the device of the model's first parameter).

    Returns
    -------
    tuple of Tensor and dict
        The generated ids ``(generated,)`` on the CPU, and the options used.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"generate must be a positive number of tokens, got {max_new_tokens!r}")
    options = dict(options or {})
    given = sorted(k for k in options if k in _OWN or k == "max_new_tokens")
    if given:
        raise ValueError(f"generation_kwargs may not set {', '.join(given)}: the prompt is "
                         "the input and generate= the number of new tokens")
    if options.get("num_return_sequences", 1) != 1 or options.get("num_beams", 1) < 1:
        raise ValueError("generation_kwargs: one sequence is explained "
                         "(num_return_sequences=1)")
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, **options}
    runner = model if callable(getattr(model, "generate", None)) else unwrap(model)
    if not callable(getattr(runner, "generate", None)):
        raise TypeError(f"generate= needs a model with generate() (a Hugging Face causal LM); "
                        f"{type(model).__name__} has none")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), _evaluating(model):
        out = runner.generate(input_ids=ids.to(device),
                              attention_mask=torch.ones_like(ids, device=device), **options)
    sequences = out if isinstance(out, Tensor) else getattr(out, "sequences", None)
    if not isinstance(sequences, Tensor) or sequences.dim() != 2 or sequences.shape[0] != 1:
        raise ValueError("generate() returned no single sequence of token ids")
    new = sequences[0, ids.shape[1]:].cpu()
    if new.numel() == 0:
        raise ValueError("the model generated no token (it ended the text at once)")
    return new, options


def explain_generation(model: nn.Module, inputs: Any, comp: Composite, tokenizer: Any,
                       contrast: Any, max_new_tokens: int, options: Mapping[str, Any] | None,
                       *, record: Sequence[str] = (), batch_size: int = 8,
                       progress: bool | None = None) -> GenerationExplanation:
    """Generate up to ``max_new_tokens`` after the prompt ``inputs`` and explain every
    generated token (see the module's description).

    Parameters
    ----------
    model : nn.Module
        A causal LM.
    inputs : str, list of int or Tensor
        The prompt: text (with ``tokenizer``) or token ids.
    comp : Composite
        The composite (already resolved).
    tokenizer : tokenizer or None
        For text and to name the tokens.
    contrast : int, str or None
        A token whose logit is subtracted at every step, or ``"softmax"``.
    max_new_tokens : int
        How many tokens to generate at most.
    options : mapping, optional
        More arguments of ``model.generate``.
    record : sequence of str
        Modules whose output relevance is kept (one row per generated token).
    batch_size : int
        Generated tokens explained per forward and backward pass.
    progress : bool, optional
        A progress bar over the generated tokens (default: when there are several passes).

    Returns
    -------
    GenerationExplanation
    """
    task = task_of(model)
    if task != "causal-lm":
        raise ValueError(f"generate= needs a causal LM (…ForCausalLM, …LMHeadModel); "
                         f"{type(unwrap(model)).__name__} is a {task or 'plain'} model")
    item = prepare(model, inputs, tokenizer, task)
    if item.ids is None or item.ids.shape[0] != 1:
        raise ValueError("generate= needs one prompt as text or token ids")
    mask = item.kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and not bool(mask.bool().all()):
        raise ValueError("generate= takes a prompt without padding (its attention mask has "
                         "zeros)")
    prompt = item.ids.cpu()
    n = prompt.shape[1]
    check_length(model, n + max_new_tokens if isinstance(max_new_tokens, int) else n,
                 "the prompt with its generated tokens")
    generated, used = generate_tokens(model, prompt, max_new_tokens, options,
                                      device=item.leaf.device)
    new = [int(t) for t in generated]
    full = torch.cat([prompt, generated[None].to(prompt.dtype)], dim=1)
    size = vocabulary(model)
    config = getattr(unwrap(model), "config", None)

    def name(i: int) -> str:
        return token_name(tokenizer, i)

    other = None
    if contrast is not None and not (isinstance(contrast, str) and contrast.lower() == SOFTMAX):
        other = contrast_id(contrast, task, size, tokenizer, config)
        if other in new:
            raise ValueError(f"the contrast {name(other)} is generated token {new.index(other)}: "
                             "a token cannot be contrasted with itself; choose another "
                             "contrast or 'softmax'")

    def resolve_rows(rows: list[int]) -> Any:
        def resolve(output: Any) -> Target:
            logits = main_output(output)
            init = torch.zeros_like(logits)
            infos = []
            for b, i in enumerate(rows):
                row = (b, n - 1 + i)
                _, suffix = logit_relevance(logits, row, new[i], contrast, name,
                                            lambda c: other, out=init)  # type: ignore[arg-type]
                score = float(init[row].double().sum())
                check_finite(score, "score")
                z = logits[row].detach().double()
                infos.append({"score": score,
                              "probability": float(torch.softmax(z, -1)[new[i]]),
                              "label": f"next token {name(new[i])}{suffix}"})
            return Target(logits, init, {"rows": infos})
        return resolve

    m = len(new)
    chunks = [list(range(i, min(i + batch_size, m))) for i in range(0, m, batch_size)]
    bar = show_progress(range(m), progress if progress is not None else True, "explain",
                        total=m if len(chunks) > 1 else 1)
    parts: list[Tensor] = []
    latent: dict[str, list[Tensor]] = {}
    infos: list[dict[str, Any]] = []
    plan = UnitPlan(model)
    units: list[dict[str, Tensor]] = []
    for rows in chunks:
        batch = prepare(model, full.repeat(len(rows), 1), tokenizer, task)
        result = attribute(model, batch, resolve_rows(rows), comp, record=record,
                           observers=plan.observers())
        units.append({k: torch.stack([plan.units(b, len(rows))[k] for b in range(len(rows))])
                      for k in plan.units(0, len(rows))})
        grad = result.relevance[next(iter(batch.leaves))]
        if grad is None:
            raise ValueError("no relevance reached the input")
        relevance = grad.detach().sum(-1).cpu()
        check_finite(relevance, "relevance")
        parts.append(relevance)
        for key, value in result.latent.items():
            latent.setdefault(key, []).append(value.detach().cpu())
        infos += result.target.info["rows"]
        if hasattr(bar, "update"):
            bar.update(len(rows))
    if hasattr(bar, "close"):
        bar.close()
    tokens = list((item.tokens or [[]])[0])
    tokens += (list(tokenizer.convert_ids_to_tokens(new)) if tokenizer is not None
               else [str(i) for i in new])
    texts = (inputs,) if isinstance(inputs, str) else None
    prompt_ids = prompt[0].tolist()
    text: TokenText = token_text(tokenizer, texts, prompt_ids, tokens[:n])
    text = extend_text(tokenizer, text, prompt_ids, new, tokens[n:])
    return GenerationExplanation(
        tokens=tokens, ids=full[0].tolist(), relevance=torch.cat(parts), prompt_length=n,
        probabilities=[info["probability"] for info in infos],
        scores=[info["score"] for info in infos], labels=[info["label"] for info in infos],
        contrast=SOFTMAX if other is None and contrast is not None else other,
        latent={k: torch.cat(v) if all(t.dim() >= 1 for t in v) else torch.stack(v)
                for k, v in latent.items()},
        composite=comp.name, model=model_name(model), generation=jsonable(used),
        token_text=text, units=stacked(units), unit_kinds=dict(plan.kinds))
