"""Never guess (issue 27) on the command line: every failure is exit code 2 and one line that
names the file or argument; pickle weights are never loaded; an unreachable hub fails fast
naming HF_HUB_OFFLINE; reading a local data file sends no request."""
from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from lrp_explicit import cli, runs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bpe import bpe_gpt2, bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    bpe_gpt2().save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


def one_line_exit_2(argv, capsys, *needles):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_empty_data_file(folder, tmp_path, capsys, monkeypatch):
    """Medium: an empty data file ended in a StopIteration traceback (exit 1)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_exit_2(["explain-dataset", "--model", str(folder), "--data", str(empty),
                     "--output", str(tmp_path / "out")], capsys, str(empty), "empty")


def test_truncated_safetensors(folder, tmp_path, capsys, monkeypatch):
    """Medium: a truncated model.safetensors ended in a SafetensorError traceback (exit 1)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    one_line_exit_2(["explain", "--model", str(broken), "--text", "a cat"], capsys,
                    f"--model {broken}", "cannot load the model")


def test_pickle_weights_are_refused_unloaded(folder, tmp_path, capsys, monkeypatch):
    """Medium: a folder with pickle weights ended in a traceback; now it is refused before
    anything is unpickled."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2)}, pickled / "pytorch_model.bin")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    one_line_exit_2(["explain", "--model", str(pickled), "--text", "a cat"], capsys,
                    "pytorch_model.bin", "pickle")
    assert not loads


def test_negative_random_orders(folder, tmp_path, capsys, monkeypatch):
    """Medium: --random-orders -1 ended in a RuntimeError traceback (exit 1)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a cat sat"}\n')
    out = tmp_path / "run"
    assert cli.main(["explain-dataset", "--model", str(folder), "--data", str(data),
                     "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    one_line_exit_2(["evaluate", "--results", str(out), "--model", str(folder),
                     "--random-orders", "-1"], capsys, "--random-orders -1")


def test_unreachable_hub_fails_fast_naming_offline_mode(capsys, monkeypatch):
    """Low: a hub name without HF_HUB_OFFLINE cost 28 s of retries before exit 2."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    one_line_exit_2(["explain", "--model", "someone/some-model", "--text", "a cat"], capsys,
                    "--model someone/some-model", "unreachable", "HF_HUB_OFFLINE")
    assert time.monotonic() - start < 5


def test_reading_local_data_sends_no_request(tmp_path, monkeypatch):
    """Low: reading a local data file made a HEAD request (a download counter)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    attempts = []
    real = socket.socket.connect

    def record(sock, address):
        attempts.append(address)
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", record)
    lookup = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # without a network a request stops here
        attempts.append(host)
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    data = tmp_path / "fresh.jsonl"
    data.write_text('{"text": "a cat sat"}\n{"text": "the mat"}\n')
    table = runs.read_data(data)
    assert len(table) == 2 and attempts == []


def test_rerun_with_another_model_exits_2_naming_what_changed(folder, tmp_path, capsys,
                                                              monkeypatch):
    """High 2 on the command line: a rerun into a run folder with another model of the same
    class and folder name is refused in one line; --force-new starts afresh."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = tmp_path / "elsewhere" / "model"
    bpe_gpt2(1).save_pretrained(other)
    bpe_tokenizer().save_pretrained(other)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a cat sat"}\n{"text": "the mat"}\n')
    out = tmp_path / "run"
    argv = ["explain-dataset", "--data", str(data), "--output", str(out), "--no-progress"]
    assert cli.main(argv[:1] + ["--model", str(folder)] + argv[1:]) == 0
    capsys.readouterr()
    one_line_exit_2(argv[:1] + ["--model", str(other)] + argv[1:], capsys,
                    "model weights changed", "--force-new")
    assert cli.main(argv[:1] + ["--model", str(other)] + argv[1:] + ["--force-new"]) == 0
