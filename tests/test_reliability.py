"""Never mix, never guess (issue 27): records that are old or new but never a mix, damaged
records refused with the file and the entry named."""
from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch

import lrp_explicit
from lrp_explicit.explain import store


def record(tokens, values, score, label):
    return lrp_explicit.Explanation(tokens=list(tokens),
                                    relevance=torch.tensor(values, dtype=torch.float64),
                                    score=score, target=1, label=label, task="classification")


OLD = record(["a", "b"], [0.25, 0.75], 1.0, "old")
NEW = record(["w", "x", "y", "z"], [1.0, 2.0, 3.0, 4.0], 10.0, "new")


def same(a, b):
    return (a.tokens == b.tokens and a.score == b.score and a.label == b.label
            and torch.equal(a.relevance, b.relevance))


def test_overwrite_interrupted_between_files_gives_old_record(tmp_path, monkeypatch):
    """High 1: an overwrite interrupted after the tensors and before the JSON left the new
    relevance with the old tokens, target and score."""
    path = OLD.save(tmp_path / "r.lrp")
    import safetensors.torch as st

    real = st.save_file

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        NEW.save(path)
    monkeypatch.undo()
    back = lrp_explicit.load(path)
    assert same(back, OLD)


def _write_killed_at(path, step, after):
    """In a forked child: overwrite the record at ``path``, SIGKILLed just before (or after)
    the ``step``-th file-system call; returns True if the write finished (no such step)."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            import shutil

            import safetensors.torch as st
            calls = [0]

            def wrap(owner, name):
                real = getattr(owner, name)

                def call(*args, **kwargs):
                    calls[0] += 1
                    mine = calls[0]
                    if mine == step and not after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    try:
                        return real(*args, **kwargs)
                    finally:
                        if mine == step and after:
                            os.kill(os.getpid(), signal.SIGKILL)
                setattr(owner, name, call)

            for name in ("rename", "replace", "mkdir", "fsync"):
                wrap(os, name)
            wrap(shutil, "rmtree")
            wrap(st, "save_file")
            real_exchange = getattr(store, "_exchange", None)

            def exchange(a, b):
                calls[0] += 1
                mine = calls[0]
                if mine == step and not after:
                    os.kill(os.getpid(), signal.SIGKILL)
                try:
                    return real_exchange(a, b)
                finally:
                    if mine == step and after:
                        os.kill(os.getpid(), signal.SIGKILL)
            if real_exchange is not None:
                store._exchange = exchange
            NEW.save(path)
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return False
    assert os.WEXITSTATUS(status) == 0
    return True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer")
@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_killed_at_every_write_step_loads_old_or_new(tmp_path, monkeypatch, swap):
    """Crash consistency: a writer SIGKILLed before or after each of its file-system calls
    leaves a folder that loads as the old record or the new one, every time; the next write
    then succeeds and cleans up what the killed one left."""
    if swap == "two renames":
        monkeypatch.setattr(store, "_exchange", lambda a, b: False, raising=False)
    outcomes = {"old": 0, "new": 0}
    for step in range(1, 40):
        finished = None
        for after in (False, True):
            path = tmp_path / f"s{step}{int(after)}" / "r.lrp"
            path.parent.mkdir()
            OLD.save(path)
            finished = _write_killed_at(path, step, after)
            back = lrp_explicit.load(path)
            if same(back, OLD):
                outcomes["old"] += 1
            else:
                assert same(back, NEW), (step, after)
                outcomes["new"] += 1
            OLD.save(path)  # a later write cleans up and succeeds
            assert same(lrp_explicit.load(path), OLD)
            assert sorted(p.name for p in path.parent.iterdir()) == ["r.lrp"]
        if finished:
            break
    else:
        pytest.fail("the write never finished within 40 steps")
    assert outcomes["old"] > 2 and outcomes["new"] >= 1, outcomes


def test_damaged_records_name_file_and_entry(tmp_path):
    """Medium: truncated tensors, corrupt JSON, a missing field or tensor raised
    SafetensorError, JSONDecodeError, KeyError or TypeError without a path."""
    path = OLD.save(tmp_path / "a.lrp")
    tensors = path / "tensors.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"tensors\.safetensors.*unreadable"):
        lrp_explicit.load(path)

    path = OLD.save(tmp_path / "b.lrp")
    text = (path / "lrp.json").read_text()
    (path / "lrp.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"lrp\.json.*not readable JSON"):
        lrp_explicit.load(path)

    path = OLD.save(tmp_path / "c.lrp")
    meta = json.loads((path / "lrp.json").read_text())
    del meta["score"], meta["label"]
    (path / "lrp.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lrp\.json"):
        lrp_explicit.load(path)

    path = OLD.save(tmp_path / "d.lrp")
    from safetensors.torch import save_file
    save_file({"other": torch.zeros(2)}, str(path / "tensors.safetensors"))
    with pytest.raises(ValueError, match=r"tensors\.safetensors.*'relevance'"):
        lrp_explicit.load(path)


def test_tokens_and_relevance_of_different_lengths_refused(tmp_path):
    """Low: a record with 4 tokens and 2 relevance values was accepted."""
    path = OLD.save(tmp_path / "a.lrp")
    meta = json.loads((path / "lrp.json").read_text())
    meta["tokens"] = ["p", "q", "r", "s"]
    (path / "lrp.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'tokens' has 4 entries but 'relevance' has 2"):
        lrp_explicit.load(path)


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_symlinks_are_not_followed(tmp_path):
    """Low: save followed a symlinked lrp.json (writing outside the record)."""
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    path = OLD.save(tmp_path / "a.lrp")
    (path / "lrp.json").unlink()
    (path / "lrp.json").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        NEW.save(path)
    with pytest.raises(ValueError, match="symbolic link"):
        lrp_explicit.load(path)
    assert outside.read_text() == "precious"
    link = tmp_path / "link.lrp"
    link.symlink_to(tmp_path / "elsewhere.lrp")
    with pytest.raises(ValueError, match="symbolic link"):
        NEW.save(link)


# ------------------------------------------------------------------------- evaluate


def test_generation_rows_scored_per_generated_token():
    """High 5: a generation row's (generated × tokens) matrix was scored as one flattened row.
    Each generated token is scored on the tokens before it against its own truth: step 0 sees
    tokens 0, 1 (truth 1 ranks first), step 1 sees tokens 0, 1, 2 (truth 2 ranks third)."""
    row = {"relevance": [[0.1, 0.5, 0.0, 0.0], [0.3, 0.1, 0.05, 0.0]], "prompt_length": 2,
           "truth": [[1], [2]]}
    ev = lrp_explicit.evaluate([row], truth="truth")
    assert ev.per_row["MRR"] == [1.0, 1 / 3] and ev.per_row["PG2"] == [1.0, 0.0]
    assert ev["MRR"] == pytest.approx(2 / 3, abs=1e-15) and ev.rows == 2
    assert ev.per_row["RMA"] == [pytest.approx(0.5 / 0.6), pytest.approx(0.05 / 0.45)]
    with pytest.raises(ValueError, match=r"row 0 is a generation of 2 tokens: give its truth "
                                         r"per generated token"):
        lrp_explicit.evaluate([dict(row, truth=[1, 2])], truth="truth")
    with pytest.raises(ValueError, match="row 0 is a generation"):
        lrp_explicit.evaluate([row], model=torch.nn.Linear(2, 2))


def test_integer_zero_one_mask_is_a_mask():
    """Medium: truth [[0, 0, 1, 0]] was read as the positions 0 and 1."""
    rows = [{"relevance": [0.1, 0.2, 0.9, 0.3]}]
    ev = lrp_explicit.evaluate(rows, truth=[[0, 0, 1, 0]])
    assert ev["MRR"] == 1.0 and ev["PG2"] == 1.0
    assert ev["RMA"] == pytest.approx(0.9 / 1.5)
    with pytest.raises(ValueError, match=r"row 0: truth \[1, 0\] is ambiguous"):
        lrp_explicit.evaluate([{"relevance": [0.1, 0.2]}], truth=[[1, 0]])
    with pytest.raises(ValueError, match="repeats a position"):
        lrp_explicit.evaluate(rows, truth=[[2, 2]])
    assert lrp_explicit.evaluate(rows, truth=[[3, 1]])["MRR"] == 1 / 2  # positions stay


def test_nan_rows_are_excluded_and_counted():
    """Medium: rows with NaN relevance were scored silently."""
    rows = [{"relevance": [float("nan"), 1.0, 0.0], "t": [0]},
            {"relevance": [0.0, 1.0, 2.0], "t": [2]},
            {"relevance": [float("inf"), 1.0, 0.0], "t": [1]}]
    with pytest.warns(RuntimeWarning, match=r"2 of 3 rows have NaN or infinite relevance"):
        ev = lrp_explicit.evaluate(rows, truth="t")
    assert ev.rows == 1 and ev.per_row["MRR"] == [1.0]
    assert ev.settings["excluded_rows"] == [0, 2] and "2 rows with NaN" in str(ev)
    with pytest.raises(ValueError, match="every row's relevance has NaN"):
        lrp_explicit.evaluate(rows[:1], truth="t")


# ------------------------------------------------------------------------- views

HOSTILE = ["Hi", " \x1b[2J", "\x1b]0;owned\x07", " \u202eevil", " ok"]


def test_control_characters_never_reach_a_view(tmp_path):
    """Medium: tokens holding terminal control sequences (clear screen, OSC title) reached the
    terminal raw."""
    e = record(HOSTILE, [0.5, -0.25, 1.0, 0.1, 0.0], 1.0, "next token '\x1b[31m'")
    views = {"plain": e.to_terminal(color=False), "colour": e.to_terminal(color="truecolor"),
             "html": e.to_html(), "latex": e.to_latex(),
             "txt": e.save(tmp_path / "e.txt").read_text(encoding="utf-8")}
    for name, text in views.items():
        for raw in ("\x1b[2J", "\x1b]0;", "\x07", "\u202e", "\x1b[31m'"):
            assert raw not in text, (name, raw)
        shown = text.replace("\\textbackslash{}", "\\")  # LaTeX escapes the backslash
        assert "\\x1b" in shown and "\\x07" in shown and "\\u202e" in shown, name
    colour = views["colour"].replace("\\x1b", "")  # the escapes shown as text
    assert all(code.startswith(("[", "]")) for code in colour.split("\x1b")[1:])


def test_nan_relevance_is_shown_as_such():
    """Medium: NaN relevance printed as +0.00, and all-NaN as 'min 0, max 0'."""
    e = record(["a", "b", "c"], [1.0, float("nan"), float("-inf")], 1.0, "x")
    plain = e.to_terminal(color=False)
    assert "b(nan)" in plain and "c(-inf)" in plain and "a(+1.00)" in plain
    assert "2 NaN or infinite" in plain
    assert "nan" in e.to_terminal(color="truecolor") and "lrp-nonfinite" in e.to_html()
    assert "nan" in e.to_latex()
    nothing = record(["a", "b"], [float("nan"), float("nan")], 1.0, "x").to_terminal(
        color=False)
    assert "+0.00" not in nothing and "min 0" not in nothing and "no finite values" in nothing


# ------------------------------------------------------------------------- inputs


def test_plain_model_on_features_gets_relevance_per_feature():
    """Medium: nn.Sequential on a (1, 6) float input got one relevance for all six features;
    a (6,) input raised an IndexError. Without biases, ε-LRP of a ReLU network is gradient ×
    input (up to ε): one value per feature."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(4, 3, bias=False)).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    e = lrp_explicit.explain(model, x, target=1)
    leaf = x.clone().requires_grad_()
    model(leaf)[0, 1].backward()
    expected = (leaf.grad * x)[0]
    assert e.relevance.shape == (6,) and len(e.tokens) == 6
    assert torch.allclose(e.relevance, expected, rtol=1e-9, atol=1e-12)
    assert e.relevance.sum().item() == pytest.approx(e.score, rel=1e-9)
    with pytest.raises(lrp_explicit.errors.InputError,
                       match=r"shape \(6,\) has no batch dimension; give \(batch, features\)"):
        lrp_explicit.explain(model, x[0], target=1)


