"""Faithfulness metrics of token relevance: against a ground truth, and by deleting tokens.

**Ground truth** (Arras et al., 2025, section 3.3). Each row of a relevance tensor
``(batch, tokens)`` is scored against a boolean mask of ground-truth tokens, over the tokens a
``valid`` mask keeps (special tokens are usually left out):

- :func:`pointing_game` (PG2 for ``k = 2``): 1 if one of the ``k`` most relevant tokens is in
  the ground truth;
- :func:`reciprocal_rank` (MRR once averaged): 1 / the best rank of a ground-truth token, ranks
  by decreasing relevance from 1 (:func:`ranks`);
- :func:`mass_accuracy` (RMA): positive relevance inside the ground truth / all positive
  relevance (0 if there is none);
- :func:`sign_agreement` (PTA): fraction of tokens whose sign agrees with the ground truth
  (inside: > 0, outside: ≤ 0);
- :func:`token_metrics`: the four at once, by those names.

**Token deletion.** Tokens are deleted (their ids replaced, e.g. by ``[MASK]``) one by one in
the order of decreasing relevance (MoRF, :func:`deletion_order`) or its reverse (LeRF); the
model's score after ``k`` of ``n`` deletions, at the fraction ``k / n``, is the deletion curve.
:func:`deleted_inputs` builds the inputs, :func:`deletion_auc` the area under a curve over
``[0, 1]`` and :func:`curve_on_grid` puts curves of different lengths on one grid to average.
*Inserting* tokens into an input whose tokens are all replaced is :func:`inserted_inputs`;
:func:`perturbed_embeddings` does both in embedding space (any replacement embedding: a
token's, zero, the mean), :func:`area_between` measures the area between the MoRF and LeRF
curves and :func:`random_orders` gives a random attribution's orders.
:func:`lrp_explicit.evaluate` runs all of them on a dataset of explanations.

Examples
--------
>>> import torch
>>> from lrp_explicit.evaluation import metrics
>>> relevance = torch.tensor([[0.1, 2.0, -0.5, 0.3]])
>>> truth = torch.tensor([[False, True, False, False]])
>>> metrics.token_metrics(relevance, truth)["MRR"]
tensor([1.], dtype=torch.float64)
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ranks", "best_rank", "pointing_game", "reciprocal_rank", "mass_accuracy",
           "sign_agreement", "token_metrics", "deletion_order", "deleted_inputs",
           "deletion_auc", "curve_on_grid", "inserted_inputs", "perturbed_embeddings",
           "area_between", "random_orders"]


def _valid(relevance: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return torch.ones_like(relevance, dtype=torch.bool)
    if valid.shape != relevance.shape:
        raise ValueError(f"valid mask of shape {tuple(valid.shape)} for relevance of shape "
                         f"{tuple(relevance.shape)}")
    return valid.bool()


def _truth(relevance: Tensor, truth: Tensor) -> Tensor:
    if truth.shape != relevance.shape:
        raise ValueError(f"ground truth of shape {tuple(truth.shape)} for relevance of shape "
                         f"{tuple(relevance.shape)}")
    return truth.bool()


def ranks(relevance: Tensor, valid: Tensor | None = None) -> Tensor:
    """Rank of each token by decreasing relevance, from 1, along the last dimension.

    Parameters
    ----------
    relevance : Tensor
        ``(..., tokens)`` relevance.
    valid : Tensor, optional
        Boolean mask of the ranked tokens; the others are ranked after all of them.

    Returns
    -------
    Tensor
        ``(..., tokens)`` int64 ranks, a permutation of ``1 .. tokens`` per row. Ties are broken
        by position (the earlier token ranks first).
    """
    keep = _valid(relevance, valid)
    order = relevance.double().masked_fill(~keep, -torch.inf).argsort(
        dim=-1, descending=True, stable=True)
    positions = torch.arange(1, relevance.shape[-1] + 1, device=relevance.device)
    return torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))


def best_rank(relevance: Tensor, truth: Tensor, valid: Tensor | None = None) -> Tensor:
    """Best (smallest) rank of a valid ground-truth token per row, ``(...,)`` float64;
    ``tokens + 1`` for a row without one (see :func:`ranks`)."""
    keep = _valid(relevance, valid)
    inside = _truth(relevance, truth) & keep
    rank = ranks(relevance, keep).masked_fill(~inside, relevance.shape[-1] + 1)
    return rank.min(-1).values.double()


def pointing_game(relevance: Tensor, truth: Tensor, valid: Tensor | None = None,
                  k: int = 2) -> Tensor:
    """1 where one of the ``k`` most relevant valid tokens is a ground-truth token, else 0.

    Parameters
    ----------
    relevance : Tensor
        ``(..., tokens)`` relevance.
    truth : Tensor
        Boolean mask of the ground-truth tokens, of ``relevance``'s shape.
    valid : Tensor, optional
        Boolean mask of the scored tokens (default: all).
    k : int
        How many of the top tokens count (PG2: ``k = 2``).

    Returns
    -------
    Tensor
        ``(...,)`` float64 zeros and ones.
    """
    return (best_rank(relevance, truth, valid) <= k).double()


def reciprocal_rank(relevance: Tensor, truth: Tensor, valid: Tensor | None = None) -> Tensor:
    """``1 / best rank`` of a ground-truth token per row (:func:`best_rank`), ``(...,)``
    float64; the mean over rows is the MRR."""
    return 1.0 / best_rank(relevance, truth, valid)


def mass_accuracy(relevance: Tensor, truth: Tensor, valid: Tensor | None = None) -> Tensor:
    """Share of the positive relevance of the valid tokens that lies on ground-truth tokens.

    Returns
    -------
    Tensor
        ``(...,)`` float64 values in ``[0, 1]``: ``Σ_truth R⁺ / Σ R⁺`` (0 for a row without
        positive relevance).
    """
    keep = _valid(relevance, valid)
    positive = relevance.double().clamp(min=0) * keep
    total = positive.sum(-1)
    inside = (positive * _truth(relevance, truth)).sum(-1)
    return torch.where(total > 0, inside / total.clamp(min=1e-300), torch.zeros_like(total))


def sign_agreement(relevance: Tensor, truth: Tensor, valid: Tensor | None = None) -> Tensor:
    """Fraction of the valid tokens whose sign agrees with the ground truth: positive on
    ground-truth tokens, not positive elsewhere. ``(...,)`` float64."""
    keep = _valid(relevance, valid)
    agree = ((relevance > 0) == _truth(relevance, truth)) & keep
    return agree.sum(-1).double() / keep.sum(-1).clamp(min=1)


def token_metrics(relevance: Tensor, truth: Tensor,
                  valid: Tensor | None = None) -> dict[str, Tensor]:
    """PG2, MRR, RMA and PTA of each row of ``relevance``.

    Parameters
    ----------
    relevance : Tensor
        ``(batch, tokens)`` relevance (any floating dtype; scored in float64).
    truth : Tensor
        Boolean mask of the ground-truth tokens, ``(batch, tokens)``.
    valid : Tensor, optional
        Boolean mask of the scored tokens (the others are ignored); default all.

    Returns
    -------
    dict of str to Tensor
        ``{"PG2": pointing_game(k=2), "MRR": reciprocal_rank, "RMA": mass_accuracy,
        "PTA": sign_agreement}``, each ``(batch,)`` float64 (average over rows yourself).
    """
    best = best_rank(relevance, truth, valid)
    return {"PG2": (best <= 2).double(), "MRR": 1.0 / best,
            "RMA": mass_accuracy(relevance, truth, valid),
            "PTA": sign_agreement(relevance, truth, valid)}


# ------------------------------------------------------------------------------ deletion


def deletion_order(relevance: Tensor, most_relevant_first: bool = True) -> Tensor:
    """The order in which to delete tokens, along the last dimension.

    Parameters
    ----------
    relevance : Tensor
        ``(..., n)`` relevance of the deletable tokens.
    most_relevant_first : bool
        MoRF: decreasing relevance (ties by position); ``False``: LeRF, the reverse of that
        order.

    Returns
    -------
    Tensor
        ``(..., n)`` int64 permutations of ``0 .. n-1``.
    """
    order = relevance.argsort(dim=-1, descending=True, stable=True)
    return order if most_relevant_first else order.flip(-1)


def deleted_inputs(ids: Tensor, orders: Tensor, replacement: int, offset: int = 0) -> Tensor:
    """Token ids after deleting the first ``k`` tokens of each order, for ``k = 0 .. n``.

    Parameters
    ----------
    ids : Tensor
        ``(length,)`` token ids; the deletable tokens are ``ids[offset : offset + n]`` (e.g.
        ``offset=1`` keeps a leading ``[CLS]``).
    orders : Tensor
        ``(orders, n)`` permutations of ``0 .. n-1`` (:func:`deletion_order`).
    replacement : int
        Id that replaces a deleted token (e.g. the ``[MASK]`` id).
    offset : int
        Position of the first deletable token.

    Returns
    -------
    Tensor
        ``(orders, n + 1, length)``: row ``k`` of each order has its first ``k`` tokens
        replaced (row 0 is ``ids``, row ``n`` has every deletable token replaced).
    """
    n_orders, n = orders.shape
    if offset < 0 or offset + n > ids.shape[-1]:
        raise ValueError(f"{n} deletable tokens from position {offset} do not fit in "
                         f"{ids.shape[-1]} tokens")
    ranks_ = torch.empty_like(orders).scatter_(
        1, orders, torch.arange(n, device=orders.device).expand_as(orders))
    steps = torch.arange(n + 1, device=orders.device)
    deleted = ranks_[:, None, :] < steps[None, :, None]  # (orders, k, n)
    out = ids.repeat(n_orders, n + 1, 1)
    span = slice(offset, offset + n)
    out[..., span] = torch.where(deleted.to(ids.device), replacement, out[..., span])
    return out


def deletion_auc(curves: Tensor) -> Tensor:
    """Area under deletion curves over ``[0, 1]`` (trapezoid rule).

    Parameters
    ----------
    curves : Tensor
        ``(..., n + 1)`` scores after ``k = 0 .. n`` deletions, at the fractions ``k / n``.

    Returns
    -------
    Tensor
        ``(...,)`` areas.
    """
    n = curves.shape[-1] - 1
    if n < 1:
        raise ValueError("a deletion curve needs at least two points")
    return torch.trapezoid(curves, dx=1.0 / n, dim=-1)


def curve_on_grid(curves: Tensor, grid: Tensor) -> Tensor:
    """Deletion curves at the fractions ``k / n`` resampled on ``grid`` (linear interpolation),
    so that curves of sentences of different lengths can be averaged.

    Parameters
    ----------
    curves : Tensor
        ``(..., n + 1)`` scores at the fractions ``0, 1/n, …, 1``.
    grid : Tensor
        ``(points,)`` fractions in ``[0, 1]``.

    Returns
    -------
    Tensor
        ``(..., points)``.
    """
    n = curves.shape[-1] - 1
    if n < 1:
        raise ValueError("a deletion curve needs at least two points")
    where = grid.to(curves.dtype).clamp(0, 1) * n
    left = where.floor().long().clamp(max=n - 1)
    weight = where - left
    return curves[..., left] * (1 - weight) + curves[..., left + 1] * weight


# ------------------------------------------------------------------------------ perturbation


def inserted_inputs(ids: Tensor, orders: Tensor, replacement: int, offset: int = 0) -> Tensor:
    """Token ids after *inserting* the first ``k`` tokens of each order into an input whose
    tokens are all replaced, for ``k = 0 .. n`` (the insertion counterpart of
    :func:`deleted_inputs`).

    Parameters
    ----------
    ids : Tensor
        ``(length,)`` token ids; the perturbed tokens are ``ids[offset : offset + n]``.
    orders : Tensor
        ``(orders, n)`` permutations of ``0 .. n-1``.
    replacement : int
        Id of a token not yet inserted.
    offset : int
        Position of the first perturbed token.

    Returns
    -------
    Tensor
        ``(orders, n + 1, length)``: row ``k`` of each order has only its first ``k`` tokens
        back (row 0 has all ``n`` replaced, row ``n`` is ``ids``).
    """
    return deleted_inputs(ids, orders.flip(-1), replacement, offset).flip(1)


def perturbed_embeddings(x: Tensor, positions: Tensor, orders: Tensor, steps: Tensor,
                         replacement: Tensor, insert: bool = False) -> Tensor:
    """Input embeddings with tokens replaced by a replacement embedding, step by step.

    Parameters
    ----------
    x : Tensor
        ``(length, hidden)`` embeddings of one input.
    positions : Tensor
        ``(n,)`` the positions that may be perturbed.
    orders : Tensor
        ``(orders, n)`` permutations of ``0 .. n-1`` (indices into ``positions``), e.g.
        :func:`deletion_order` of their relevance.
    steps : Tensor
        ``(steps,)`` numbers ``k`` of perturbed tokens, in ``0 .. n``.
    replacement : Tensor
        ``(hidden,)`` the embedding that replaces a token (e.g. the ``[MASK]`` token's, zero
        or the mean embedding).
    insert : bool
        ``False``: deletion, the first ``k`` positions of each order are replaced.
        ``True``: insertion, every position is replaced except the first ``k`` of the order.

    Returns
    -------
    Tensor
        ``(orders, steps, length, hidden)``.

    Notes
    -----
    With one replacement, inserting the first ``k`` of an order is deleting the first
    ``n − k`` of the reversed order: the insertion curve of MoRF is the deletion curve of LeRF
    read backwards.
    """
    n_orders, n = orders.shape
    if positions.shape != (n,):
        raise ValueError(f"{n} orders' entries for {tuple(positions.shape)} positions")
    steps = steps.to(orders.device)
    if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) > n):
        raise ValueError(f"steps must lie in 0 .. {n}")
    rank = torch.empty_like(orders).scatter_(
        1, orders, torch.arange(n, device=orders.device).expand_as(orders))
    chosen = rank[:, None, :] < steps[None, :, None]  # (orders, steps, n)
    replaced = ~chosen if insert else chosen
    mask = torch.zeros(n_orders, len(steps), x.shape[0], dtype=torch.bool, device=x.device)
    mask[..., positions.to(x.device)] = replaced.to(x.device)
    out = x.expand(n_orders, len(steps), *x.shape).clone()
    out[mask] = replacement.to(x.dtype).to(x.device)
    return out


def area_between(morf: Tensor, lerf: Tensor, fractions: Tensor | None = None) -> Tensor:
    """Area between two perturbation curves, ``∫ (lerf − morf)`` over the perturbed fraction
    (trapezoid rule): large when removing the most relevant tokens first hurts the score much
    more than removing the least relevant first.

    Parameters
    ----------
    morf, lerf : Tensor
        ``(..., points)`` the curves (e.g. deletion MoRF and LeRF).
    fractions : Tensor, optional
        ``(points,)`` where the points lie in ``[0, 1]``; default evenly spaced.

    Returns
    -------
    Tensor
        ``(...,)`` areas.
    """
    if morf.shape != lerf.shape:
        raise ValueError(f"curves of shapes {tuple(morf.shape)} and {tuple(lerf.shape)}")
    if fractions is None:
        return deletion_auc(lerf - morf)
    return torch.trapezoid(lerf - morf, fractions.to(morf.dtype), dim=-1)


def random_orders(n: int, count: int, generator: torch.Generator | None = None) -> Tensor:
    """``(count, n)`` random permutations of ``0 .. n-1`` (a random attribution's orders)."""
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(count)]) \
        if count else torch.empty(0, n, dtype=torch.long)
