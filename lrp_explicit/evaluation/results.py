""":func:`evaluate`: the faithfulness metrics of the field on a dataset of explanations.

The explanations are the rows of a run of :func:`lrp_explicit.explain_dataset` (its folder or
the ``datasets.Dataset`` it returns), a list of :class:`~lrp_explicit.Explanation`, a list of
dicts or a dict of columns: each row needs its ``relevance`` (one value per token, or a picture
as nested lists, flattened here).

**Against a ground truth** (``truth=``: per row the positions of the tokens that carry the
evidence, or a boolean mask), over the scored tokens (``valid=``; by default all but the
special tokens): the pointing game ``PG{k}`` (one of the ``k`` most relevant tokens is in the
ground truth), ``MRR`` (1 / the best rank of a ground-truth token), ``RMA`` (relevance mass
accuracy: the share of the positive relevance on the ground truth) and ``PTA`` (per-token
accuracy: the share of tokens whose sign agrees with the ground truth, Arras et al. 2025). The
functions are those of :mod:`lrp_explicit.evaluation.metrics`.

**By perturbation** (``model=``): the scored tokens are replaced, one after another, by a
replacement embedding (the ``[MASK]`` token's by default, or any token's, zero, the mean
embedding, or a vector), most relevant first (MoRF) or least relevant first (LeRF), and the
explained score is read after each step (*deletion*); *insertion* starts from the input with
every scored token replaced and puts them back in the same orders. The areas under the curves
over the perturbed fraction (``AUC``) and the area between the deletion curves
``ABC = AUC(LeRF) − AUC(MoRF)`` (larger is better) are reported per row and on average, with
``random_orders`` random orders as the reference a method must beat. The score is what the
run explained (the target's logit, minus the contrast's, at the explained position), checked
against the row's ``score`` before perturbing; ``score=`` takes any other function of the
embeddings.

:class:`Evaluation` holds the table, the curves and the per-row values, and draws them
(:meth:`Evaluation.plot`).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..pipeline import embed, main_output, task_of
from . import metrics

__all__ = ["evaluate", "Evaluation", "compare", "replacement_embedding", "GRID",
           "add_arguments", "run_command"]

#: Fractions of perturbed tokens at which the mean curves are given.
GRID = np.linspace(0.0, 1.0, 21)
_TASKS = ("causal-lm", "masked-lm", "classification", None)


@dataclass
class Evaluation:
    """What :func:`evaluate` returns.

    Attributes
    ----------
    metrics : dict of str to float
        Each metric's mean over the rows (``PG2``, ``MRR``, ``RMA``, ``PTA``; ``delete MoRF``,
        ``delete LeRF``, ``insert MoRF``, ``insert LeRF`` (areas under the curves), ``ABC``;
        ``delete random``, ``insert random`` and ``ABC random`` (between a random order and
        its reverse) for the random orders).
    sem : dict of str to float
        The standard error of each mean (over rows; for the random orders over rows and
        draws).
    per_row : dict of str to list of float
        Each metric per row.
    curves : dict of str to list of float
        Mean perturbation curves on :attr:`grid` (``delete MoRF``, ``delete LeRF``, ``insert
        MoRF``, ``insert LeRF``, ``delete random``, ``insert random``).
    grid : list of float
        Fractions of perturbed tokens.
    rows : int
        Number of rows evaluated.
    settings : dict
        How it was measured (``k``, the replacement, ``max_steps``, ``random_orders``, the
        level).
    """

    metrics: dict[str, float]
    sem: dict[str, float]
    per_row: dict[str, list[float]]
    curves: dict[str, list[float]] = field(default_factory=dict)
    grid: list[float] = field(default_factory=lambda: GRID.tolist())
    rows: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]

    def table(self) -> str:
        """The metrics as a Markdown table (mean ± standard error)."""
        lines = ["| metric | mean | ± |", "|---|---|---|"]
        for name, value in self.metrics.items():
            lines.append(f"| {name} | {value:.4f} | {self.sem.get(name, float('nan')):.4f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        excluded = self.settings.get("excluded_rows") or []
        note = f" ({len(excluded)} rows with NaN or infinite relevance excluded: " \
            f"{', '.join(map(str, excluded[:10]))}{' …' if len(excluded) > 10 else ''})" \
            if excluded else ""
        return f"{self.rows} rows{note}\n{self.table()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"rows": self.rows, "metrics": self.metrics, "sem": self.sem,
                "per_row": self.per_row, "curves": self.curves, "grid": self.grid,
                "settings": self.settings}

    def plot(self, path: str | os.PathLike | None = None, title: str | None = None) -> Any:
        """The perturbation curves (left) and the ground-truth metrics (right).

        Parameters
        ----------
        path : path-like, optional
            Write the figure there (PNG, PDF or SVG by the suffix).
        title : str, optional
            A title over the figure.

        Returns
        -------
        matplotlib.figure.Figure
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        truth = [m for m in self.metrics if m in ("MRR", "RMA", "PTA") or m.startswith("PG")]
        panels = [bool(self.curves), bool(truth)]
        fig, axes = plt.subplots(1, max(1, sum(panels)), figsize=(6 * max(1, sum(panels)), 4),
                                 squeeze=False)
        ax = iter(axes[0])
        if self.curves:
            left = next(ax)
            styles = {"MoRF": "C3", "LeRF": "C0", "random": "0.5"}
            for name, curve in self.curves.items():
                mode, order = name.split(" ", 1)
                left.plot(self.grid, curve, color=styles.get(order, "C2"),
                          ls="-" if mode == "delete" else "--", label=name)
            left.set(xlabel="fraction of tokens perturbed", ylabel="explained score",
                     title="perturbation curves")
            left.legend(fontsize=8)
        if truth:
            right = next(ax)
            values = [self.metrics[m] for m in truth]
            errors = [self.sem.get(m, 0.0) for m in truth]
            right.bar(truth, values, yerr=errors, color="C0")
            right.set(ylim=(0, 1.05), title="against the ground truth")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.json`` (:meth:`to_dict`), ``.md`` (:meth:`table`) or a figure (``.png``,
        ``.pdf``, ``.svg``) by the suffix."""
        path = Path(path)
        kind = path.suffix.lower()
        if kind == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        elif kind == ".md":
            path.write_text(str(self) + "\n", encoding="utf-8")
        elif kind in (".png", ".pdf", ".svg"):
            self.plot(path)
        else:
            raise ValueError(f"{path.name}: write .json, .md, .png, .pdf or .svg")
        return path


def compare(evaluations: Mapping[str, Evaluation], metrics: Sequence[str] | None = None,
            digits: int = 3) -> str:
    """A Markdown table with one row per evaluation (e.g. per method) and one column per
    metric.

    Parameters
    ----------
    evaluations : mapping of str to Evaluation
        Name → evaluation.
    metrics : sequence of str, optional
        The columns (default: the metrics of the first evaluation).
    digits : int
        Decimals shown.
    """
    if not evaluations:
        return ""
    names = list(metrics or next(iter(evaluations.values())).metrics)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, ev in evaluations.items():
        cells = [f"{ev.metrics[m]:.{digits}f}" if m in ev.metrics else "–" for m in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ============================================================================ the rows


def _rows_of(results: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows as dicts, and the run's metadata where known."""
    from ..runs import load_run, run_metadata

    meta: dict[str, Any] = {}
    if isinstance(results, (str, os.PathLike)):
        results = load_run(results)
    if hasattr(results, "column_names") and hasattr(results, "to_list"):  # datasets.Dataset
        try:
            meta = run_metadata(results)
        except ValueError:
            meta = {}
        return list(results.to_list()), meta
    if isinstance(results, Mapping):
        columns = {k: list(v) for k, v in results.items()}
        sizes = {len(v) for v in columns.values()}
        if len(sizes) > 1:
            raise ValueError(f"the columns of results have different lengths {sorted(sizes)}")
        n = sizes.pop() if sizes else 0
        return [{k: v[i] for k, v in columns.items()} for i in range(n)], meta
    if isinstance(results, Sequence):
        rows = []
        for i, item in enumerate(results):
            if isinstance(item, Mapping):
                rows.append(dict(item))
            elif hasattr(item, "relevance") and hasattr(item, "tokens"):
                rows.append(_explanation_row(item))
            else:
                raise TypeError(f"results[{i}] is a {type(item).__name__}; give dicts or "
                                "explanations")
        return rows, meta
    raise TypeError(f"results must be a run folder, a datasets.Dataset, a list of rows or "
                    f"explanations, or a dict of columns, not {type(results).__name__}")


