"""Dataset runs (``lrp_explicit.explain_dataset``, ``lrp-explicit explain-dataset``): the rows
equal ``explain`` of each sample and come back from ``load``; a rerun resumes; a run killed by
SIGKILL and rerun has every row exactly once, equal to an uninterrupted run; ``torchrun`` and
``accelerate launch`` with two processes (gloo on CPU) give the rows of one process, bit for
bit; bad input stops with one line naming the row and keeps what was written; the README's
section runs as shown."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

import lrp_explicit  # noqa: E402
from lrp_explicit import cli, runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
sys.path.insert(0, str(Path(__file__).parent))
WORDS = ("The capital of France is Paris . We flew to Rome in the spring ; a cat sat on the "
         "mat and the cat purred").split()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny float64 GPT-2 with its byte-level BPE tokenizer, saved as a model folder."""
    from bpe import bpe_gpt2, bpe_tokenizer

    path = tmp_path_factory.mktemp("model")
    bpe_gpt2().save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer(folder):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    return model, tf.AutoTokenizer.from_pretrained(folder)


def samples(n: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 9, (1,), generator=gen))
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=gen)]
        out.append({"key": f"s{i:02d}", "text": " ".join(words), "evidence": [0]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def as_rows(dataset) -> list[dict]:
    return dataset.to_list()


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def one_process_reference(model, tokenizer, data, out: Path, **kwargs):
    """The rows of an uninterrupted one-process run with one thread (as torchrun's workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lrp_explicit.explain_dataset(model, data, out, tokenizer=tokenizer,
                                            progress=False, **kwargs)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- rows and load


def test_rows_are_the_explanations_and_load_returns_them(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    data = samples(10)
    for row in data:
        row["target"] = " Paris"  # id 280
    out = lrp_explicit.explain_dataset(model, data, tmp_path / "run", tokenizer=tok,
                                       target_field="target", batch_size=4, keep=["key"],
                                       id_field="key", progress=False)
    loaded = lrp_explicit.load(tmp_path / "run")
    assert as_rows(loaded) == as_rows(out)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "lrp_run.json", "rows-000000000-000000004.parquet", "rows-000000004-000000008.parquet",
        "rows-000000008-000000010.parquet"]
    expected = lrp_explicit.explain(model, [r["text"] for r in data],
                                    [r["target"] for r in data], tokenizer=tok, batch_size=4,
                                    progress=False)
    assert len(loaded) == len(data)
    for i, (row, e) in enumerate(zip(as_rows(loaded), expected)):
        assert (row["id"], row["row"], row["key"]) == (data[i]["key"], i, data[i]["key"])
        assert row["tokens"] == e.tokens and row["ids"] == e.ids
        assert torch.equal(torch.tensor(row["relevance"], dtype=torch.float64), e.relevance)
        assert row["words"] == e.words and row["special"] == e.special
        assert torch.equal(torch.tensor(row["word_relevance"], dtype=torch.float64),
                           e.word_relevance)
        assert (row["target"], row["label"], row["score"], row["prediction"]) == (
            e.target, e.label, e.score, e.prediction) and row["target"] == 280
        assert row["position"] == len(e.tokens) - 1 and row["contrast"] is None
    meta = runs.run_metadata(tmp_path / "run")
    assert meta == runs.run_metadata(loaded)
    assert meta["composite"].startswith("attnlrp") and meta["epsilon"] == 1e-12
    assert (meta["model_class"], meta["task"], meta["version"], meta["rows"]) == (
        "GPT2LMHeadModel", "causal-lm", lrp_explicit.__version__, 10)


def test_a_rerun_skips_finished_rows_and_explains_new_ones(model_and_tokenizer, tmp_path,
                                                           monkeypatch):
    model, tok = model_and_tokenizer
    data = samples(9)
    first = lrp_explicit.explain_dataset(model, data[:5], tmp_path, tokenizer=tok,
                                         id_field="key", batch_size=2, progress=False)
    shards = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("rows-*")}
    calls = []
    real = runs._explain_rows

    def counting(model, rows, *args):
        calls.append(rows)
        return real(model, rows, *args)

    monkeypatch.setattr(runs, "_explain_rows", counting)
    both = lrp_explicit.explain_dataset(model, data, tmp_path, tokenizer=tok, id_field="key",
                                        batch_size=2, progress=False)
    assert calls == [[5], [6, 7], [8]]  # only the new rows, in the batches of the full data
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("rows-*")
            if p.name in shards} == shards  # nothing written before was touched
    assert as_rows(both)[:5] == as_rows(first) and [r["id"] for r in as_rows(both)] == [
        r["key"] for r in data]
    with pytest.raises(ValueError, match=r"other settings \(composite: 'attnlrp \(gpt2\)' → "
                                         r"'cp-lrp \(gpt2\)'"):
        lrp_explicit.explain_dataset(model, data, tmp_path, tokenizer=tok, id_field="key",
                                     composite="cp-lrp", progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files \(notes.txt\)"):
        lrp_explicit.explain_dataset(model, data, tmp_path, tokenizer=tok, id_field="key",
                                     progress=False)


def test_generation_rows(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    data = samples(3)
    rows = as_rows(lrp_explicit.explain_dataset(model, data, tmp_path, tokenizer=tok,
                                                generate=3, progress=False))
    for row, sample in zip(rows, data):
        g = lrp_explicit.explain(model, sample["text"], tokenizer=tok, generate=3)
        assert row["tokens"] == g.tokens and row["target"] == g.generated
        assert torch.equal(torch.tensor(row["relevance"], dtype=torch.float64), g.relevance)
        assert row["score"] == g.scores and row["label"] == g.labels
        assert row["prompt_length"] == g.prompt_length


# ---------------------------------------------------------------------------- bad input


def test_bad_input_names_the_row_and_keeps_what_was_written(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    data = samples(8)
    for row in data:
        row["target"] = " Paris"
    data[6]["target"] = " zzqx Paris"  # several tokens: a next token is one
    out = tmp_path / "run"
    with pytest.raises(runs.RowError) as err:
        lrp_explicit.explain_dataset(model, data, out, tokenizer=tok, target_field="target",
                                     id_field="key", batch_size=2, progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith("row 6 (id 's06'): target ")
    assert (err.value.row, err.value.id) == (6, "s06")
    done = as_rows(lrp_explicit.load(out))
    assert [r["id"] for r in done] == ["s00", "s01", "s02", "s03", "s04", "s05"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    data[6]["target"] = " Paris"
    rows = as_rows(lrp_explicit.explain_dataset(model, data, out, tokenizer=tok,
                                                target_field="target", id_field="key",
                                                batch_size=2, progress=False))
    assert rows[:6] == done and [r["id"] for r in rows] == [r["key"] for r in data]


@pytest.mark.parametrize("change, message", [
    (lambda rows: rows[3].update(text=""), r"^row 3: field 'text' is an empty text$"),
    (lambda rows: rows[2].update(text=None), r"^row 2: field 'text' is missing$"),
    (lambda rows: rows[4].update(target=10 ** 6),
     r"^row 4: target 1000000 is not one of the model's 300 outputs$"),
    (lambda rows: rows[5].update(key="s01"), r"^row 5 \(id 's01'\): id 's01' repeats row 1"),
])
def test_bad_rows_stop_before_any_work(model_and_tokenizer, tmp_path, change, message):
    model, tok = model_and_tokenizer
    data = samples(6)
    for row in data:
        row["target"] = 280
    change(data)
    id_field = "key" if "repeats" in message else None
    with pytest.raises(runs.RowError, match=message):
        lrp_explicit.explain_dataset(model, data, tmp_path / "run", tokenizer=tok,
                                     target_field="target", id_field=id_field, progress=False)
    assert not list((tmp_path / "run").glob("rows-*")) if (tmp_path / "run").exists() else True


def test_unreadable_files_and_missing_fields(model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat"}\n{"text": "the mat"\n{"text": "Paris"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: cannot read it as json: .* in row 1$"):
        lrp_explicit.explain_dataset(model, bad, tmp_path / "r", tokenizer=tok)
    with pytest.raises(ValueError, match=r"unknown data format '\.txt'"):
        lrp_explicit.explain_dataset(model, tmp_path / "a.txt", tmp_path / "r", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="no such file"):
        lrp_explicit.explain_dataset(model, tmp_path / "none.csv", tmp_path / "r", tokenizer=tok)
    good = write_jsonl(tmp_path / "good.jsonl", samples(2))
    with pytest.raises(ValueError, match=r"good.jsonl: no field 'sentence' for text_field "
                                         r"\(fields: key, text, evidence\)"):
        lrp_explicit.explain_dataset(model, good, tmp_path / "r", tokenizer=tok,
                                     text_field="sentence")
    assert not (tmp_path / "r").exists()


def test_cli_explain_dataset_and_evaluate(folder, model_and_tokenizer, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", samples(6))
    out = tmp_path / "run"
    code = cli.main(["explain-dataset", "--model", str(folder), "--data", str(data), "--output",
                     str(out), "--keep", "evidence", "--batch-size", "4", "--no-progress"])
    assert code == 0 and "6 rows in" in capsys.readouterr().out
    code = cli.main(["evaluate", "--results", str(out), "--truth", "evidence", "--model",
                     str(folder), "--dtype", "float64", "--random-orders", "2", "--plot",
                     str(tmp_path / "curves.png"), "--output", str(tmp_path / "scores.json")])
    text = capsys.readouterr().out
    assert code == 0 and "| PG2 |" in text and "| ABC |" in text
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["rows"] == 6 and set(saved["per_row"]) >= {"PG2", "delete MoRF", "ABC"}
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a cat"}, {"text": "  "}])
    code = cli.main(["explain-dataset", "--model", str(folder), "--data", str(bad), "--output",
                     str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("lrp-explicit explain-dataset: error: row 1: field 'text' is "
                                 "an empty text\n")


# ---------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_every_row_once(folder, model_and_tokenizer, tmp_path):
    """A run killed by SIGKILL while a shard is being written (its rename slowed down, so the
    kill lands between the temporary file and the rename) leaves only whole shards; the rerun
    explains the rest and equals an uninterrupted run row for row."""
    model, tok = model_and_tokenizer
    data = write_jsonl(tmp_path / "data.jsonl", samples(24))
    out = tmp_path / "killed"
    script = (
        "import os, sys, time\n"
        "import lrp_explicit, transformers as tf, torch\n"
        "replace = os.replace\n"
        "def slow(a, b):\n"
        "    time.sleep(0.4)\n"
        "    replace(a, b)\n"
        "os.replace = slow\n"
        f"model = tf.AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float64)\n"
        f"tok = tf.AutoTokenizer.from_pretrained({str(folder)!r})\n"
        f"lrp_explicit.explain_dataset(model.eval(), {str(data)!r}, {str(out)!r}, "
        "tokenizer=tok, id_field='key', batch_size=4, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=child_env(),
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            names = [p.name for p in out.iterdir()] if out.is_dir() else []
            if sum(n.startswith("rows-") for n in names) >= 2 \
                    and any(n.startswith(".tmp-") for n in names):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("rows-")]
    assert 2 <= len(shards) < 6 and any(n.startswith(".tmp-") for n in names)
    partial = as_rows(lrp_explicit.load(out))  # every shard left is whole
    assert len(partial) == 4 * len(shards)
    resumed = as_rows(one_process_reference(model, tok, data, out, id_field="key",
                                            batch_size=4))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    whole = as_rows(one_process_reference(model, tok, data, tmp_path / "whole", id_field="key",
                                          batch_size=4))
    assert [r["id"] for r in resumed] == [f"s{i:02d}" for i in range(24)]
    assert resumed == whole and resumed[:len(partial)] == partial


@pytest.mark.slow
def test_accelerate_launch_gives_the_rows_of_one_process(folder, model_and_tokenizer,
                                                        tmp_path):
    """The same command under ``accelerate launch --num_processes 2`` (gloo on CPU): the rows
    equal a one-process run's, bit for bit (``torchrun``: the README test below)."""
    pytest.importorskip("accelerate")
    model, tok = model_and_tokenizer
    data = write_jsonl(tmp_path / "data.jsonl", samples(30, seed=1))
    command = ["-m", "lrp_explicit", "explain-dataset", "--model", str(folder), "--data",
               str(data), "--id-field", "key", "--batch-size", "4", "--output",
               str(tmp_path / "two"), "--no-progress"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes",
              "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run(launch + command, env=child_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("30 rows in") == 1  # printed by the main process only
    two = as_rows(lrp_explicit.load(tmp_path / "two"))
    one = as_rows(one_process_reference(model, tok, data, tmp_path / "one", id_field="key",
                                        batch_size=4))
    assert len(two) == 30 and two == one


def test_process_gpus_share_the_node():
    assert runs.process_gpus(1, 2, 8) == [4, 5, 6, 7]
    assert runs.process_gpus(0, 3, 8) == [0, 1]
    with pytest.raises(ValueError, match="3 processes cannot share 2 GPUs"):
        runs.process_gpus(0, 3, 2)


# ---------------------------------------------------------------------------- the README


@pytest.mark.slow
def test_readme_section_runs_as_shown_and_torchrun_equals_one_process(folder, tmp_path,
                                                                      monkeypatch):
    """The section "Explaining a dataset": its shell commands (``lrp-explicit`` run as
    ``python -m lrp_explicit``, ``torchrun`` as ``python -m torch.distributed.run``) and its
    Python block, in a folder holding ``model/`` (a tiny GPT-2) and ``samples.jsonl``; the rows
    of ``torchrun --nproc_per_node 2`` (gloo on CPU) equal those of one process, bit for
    bit."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Explaining a dataset\n")
    section = text[start:text.find("\n## ", start + 1)]
    (tmp_path / "model").symlink_to(folder)
    write_jsonl(tmp_path / "samples.jsonl", [{"text": r["text"], "evidence": r["evidence"]}
                                             for r in samples(24)])
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
                for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert any(c.startswith("torchrun --nproc_per_node 2") for c in commands)

    def argv(command: str) -> list[str]:
        words = shlex.split(command)
        launcher = {"lrp-explicit": ["-m", "lrp_explicit"],
                    "torchrun": ["-m", "torch.distributed.run"]}[words[0]]
        return [sys.executable, *launcher, *words[1:]]

    # the explain-dataset runs are independent: side by side; then the others in order
    runs_first = [c for c in commands if "explain-dataset" in c]
    started = [(c, subprocess.Popen(argv(c), cwd=tmp_path, env=child_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE))
               for c in runs_first]
    for command, proc in started:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{command}\n{err[-3000:]}"
    for command in [c for c in commands if c not in runs_first]:
        done = subprocess.run(argv(command), cwd=tmp_path, env=child_env(), capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for n, block in enumerate(blocks):
        exec(compile(block, f"README 'Explaining a dataset' block {n + 1}", "exec"), namespace)
    one = as_rows(lrp_explicit.load(tmp_path / "runs" / "one"))
    two = as_rows(lrp_explicit.load(tmp_path / "runs" / "two"))
    assert len(one) == 24 and one == two  # one thread per process in both: bit for bit
    python = as_rows(namespace["rows"])
    assert [r["tokens"] for r in python] == [r["tokens"] for r in one]
    assert namespace["scores"].rows == 24 and "ABC" in namespace["scores"].metrics
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "evaluation.png").is_file()
