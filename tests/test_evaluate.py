"""``lrp_explicit.evaluate``: every metric equals a value computed by hand on small fixed
examples; the perturbation curves of a known-perfect attribution beat random orders; the
building blocks (perturbed embeddings, insertion, the area between curves) by hand; the score
check against the run; the vision task's RMA goes through the same metric."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lrp_explicit
from lrp_explicit.evaluation import metrics, results, vision


class Linear(nn.Module):
    """A "classifier" whose class-0 logit is the sum over tokens of a 1-d embedding (times
    ``w``): deleting token t (zero embedding) lowers it by exactly its contribution."""

    def __init__(self, values: list[float], classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(len(values), 1)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.tensor(values, dtype=torch.float64)[:, None])
        self.head = nn.Linear(1, classes, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.arange(1, classes + 1, dtype=torch.float64)[:, None])
        self.double()

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding

    def forward(self, inputs_embeds: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.head(inputs_embeds.sum(1))


# ---------------------------------------------------------------------------- ground truth


def test_ground_truth_metrics_by_hand():
    rows = [
        # ranks: pos1 (3.0) 1, pos3 (2.0) 2, pos0 3, pos2 4; truth {3}
        {"relevance": [1.0, 3.0, -2.0, 2.0], "truth": [3]},
        # special tokens at 0 and 4 are not scored: pos2 (1.5) 1, pos1 (0.5) 2; truth {1}
        {"relevance": [9.0, 0.5, 1.5, -0.5, 9.0], "truth": [False, True, False, False, False],
         "special": [True, False, False, False, True]},
    ]
    ev = lrp_explicit.evaluate(rows, truth="truth")
    assert ev.per_row["PG2"] == [1.0, 1.0]
    assert ev.per_row["MRR"] == [0.5, 0.5]
    assert ev.per_row["RMA"] == pytest.approx([2 / 6, 0.5 / 2.0], abs=1e-15)
    # PTA: row 0 agrees at positions 2 and 3 of 4; row 1 at 1 and 3 of the 3 scored
    assert ev.per_row["PTA"] == pytest.approx([2 / 4, 2 / 3], abs=1e-15)
    assert ev.metrics["RMA"] == pytest.approx((1 / 3 + 1 / 4) / 2, abs=1e-15)
    assert ev.sem["PTA"] == pytest.approx(abs(0.5 - 2 / 3) / 2, abs=1e-15)
    one = lrp_explicit.evaluate(rows, truth="truth", k=1)
    assert one.per_row["PG1"] == [0.0, 0.0] and one.per_row["MRR"] == ev.per_row["MRR"]
    words = lrp_explicit.evaluate([{"word_relevance": [0.2, -1.0, 0.7]}], truth=[[2]],
                                  level="words")
    assert (words["PG2"], words["MRR"], words["RMA"]) == (1.0, 1.0, pytest.approx(0.7 / 0.9))


def test_ground_truth_errors_name_the_row():
    with pytest.raises(ValueError, match=r"^row 1: no ground-truth token among the scored "):
        lrp_explicit.evaluate([{"relevance": [1.0, 2.0], "t": [0]},
                               {"relevance": [1.0, 2.0], "t": []}], truth="t")
    with pytest.raises(ValueError, match=r"^row 0: truth position outside the 2 tokens"):
        lrp_explicit.evaluate([{"relevance": [1.0, 2.0], "t": [2]}], truth="t")
    with pytest.raises(ValueError, match=r"^row 0: no field 'gt' for truth"):
        lrp_explicit.evaluate([{"relevance": [1.0]}], truth="gt")
    with pytest.raises(ValueError, match="give truth= .* or model="):
        lrp_explicit.evaluate([{"relevance": [1.0]}])


# ---------------------------------------------------------------------------- perturbation


def test_perturbation_curves_by_hand():
    """Contributions 3, 1, −2 (score 2), zero replacement. MoRF deletes 3, 1, −2: scores
    2, −1, −2, 0; LeRF deletes −2, 1, 3: 2, 4, 3, 0; insertion puts tokens back into zeros."""
    model = Linear([3.0, 1.0, -2.0])
    row = {"relevance": [3.0, 1.0, -2.0], "ids": [0, 1, 2], "target": 0, "score": 2.0}
    ev = lrp_explicit.evaluate([row], model=model, replacement="zero", random_orders=0)
    third = 1 / 3
    morf = third * ((2 - 1) / 2 + (-1 - 2) / 2 + (-2 + 0) / 2)  # −2/3
    lerf = third * ((2 + 4) / 2 + (4 + 3) / 2 + (3 + 0) / 2)    # 8/3
    assert ev["delete MoRF"] == pytest.approx(morf, abs=1e-12)
    assert ev["delete LeRF"] == pytest.approx(lerf, abs=1e-12)
    assert ev["ABC"] == pytest.approx(lerf - morf, abs=1e-12)
    # insertion, MoRF: 0, 3, 4, 2; LeRF: 0, −2, −1, 2
    assert ev["insert MoRF"] == pytest.approx(third * (1.5 + 3.5 + 3), abs=1e-12)
    assert ev["insert LeRF"] == pytest.approx(third * (-1 - 1.5 + 0.5), abs=1e-12)
    assert ev.grid[6] == pytest.approx(0.3)  # on the grid: linear between the steps
    assert ev.curves["delete MoRF"][6] == pytest.approx(2 - 3 * 0.9, abs=1e-6)
    assert ev.curves["delete MoRF"][0] == 2 and ev.curves["delete LeRF"][-1] == 0
    # a contrast (class 1 has twice the logit): the score is z0 − z1 = −Σ, the curves flip
    contrast = lrp_explicit.evaluate([dict(row, contrast=1, score=-2.0)], model=model,
                                     replacement="zero")
    assert contrast["delete MoRF"] == pytest.approx(-morf, abs=1e-12)


def test_a_perfect_attribution_beats_random_orders():
    """For a sum of per-token contributions with zero replacement, deleting by decreasing
    contribution is the lowest curve at every step: MoRF below every random order, LeRF
    above, and the area between the curves larger than random's."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(40, generator=gen, dtype=torch.float64).tolist()
    model = Linear(values)
    rows = []
    for _ in range(12):
        ids = torch.randint(40, (10,), generator=gen).tolist()
        contribution = [values[i] for i in ids]
        rows.append({"relevance": contribution, "ids": ids, "target": 0,
                     "score": sum(contribution)})
    ev = lrp_explicit.evaluate(rows, model=model, replacement="zero", random_orders=20)
    assert ev["delete MoRF"] < ev["delete random"] - 0.5
    assert ev["delete LeRF"] > ev["delete random"] + 0.5
    assert ev["insert MoRF"] > ev["insert random"] + 0.5
    assert ev["ABC"] > 1.0 and abs(ev["ABC random"]) < 4 * ev.sem["ABC random"] + 0.1
    morf, rand = np.array(ev.curves["delete MoRF"]), np.array(ev.curves["delete random"])
    assert (morf <= rand + 1e-9).all() and (morf[1:-1] < rand[1:-1]).all()
    scrambled = [dict(r, relevance=torch.randn(10, generator=gen).tolist()) for r in rows]
    noise = lrp_explicit.evaluate(scrambled, model=model, replacement="zero")
    assert ev["ABC"] > noise["ABC"] + 1.0


