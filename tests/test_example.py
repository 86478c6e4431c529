"""The example ``examples/explain_toy_transformer.py`` runs and finds the key token."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "explain_toy_transformer.py"


def run_example(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_COLOR="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_example_runs():
    proc = run_example("--steps", "5", "--no-color")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Held-out accuracy:" in out
    assert "Per-token relevance" in out
    assert "attnlrp" in out and "cp-lrp" in out
    assert "<- key" in out                      # the table row of the key token
    assert out.count("conservation:") == 2
    assert "\033[" not in out                   # no ANSI codes without a terminal


def test_example_key_token_most_relevant():
    # 100 seeded steps: ~100% held-out accuracy, a few seconds on a CPU.
    proc = run_example("--steps", "100", "--seed", "0", "--no-color")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    accuracy = float(re.search(r"Held-out accuracy: ([\d.]+)%", out).group(1))
    assert accuracy >= 95.0, out
    assert out.count("-> is the key token") == 2, out
    assert "the key token is the most relevant token for both methods" in out, out