def _explanation_row(e: Any) -> dict[str, Any]:
    if getattr(e, "prompt_length", None) is not None:  # a GenerationExplanation
        return {"relevance": e.relevance, "ids": e.ids, "special": e.special,
                "score": e.scores, "target": e.generated, "contrast": e.contrast,
                "prompt_length": e.prompt_length, "task": e.task}
    row = {"relevance": e.relevance, "ids": e.ids, "special": e.special, "score": e.score,
           "target": e.target, "contrast": e.contrast, "task": e.task}
    if e.task == "causal-lm" and e.tokens is not None and not isinstance(e.target, list):
        row["position"] = len(e.tokens) - 1
    return row


def _per_row(spec: Any, rows: list[dict[str, Any]], what: str) -> list[Any]:
    if spec is None:
        return [None] * len(rows)
    if isinstance(spec, str):
        missing = next((i for i, r in enumerate(rows) if spec not in r), None)
        if missing is not None:
            raise ValueError(f"row {missing}: no field {spec!r} for {what} (fields: "
                             f"{', '.join(rows[missing])})")
        return [r[spec] for r in rows]
    if callable(spec):
        return [spec(r) for r in rows]
    values = list(spec)
    if len(values) != len(rows):
        raise ValueError(f"{what} has {len(values)} entries for {len(rows)} rows")
    return values