def test_long_png_is_capped():
    """Low: the PNG of 10k tokens took 36 s; it now draws the first MAX_TOKENS tokens and says
    how many more there are, with the colour scale of all of them."""
    from lrp_explicit.heatmaps import _image

    n = _image.MAX_TOKENS + 250
    values = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    values[-1] = 4.0  # the largest value is among the tokens not drawn
    tokens = [f" w{i}" for i in range(n)]
    fig = _image.figure(tokens, values, "long")
    texts = [t.get_text() for t in fig.texts]
    assert sum(t.startswith("w") for t in texts) == _image.MAX_TOKENS
    assert any(f"the first {_image.MAX_TOKENS} of {n} tokens; 250 more not drawn" in t
               for t in texts)
    bar = fig.axes[0]
    assert max(abs(v) for v in bar.get_xlim()) == pytest.approx(4.0)


def test_int_keys_of_a_unit_target_come_back_as_ints(tmp_path):
    """Low: a unit target's dict keys (unit indices) came back from load as strings."""
    target = {"layers.0.mlp.act": {17: 1.0, 3: -1.0}}
    e = lrp_explicit.Explanation(tokens=["a", "b"], relevance=torch.tensor([1.0, 2.0]),
                                 score=3.0, target=target, label="units", task="causal-lm")
    back = lrp_explicit.load(e.save(tmp_path / "u.lrp"))
    assert back.target == target and list(back.target["layers.0.mlp.act"]) == [17, 3]
