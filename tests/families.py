"""Tiny random configurations of the supported Hugging Face families, for tests."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers as tf

SIZE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=64, initializer_range=0.2)
DECODER = dict(SIZE, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)


@dataclass
class Family:
    """A family under test: its config, head classes (main head first) and input kind."""

    name: str
    config: tf.PretrainedConfig
    heads: list[str]
    causal: bool = True
    vision: bool = False
    attn: tuple[str, ...] = ("eager", "sdpa")
    extra: dict = field(default_factory=dict)

    def classes(self):
        return [getattr(tf, h) for h in self.heads if hasattr(tf, h)]

    def build(self, head: type | None = None, attn: str = "eager", dtype=torch.float64,
              seed: int = 0):
        torch.manual_seed(seed)
        self.config._attn_implementation = attn
        model = (head or self.classes()[0])(self.config).to(dtype).eval()
        return model


def _decoder(name, config_cls, prefix, **extra):
    return Family(name, config_cls(**DECODER, **extra),
                  [f"{prefix}ForCausalLM", f"{prefix}Model", f"{prefix}ForSequenceClassification",
                   f"{prefix}ForTokenClassification"])


FAMILIES = [
    _decoder("llama", tf.LlamaConfig, "Llama"),
    _decoder("mistral", tf.MistralConfig, "Mistral", sliding_window=4),
    _decoder("qwen2", tf.Qwen2Config, "Qwen2"),
    _decoder("qwen3", tf.Qwen3Config, "Qwen3", head_dim=8),
    _decoder("phi3", tf.Phi3Config, "Phi3"),
    Family("gemma2", tf.Gemma2Config(**DECODER, head_dim=8, attn_logit_softcapping=5.0,
                                     final_logit_softcapping=3.0, query_pre_attn_scalar=8),
           ["Gemma2ForCausalLM", "Gemma2Model", "Gemma2ForSequenceClassification",
            "Gemma2ForTokenClassification"], attn=("eager",)),
    Family("gemma3", tf.Gemma3TextConfig(**DECODER, head_dim=8, final_logit_softcapping=3.0,
                                         query_pre_attn_scalar=8),
           ["Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3TextForSequenceClassification"]),
    Family("gpt2", tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                 initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0, pad_token_id=0),
           ["GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification",
            "GPT2ForTokenClassification"]),
    Family("bert", tf.BertConfig(**SIZE, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0),
           ["BertForMaskedLM", "BertModel", "BertForSequenceClassification",
            "BertForTokenClassification"], causal=False),
    Family("roberta", tf.RobertaConfig(**SIZE, pad_token_id=1, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0),
           ["RobertaForMaskedLM", "RobertaModel", "RobertaForSequenceClassification",
            "RobertaForTokenClassification"], causal=False),
    Family("vit", tf.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, image_size=16, patch_size=4,
                               num_channels=3, initializer_range=0.2, num_labels=3),
           ["ViTForImageClassification", "ViTModel"], causal=False, vision=True),
]
BY_NAME = {f.name: f for f in FAMILIES}


def inputs(family: Family, model, batch: int = 1, length: int = 7, seed: int = 1):
    """The input to explain (embeddings or pixels) and the forward keyword for it."""
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    if family.vision:
        pixels = torch.randn(batch, 3, 16, 16, generator=generator).to(dtype)
        return pixels, "pixel_values"
    ids = torch.randint(3, 64, (batch, length), generator=generator)
    return model.get_input_embeddings()(ids).detach(), "inputs_embeds"


def score(output, index: int = 5):
    """A scalar per sample from the first output: logits or hidden states, at the last position."""
    first = output[0]
    if first.dim() == 3:
        first = first[:, -1]
    return first[:, index % first.shape[-1]]