def _flat(value: Any, row: int, what: str) -> Tensor:
    if value is None:
        raise ValueError(f"row {row}: no {what}")
    tensor = value.detach().cpu() if isinstance(value, Tensor) else torch.tensor(
        np.asarray(value, dtype=np.float64))
    return tensor.double().flatten()


def _mask(value: Any, n: int, row: Any, what: str) -> Tensor:
    """Positions (ints) or a boolean mask → a boolean mask of ``n`` entries.

    A sequence of ``n`` zeros and ones with a repeat (``[0, 0, 1, 0]``) is a 0/1 mask (positions
    never repeat); one without a repeat (``[1, 0]`` of 2 tokens) could be either and is
    refused; other repeated positions are refused.
    """
    if value is None:
        raise ValueError(f"row {row}: no {what}")
    tensor = value.detach().cpu() if isinstance(value, Tensor) else torch.as_tensor(
        np.asarray(value))
    if tensor.dtype == torch.bool:
        tensor = tensor.flatten()
        if tensor.numel() != n:
            raise ValueError(f"row {row}: {what} has {tensor.numel()} entries for {n} tokens")
        return tensor
    if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(f"row {row}: {what} must be token positions (ints) or a boolean mask, "
                         f"not {tensor.dtype} values")
    positions = tensor.flatten().long()
    repeats = positions.numel() != positions.unique().numel()
    binary = positions.numel() == n and bool(((positions == 0) | (positions == 1)).all())
    if binary and repeats:
        return positions.bool()  # a 0/1 mask: positions never repeat
    if binary and n > 1:
        raise ValueError(f"row {row}: {what} {positions.tolist()} is ambiguous: {n} zeros and "
                         "ones read as a 0/1 mask or as positions; give a boolean mask or "
                         "positions")
    if repeats:
        raise ValueError(f"row {row}: {what} repeats a position ({positions.tolist()}); give "
                         "positions without repeats or a boolean mask")
    if positions.numel() and (positions.min() < -n or positions.max() >= n):
        raise ValueError(f"row {row}: {what} position outside the {n} tokens")
    out = torch.zeros(n, dtype=torch.bool)
    out[positions] = True
    return out


# ============================================================================ perturbation


def replacement_embedding(model: nn.Module, spec: Any = None, tokenizer: Any = None) -> Tensor:
    """The embedding that replaces a perturbed token.

    Parameters
    ----------
    model : nn.Module
        A model with ``get_input_embeddings()``.
    spec : int, str or Tensor, optional
        A token id; ``"mask"``, ``"pad"``, ``"unk"``, ``"bos"``, ``"eos"`` (the tokenizer's
        special token); ``"zero"``; ``"mean"`` (the mean of the embedding matrix); a token as
        text; or a ``(hidden,)`` vector. Default: the tokenizer's mask token if it has one,
        else ``"mean"``.
    tokenizer : tokenizer, optional
        Needed for special tokens and tokens as text.

    Returns
    -------
    Tensor
        ``(hidden,)`` on the model's device.
    """
    weight = model.get_input_embeddings().weight
    if spec is None:
        spec = "mask" if getattr(tokenizer, "mask_token_id", None) is not None else "mean"
    if isinstance(spec, Tensor):
        if spec.shape != weight.shape[1:]:
            raise ValueError(f"a replacement embedding of shape {tuple(spec.shape)} for "
                             f"embeddings of size {weight.shape[1]}")
        return spec.to(weight.device, weight.dtype)
    if isinstance(spec, str) and spec in ("zero", "mean"):
        with torch.no_grad():
            return torch.zeros_like(weight[0]) if spec == "zero" else weight.mean(0).detach()
    if isinstance(spec, str) and spec in ("mask", "pad", "unk", "bos", "eos"):
        index = getattr(tokenizer, f"{spec}_token_id", None)
        if index is None:
            raise ValueError(f"replacement {spec!r} needs a tokenizer with a {spec} token")
        spec = index
    elif isinstance(spec, str):
        if tokenizer is None:
            raise ValueError(f"replacement {spec!r} needs a tokenizer")
        ids = tokenizer(spec, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"replacement {spec!r} is {len(ids)} tokens; give one token")
        spec = ids[0]
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise TypeError(f"replacement must be a token id, a name or a vector, not {spec!r}")
    return embed(model, torch.tensor([[spec]]))[0, 0]


