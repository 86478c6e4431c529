"""Never mix, never guess (issue 27) for dataset runs: a run is bound to its model, tokenizer
and data; a resume with any of them changed is refused naming what changed; computed columns
are never replaced by data fields; one run at a time writes into a folder."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

import lrp_explicit  # noqa: E402
from lrp_explicit import runs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bpe import bpe_gpt2, bpe_tokenizer  # noqa: E402

DATA = [{"text": "The capital of France is", "label": 1, "truth": [0]},
        {"text": "a cat sat on the mat", "label": 0, "truth": [1]},
        {"text": "We flew to Rome", "label": 1, "truth": [2]},
        {"text": "the cat purred", "label": 0, "truth": [0]}]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny GPT-2s of one class and one config, saved in folders of the same name."""
    import transformers as tf

    out = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"m{seed}") / "model"
        bpe_gpt2(seed).save_pretrained(path)
        out.append(tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval())
    return out


def run(model, tok, data, out, **kwargs):
    kwargs.setdefault("batch_size", 2)
    return lrp_explicit.explain_dataset(model, data, out, tokenizer=tok, progress=False,
                                        **kwargs)


def test_resume_with_another_model_of_same_class_and_name_is_refused(two_models, tok,
                                                                     tmp_path):
    """High 2: the check compared only the last part of _name_or_path; the rows mixed two
    models."""
    a, b = two_models
    from lrp_explicit.explain.common import model_name

    assert model_name(a) == model_name(b) and type(a) is type(b)
    run(a, tok, DATA[:2], tmp_path / "run")
    with pytest.raises(ValueError, match=r"model weights changed"):
        run(b, tok, DATA, tmp_path / "run")
    rows = lrp_explicit.load(tmp_path / "run").to_list()
    assert len(rows) == 2  # nothing of the other model was written
    fresh = run(b, tok, DATA, tmp_path / "run", force_new=True).to_list()
    alone = run(b, tok, DATA, tmp_path / "alone").to_list()
    assert fresh == alone


def test_resume_with_other_data_is_refused(two_models, tok, tmp_path):
    """High 3: resumed with other texts under the same fields, the old rows kept the old
    texts."""
    a, _ = two_models
    run(a, tok, DATA[:2], tmp_path / "run")
    changed = [dict(r) for r in DATA]
    changed[1]["text"] = "a dog sat on the mat"
    with pytest.raises(ValueError, match=r"the data of row 1 differs"):
        run(a, tok, changed, tmp_path / "run")
    rows = run(a, tok, DATA, tmp_path / "run").to_list()  # appending rows still resumes
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert rows == run(a, tok, DATA, tmp_path / "whole").to_list()


def test_resume_with_another_tokenizer_is_refused(two_models, tok, tmp_path):
    a, _ = two_models
    run(a, tok, DATA[:2], tmp_path / "run")
    other = copy.deepcopy(bpe_tokenizer())  # the shared (cached) one stays as it is
    other.add_tokens(["zzqx"])
    assert len(bpe_tokenizer()) == 300
    with pytest.raises(ValueError, match=r"tokenizer changed"):
        run(a, other, DATA, tmp_path / "run")


def test_keep_of_a_computed_column_is_stored_as_data_field(two_models, tok, tmp_path):
    """High 4: keep=["label"] replaced the computed label column with the data field."""
    a, _ = two_models
    rows = run(a, tok, DATA, tmp_path / "run", keep=["label", "truth"]).to_list()
    alone = lrp_explicit.explain(a, [r["text"] for r in DATA], tokenizer=tok, progress=False)
    for row, e, d in zip(rows, alone, DATA):
        assert row["label"] == e.label and isinstance(row["label"], str)
        assert row["data.label"] == d["label"] and row["truth"] == d["truth"]
    with pytest.raises(ValueError, match="twice"):
        run(a, tok, [dict(r, **{"data.label": 3}) for r in DATA], tmp_path / "other",
            keep=["label", "data.label"])


def test_corrupt_run_metadata_is_one_clear_error(two_models, tok, tmp_path):
    """Medium: a corrupt lrp_run.json raised a raw JSONDecodeError."""
    a, _ = two_models
    run(a, tok, DATA[:2], tmp_path / "run")
    (tmp_path / "run" / "lrp_run.json").write_text('{"format": "lrp_expl')
    with pytest.raises(ValueError, match=r"lrp_run\.json: not readable JSON"):
        lrp_explicit.load(tmp_path / "run")
    with pytest.raises(ValueError, match=r"lrp_run\.json: not readable JSON"):
        run(a, tok, DATA, tmp_path / "run")
    assert len(run(a, tok, DATA, tmp_path / "run", force_new=True)) == 4


def test_second_run_into_a_busy_folder_is_refused_and_keeps_its_shards(two_models, tok,
                                                                      tmp_path, monkeypatch):
    """Medium: a second run into a folder deleted the first run's temporary shard and the
    first crashed with FileNotFoundError."""
    a, _ = two_models
    out = tmp_path / "run"
    real = runs._write_atomic
    seen = []

    def second_run_meanwhile(path, write):
        if path.name.startswith("rows-") and not seen:
            def write_then_compete(tmp):
                write(tmp)
                seen.append(tmp)
                with pytest.raises(ValueError, match=r"in use by another run \(process "):
                    run(a, tok, DATA, out)
                assert tmp.exists()  # the other run did not delete it
            return real(path, write_then_compete)
        return real(path, write)

    monkeypatch.setattr(runs, "_write_atomic", second_run_meanwhile)
    rows = run(a, tok, DATA, out).to_list()
    assert seen and len(rows) == 4
    monkeypatch.undo()
    assert rows == run(a, tok, DATA, tmp_path / "alone").to_list()
    assert not (out / runs.LOCK).exists()


