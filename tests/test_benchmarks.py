"""Smoke test of ``benchmarks/speed.py --quick``: it runs end to end (tiny models, every method,
the memory subprocesses) and writes its three results into a temporary folder. No timing or
memory figure is asserted: unit tests never judge speed."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SPEED = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"


def test_speed_quick(tmp_path):
    run = subprocess.run([sys.executable, str(SPEED), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
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
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "speed.png").stat().st_size > 0


PROFILE = SPEED.parent / "profile_backward.py"


def test_profile_backward_runs(tmp_path):
    """``profile_backward.py`` on the tiny LLaMA: it completes and reports every method and the
    rule Functions' backward nodes (no figure is asserted)."""
    run = subprocess.run([sys.executable, str(PROFILE), "--model", "llama-tiny", "--seq", "32",
                          "--repeats", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "speed_profile.json").read_text())
    assert set(results["split_s"]) == {"ixg", "mgxi", "attnlrp"}
    assert results["saved_bytes"]["attnlrp"] > 0
    assert "LinearEpsilonFunctionBackward" in results["nodes_s"]["attnlrp"]
    assert "| AttnLRP |" in (tmp_path / "speed_profile.md").read_text()
