"""The model zoo: every model type of the installed transformers with a causal-LM, masked-LM,
sequence-classification (encoders), seq2seq, image-classification or image-text-to-text head,
built from a tiny random configuration and explained with the default composite.

For each type that builds it records

* ``exact`` — the forward under the composite equals the plain forward bit for bit
  (``torch.equal`` of the logits; both with grad enabled, as an explanation runs: on sdpa the
  kernel PyTorch picks can depend on it);
* ``clean`` — :func:`lrp_explicit.check` with the default composite (AttnLRP) finds no unruled
  op, no undocumented leak and nothing non-finite;
* ``conserving`` — CP-LRP with the biases, position / token-type embeddings and constant tokens
  zeroed gives the explained inputs a total relevance equal to the explained logit to 1e-8
  (float64; the modeling code's own casts to float32 kept in float64 for this check,
  :class:`gxi_ssm.Float64Inside`);
* ``outcome`` — ``"explained"``, ``"refused: <op> in <module>"`` (the first unruled op, or the
  library's own error before any work), ``"not conserved: …"`` (inexact, leaking or not
  conserving without an unruled op: a bug) or ``"crash: <exception>"`` (a bug).

The models are float64, in eval mode, on transformers' default attention (sdpa where the model
has it), 6 tokens and 32 × 32 images. Types that do not build from a tiny configuration are kept
with the reason (``built`` false).
Run ``python -m tests.zoo`` from the repository root; ``--write docs/models.md`` regenerates the
coverage table, ``--json PATH`` writes the raw results, ``--jobs N`` runs N worker processes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import inspect
import json
import math
import multiprocessing
import re
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import transformers
from torch import Tensor, nn
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

import lrp_explicit
from lrp_explicit import composites
from lrp_explicit.audit.bias import is_bias
from lrp_explicit.errors import UnknownModelError

try:
    from gxi_ssm import Float64Inside
except ImportError:  # run as ``python -m tests.zoo``: the tests folder is not on the path
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from gxi_ssm import Float64Inside

#: Heads of the zoo: name -> (mapping of model type to class name(s), task of the inputs).
HEADS: dict[str, tuple[str, str]] = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "text"),
    "encoder-classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text"),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image"),
    "image-text-to-text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text"),
}
#: Share of clean-and-conserving types the zoo test asserts per head (issue 26).
TARGETS = {"causal-lm": 0.95, "masked-lm": 0.90, "encoder-classification": 0.90,
           "seq2seq-lm": 0.90, "image-classification": 0.90, "image-text-to-text": 0.90}
#: Conservation tolerance (relative to the explained logit), CP-LRP in float64 without biases.
CONSERVATION_RTOL = 1e-8
#: Models above this many parameters (counted on the meta device) are not built.
MAX_PARAMETERS = 20_000_000
#: Tokens of the text inputs and side of the square images.
TOKENS = 6
IMAGE_SIZE = 32


def composite_family(model: nn.Module) -> str | None:
    """The family the zoo explains ``model`` with: ``None`` (the default: the registered family,
    or whatever the library does for a type without one) when the default accepts the model,
    else the automatic composite where it exists, else the generic one. This is the one switch
    between "before" and "after" the automatic composite is the default."""
    try:
        composites.family_of(model)
        return None
    except UnknownModelError:
        return "auto" if "auto" in composites.available() else "generic"


# ----------------------------------------------------------------------------- the types


@dataclass
class Entry:
    """One model type under one head, and what the zoo found."""

    model_type: str
    head: str
    cls: str
    built: bool = False
    reason: str = ""
    parameters: int = 0
    attn: str = ""
    family: str | None = None
    exact: bool | None = None
    forward_error: float | None = None
    clean: bool | None = None
    unruled: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    nonfinite: str | None = None
    conserving: bool | None = None
    conservation_error: float | None = None
    absorbed_by: dict[str, float] = field(default_factory=dict)
    outcome: str = ""
    traceback: str = ""
    seconds: float = 0.0

    @property
    def explained(self) -> bool:
        return self.outcome == "explained"


def mapping(head: str) -> dict[str, Any]:
    return getattr(modeling_auto, HEADS[head][0])


def enumerate_types(heads: list[str] | None = None) -> list[tuple[str, str, str]]:
    """``(head, model_type, class name)`` of every type of the zoo's heads; the encoder
    classification head takes the sequence-classification types that are neither causal LMs
    nor seq2seq models."""
    out = []
    decoders = set(mapping("causal-lm")) | set(mapping("seq2seq-lm"))
    for head in heads or list(HEADS):
        for model_type, names in sorted(mapping(head).items()):
            if head == "encoder-classification" and model_type in decoders:
                continue
            name = names[0] if isinstance(names, (tuple, list)) else names
            out.append((head, model_type, name))
    return out


# ----------------------------------------------------------------------- tiny configurations

WIDTH = 64
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
             "num_key_value_groups")
#: Field name -> tiny value (applied to the fields a configuration class has).
TINY: dict[str, Any] = {
    **dict.fromkeys(["num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers",
                     "decoder_layers", "num_encoder_layers", "num_decoder_layers",
                     "num_text_layers", "num_vision_layers", "depth", "text_layers",
                     "vision_layers", "num_blocks"], 2),
    **dict.fromkeys(["hidden_size", "d_model", "n_embd", "embed_dim", "dim", "embedding_dim",
                     "hidden_dim", "model_dim", "n_embed", "d_embed", "word_embed_proj_dim",
                     "projection_dim", "text_hidden_size", "vision_hidden_size",
                     "out_hidden_size", "projector_hidden_size"], WIDTH),
    **dict.fromkeys(["num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "n_heads", "attention_heads"], 4),
    **dict.fromkeys(_KV_HEADS, 2),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff",
                     "n_inner", "ffn_hidden_size", "ffn_size", "mlp_dim", "dim_feedforward",
                     "inner_hidden_size", "decoder_intermediate_size"], 2 * WIDTH),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size",
                     "expert_intermediate_size", "moe_ffn_hidden_size"], WIDTH),
    **dict.fromkeys(["head_dim", "d_kv", "attention_head_dim", "d_head"], 16),
    **dict.fromkeys(["qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"], 16),
    **dict.fromkeys(["kv_lora_rank", "q_lora_rank"], 16),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                     "num_experts_total"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts",
                     "moe_k"], 2),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts"], 1),
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    **dict.fromkeys(["vocab_size", "text_vocab_size"], 128),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                     "max_sequence_length", "seq_length"], 64),
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0,
    "sep_token_id": 2, "cls_token_id": 1, "mask_token_id": 3,
    "image_size": IMAGE_SIZE, "patch_size": 8, "num_channels": 3,
    "rotary_dim": 8, "mm_tokens_per_image": 4, "num_groups": 4,
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
    **dict.fromkeys(["linear_num_heads", "linear_num_value_heads", "mamba_n_heads"], 8),
    **dict.fromkeys(["linear_num_key_heads"], 4),
    **dict.fromkeys(["linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
                     "mamba_d_head"], 16),
    "mamba_d_ssm": 2 * WIDTH, "mamba_chunk_size": 16, "chunk_size": 16,
    "state_size": 8, "d_state": 8, "time_step_rank": 8, "mamba_d_state": 8,
    "num_labels": 2, "type_vocab_size": 2,
    "tie_word_embeddings": False,
}
#: Other size fields (by ``fnmatch`` pattern) set to the width (16 for head sizes, 128 for
#: vocabularies) when they are larger than twice the width.
_SIZES = ("*intermediate_size*", "*head_dim*", "dim_head", "*embed_dim", "dim_ff", "*ffn*",
          "*_channel", "*_channels", "*vocab_size*", "*hidden_size*", "*_dim")
#: Special-token fields given distinct small ids (after those of TINY).
_TOKEN_SUFFIXES = ("_token_id", "_token_index")
_RESERVED = {0, 1, 2, 3}


def _fields(cls: type) -> dict[str, Any]:
    if dataclasses.is_dataclass(cls):
        return {f.name: f for f in dataclasses.fields(cls)}
    return dict.fromkeys(inspect.signature(cls.__init__).parameters)


def _default(f: Any) -> Any:
    if isinstance(f, dataclasses.Field):
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            try:
                return f.default_factory()  # type: ignore[misc]
            except Exception:
                return None
    return None


_LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers")


def _shrink_list(name: str, value: list) -> list | None:
    """A tiny version of a list-valued field that is not per layer, or None to leave it."""
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    if "depth" in name or name in ("layers", "num_layers", "num_blocks", "block_repeats"):
        return [1] * len(value)
    if "head" in name:
        first = max(1, value[0])
        return [max(1, v // first) for v in value]
    if any(k in name for k in ("hidden_size", "embed_dim", "dims", "channels", "sizes",
                               "hidden_dim", "width")) and value[0] >= 16:
        factor = max(1, value[0] // 16)
        return [max(4, v // factor) for v in value]
    return None


def _mrope(parts: int) -> list[int]:
    """Multimodal RoPE sections for the tiny head size: ``parts`` sections summing to half of
    it (the rotary frequencies of a 16-wide head)."""
    half = TINY["head_dim"] // 2
    return [half // parts + (1 if i < half % parts else 0) for i in range(parts)][::-1]


def _layer_choice(per_layer: dict[str, list]) -> list[int]:
    """Which layers a tiny model keeps: the first layer of each kind (by the first per-layer
    list of strings, e.g. ``layer_types``), at least two."""
    kinds = next((v for v in per_layer.values() if all(isinstance(x, str) for x in v)), None)
    chosen: list[int] = []
    if kinds is not None:
        for i, kind in enumerate(kinds):
            if kind not in [kinds[j] for j in chosen]:
                chosen.append(i)
    for i in range(len(next(iter(per_layer.values())))):
        if len(chosen) >= 2:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen[:3])


def tiny_kwargs(cls: type, base: Any | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments that make configuration class ``cls`` tiny (sub-configurations as
    dicts, shrunk the same way, from the default instance ``base``); ``extra`` overrides."""
    fields = _fields(cls)
    names = set(fields) | set(getattr(cls, "attribute_map", {}) or {})
    tiny = {**TINY, **(extra or {})}

    def value_of(name: str) -> Any:
        if base is None:
            return _default(fields.get(name))
        try:
            return getattr(base, name, None)
        except Exception:  # a per-layer attribute read globally (Gemma 4's head_dim)
            return None

    # a generic scalar never replaces a list (per-stage widths and heads of a vision model:
    # shrunk as lists below); a value given for this type (``extra``) always does
    kwargs: dict[str, Any] = {k: v for k, v in tiny.items() if k in names and (
        (extra and k in extra) or not isinstance(value_of(k), (list, tuple)))}

    layers = next((v for v in map(value_of, _LAYER_COUNTS) if isinstance(v, int)), None)
    per_layer = {}
    next_id = 4
    subs = getattr(cls, "sub_configs", {}) or {}
    for name, f in fields.items():
        if name in kwargs or name in subs:
            continue
        value = value_of(name)
        if name.endswith(_TOKEN_SUFFIXES) and isinstance(value, int):
            kwargs[name] = next_id
            next_id += 1
        elif isinstance(value, int) and not isinstance(value, bool) \
                and value > (32 if "head" in name else 2 * WIDTH) \
                and any(fnmatch.fnmatchcase(name, p) for p in _SIZES):
            kwargs[name] = 16 if "head" in name else (128 if "vocab" in name else WIDTH)
        elif name == "mrope_section" and isinstance(value, list):
            kwargs[name] = _mrope(len(value))
        elif isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
            kwargs[name] = {**value, "mrope_section": _mrope(len(value["mrope_section"]))}
        elif isinstance(value, (list, tuple)) and extra and extra.get(KEEP_LISTS):
            continue
        elif isinstance(value, (list, tuple)) and layers and layers > 2 \
                and len(value) == layers:
            per_layer[name] = list(value)
        elif isinstance(value, (list, tuple)):
            small = _shrink_list(name, list(value))
            if small is not None:
                kwargs[name] = small
    if per_layer:
        keep = _layer_choice(per_layer)
        for name, value in per_layer.items():
            kept = [value[i] for i in keep]
            # the stages of a vision model (a few per-stage widths, heads, depths) are also
            # made narrow and shallow
            stage = _shrink_list(name, kept) if len(value) <= 5 else None
            kwargs[name] = stage if stage is not None else kept
        for name in _LAYER_COUNTS:
            if name in names and not (extra and name in extra):
                kwargs[name] = len(keep)
    for name in subs:
        sub = getattr(base, name, None) if base is not None else None
        if isinstance(sub, transformers.PretrainedConfig):
            own = extra if name == "text_config" or not extra else {
                k: v for k, v in extra.items() if k != "rope_parameters"}  # the text model's
            kwargs[name] = {"model_type": sub.model_type, **tiny_kwargs(type(sub), sub, own)}
    return kwargs