def test_score_check_and_row_errors():
    model = Linear([3.0, 1.0, -2.0])
    row = {"relevance": [3.0, 1.0, -2.0], "ids": [0, 1, 2], "target": 0, "score": 5.0}
    with pytest.raises(ValueError, match=r"^row 0: the model scores the unperturbed input 2, "
                                         r"the row says 5"):
        lrp_explicit.evaluate([row], model=model, replacement="zero")
    with pytest.raises(ValueError, match=r"^row 1: no token ids"):
        lrp_explicit.evaluate([dict(row, score=2.0), {"relevance": [1.0], "target": 0}],
                              model=model, replacement="zero")
    custom = lrp_explicit.evaluate([row], model=model, replacement="zero",
                                   score=lambda x, r: x.sum((1, 2)) * 10)
    assert custom["delete MoRF"] == pytest.approx(10 * -2 / 3, abs=1e-12)


def test_building_blocks_by_hand():
    x = torch.arange(12, dtype=torch.float64).view(4, 3)  # 4 tokens, hidden 3
    positions = torch.tensor([1, 2, 3])
    orders = torch.tensor([[2, 0, 1]])  # position 3 first, then 1, then 2
    r = torch.full((3,), -1.0, dtype=torch.float64)
    out = metrics.perturbed_embeddings(x, positions, orders, torch.arange(4), r)
    assert out.shape == (1, 4, 4, 3)
    assert torch.equal(out[0, 0], x)
    assert torch.equal(out[0, 1, 3], r) and torch.equal(out[0, 1, :3], x[:3])
    assert torch.equal(out[0, 2, 1], r) and torch.equal(out[0, 2, 2], x[2])
    assert (out[0, 3, 1:] == -1).all() and torch.equal(out[0, 3, 0], x[0])
    ins = metrics.perturbed_embeddings(x, positions, orders, torch.arange(4), r, insert=True)
    # inserting the first k of an order = deleting the first n - k of the reversed order
    back = metrics.perturbed_embeddings(x, positions, orders.flip(-1), torch.arange(4), r)
    assert torch.equal(ins[0], back[0].flip(0))
    ids = torch.tensor([101, 7, 8, 9, 102])
    inserted = metrics.inserted_inputs(ids, torch.tensor([[1, 2, 0]]), 0, offset=1)
    assert inserted[0].tolist() == [[101, 0, 0, 0, 102], [101, 0, 8, 0, 102],
                                    [101, 0, 8, 9, 102], [101, 7, 8, 9, 102]]
    area = metrics.area_between(torch.tensor([2.0, -1, -2, 0]), torch.tensor([2.0, 4, 3, 0]))
    assert float(area) == pytest.approx(10 / 3)
    uneven = metrics.area_between(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 3.0]),
                                  torch.tensor([0.0, 0.5]))
    assert float(uneven) == pytest.approx(1.0)
    perms = metrics.random_orders(5, 3, torch.Generator().manual_seed(0))
    assert perms.shape == (3, 5) and (perms.sort(-1).values == torch.arange(5)).all()


