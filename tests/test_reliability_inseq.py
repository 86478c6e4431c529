"""The inseq plugin keeps the model's own token ids (issue 27): with a byte-level tokenizer a
generated token that does not survive decoding and tokenizing again is still the token its
step explains, and the steps equal explain(generate=N)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).parent))
from bpe import bpe_gpt2, bpe_tokenizer  # noqa: E402

PROMPT = "The capital of France is"


def test_steps_explain_the_generated_byte_level_tokens():
    inseq = pytest.importorskip("inseq")
    import lrp_explicit.integrations.inseq  # noqa: F401  (registers the methods)

    model, tok = bpe_gpt2(), bpe_tokenizer()
    prompt = tok(PROMPT)["input_ids"]
    forced = 100  # a byte token: decoding and tokenizing again gives other ids
    text = tok.decode(prompt + [forced], clean_up_tokenization_spaces=False)
    assert tok(text)["input_ids"] != prompt + [forced]
    generation_kwargs = {"sequence_bias": {(forced,): 1000.0}, "do_sample": False}
    generation = lrp_explicit.explain(model, torch.tensor([prompt]), generate=2,
                                      generation_kwargs=generation_kwargs)
    assert forced in generation.generated

    wrapped = inseq.load_model(model, "attnlrp", tokenizer=tok)
    out = wrapped.attribute(PROMPT, generation_args={"max_new_tokens": 2, "min_new_tokens": 2,
                                                     **generation_kwargs},
                            show_progress=False)
    seq = out.sequence_attributions[0]
    ids = [t.id for t in seq.target]
    assert ids == generation.ids  # the model's own tokens, not those of the decoded text
    scores = seq.target_attributions
    for step in range(2):
        position = len(prompt) + step
        got = scores[:position, step].double()
        want = generation.relevance[step, :position]
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-12), step