def test_stale_temporary_shard_of_a_live_process_is_kept(two_models, tok, tmp_path):
    """A temporary shard named for a process that is alive (another run's) is not deleted;
    one of a process that is gone is."""
    a, _ = two_models
    out = tmp_path / "run"
    run(a, tok, DATA[:2], out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".tmp-{sleeper.pid}-rows-000000002-000000004.parquet"
        live.write_bytes(b"partial")
        dead = out / ".tmp-999999999-rows-000000002-000000004.parquet"
        dead.write_bytes(b"partial")
        run(a, tok, DATA, out)
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_generate_beyond_the_model_is_refused(two_models, tok, tmp_path):
    """Low: generate=10**9 was accepted."""
    a, _ = two_models
    with pytest.raises(ValueError, match=r"generate=1000000000 does not fit the model's 64 "):
        run(a, tok, DATA, tmp_path / "run", generate=10 ** 9)


def test_metadata_holds_the_identity(two_models, tok, tmp_path):
    a, b = two_models
    run(a, tok, DATA, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "lrp_run.json").read_text())
    assert set(meta["fingerprint"]) == {"model config", "model weights", "adapters",
                                        "tokenizer", "generation config"}
    assert meta["fingerprint"] == runs.fingerprint(a, tok)
    assert runs.fingerprint(a, tok)["model weights"] != runs.fingerprint(b, tok)["model weights"]
    assert runs.fingerprint(a, tok)["model config"] == runs.fingerprint(b, tok)["model config"]
    assert meta["rows"] == 4 and meta["data_fields"] == ["text"]
    assert os.path.basename(meta["data"]) == "data"


def test_evaluate_a_generation_run_per_generated_token(two_models, tok, tmp_path):
    """High 5 on a real run: generate=2 rows are scored per generated token against a truth
    per step, each step equal to scoring explain(prompt + generated so far) alone; a flat
    truth is refused."""
    a, _ = two_models
    rows = run(a, tok, DATA[:2], tmp_path / "run", generate=2)
    with pytest.raises(ValueError, match=r"row 0 is a generation of 2 tokens"):
        lrp_explicit.evaluate(tmp_path / "run", truth=[[0], [1]])
    truth = [[[0], [1]], [[1], [0]]]
    ev = lrp_explicit.evaluate(tmp_path / "run", truth=truth, valid=None)
    assert ev.rows == 4 and ev.settings["per"] == "generated token"
    expected = []
    for i, row in enumerate(rows.to_list()):
        for g in range(2):
            n = row["prompt_length"] + g
            single = lrp_explicit.explain(a, row["ids"][:n], target=row["target"][g],
                                          tokenizer=tok)
            alone = lrp_explicit.evaluate([{"relevance": single.relevance,
                                            "special": row["special"][:n]}],
                                          truth=[truth[i][g]])
            expected.append(alone.per_row["MRR"][0])
    assert ev.per_row["MRR"] == pytest.approx(expected, abs=1e-12)
    gen = lrp_explicit.explain(a, DATA[0]["text"], tokenizer=tok, generate=2)
    assert lrp_explicit.evaluate([gen], truth=[truth[0]]).per_row["MRR"] == pytest.approx(
        expected[:2], abs=1e-12)


def test_ablate_refuses_an_explanation_of_other_inputs(two_models, tok):
    """Medium: ablate(..., explanation=<of another input>) silently used the other input's
    score as the base."""
    a, b = two_models
    first, second = tok(DATA[0]["text"])["input_ids"], tok(DATA[1]["text"])["input_ids"]
    mine = lrp_explicit.explain(a, first, target=5)
    result = lrp_explicit.ablate(a, first, "*", k=1, target=5, draws=0, explanation=mine)
    assert result.base == mine.score
    with pytest.raises(ValueError, match="explanation is of other inputs"):
        lrp_explicit.ablate(a, first, "*", k=1, draws=0,
                            explanation=lrp_explicit.explain(a, second, target=5))
    same_tokens_other_model = lrp_explicit.explain(b, first, target=5)
    with pytest.raises(ValueError, match=r"score .* is not the model's"):
        lrp_explicit.ablate(a, first, "*", k=1, draws=0, explanation=same_tokens_other_model)


def test_resume_with_another_adapter_is_refused(tok, tmp_path):
    """The adapter state is part of a run's identity: the same base model with another LoRA
    adapter (other weights, or another configuration) is refused."""
    peft = pytest.importorskip("peft")

    def adapted(rank, seed):
        base = bpe_gpt2(0)
        torch.manual_seed(seed)  # the adapter's own initialisation
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=rank, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False))
        return model.double().eval()

    run(adapted(4, 0), tok, DATA[:2], tmp_path / "run")
    with pytest.raises(ValueError, match=r"model weights changed"):
        run(adapted(4, 1), tok, DATA, tmp_path / "run")
    with pytest.raises(ValueError, match=r"adapters changed"):
        run(adapted(8, 0), tok, DATA, tmp_path / "run")
    assert len(run(adapted(4, 0), tok, DATA, tmp_path / "run")) == 4
