"""``lrp_explicit.evaluation``: the old ``vision_task`` import is the same module API-wise, the
vision and text tasks' explanations (through ``pipeline.attribute``) equal hand-written passes,
and the metrics give hand-computed values."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lrp_explicit import composites
from lrp_explicit import vision_task as vt
from lrp_explicit.evaluation import metrics, text, vision


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


# ---------------------------------------------------------------------------- the old import


def test_vision_task_is_an_alias_of_evaluation_vision():
    assert vt.__all__ == vision.__all__
    for name in vision.__all__:
        assert getattr(vt, name) is getattr(vision, name), name
    for name in ("load_model", "explain", "make_batch", "CLASSES", "GLYPH", "normalize",
                 "MEAN", "STD", "TaskConfig", "gamma_composite", "evaluate"):
        assert getattr(vt, name) is getattr(vision, name), name
    namespace: dict = {}
    exec("from lrp_explicit.vision_task import *", namespace)
    assert namespace["explain"] is vision.explain and namespace["CLASSES"] is vision.CLASSES
    assert "moved" in vt.__doc__.lower()


def test_importing_evaluation_loads_no_heavy_dependency():
    """torchvision, zennit and transformers are imported by the functions that need them; the
    evaluation layer never imports the command line."""
    code = ("import sys, lrp_explicit.evaluation, lrp_explicit.vision_task; "
            "print(sorted(m for m in ('torchvision', 'zennit', 'transformers', "
            "'lrp_explicit.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- the vision task


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    model = vision.build_model(vision.TaskConfig(num_layers=1, hidden_dim=16, mlp_dim=32,
                                                 num_heads=2)).double().eval()
    with torch.no_grad():  # torchvision starts the head at zero: no relevance at all
        model.heads.head.weight.normal_(0, 0.5)
        model.heads.head.bias.normal_(0, 0.5)
    return model


def manual_heatmaps(model, images, labels, method, gamma):
    """The reference: the composite's context, one forward, ``y.backward(y.detach())``, the
    relevance of the normalised pixels summed over channels (Gradient×Input: the plain
    gradient of the logits' sum, times the input)."""
    x = vision.normalize(images).double().requires_grad_(True)
    if method == "gxi":
        model(x).gather(1, labels[:, None]).sum().backward()
        return (x.grad * x.detach()).sum(1)
    zen = vision.gamma_composite(*gamma) if gamma is not None else None
    with composites.get(method, model, zennit=zen).context(model):
        y = model(x).gather(1, labels[:, None])
        y.backward(y.detach())
    return x.grad.sum(1)


@pytest.mark.parametrize("method,gamma", [("attnlrp", None), ("attnlrp", (0.25, 0.1)),
                                          ("cp-lrp", None), ("gxi", None)])
def test_vision_explain_equals_a_manual_pass(tiny_vit, method, gamma):
    images, labels, _ = vision.make_batch(5, seed=3)
    got = vision.explain(tiny_vit, images, labels, method, gamma, batch_size=2)
    reference = manual_heatmaps(tiny_vit, images, labels, method, gamma)
    assert got.shape == (5, 32, 32) and reference.abs().max() > 0
    assert relative_error(got, reference) < 1e-6
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_vit.modules())


# ---------------------------------------------------------------------------- the text task


def one_length(family: str, n: int = 4) -> list[text.Sample]:
    """``n`` held-out samples of one length (an unpadded batch)."""
    samples = text.make_samples(200, family == "bert", attractors=True, seed=7)
    by_length: dict[int, list[text.Sample]] = {}
    for s in samples:
        by_length.setdefault(len(s.ids), []).append(s)
    group = max(by_length.values(), key=len)
    assert len(group) >= n
    return group[:n]


@pytest.mark.parametrize("family", text.FAMILIES)
def test_text_batch_explanation_equals_per_sample_explanations(family):
    model = text.build_model(family, seed=0).double().eval()
    model.requires_grad_(False)
    ids, _, positions, labels, _ = text.collate(one_length(family))
    predicted = 1 - labels  # any verb form: the model is untrained
    batch = text.explain_batch(model, ids, positions, predicted)
    assert set(batch) == {"attnlrp", "cp-lrp", "gradient", "gxi", "attnlrp:delta",
                          "cp-lrp:delta"}
    for i in range(len(ids)):
        single = text.explain_batch(model, ids[i:i + 1], positions[i:i + 1],
                                    predicted[i:i + 1])
        for key, value in batch.items():
            assert relative_error(value[i:i + 1], single[key]) < 1e-6, (key, i)
    # the explained difference is the contrast; the gradient baselines are plain autograd
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.allclose(batch["attnlrp:delta"], text.contrast(logits, positions, predicted))
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    text.contrast(model(inputs_embeds=x).logits, positions, predicted).sum().backward()
    assert relative_error(batch["gradient"], x.grad.norm(dim=-1)) < 1e-12
    assert relative_error(batch["gxi"], (x.grad * x.detach()).sum(-1)) < 1e-12
    # ready composites give the same relevance as names
    comps = {"attnlrp": composites.get("attnlrp", model, strict=True)}
    again = text.explain_batch(model, ids, positions, predicted, ["attnlrp"], comps)
    assert set(again) == {"attnlrp", "attnlrp:delta"}
    assert torch.equal(again["attnlrp"], batch["attnlrp"])