def test_replacement_embeddings():
    model = Linear([3.0, 1.0, -2.0])

    class Tok:
        mask_token_id = 2
        pad_token_id = None

    assert float(results.replacement_embedding(model, None, Tok())) == -2.0
    assert float(results.replacement_embedding(model, "mean")) == pytest.approx(2 / 3)
    assert float(results.replacement_embedding(model, "zero")) == 0.0
    assert float(results.replacement_embedding(model, 1)) == 1.0
    assert float(results.replacement_embedding(model)) == pytest.approx(2 / 3)  # no tokenizer
    with pytest.raises(ValueError, match="replacement 'pad' needs a tokenizer with a pad token"):
        results.replacement_embedding(model, "pad", Tok())


def test_evaluation_table_plot_and_save(tmp_path):
    model = Linear([3.0, 1.0, -2.0])
    rows = [{"relevance": [3.0, 1.0, -2.0], "ids": [0, 1, 2], "target": 0, "score": 2.0,
             "truth": [0]}] * 2
    ev = lrp_explicit.evaluate(rows, truth="truth", model=model, replacement="zero",
                               random_orders=3)
    assert "| PG2 | 1.0000 |" in ev.table() and "| delete random |" in ev.table()
    for name in ("e.json", "e.md", "e.png"):
        assert ev.save(tmp_path / name).stat().st_size > 0
    table = results.compare({"perfect": ev, "again": ev}, ["PG2", "ABC"])
    assert table.splitlines()[2] == f"| perfect | 1.000 | {ev['ABC']:.3f} |"


