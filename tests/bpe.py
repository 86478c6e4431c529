"""A small byte-level BPE tokenizer (GPT-2 style: ``Ġ`` marks a space) trained on a few sentences
with the ``tokenizers`` library, and a tiny GPT-2 with its vocabulary; nothing is downloaded."""
from __future__ import annotations

import functools

import torch
import transformers as tf

SENTENCES = [
    "The capital of France is Paris.",
    "The capital of Italy is Rome, and the capital of Spain is Madrid.",
    "We flew to Paris in the spring; Paris was sunny.",
    "Layer-wise relevance propagation explains the encoder of a transformer.",
    "A cat sat on the mat, and the cat purred.",
    "Par is a word, and this is it.",
]


@functools.lru_cache(maxsize=1)
def bpe_tokenizer() -> tf.PreTrainedTokenizerFast:
    """Byte-level BPE with 300 tokens, ``<|endoftext|>`` its only special token."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(SENTENCES * 20, vocab_size=300, min_frequency=2,
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer._tokenizer,
                                      eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def bpe_gpt2(seed: int = 0) -> tf.GPT2LMHeadModel:
    """A tiny float64 GPT-2 whose vocabulary is that of :func:`bpe_tokenizer`."""
    tokenizer = bpe_tokenizer()
    torch.manual_seed(seed)
    config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer),
                           n_positions=64, initializer_range=0.2, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=tokenizer.eos_token_id,
                           eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.eos_token_id)
    return tf.GPT2LMHeadModel(config).double().eval()
