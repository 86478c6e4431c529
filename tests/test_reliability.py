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