def test_vision_rma_is_the_shared_metric():
    images, labels, boxes = vision.make_batch(4, seed=3)
    heat = torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = vision.box_mask(boxes)
    expected = metrics.mass_accuracy(heat.flatten(1), mask.flatten(1))
    assert torch.equal(vision.relevance_mass_accuracy(heat, boxes), expected)
    ev = lrp_explicit.evaluate({"relevance": list(heat)}, truth=list(mask))
    assert ev["RMA"] == pytest.approx(float(expected.mean()), abs=1e-12)
    assert math.isclose(ev.metrics["RMA"], float(expected.mean()), abs_tol=1e-12)


# ---------------------------------------------------------------------------- the marked task


def test_marked_task_sentences():
    from lrp_explicit.evaluation import marked

    for masked in (False, True):
        for s in marked.make_samples(200, masked, held_out=True, seed=1):
            ids = s.ids.tolist()
            assert ids[s.marker] == marked.MARK and s.noun == s.marker + 1
            nouns = [i for i in ids if marked.NOUN0 <= i < marked.FILLER0]
            number = [(i - marked.NOUN0) // marked.N_NOUNS for i in nouns]
            assert 7 <= len(nouns) <= 11 and ids.count(marked.MARK) == 1
            decoys = [k for k, i in enumerate(ids) if i == marked.DECOY]
            assert len(decoys) == 2 and all(marked.NOUN0 <= ids[k + 1] < marked.FILLER0
                                            for k in decoys)
            assert (ids[s.noun] - marked.NOUN0) // marked.N_NOUNS == s.label
            assert number.count(1 - s.label) >= 2 and number.count(s.label) >= 2
            if masked:
                assert ids[0] == marked.CLS and ids[s.position] == marked.MASK
            else:
                assert s.position == len(ids) - 1
    batch = marked.make_samples(5, False, held_out=True, seed=2)
    ids, mask, _, _, truth = marked.collate(batch)
    assert truth.sum(1).tolist() == [2] * 5 and (ids[truth.nonzero(as_tuple=True)][::2]
                                                 == marked.MARK).all()
    noun, valid = marked.noun_only(ids, truth)
    assert noun.sum(1).tolist() == [1] * 5 and not (valid & (ids == marked.MARK)).any()
    assert not (marked.scored_tokens(ids) & (mask == 0)).any()


def test_marked_batch_equals_one_sample_at_a_time():
    from lrp_explicit.evaluation import marked

    model = marked.build_model("gpt2", seed=0).double().eval()
    samples = [s for s in marked.make_samples(60, False, held_out=True, seed=3)]
    length = max({len(s.ids) for s in samples}, key=[len(s.ids) for s in samples].count)
    same = [s for s in samples if len(s.ids) == length][:4]
    ids, _, pos, label, _ = marked.collate(same)
    batch = marked.explain_batch(model, ids, pos, label)
    for i in range(len(same)):
        one = marked.explain_batch(model, ids[i:i + 1], pos[i:i + 1], label[i:i + 1])
        for name in marked.METHODS:
            torch.testing.assert_close(batch[name][i], one[name][0], rtol=1e-9, atol=1e-12)
    # completeness of Integrated Gradients: Σ relevance → Δ(x) − Δ(baseline), with the
    # midpoint rule's error falling as 1 / steps² (16 → 64 steps: about 16 times smaller)
    error = (batch["ig"].sum(-1) / batch["ig:delta"] - 1).abs()
    finer = marked.explain_batch(model, ids, pos, label, methods=["ig"], ig_steps=64)
    error_64 = (finer["ig"].sum(-1) / finer["ig:delta"] - 1).abs()
    assert (error < 1e-2).all() and (error_64 < error / 8).all() and (error_64 < 5e-4).all(), (
        error, error_64)