#: Per model type: what its configuration needs besides the generic tiny values (a field the
#: generic rules cannot derive: an architecture check between fields, a per-layer pattern
#: given by other means).
OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "zaya": {"num_experts_per_tok": 1},
    "reformer": {"is_decoder": True, "axial_pos_shape": [8, 8], "axial_pos_embds_dim": [32, 32],
                 "attn_layers": ["local", "lsh"], "num_buckets": 4, "lsh_attn_chunk_length": 4,
                 "local_attn_chunk_length": 4},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "longformer": {"attention_window": [4, 4]},  # it pads the input to a window
    # any-resolution LLaVA: one 32 × 32 tile (the image is then the tile and its overview)
    **dict.fromkeys(["llava_next", "llava_next_video", "llava_onevision"],
                    {"image_grid_pinpoints": [[IMAGE_SIZE, IMAGE_SIZE]]}),
}
# multimodal RoPE whose sections the modeling code defaults to those of a 128-wide head
for _type in ("qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker", "glm4v", "glm4v_moe", "glm46v",
              "glm_ocr", "glmga", "llava_onevision1_5"):
    OVERRIDES[_type] = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "mrope_section": [2, 3, 3]}}
#: Per model type: what the built model needs before it runs.
PREPARE: dict[str, Callable[[nn.Module], None]] = {
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),
}
#: Key of a fall-back that leaves list-valued fields (per layer, per stage) as they are.
KEEP_LISTS = "__keep_lists__"
#: Generic fall-backs tried in turn when the tiny configuration does not build or run.
FALLBACKS: tuple[dict[str, Any], ...] = (
    {},
    dict.fromkeys(_KV_HEADS, 4),  # multi-head latent attention and others without GQA
    {**dict.fromkeys(_KV_HEADS, 4), "num_experts_per_tok": 1},
    {"image_size": 64},  # vision models that downsample more than 32 times
    {"image_size": 224, "patch_size": 16},
    {KEEP_LISTS: True},  # vision models whose per-stage lists must agree in ways not shrunk
)