def test_text_samples_and_collate():
    samples = text.make_samples(50, masked=True, attractors=True, seed=1)
    for s in samples:
        assert s.ids[0] == text.CLS and s.ids[-1] == text.SEP and s.ids[s.position] == text.MASK
        subject = int(s.ids[s.subject])
        assert (subject - text.NOUN0) // text.N_NOUNS == s.label  # its number is the label
    ids, mask, positions, labels, subjects = text.collate(samples[:5])
    assert ids.shape[0] == 5 and torch.equal(mask, (ids != text.PAD).long())
    assert positions.tolist() == [s.position for s in samples[:5]]
    valid = text.scored_tokens(ids)
    assert not valid[:, 0].any() and valid[torch.arange(5), subjects].all()


# ---------------------------------------------------------------------------- the metrics


def test_metrics_on_a_relevance_whose_top_token_is_the_truth():
    relevance = torch.tensor([[0.1, 2.0, -0.5, 0.3]])
    truth = torch.tensor([[False, True, False, False]])
    got = metrics.token_metrics(relevance, truth)
    assert got["PG2"].item() == 1.0 and got["MRR"].item() == 1.0
    assert got["RMA"].item() == pytest.approx(2.0 / 2.4)  # 2.0 of 0.1 + 2.0 + 0.3
    assert got["PTA"].item() == pytest.approx(0.5)        # agrees at 2.0 and −0.5


def test_metrics_by_hand():
    relevance = torch.tensor([[0.5, -1.0, 0.2, 0.9, 0.0]])
    truth = torch.tensor([[False, False, True, False, False]])
    # ranks: 0.9 → 1, 0.5 → 2, 0.2 → 3, 0.0 → 4, −1.0 → 5
    assert metrics.ranks(relevance).tolist() == [[2, 5, 3, 1, 4]]
    got = metrics.token_metrics(relevance, truth)
    assert got["PG2"].item() == 0.0
    assert got["MRR"].item() == pytest.approx(1 / 3)
    assert got["RMA"].item() == pytest.approx(0.2 / 1.6)
    assert got["PTA"].item() == pytest.approx(3 / 5)  # agree at −1.0, 0.2 and 0.0
    assert metrics.pointing_game(relevance, truth, k=3).item() == 1.0
    # without the token 0.9: 0.2 ranks second among the scored tokens
    valid = torch.tensor([[True, True, True, False, True]])
    got = metrics.token_metrics(relevance, truth, valid)
    assert got["PG2"].item() == 1.0 and got["MRR"].item() == pytest.approx(1 / 2)
    assert got["RMA"].item() == pytest.approx(0.2 / 0.7)
    assert got["PTA"].item() == pytest.approx(3 / 4)
    # ties go to the earlier token; no positive relevance scores RMA 0
    assert metrics.reciprocal_rank(torch.ones(1, 3), torch.tensor([[False, True, False]])) \
        .item() == pytest.approx(1 / 2)
    assert metrics.mass_accuracy(-torch.ones(1, 3), torch.tensor([[True, False, False]])) \
        .item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.token_metrics(relevance, truth[:, :3])


def test_deletion_helpers_by_hand():
    relevance = torch.tensor([0.3, 0.9, 0.1])
    assert metrics.deletion_order(relevance).tolist() == [1, 0, 2]
    assert metrics.deletion_order(relevance, most_relevant_first=False).tolist() == [2, 0, 1]
    ids = torch.tensor([10, 11, 12, 13, 14])  # [CLS] a b c [SEP]
    got = metrics.deleted_inputs(ids, torch.tensor([[1, 0, 2]]), 0, offset=1)
    assert got.tolist() == [[[10, 11, 12, 13, 14], [10, 11, 0, 13, 14], [10, 0, 0, 13, 14],
                             [10, 0, 0, 0, 14]]]
    curve = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert metrics.deletion_auc(curve).item() == pytest.approx(0.5)
    grid = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert metrics.curve_on_grid(curve, grid).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.0])