def _weights(size: int, target: int, contrast: Any, row: int) -> Tensor:
    w = torch.zeros(size, dtype=torch.float64)
    if isinstance(contrast, str) and contrast.lower() == "softmax":
        w -= 1.0 / size
    elif contrast is not None:
        w[int(contrast)] = -1.0
    if not 0 <= int(target) < size:
        raise ValueError(f"row {row}: target {target} outside the model's {size} outputs")
    w[int(target)] = 1.0
    return w


def _task_score(model: nn.Module, task: str | None, row: dict[str, Any], index: int,
                contrast: Any) -> Callable[[Tensor], Tensor]:
    """The score the run explained, as a function of input embeddings ``(m, L, H)``."""
    if task not in _TASKS:
        raise ValueError(f"perturbation curves of a {task} model need a score= function")
    target = row.get("target")
    if target is None or isinstance(target, list):
        raise ValueError(f"row {index}: perturbation curves need one explained target "
                         f"(got {target!r}); give score= for other outputs")
    position = row.get("position")
    if task == "masked-lm" and position is None:
        raise ValueError(f"row {index}: no explained position (column 'position')")
    weights: list[Tensor] = []

    def score(x: Tensor) -> Tensor:
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        logits = main_output(model(inputs_embeds=x, attention_mask=mask))
        if logits.dim() == 3:
            logits = logits[:, x.shape[1] - 1 if position is None else int(position)]
        if not weights:
            weights.append(_weights(logits.shape[-1], target, contrast, index))
        return (logits.double() * weights[0].to(logits.device)).sum(-1)

    return score


def _steps(n: int, max_steps: int) -> Tensor:
    if n <= max_steps:
        return torch.arange(n + 1)
    return torch.unique(torch.linspace(0, n, max_steps + 1).round().long())


def _curves(score: Callable[[Tensor], Tensor], x: Tensor, positions: Tensor, orders: Tensor,
            steps: Tensor, replacement: Tensor, batch_size: int) -> Tensor:
    """Deletion curves ``(orders, steps)``: the score after replacing the first ``k`` tokens
    of each order."""
    variants = metrics.perturbed_embeddings(x, positions, orders, steps, replacement)
    flat = variants.flatten(0, 1)
    with torch.no_grad():
        values = torch.cat([score(part).detach().double().cpu()
                            for part in flat.split(batch_size)])
    return values.view(orders.shape[0], len(steps))


def _on_grid(fractions: Tensor, curve: Tensor) -> np.ndarray:
    return np.interp(GRID, fractions.numpy(), curve.numpy())


def _auc(fractions: Tensor, curve: Tensor) -> float:
    return float(torch.trapezoid(curve, fractions))


# ============================================================================ evaluate