def tiny_config(model_type: str, extra: dict[str, Any] | None = None
                ) -> transformers.PretrainedConfig:
    """A tiny configuration of ``model_type`` (2 layers, width 64, 4 heads, vocabulary 128)."""
    cls = CONFIG_MAPPING[model_type]
    extra = {**OVERRIDES.get(model_type, {}), **(extra or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            base = cls()
        except Exception:
            base = None
        return cls(**tiny_kwargs(cls, base, extra))


def count_parameters(model_cls: type, config: Any) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def build(model_cls: type, config: Any, attn: str | None = None) -> nn.Module:
    """The model in float64 and eval mode (``attn``: the attention implementation, ``None``
    for transformers' default)."""
    torch.manual_seed(0)
    config._experts_implementation = "eager"  # the grouped-mm kernel has no float64
    if attn is not None:
        config._attn_implementation = attn
        for sub in _sub_configs(config):
            sub._attn_implementation = attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(config)
    return model.to(torch.float64).eval()


def _sub_configs(config: Any) -> Iterator[Any]:
    for name in getattr(type(config), "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if isinstance(sub, transformers.PretrainedConfig):
            yield sub
            yield from _sub_configs(sub)


# ----------------------------------------------------------------------------- inputs


@dataclass
class Case:
    """How to run one built model: ``inputs`` as :func:`lrp_explicit.audit` takes them (a dict
    of keyword arguments whose leaves require grad, or a callable); ``target`` the explained
    logit index (``out[..., -1, t]`` or ``out[..., t]``)."""

    inputs: dict[str, Any] | Callable[[nn.Module], Any]
    target: int = 0


def _vocab(config: Any) -> int:
    for c in (config, getattr(config, "text_config", None), getattr(config, "decoder", None)):
        v = getattr(c, "vocab_size", None)
        if isinstance(v, int):
            return v
    return 128


def _ids(config: Any, n: int = TOKENS, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = _vocab(config)
    low = min(16, vocab // 2)
    return torch.randint(low, vocab, (1, n), generator=g)


def _pixels(config: Any) -> Tensor:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", IMAGE_SIZE)
    size = size if isinstance(size, int) else (size[0] if isinstance(size, (list, tuple))
                                               else IMAGE_SIZE)
    channels = getattr(vision, "num_channels", 3)
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, channels if isinstance(channels, int) else 3, size, size, generator=g,
                       dtype=torch.float64)


@contextlib.contextmanager
def embedding_leaves(model: nn.Module) -> Iterator[None]:
    """Make every output of the input embedding a leaf that requires grad: the explained input,
    however the model calls its embedding (scaled, shared by encoder and decoder)."""
    embedding = model.get_input_embeddings()

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output.detach().requires_grad_() if torch.is_grad_enabled() else output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def make_case(model: nn.Module, task: str) -> Case:
    """The inputs of one built model: the explained inputs are leaves that require grad
    (``inputs_embeds``, ``decoder_inputs_embeds``, ``pixel_values``), as a user passes them."""
    config = model.config
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    if task == "image":
        return Case({"pixel_values": _pixels(config).requires_grad_()})
    if task == "image-text":
        return _image_text_case(model, extra)
    ids = _ids(config)
    if task == "seq2seq" or getattr(config, "is_encoder_decoder", False):  # BART as a masked LM
        dec = _ids(config, 4, seed=3)
        dec[0, 0] = getattr(config, "decoder_start_token_id", None) or 0
        if _accepts(model, "inputs_embeds") and _accepts(model, "decoder_inputs_embeds"):
            return Case({"inputs_embeds": _embed(model, ids),
                         "decoder_inputs_embeds": _embed(model, dec), **extra})
        return Case(_hooked({"input_ids": ids, "decoder_input_ids": dec, **extra}))
    if _accepts(model, "inputs_embeds"):
        return Case({"inputs_embeds": _embed(model, ids), **extra})
    return Case(_hooked({"input_ids": ids, **extra}))


def _embed(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids).detach().requires_grad_()


def _hooked(kwargs: dict[str, Any]) -> Callable[[nn.Module], Any]:
    """For a model without ``inputs_embeds``: its input embedding's outputs are the leaves."""
    def run(model: nn.Module) -> Any:
        with embedding_leaves(model):
            return model(**kwargs)
    return run


def run_inputs(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on a case's inputs: tensors that require grad (with grad enabled), made
    from fresh leaves but not leaves themselves, so that a model may update its input in place
    (CTRL scales its embeddings with ``*=``); the library's own leaves meet that in (b), (c)."""
    if callable(inputs):
        return inputs(model)
    grad = torch.is_grad_enabled()
    return model(**{k: v.detach().clone().requires_grad_(grad).clone()
                    if isinstance(v, Tensor) and v.requires_grad else v
                    for k, v in inputs.items()})


def _image_token(config: Any) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _image_text_case(model: nn.Module, extra: dict[str, Any]) -> Case:
    """Pixels and text with as many image tokens as the model makes image features (a model
    without image tokens takes the pixels beside the text)."""
    config = model.config
    token = _image_token(config)
    pixels, side = _vision_inputs(model)
    if token is None:
        return _text_and_pixels(model, _ids(config, TOKENS), pixels, side, extra)
    getter = getattr(model, "get_image_features", None) or getattr(
        getattr(model, "model", None), "get_image_features", None)
    if getter is None:
        raise ZooInputError("no get_image_features to size the image tokens")
    features, pixels = _image_features(getter, pixels, side)
    features = getattr(features, "pooler_output", None) if not isinstance(
        features, (Tensor, list, tuple)) else features
    if features is None:
        raise ZooInputError("get_image_features gave no features")
    if isinstance(features, (list, tuple)):
        count = sum(f.shape[-2] if f.dim() > 1 else 1 for f in features)
    else:
        count = features.shape[:-1].numel()
    text = _ids(config, TOKENS)
    ids = torch.cat([text[:, :1], torch.full((1, count), token), text[:, 1:]], 1)
    return _text_and_pixels(model, ids, pixels, side, extra)


def _vision_inputs(model: nn.Module) -> tuple[Tensor, dict[str, Any]]:
    """Pixels as the vision tower takes them and the side inputs that describe them: a
    ``(1, C, H, W)`` image, or for a tower on flattened patches (Qwen2-VL and its kin) the
    patches of a 4 × 4 grid (in merge units) and ``image_grid_thw``."""
    config = model.config
    vision = getattr(config, "vision_config", None) or config
    if "image_grid_thw" in _parameters(model):
        patch = getattr(vision, "patch_size", 8)
        temporal = getattr(vision, "temporal_patch_size", 2) or 1
        merge = getattr(vision, "spatial_merge_size", 2) or 1
        channels = getattr(vision, "in_channels", getattr(vision, "num_channels", 3))
        grid = torch.tensor([[1, 2 * merge, 2 * merge]])
        g = torch.Generator().manual_seed(2)
        patches = torch.randn(int(grid.prod()), channels * temporal * patch * patch,
                              generator=g, dtype=torch.float64)
        return patches, {"image_grid_thw": grid}
    pixels = _pixels(config)
    side: dict[str, Any] = {}
    if "image_sizes" in _parameters(model):
        side["image_sizes"] = torch.tensor([list(pixels.shape[-2:])])
    if getattr(config, "image_grid_pinpoints", None) == [[IMAGE_SIZE, IMAGE_SIZE]]:
        g = torch.Generator().manual_seed(3)  # the overview and one tile
        pixels = torch.stack([pixels[0], torch.randn(pixels.shape[1:], generator=g,
                                                     dtype=pixels.dtype)])[None]
    return pixels, side


def _parameters(model: nn.Module) -> set[str]:
    names = set(inspect.signature(model.forward).parameters)
    getter = getattr(model, "get_image_features", None)
    if getter is not None:
        names |= set(inspect.signature(getter).parameters)
    return names


def _image_features(getter: Callable[..., Any], pixels: Tensor,
                    side: dict[str, Any]) -> tuple[Any, Tensor]:
    """The image features, and the pixels in the layout that gave them (a model that takes
    several images per sample wants ``(1, images, C, H, W)``)."""
    wanted = set(inspect.signature(getter).parameters)
    kwargs = {k: v for k, v in side.items() if k in wanted}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return getter(pixel_values=pixels, **kwargs), pixels
        except TypeError as error:
            raise ZooInputError(f"get_image_features: {error}") from error
        except ValueError as error:
            if pixels.dim() != 4 or "unpack" not in str(error):
                raise
            pixels = pixels.unsqueeze(1)
            return getter(pixel_values=pixels, **kwargs), pixels


def _text_and_pixels(model: nn.Module, ids: Tensor, pixels: Tensor, side: dict[str, Any],
                     extra: dict[str, Any]) -> Case:
    inputs = {"pixel_values": pixels.requires_grad_(), **side, **extra}
    if _accepts(model, "inputs_embeds"):
        return Case({"inputs_embeds": _embed(model, ids), **inputs})
    return Case(_hooked({"input_ids": ids, **inputs}))


class ZooInputError(Exception):
    """The zoo found no tiny input for a model that builds."""


def logits_of(output: Any) -> Tensor:
    value = getattr(output, "logits", None)
    if value is None and isinstance(output, (tuple, list)):
        value = output[0]
    if value is None:
        value = output
    return value


# --------------------------------------------------------------------- constants zeroed

#: Parameters and floating buffers that are constant additive terms of the inputs (besides the
#: biases): position and token-type embeddings, class / distillation / register tokens.
CONSTANT_PATTERNS = ("*position*", "*pos_emb*", "*pos_embed*", "*wpe.weight", "*token_type*",
                     "*cls_token*", "*class_embedding*", "*dist_token*", "*distillation_token*",
                     "*register_tokens*", "*registers*", "*mask_token*", "*absolute_pos*",
                     "*embed_positions*", "*segment_embedding*", "*image_newline*",
                     "*pos_encoding*")


def is_constant_term(name: str) -> bool:
    return is_bias(name) or any(fnmatch.fnmatchcase(name, p) for p in CONSTANT_PATTERNS)


@contextlib.contextmanager
def zero_constants(model: nn.Module) -> Iterator[None]:
    """Biases, position / token-type embeddings and constant tokens set to zero (parameters and
    floating buffers), restored bit for bit on exit."""
    saved = []
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    try:
        with torch.no_grad():
            for name, tensor in tensors:
                if is_constant_term(name):
                    saved.append((tensor, tensor.detach().clone()))
                    tensor.zero_()
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


# ----------------------------------------------------------------------------- checks


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _refusal(error: BaseException) -> bool:
    """An error the library raises on purpose, before any work."""
    return type(error).__module__.startswith("lrp_explicit")


def run_entry(head: str, model_type: str, cls_name: str, attn: str | None = None) -> Entry:
    """Build one type and record its forward, check and conservation; ``attn`` is the
    attention implementation (``None``: transformers' default, sdpa where the model has it)."""
    start = time.perf_counter()
    entry = Entry(model_type, head, cls_name, attn=attn or "")
    try:
        _run(entry, attn)
    except Exception as error:  # the outcome is the record; nothing escapes
        entry.outcome = f"crash: {_first_line(error)}"
        entry.traceback = traceback.format_exc(limit=-6)
    entry.seconds = round(time.perf_counter() - start, 3)
    return entry


class _NotBuilt(Exception):
    """Why a type does not build or run from one tiny configuration (``final``: no fall-back
    can help)."""

    def __init__(self, reason: str, final: bool = False):
        super().__init__(reason)
        self.final = final


def _configs(model_cls: type, model_type: str, head: str, extra: dict[str, Any]) -> list[Any]:
    """The tiny configuration, and for a causal LM of a composite configuration (a
    vision-language type whose causal LM takes the text part) its text configuration."""
    config = tiny_config(model_type, extra)
    configs = [config]
    if head == "causal-lm" and getattr(type(config), "sub_configs", None):
        try:
            text = config.get_text_config(decoder=True)
        except ValueError:  # several text configurations (an audio model's)
            text = config
        if text is not config:
            configs.append(text)
    return configs


def _build_and_run(entry: Entry, model_cls: type, task: str, attn: str | None,
                   extra: dict[str, Any]) -> tuple[nn.Module, Case, Tensor]:
    try:
        configs = _configs(model_cls, entry.model_type, entry.head, extra)
    except ImportError as error:
        raise _NotBuilt(f"tiny config: {_first_line(error)}", final=True) from error
    except Exception as error:
        raise _NotBuilt(f"tiny config: {_first_line(error)}") from error
    failure = None
    for config in configs:
        try:
            entry.parameters = count_parameters(model_cls, config)
        except ImportError as error:
            raise _NotBuilt(f"build: {_first_line(error)}", final=True) from error
        except Exception as error:
            failure = failure or _NotBuilt(f"build: {_first_line(error)}")
            continue
        if entry.parameters > MAX_PARAMETERS:
            raise _NotBuilt(f"{entry.parameters:,} parameters in the tiny config", final=True)
        try:
            model = build(model_cls, config, attn)
            if entry.model_type in PREPARE:
                PREPARE[entry.model_type](model)
            case = make_case(model, task)
            with torch.enable_grad(), warnings.catch_warnings():  # as an explanation runs it
                warnings.simplefilter("ignore")
                plain = logits_of(run_inputs(model, case.inputs))
            entry.attn = str(getattr(model.config, "_attn_implementation", None) or attn)
            return model, case, plain.detach()
        except ZooInputError as error:
            raise _NotBuilt(f"inputs: {_first_line(error)}", final=True) from error
        except Exception as error:
            failure = failure or _NotBuilt(f"plain forward: {_first_line(error)}")
    raise failure or _NotBuilt("no configuration")


def _default_builds(model_cls: type, model_type: str) -> bool:
    """Whether ``model_cls`` builds (on the meta device) from its default configuration."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            count_parameters(model_cls, CONFIG_MAPPING[model_type]())
        return True
    except Exception:
        return False


def _run(entry: Entry, attn: str | None) -> None:
    task = HEADS[entry.head][1]
    model_cls = getattr(transformers, entry.cls, None)
    if model_cls is None:
        entry.reason = f"{entry.cls} is not exported by transformers"
        return
    reasons, built = [], None
    for extra in FALLBACKS:
        try:
            built = _build_and_run(entry, model_cls, task, attn, extra)
            break
        except _NotBuilt as error:
            reasons.append(str(error))
            if error.final:
                break
    if built is None:
        entry.reason = reasons[0]
        if reasons[0].startswith("build:") and not _default_builds(model_cls, entry.model_type):
            entry.reason += " (transformers' default configuration does not build either)"
        return
    model, case, plain = built
    entry.built = True
    if not isinstance(plain, Tensor) or not plain.is_floating_point():
        entry.outcome = "crash: the plain forward gave no floating-point logits"
        return
    case.target = int(plain.reshape(-1, plain.shape[-1])[-1].argmax())
    try:
        _explain(entry, model, case, plain)
    except Exception as error:
        if not _refusal(error):
            raise
        entry.outcome = f"refused: {_first_line(error)}"
        return
    if entry.unruled:
        entry.outcome = f"refused: {entry.unruled[0]}"
    elif entry.clean and entry.conserving and entry.exact:
        entry.outcome = "explained"
    else:
        problems = []
        if not entry.exact:
            problems.append(f"forward off by {entry.forward_error:.2g}")
        if entry.leaks:
            problems.append(f"leaks in {entry.leaks[0]}")
        if entry.nonfinite:
            problems.append(f"non-finite in {entry.nonfinite}")
        if not entry.conserving:
            problems.append(f"CP-LRP conserves only to {entry.conservation_error:.2g}")
        entry.outcome = "not conserved: " + "; ".join(problems)


def _explain(entry: Entry, model: nn.Module, case: Case, plain: Tensor) -> None:
    """(a) forward exact, (b) check() clean, (c) CP-LRP conserving, into ``entry``."""
    entry.family = composite_family(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (a) the forward under the default composite, bit for bit (not strict: the ops
        # without rule are listed by (b); strict mode would stop at the first)
        composite = composites.get("attnlrp", model, family=entry.family, strict=False)
        with composite.context(model):
            registered = logits_of(run_inputs(model, case.inputs)).detach()
        entry.exact = bool(torch.equal(registered, plain))
        if not entry.exact:
            entry.forward_error = float((registered - plain).abs().max()) \
                if registered.shape == plain.shape else math.inf
        # (b) check() with the default composite
        result = lrp_explicit.check(model, case.inputs, "attnlrp", target=case.target,
                                    family=entry.family, strict=False)
        entry.unruled = [f"{u.op} in {u.module or '<root>'}" for u in result.unruled]
        entry.leaks = [f"{k.module} ({k.type})" for k in result.leaks if not k.inherited]
        entry.nonfinite = result.first_nonfinite or result.first_nonfinite_forward
        entry.clean = result.ok
        # (c) CP-LRP without constant terms conserves the logit; the modeling code's own float32
        # casts (norms, state-space scans computed in float32 whatever the model's dtype) are
        # kept in float64, else the relevance is rounded to float32 there (the forward of (a)
        # ran the stock code)
        def conservation(inside: contextlib.AbstractContextManager) -> Any:
            with zero_constants(model), inside:
                return lrp_explicit.audit(model, case.inputs, case.target, "cp-lrp",
                                          family=entry.family, strict=False)

        try:
            report = conservation(Float64Inside())
        except RuntimeError:  # code that needs its float32 tensors (GLM-4V's vision tower)
            report = conservation(contextlib.nullcontext())
        explained = report.explained
        entry.conservation_error = abs(report.input_total - explained) / max(abs(explained),
                                                                           1e-300)
        entry.conserving = bool(entry.conservation_error <= CONSERVATION_RTOL
                                and math.isfinite(report.input_total))
        entry.absorbed_by = {k: v for k, v in report.absorbed_by.items()
                             if abs(v) > 1e-12 * max(abs(explained), 1e-300)}


# ----------------------------------------------------------------------------- the run


def _worker(job: tuple[str, str, str]) -> dict[str, Any]:
    torch.set_num_threads(1)
    return asdict(run_entry(*job))


def run_zoo(heads: list[str] | None = None, types: list[str] | None = None, jobs: int = 1,
            progress: bool = False) -> list[Entry]:
    """Run every type of ``heads`` (all by default; ``types`` filters by ``fnmatch`` pattern)
    in ``jobs`` processes."""
    work = [j for j in enumerate_types(heads)
            if not types or any(fnmatch.fnmatchcase(j[1], p) for p in types)]
    results: list[dict[str, Any]] = []
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs) as pool:
            for done in pool.imap_unordered(_worker, work):
                results.append(done)
                if progress:
                    _show(done, len(results), len(work))
    else:
        for job in work:
            results.append(_worker(job))
            if progress:
                _show(results[-1], len(results), len(work))
    entries = [Entry(**r) for r in results]
    order = {j: i for i, j in enumerate(work)}
    entries.sort(key=lambda e: order[(e.head, e.model_type, e.cls)])
    return entries


def _show(done: dict[str, Any], i: int, n: int) -> None:
    what = done["outcome"] if done["built"] else f"not built: {done['reason']}"
    print(f"[{i}/{n}] {done['head']:<22} {done['model_type']:<28} {done['seconds']:6.2f}s "
          f"{what[:120]}", file=sys.stderr, flush=True)


def shares(entries: list[Entry]) -> dict[str, dict[str, Any]]:
    """Per head: types, built, exact, clean, conserving, explained (counts) and the share of
    built types explained."""
    out: dict[str, dict[str, Any]] = {}
    for head in HEADS:
        rows = [e for e in entries if e.head == head]
        if not rows:
            continue
        built = [e for e in rows if e.built]
        out[head] = {
            "types": len(rows), "built": len(built),
            "exact": sum(bool(e.exact) for e in built),
            "clean": sum(bool(e.clean) for e in built),
            "conserving": sum(bool(e.conserving) for e in built),
            "explained": sum(e.explained for e in built),
            "refused": sum(e.outcome.startswith("refused") for e in built),
            "crashed": sum(e.outcome.startswith("crash") for e in built),
            "share": round(sum(e.explained for e in built) / len(built), 4) if built else 0.0,
        }
    return out


def status(entry: Entry) -> str:
    return entry.outcome if entry.built else f"not built: {entry.reason}"


#: The markers around the generated section of docs/models.md.
START = "<!-- zoo:start (generated by `python -m tests.zoo --jobs 2 --write docs/models.md`) -->"
END = "<!-- zoo:end -->"


def _cell(text: str) -> str:
    """A table cell: the text in a code span (no pipes, no backticks, no addresses)."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x…", text.replace("\n", " "))
    return "`" + text.replace("|", "/").replace("`", "'") + "`"


def table(entries: list[Entry]) -> str:
    """The coverage section of docs/models.md for a zoo run (between :data:`START` and
    :data:`END`)."""
    version = transformers.__version__
    lines = [
        START,
        "",
        "## Every model type (the zoo)",
        "",
        f"Every model type of transformers {version} with one of the heads below, built from a "
        "tiny random configuration (2 layers, width 64, 4 heads, vocabulary 128, float64, "
        "transformers' default attention: sdpa where the model has it) and explained with the "
        "default composite (`tests/zoo.py`, asserted by `tests/test_zoo.py`). A type is "
        "**explained** when its forward under the composite equals the plain forward bit for "
        "bit, `lrp_explicit.check()` finds no unruled op, no undocumented leak and nothing "
        "non-finite, and CP-LRP with the biases, position embeddings and constant tokens set "
        "to zero conserves the explained logit to 1e-8. A type is **refused** with the first op "
        "without a rule and the module that calls it (strict mode raises there, before any "
        "work), or with the library's own error. *Not conserved* and *crash* are open bugs. A "
        "type that cannot be built from a tiny configuration is listed with the reason. "
        "Regenerate this section with `python -m tests.zoo --jobs 2 --write docs/models.md` "
        "(on the pinned transformers release, `.ci/constraints.txt`); `tests/test_zoo.py` "
        "checks that it is the table of a fresh run.",
        "",
        "| head | types | built | forward exact | check clean | CP-LRP conserves | explained |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for head, s in shares(entries).items():
        pct = f"{100 * s['share']:.0f} %" if s["built"] else "-"
        lines.append(f"| {head} | {s['types']} | {s['built']} | {s['exact']} | {s['clean']} | "
                     f"{s['conserving']} | {s['explained']} ({pct}) |")
    for head in HEADS:
        rows = [e for e in entries if e.head == head]
        if not rows:
            continue
        lines += ["", f"### {head}", "", "| model type | class | outcome |", "|---|---|---|"]
        for e in rows:
            text = "explained" if e.explained else _cell(status(e))
            lines.append(f"| `{e.model_type}` | `{e.cls}` | {text} |")
    return "\n".join(lines + ["", END]) + "\n"


def section(path: str) -> str | None:
    """The generated section of the page at ``path`` (None if it has none)."""
    text = open(path).read()
    if START not in text or END not in text:
        return None
    return text[text.index(START):text.index(END) + len(END)] + "\n"


def write_table(path: str, entries: list[Entry]) -> None:
    """Replace the generated section of the page at ``path`` (appended if it has none)."""
    text = open(path).read()
    new = table(entries)
    if START in text and END in text:
        text = text[:text.index(START)] + new + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + new
    with open(path, "w") as handle:
        handle.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--heads", nargs="*", choices=list(HEADS), help="heads (default: all)")
    parser.add_argument("--types", nargs="*", help="fnmatch patterns of model types")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--write", help="write the coverage table (docs/models.md) here")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    entries = run_zoo(args.heads, args.types, args.jobs, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    summary = shares(entries)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "seconds": round(elapsed, 1), "shares": summary,
                       "entries": [asdict(e) for e in entries]}, handle, indent=1)
    if args.write:
        write_table(args.write, entries)
    for head, s in summary.items():
        print(f"{head:<24} {s}")
    print(f"{len(entries)} entries in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