def evaluate(results: Any, truth: Any = None, *, model: nn.Module | None = None,
             tokenizer: Any = None, valid: Any = None, k: int = 2, level: str = "tokens",
             replacement: Any = None, max_steps: int = 50, random_orders: int = 0,
             score: Callable[[Tensor, dict[str, Any]], Tensor] | None = None,
             contrast: Any = None, batch_size: int = 64, seed: int = 0,
             check_score: bool = True, progress: bool | None = None) -> Evaluation:
    """Faithfulness metrics of a dataset of explanations.

    Parameters
    ----------
    results : path-like, datasets.Dataset, list or dict
        A run folder of :func:`lrp_explicit.explain_dataset` (or the dataset it returns), a
        list of :class:`~lrp_explicit.Explanation` or of dicts, or a dict of columns; each row
        has ``relevance`` (and ``ids``, ``target``, ``position``, ``score`` for the
        perturbation curves).
    truth : str, sequence or callable, optional
        The ground truth: a field of the rows, a sequence with one entry per row, or a function
        of the row; each entry the positions of the evidence tokens or a boolean mask. Gives
        ``PG{k}``, ``MRR``, ``RMA`` and ``PTA``.
    model : nn.Module, optional
        The explained model: gives the perturbation curves (``delete MoRF``, ``delete LeRF``,
        ``insert MoRF``, ``insert LeRF``: areas under the curves; ``ABC``).
    tokenizer : tokenizer, optional
        For a replacement given as a special token or text (default replacement: its mask
        token).
    valid : str, sequence or callable, optional
        The scored (and perturbed) tokens, as ``truth``; default: those not ``special``.
    k : int
        The pointing game's top ``k``.
    level : {"tokens", "words"}
        Score ``relevance`` per token, or ``word_relevance`` per word (ground truth only).
    replacement : int, str or Tensor, optional
        What replaces a perturbed token (:func:`replacement_embedding`).
    max_steps : int
        At most this many perturbation steps per curve (evenly spread over the tokens).
    random_orders : int
        Also perturb in this many random orders per row and in their reverses (``delete
        random``, ``insert random``, ``ABC random``: the baseline).
    score : callable, optional
        ``score(inputs_embeds, row)`` → ``(m,)`` scores of ``m`` perturbed inputs ``(m, L,
        H)``, instead of the explained logit.
    contrast : int or str, optional
        The contrast of the explained score where the rows do not say (``"softmax"`` for a
        run with that contrast; read from the run's metadata when known).
    batch_size : int
        Perturbed inputs per forward pass.
    seed : int
        Seed of the random orders.
    check_score : bool
        Check that the model reproduces each row's ``score`` on the unperturbed input.
    progress : bool, optional
        Show a progress bar over the rows (default: with a model and more than one row).

    Returns
    -------
    Evaluation

    Raises
    ------
    ValueError
        For a row without relevance, a ground truth outside the tokens or without a scored
        token, or a model that does not reproduce a row's score (the message names the row).
    """
    if level not in ("tokens", "words"):
        raise ValueError(f"level must be 'tokens' or 'words', not {level!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, value, least in (("random_orders", random_orders, 0), ("batch_size", batch_size, 1),
                               ("max_steps", max_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int of at least {least}, got {value!r}")
    rows, meta = _rows_of(results)
    if not rows:
        raise ValueError("no rows to evaluate")
    if truth is None and model is None:
        raise ValueError("give truth= (ground-truth metrics) or model= (perturbation curves)")
    if level == "words" and model is not None:
        raise ValueError("perturbation curves are per token: level='words' takes no model")
    key = "relevance" if level == "tokens" else "word_relevance"
    truths = _per_row(truth, rows, "truth")
    valids = _per_row(valid, rows, "valid")
    per_row: dict[str, list[float]] = {}
    generation = [r.get("prompt_length") is not None for r in rows]
    if any(generation):
        if model is not None:
            first = generation.index(True)
            raise ValueError(f"row {first} is a generation (one explanation per generated "
                             "token): perturbation curves score one explained output per row; "
                             "evaluate generations against a ground truth per generated token")
        rows, truths, valids, labels = _generation_steps(rows, truths, valids, key, level)
    else:
        labels = list(range(len(rows)))
    flats = [_flat(r.get(key), labels[i], key) for i, r in enumerate(rows)]
    finite = [bool(torch.isfinite(f).all()) for f in flats]
    excluded = [labels[i] for i, ok in enumerate(finite) if not ok]
    if excluded:
        if len(excluded) == len(rows):
            raise ValueError(f"every row's {key} has NaN or infinite values; nothing to score")
        warnings.warn(f"lrp_explicit.evaluate: {len(excluded)} of {len(rows)} rows have NaN or "
                      f"infinite {key} and are excluded (rows {excluded[:10]})", RuntimeWarning,
                      stacklevel=2)
        kept_rows = [i for i, ok in enumerate(finite) if ok]
        rows, flats = [rows[i] for i in kept_rows], [flats[i] for i in kept_rows]
        truths, valids = [truths[i] for i in kept_rows], [valids[i] for i in kept_rows]
        labels = [labels[i] for i in kept_rows]
    keep: list[Tensor] = []
    for i, (row, rel) in enumerate(zip(rows, flats)):
        if valids[i] is not None:
            keep.append(_mask(valids[i], rel.numel(), labels[i], "valid"))
        elif level == "tokens" and row.get("special") is not None \
                and len(row["special"]) == rel.numel():
            keep.append(~torch.as_tensor(np.asarray(row["special"], dtype=bool)))
        else:
            keep.append(torch.ones(rel.numel(), dtype=torch.bool))
        if row.get("_context") is not None:  # a generated token sees only the tokens before it
            keep[-1] = keep[-1].clone()
            keep[-1][row["_context"]:] = False
    if truth is not None:
        per_row.update(_truth_metrics(flats, truths, keep, k, labels))
    curves: dict[str, list[np.ndarray]] = {}
    random_sem: dict[str, list[np.ndarray]] = {}
    settings: dict[str, Any] = {"level": level, "k": k, "rows": len(rows),
                                "excluded_rows": excluded}
    if any(generation):
        settings["per"] = "generated token"
    if model is not None:
        settings.update(_perturb(model, rows, flats, keep, tokenizer, replacement, max_steps,
                                 random_orders, score, contrast, meta, batch_size, seed,
                                 check_score, progress, per_row, curves, random_sem))
    means = {name: float(np.mean(values)) for name, values in per_row.items()}
    sem = {name: float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1
           else float("nan") for name, values in per_row.items()}
    for name, draws in random_sem.items():  # rows × draws
        flat = np.concatenate(draws)
        means[name] = float(flat.mean())
        sem[name] = float(flat.std(ddof=1) / math.sqrt(len(flat))) if len(flat) > 1 \
            else float("nan")
        per_row[name] = [float(d.mean()) for d in draws]
    mean_curves = {name: np.mean(values, 0).round(6).tolist() for name, values in curves.items()}
    return Evaluation(means, sem, per_row, mean_curves, GRID.tolist(), len(rows), settings)


def _generation_steps(rows: list[dict[str, Any]], truths: list[Any], valids: list[Any],
                      key: str, level: str) -> tuple[list[dict[str, Any]], list[Any],
                                                     list[Any], list[Any]]:
    """Each generated token of a generation row as a row of its own, with the truth (and
    valid mask) given for that step; labels ``"row/step"``."""
    if level != "tokens":
        raise ValueError("generation rows are scored per token (level='tokens')")
    out_rows, out_truths, out_valids, labels = [], [], [], []
    for i, row in enumerate(rows):
        matrix = row.get(key)
        if row.get("prompt_length") is None:
            out_rows.append(row)
            out_truths.append(truths[i])
            out_valids.append(valids[i])
            labels.append(i)
            continue
        if matrix is None:
            raise ValueError(f"row {i}: no {key}")
        matrix = matrix.detach().cpu() if isinstance(matrix, Tensor) else torch.tensor(
            np.asarray(matrix, dtype=np.float64))
        if matrix.dim() != 2:
            raise ValueError(f"row {i}: a generation's {key} is a (generated, tokens) matrix, "
                             f"not of shape {tuple(matrix.shape)}")
        steps = matrix.shape[0]
        truth, valid = truths[i], valids[i]
        for name, spec in (("truth", truth), ("valid", valid)):
            if spec is None:
                continue
            if isinstance(spec, Tensor):
                ok = spec.dim() == 2 and spec.shape[0] == steps
            else:
                ok = isinstance(spec, (list, tuple)) and len(spec) == steps and all(
                    isinstance(s, (list, tuple, Tensor, np.ndarray)) for s in spec)
            if not ok:
                raise ValueError(f"row {i} is a generation of {steps} tokens: give its {name} "
                                 f"per generated token (a list of {steps} position lists or "
                                 "masks, one per step)")
        for g in range(steps):
            out_rows.append({**row, key: matrix[g], "_context": int(row["prompt_length"]) + g})
            out_truths.append(None if truth is None else truth[g])
            out_valids.append(None if valid is None else valid[g])
            labels.append(f"{i}/{g}")
    return out_rows, out_truths, out_valids, labels


def _truth_metrics(flats: list[Tensor], truths: list[Any], keep: list[Tensor],
                   k: int, labels: list[Any] | None = None) -> dict[str, list[float]]:
    """PG-k, MRR, RMA and PTA of every row, computed on the rows padded into one batch (the
    padding is not scored)."""
    width = max(rel.numel() for rel in flats)
    rel = torch.zeros(len(flats), width, dtype=torch.float64)
    gt = torch.zeros(len(flats), width, dtype=torch.bool)
    valid = torch.zeros(len(flats), width, dtype=torch.bool)
    labels = list(range(len(flats))) if labels is None else labels
    for i, row in enumerate(flats):
        n = row.numel()
        mask = _mask(truths[i], n, labels[i], "truth")
        if not (mask & keep[i]).any():
            raise ValueError(f"row {labels[i]}: no ground-truth token among the scored tokens")
        rel[i, :n], gt[i, :n], valid[i, :n] = row, mask, keep[i]
    best = metrics.best_rank(rel, gt, valid)
    return {f"PG{k}": (best <= k).double().tolist(), "MRR": (1.0 / best).tolist(),
            "RMA": metrics.mass_accuracy(rel, gt, valid).tolist(),
            "PTA": metrics.sign_agreement(rel, gt, valid).tolist()}


def _perturb(model: nn.Module, rows: list[dict[str, Any]], flats: list[Tensor],
             keep: list[Tensor], tokenizer: Any, replacement: Any, max_steps: int,
             random_orders: int, score_fn: Any, contrast: Any, meta: dict[str, Any],
             batch_size: int, seed: int, check_score: bool, progress: bool | None,
             per_row: dict[str, list[float]], curves: dict[str, list[np.ndarray]],
             random_sem: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """The perturbation curves of every row into ``per_row`` and ``curves``."""
    from ..pipeline import progress as show_progress

    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    task = task_of(model)
    if contrast is None and isinstance(meta.get("contrast"), str) \
            and meta["contrast"].lower() == "softmax":
        contrast = "softmax"
    vector = replacement_embedding(model, replacement, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    names = ["delete MoRF", "delete LeRF", "insert MoRF", "insert LeRF", "ABC"]
    for name in names:
        per_row[name] = []
    if random_orders:
        for name in ("delete random", "insert random", "ABC random"):
            random_sem[name] = []
    was_training = model.training
    model.eval()
    show = progress if progress is not None else len(rows) > 1
    try:
        for i in show_progress(range(len(rows)), bool(show), desc="perturb"):
            row, rel = rows[i], flats[i]
            if row.get("ids") is None:
                raise ValueError(f"row {i}: no token ids (column 'ids') to perturb")
            ids = torch.tensor(list(row["ids"]))[None]
            if ids.shape[1] != rel.numel():
                raise ValueError(f"row {i}: {ids.shape[1]} ids for {rel.numel()} relevance "
                                 "values")
            x = embed(model, ids)[0]
            scored = keep[i].clone()
            position = row.get("position")
            if task == "masked-lm" and position is not None:
                scored[int(position)] = False  # the mask whose prediction is explained stays
            positions = scored.nonzero().flatten()
            n = positions.numel()
            if n == 0:
                raise ValueError(f"row {i}: no token to perturb")
            if score_fn is not None:
                score = (lambda r: lambda e: score_fn(e, r))(row)
            else:
                score = _task_score(model, task, row, i, row.get("contrast")
                                    if row.get("contrast") is not None else contrast)
            steps = _steps(n, max_steps)
            morf = metrics.deletion_order(rel[positions])
            orders = torch.stack([morf, morf.flip(-1)])
            shuffled = metrics.random_orders(n, random_orders, generator)
            shuffled = torch.cat([shuffled, shuffled.flip(-1)])  # each draw and its reverse
            values = _curves(score, x, positions, torch.cat([orders, shuffled]), steps, vector,
                             batch_size)
            if check_score and score_fn is None and row.get("score") is not None:
                expected, got = float(row["score"]), float(values[0, 0])
                if abs(got - expected) > 1e-3 * max(1.0, abs(expected)):
                    raise ValueError(f"row {i}: the model scores the unperturbed input {got:.6g}"
                                     f", the row says {expected:.6g}: are model and results "
                                     "of the same run?")
            fractions = steps.double() / n
            back = 1.0 - fractions.flip(0)
            delete = {"MoRF": values[0], "LeRF": values[1]}
            # inserting the first k of an order = deleting the first n - k of its reverse
            insert = {"MoRF": values[1].flip(0), "LeRF": values[0].flip(0)}
            for order in ("MoRF", "LeRF"):
                per_row[f"delete {order}"].append(_auc(fractions, delete[order]))
                per_row[f"insert {order}"].append(_auc(back, insert[order]))
                curves.setdefault(f"delete {order}", []).append(_on_grid(fractions,
                                                                         delete[order]))
                curves.setdefault(f"insert {order}", []).append(_on_grid(back, insert[order]))
            per_row["ABC"].append(float(metrics.area_between(values[0], values[1], fractions)))
            if random_orders:
                draws = values[2:]
                forward, reverse = draws[:random_orders], draws[random_orders:]
                random_sem["delete random"].append(np.array(
                    [_auc(fractions, d) for d in draws]))
                # inserting the first k of an order = deleting the first n - k of its reverse
                random_sem["insert random"].append(np.array(
                    [_auc(back, d.flip(0)) for d in draws]))
                random_sem["ABC random"].append(np.array(
                    [float(metrics.area_between(a, b, fractions))
                     for a, b in zip(forward, reverse)]))
                curves.setdefault("delete random", []).append(np.mean(
                    [_on_grid(fractions, d) for d in draws], 0))
                curves.setdefault("insert random", []).append(np.mean(
                    [_on_grid(back, d.flip(0)) for d in draws], 0))
    finally:
        model.train(was_training)
    return {"replacement": replacement if not isinstance(replacement, Tensor)
            else "vector", "max_steps": max_steps, "random_orders": random_orders,
            "task": task, "contrast": contrast}


# ============================================================================ command line


def add_arguments(parser: Any) -> None:
    """The arguments of ``lrp-explicit evaluate``."""
    parser.add_argument("--results", required=True, metavar="DIR",
                        help="run folder written by explain-dataset")
    parser.add_argument("--truth", metavar="FIELD",
                        help="field of the rows with the ground-truth token positions (or a "
                             "mask); gives PG-k, MRR, RMA, PTA")
    parser.add_argument("--valid", metavar="FIELD",
                        help="field with the scored tokens (default: all but special tokens)")
    parser.add_argument("--k", type=int, default=2, help="pointing game top k (default 2)")
    parser.add_argument("--level", choices=("tokens", "words"), default="tokens")
    parser.add_argument("--model", metavar="PATH_OR_NAME",
                        help="the explained model: gives the perturbation curves")
    parser.add_argument("--replacement", help="token id, mask|pad|unk|bos|eos, zero or mean "
                        "(default: the mask token, else the mean embedding)")
    parser.add_argument("--max-steps", type=int, default=50,
                        help="perturbation steps per curve at most (default 50)")
    parser.add_argument("--random-orders", type=int, default=0,
                        help="random orders per row as a baseline (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--plot", metavar="FILE", help="write the figure (png, pdf, svg)")
    parser.add_argument("--output", metavar="FILE", help="write the results (.json or .md)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_command(args: Any, load: Callable[[], tuple[nn.Module, Any]] | None) -> int:
    """Run ``lrp-explicit evaluate`` with parsed ``args``; ``load()`` returns the model and
    its tokenizer (``None``: no model given)."""
    folder = Path(args.results).expanduser()
    from ..runs import META

    if not (folder / META).is_file():
        raise ValueError(f"--results {args.results}: not a run folder of explain-dataset (no "
                         f"{META})")
    if args.truth is None and load is None:
        raise ValueError("give --truth FIELD (ground-truth metrics) or --model (perturbation "
                         "curves)")
    for option, value, least in (("--k", args.k, 1), ("--max-steps", args.max_steps, 1),
                                 ("--random-orders", args.random_orders, 0)):
        if value < least:
            raise ValueError(f"{option} {value}: give {least} or more")
    for name, suffixes in (("plot", (".png", ".pdf", ".svg")), ("output", (".json", ".md"))):
        value = getattr(args, name)
        if value is not None and Path(value).suffix.lower() not in suffixes:
            raise ValueError(f"--{name} {value}: use a {', '.join(suffixes)} file")
    replacement: Any = args.replacement
    if replacement is not None and replacement.lstrip("-").isdigit():
        replacement = int(replacement)
    model, tokenizer = load() if load is not None else (None, None)
    result = evaluate(folder, args.truth, model=model, tokenizer=tokenizer, valid=args.valid,
                      k=args.k, level=args.level, replacement=replacement,
                      max_steps=args.max_steps, random_orders=args.random_orders)
    if args.json:
        print(json.dumps({"rows": result.rows, "metrics": result.metrics, "sem": result.sem},
                         indent=1))
    else:
        print(result)
    if args.plot is not None:
        result.plot(args.plot)
        print(f"wrote {args.plot}")
    if args.output is not None:
        result.save(args.output)
        print(f"wrote {args.output}")
    return 0
