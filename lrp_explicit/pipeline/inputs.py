"""Inputs of the attribution pipeline: the task of a model, batches split into samples, and any
input turned into model arguments with leaves that require grad (:class:`Prepared`)."""
from __future__ import annotations

import inspect
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..composites.wrappers import unwrap
from ..errors import InputError

__all__ = ["TASKS", "task_of", "Prepared", "prepare", "make_leaf", "embed", "split_batch",
           "collate", "per_sample", "progress", "max_length", "check_length", "InputError"]

#: Tasks :func:`lrp_explicit.explain` knows; :func:`task_of` picks one from the model's head.
TASKS = ("causal-lm", "masked-lm", "classification", "token-classification",
         "image-classification", "similarity", "seq2seq-lm", "image-text-similarity",
         "image-text-to-text")
_SUFFIXES = {"causal-lm": ("ForCausalLM", "LMHeadModel"), "masked-lm": ("ForMaskedLM",),
             "classification": ("ForSequenceClassification",),
             "token-classification": ("ForTokenClassification",),
             "image-classification": ("ForImageClassification",)}
#: Keyword of the leaf passed positionally (``model(x)``) in :attr:`Prepared.leaves`.
POSITIONAL = "input"


#: Preparers of a dict of model inputs (``input_ids`` and ``pixel_values``) for the tasks whose
#: inputs the user layer lays out, ``task -> preparer(model, inputs, task) -> Prepared``; the
#: layer above registers them (:mod:`lrp_explicit.explain.multimodal` the image–text tasks), so
#: the pipeline never imports it.
MAPPING_PREPARERS: dict[str, Callable[[nn.Module, Mapping[str, Any], str], "Prepared"]] = {}


def task_of(model: nn.Module) -> str | None:
    """The task of a Hugging Face head (by class name: ``…ForCausalLM``, ``…ForMaskedLM``, …);
    ``"similarity"`` for a Hugging Face base model with a vocabulary (a sentence encoder);
    ``"seq2seq-lm"`` for an encoder–decoder ``…ForConditionalGeneration`` (T5),
    ``"image-text-to-text"`` for a vision–language ``…ForConditionalGeneration`` (LLaVA),
    ``"image-text-similarity"`` for a dual encoder with image and text features (CLIP);
    ``None`` for other models (decided by the output's shape: ``(batch, classes)`` is a
    classification, ``(batch, tokens, classes)`` a per-position one). Transparent wrappers
    (``DataParallel``, ``torch.compile``, PEFT) have the task of the model inside."""
    model = unwrap(model)
    name = type(model).__name__
    for task, suffixes in _SUFFIXES.items():
        if name.endswith(suffixes):
            return task
    config = getattr(model, "config", None)
    if config is not None and name.endswith("ForConditionalGeneration"):
        if getattr(config, "is_encoder_decoder", False):
            return "seq2seq-lm"
        if getattr(config, "vision_config", None) is not None:
            return "image-text-to-text"
    if config is not None and hasattr(model, "get_image_features") \
            and hasattr(model, "get_text_features"):
        return "image-text-similarity"
    if config is not None and name.endswith("Model") and getattr(config, "vocab_size", None) \
            and not getattr(config, "is_encoder_decoder", False):
        return "similarity"
    return None


@dataclass
class Prepared:
    """One input made ready for an attribution pass.

    Attributes
    ----------
    leaves : dict of str to Tensor
        The explained inputs: fresh leaf tensors that require grad, by keyword argument
        (``"input"`` for the one passed positionally). Empty when :attr:`call` runs the model
        itself: the leaves are then found in the graph.
    kwargs : dict
        The other keyword arguments of the model (masks, token types …).
    ids : Tensor, optional
        ``(batch, tokens)`` token ids behind ``inputs_embeds``.
    tokens : list of list of str, optional
        The tokens of each sample (ids as text without a tokenizer).
    image : Tensor, optional
        ``(H, W, 3)`` picture of the first sample's pixels in ``[0, 1]``, for heatmaps.
    call : callable, optional
        ``call(model)`` runs the model on tensors that require grad (a user's own code).
    """

    leaves: dict[str, Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)
    ids: Tensor | None = None
    tokens: list[list[str]] | None = None
    image: Tensor | None = None
    call: Callable[[nn.Module], Any] | None = None
    lengths: list[int] | None = None

    @property
    def leaf(self) -> Tensor:
        """The explained input when there is exactly one."""
        if len(self.leaves) != 1:
            raise ValueError(f"{len(self.leaves)} explained inputs, not one")
        return next(iter(self.leaves.values()))

    @property
    def key(self) -> str | None:
        """Keyword of the single explained input (``None``: passed positionally)."""
        key = next(iter(self.leaves), None)
        return None if key == POSITIONAL else key

    def run(self, model: nn.Module) -> Any:
        """Run ``model`` on the leaves and keyword arguments (no key-value cache)."""
        if self.call is not None:
            return self.call(model)
        kwargs = dict(self.kwargs)
        if "use_cache" not in kwargs and _accepts(model, "use_cache"):
            kwargs["use_cache"] = False
        named = {k: v for k, v in self.leaves.items() if k != POSITIONAL}
        if POSITIONAL in self.leaves:
            return model(self.leaves[POSITIONAL], **named, **kwargs)
        return model(**named, **kwargs)


def _is_image(obj: Any) -> bool:
    return hasattr(obj, "convert") and hasattr(obj, "size") and hasattr(obj, "mode")


def _is_text(obj: Any) -> bool:
    return isinstance(obj, str) or (isinstance(obj, tuple) and bool(obj)
                                    and all(isinstance(s, str) for s in obj))


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _device(model: nn.Module) -> torch.device:
    """Where the inputs go: the execution device of accelerate's hook on the model (a model
    with a ``device_map`` or offloaded weights), else that of its first loaded parameter."""
    for module in model.modules():
        hook = module.__dict__.get("_hf_hook")
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def make_leaf(x: Tensor, device: torch.device | str | None = None) -> Tensor:
    """A fresh leaf copy of ``x`` (on ``device``) that requires grad.

    Raises
    ------
    TypeError
        For an integer or boolean tensor (explain from embeddings or pixels).
    InputError
        For a tensor on the meta device (it holds no values).
    """
    if not x.is_floating_point():
        raise TypeError(f"cannot explain a {x.dtype} tensor; pass embeddings or pixel values")
    _check_data(x, "inputs")
    return x.detach().to(device if device is not None else x.device).clone().requires_grad_(True)


def _check_data(x: Any, what: str) -> None:
    if isinstance(x, Tensor) and x.is_meta:
        raise InputError(f"{what} is on the meta device: it holds no values to explain; pass "
                         "a tensor with data (on the model's device)")


def max_length(model: nn.Module) -> int | None:
    """The most tokens ``model`` takes: the size of its learned absolute position embeddings
    (BERT's ``position_embeddings``, GPT-2's ``wpe``; RoBERTa's start after the padding index),
    or ``None`` for models without them (rotary and relative positions)."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.Embedding) and name.endswith(("position_embeddings", "wpe")):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - offset
    return None


def check_length(model: nn.Module, length: int, what: str = "inputs") -> None:
    """Refuse ``length`` tokens for a model whose position embeddings end before.

    Raises
    ------
    InputError
        Naming ``what``, the length and the model's maximum.
    """
    limit = max_length(model)
    if limit is not None and length > limit:
        raise InputError(f"{what} is {length} tokens long; {type(unwrap(model)).__name__} takes "
                         f"at most {limit} (its position embeddings end there): shorten the "
                         "input")


def _check_mask(kwargs: Mapping[str, Any], shape: Sequence[int], what: str) -> None:
    """``attention_mask`` must have one entry per token of the explained input."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise InputError(f"attention_mask must be a tensor, not {type(mask).__name__}")
    _check_data(mask, "attention_mask")
    if tuple(mask.shape) != tuple(shape):
        raise InputError(f"attention_mask has shape {tuple(mask.shape)} but {what} has "
                         f"{tuple(shape)} (batch, tokens): it needs one entry per token")


def _embedding_of(model: nn.Module) -> nn.Module | None:
    get = getattr(unwrap(model), "get_input_embeddings", None)
    try:
        return get() if get is not None else None
    except NotImplementedError:
        return None


def embed(model: nn.Module, ids: Tensor) -> Tensor:
    """Input embeddings of token ``ids`` (no grad), checked against the vocabulary.

    Raises
    ------
    TypeError
        If ``model`` has no ``get_input_embeddings()``, or for ids that are not integers.
    InputError
        For ids outside the vocabulary, an empty input, ids on the meta device or more tokens
        than the model takes (a ``ValueError``).
    """
    embedding = _embedding_of(model)
    if embedding is None:
        raise TypeError("token ids need a model with get_input_embeddings(); pass embeddings "
                        "(float) instead")
    if not isinstance(ids, Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, not {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"input_ids must be integer token ids, got a {ids.dtype} tensor "
                        "(embeddings go in as inputs_embeds)")
    _check_data(ids, "input_ids")
    if ids.dim() > 2:
        raise InputError(f"input_ids has shape {tuple(ids.shape)}; give (tokens) or (batch, "
                         "tokens)")
    if ids.numel() == 0:
        raise InputError("input_ids has no tokens: the input is empty")
    size = getattr(embedding, "num_embeddings", None)
    if size is not None and (ids.min() < 0 or ids.max() >= size):
        bad = sorted({int(i) for i in ids.flatten() if not 0 <= int(i) < size})
        shown = ", ".join(map(str, bad[:5])) + (", …" if len(bad) > 5 else "")
        raise InputError(f"input_ids holds token ids outside the vocabulary of {size} "
                         f"({shown})")
    check_length(model, ids.shape[-1], "input_ids")
    with torch.no_grad():
        return embedding(ids.to(_device(model)))


def _display(pixels: Tensor) -> Tensor:
    """``(C, H, W)`` pixel values as ``(H, W, 3)`` in [0, 1] (min-max rescaled)."""
    x = pixels.detach().float().cpu()
    x = x.expand(3, *x.shape[1:]) if x.shape[0] == 1 else x[:3]
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    return x.permute(1, 2, 0).contiguous()


def _to(kwargs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}


def _from_ids(model: nn.Module, ids: Tensor, kwargs: Mapping[str, Any],
              tokenizer: Any) -> Prepared:
    ids = ids if not isinstance(ids, Tensor) or ids.dim() >= 2 else ids.reshape(1, -1)
    x = embed(model, ids)
    kwargs = _batched_mask(kwargs, ids.shape[-1])
    _check_mask(kwargs, ids.shape, "input_ids")
    rows = ids.tolist()
    tokens = [list(tokenizer.convert_ids_to_tokens(r)) if tokenizer is not None
              else [str(i) for i in r] for r in rows]
    return Prepared({"inputs_embeds": make_leaf(x)}, _to(kwargs, x.device), ids.cpu(), tokens)


def _batched_mask(kwargs: Mapping[str, Any], length: int) -> Mapping[str, Any]:
    """A one-sample ``(tokens,)`` attention mask as ``(1, tokens)``."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 1 and mask.shape[0] == length:
        return {**kwargs, "attention_mask": mask[None]}
    return kwargs


def _check_embeds(model: nn.Module, x: Tensor, kwargs: Mapping[str, Any]) -> None:
    """``inputs_embeds`` must be ``(batch, tokens, hidden)`` of the model's hidden size and
    dtype, with a matching attention mask and no more tokens than the model takes."""
    if x.dim() != 3:
        raise InputError(f"inputs_embeds has shape {tuple(x.shape)}; give (tokens, hidden) or "
                         "(batch, tokens, hidden)")
    if x.shape[1] == 0:
        raise InputError("inputs_embeds has no tokens: the input is empty")
    embedding = _embedding_of(model)
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        hidden = weight.shape[1]
        if x.shape[-1] != hidden:
            raise InputError(f"inputs_embeds has hidden size {x.shape[-1]}, the model's "
                             f"embeddings have {hidden}")
        if weight.is_floating_point() and x.dtype != weight.dtype:
            raise TypeError(f"inputs_embeds is {x.dtype} but the model computes in "
                            f"{weight.dtype}: pass inputs_embeds.to({weight.dtype})")
    check_length(model, x.shape[1], "inputs_embeds")
    _check_mask(kwargs, x.shape[:2], "inputs_embeds")


def _from_tensor(model: nn.Module, key: str, x: Tensor, kwargs: Mapping[str, Any]) -> Prepared:
    _check_data(x, key)
    if key in ("inputs_embeds", "pixel_values"):
        x = x[None] if x.dim() == (2 if key == "inputs_embeds" else 3) else x
    if x.numel() == 0:
        raise InputError(f"{key} is empty")
    if key == "inputs_embeds":
        kwargs = _batched_mask(kwargs, x.shape[1])
        _check_embeds(model, x, kwargs)
    elif key == "pixel_values" and x.dim() != 4:
        raise InputError(f"pixel_values has shape {tuple(x.shape)}; give (channels, height, "
                         "width) or (batch, channels, height, width)")
    device = _device(model)
    leaf = make_leaf(x, device)
    image = _display(x[0]) if key == "pixel_values" else None
    tokens = ([[str(i) for i in range(x.shape[1])] for _ in range(x.shape[0])]
              if key == "inputs_embeds" else None)
    return Prepared({key: leaf}, _to(kwargs, device), None, tokens, image)


def prepare(model: nn.Module, inputs: Any, tokenizer: Any = None,
            task: str | None = None) -> Prepared:
    """Turn ``inputs`` into model arguments with explained leaves that require grad.

    Parameters
    ----------
    model : nn.Module
        The model the inputs are for.
    inputs : str, tuple of str, Tensor, dict, PIL image, list of int or callable
        Text or a pair of texts (with ``tokenizer``); an image (with its image processor as
        ``tokenizer``); token ids (a list of int or an integer tensor), embedded with
        ``model.get_input_embeddings()`` and explained as ``inputs_embeds``; a floating-point
        tensor (``inputs_embeds``, or ``pixel_values`` for 4-D tensors and image tasks, of a
        Hugging Face model; the positional input of any other model); a dict of keyword
        arguments, whose explained inputs are the tensors that require grad, else
        ``input_ids`` (embedded), else ``inputs_embeds`` or ``pixel_values``, else the
        floating-point tensors without ``mask`` in their name; or a callable ``f(model)`` that
        runs the model itself on tensors that require grad.
    tokenizer : tokenizer or image processor, optional
        For text and images, and to name the tokens of ids.
    task : str, optional
        The model's task (:func:`task_of`); it decides what a float tensor is.

    Returns
    -------
    Prepared

    Raises
    ------
    TypeError, ValueError
        For inputs that cannot be explained (text without tokenizer, an empty text, integer
        tensors for a model without embeddings, a dict without explainable input …).
    """
    hf = getattr(unwrap(model), "config", None) is not None
    if _is_text(inputs):
        if tokenizer is None:
            raise ValueError("text input needs a tokenizer: explain(model, text, tokenizer=...)")
        texts = (inputs,) if isinstance(inputs, str) else inputs
        if not all(t.strip() for t in texts):
            raise ValueError("the text is empty")
        enc = tokenizer(*texts, return_tensors="pt")
        kwargs = {k: v for k, v in enc.items() if k == "attention_mask"
                  or (k == "token_type_ids" and _accepts(model, k))}
        return _from_ids(model, enc["input_ids"], kwargs, tokenizer)
    if _is_image(inputs):
        if tokenizer is None:
            raise ValueError("an image needs its image processor: explain(model, image, "
                             "tokenizer=processor)")
        pixels = tokenizer(images=inputs.convert("RGB"), return_tensors="pt")["pixel_values"]
        return _from_tensor(model, "pixel_values", pixels, {})
    if isinstance(inputs, (list, tuple)) and inputs and all(_is_id(i) for i in inputs):
        return _from_ids(model, torch.tensor([[int(i) for i in inputs]]), {}, tokenizer)
    if isinstance(inputs, (list, tuple)) and not inputs:
        raise InputError("inputs is empty: give text, token ids, embeddings or pixel values")
    if isinstance(inputs, (list, tuple)) and all(isinstance(i, numbers.Number) for i in inputs):
        bad = next(i for i in inputs if not _is_id(i))
        raise TypeError(f"token ids must be integers, got {bad!r} ({type(bad).__name__}); "
                        "embeddings go in as a float tensor")
    if isinstance(inputs, Tensor):
        _check_data(inputs, "inputs")
        if not inputs.is_floating_point():
            return _from_ids(model, inputs, {}, tokenizer)
        if not hf:
            if inputs.numel() == 0:
                raise InputError("inputs is empty")
            if inputs.dim() < 2:
                raise InputError(f"a float input of shape {tuple(inputs.shape)} has no batch "
                                 "dimension; give (batch, features), e.g. inputs[None] for one "
                                 "sample")
            return Prepared({POSITIONAL: make_leaf(inputs, _device(model))})
        key = "pixel_values" if task == "image-classification" or inputs.dim() == 4 \
            else "inputs_embeds"
        return _from_tensor(model, key, inputs, {})
    if isinstance(inputs, Mapping):
        preparer = MAPPING_PREPARERS.get(task)
        if preparer is not None \
                and all(isinstance(inputs.get(k), Tensor) for k in ("input_ids", "pixel_values")) \
                and not any(isinstance(v, Tensor) and v.requires_grad for v in inputs.values()):
            return preparer(model, inputs, task)  # pixels and text explained together
        return _from_mapping(model, dict(inputs), tokenizer)
    if callable(inputs) and not isinstance(inputs, nn.Module):
        return Prepared({}, call=inputs)
    raise TypeError(f"cannot explain an input of type {type(inputs).__name__}: give text, "
                    "token ids, embeddings, pixel values, a dict of model inputs, a callable "
                    "taking the model, or a list")


def _is_id(value: Any) -> bool:
    """An int (also a numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _from_mapping(model: nn.Module, kwargs: dict[str, Any], tokenizer: Any) -> Prepared:
    for key, value in kwargs.items():
        _check_data(value, key)
    chosen = [k for k, v in kwargs.items() if isinstance(v, Tensor) and v.requires_grad]
    if not chosen and isinstance(kwargs.get("input_ids"), Tensor):
        return _from_ids(model, kwargs.pop("input_ids"), kwargs, tokenizer)
    if not chosen:
        for key in ("inputs_embeds", "pixel_values"):
            if isinstance(kwargs.get(key), Tensor):
                return _from_tensor(model, key, kwargs.pop(key), kwargs)
        chosen = [k for k, v in kwargs.items() if isinstance(v, Tensor)
                  and v.is_floating_point() and "mask" not in k]
    if not chosen:
        raise ValueError("a dict input needs input_ids, inputs_embeds or pixel_values (or "
                         "tensors that require grad): no explainable input among its keys "
                         f"{sorted(kwargs)}")
    device = _device(model)
    leaves = {k: make_leaf(kwargs.pop(k), device) for k in chosen}
    if "inputs_embeds" in leaves:
        _check_embeds(model, leaves["inputs_embeds"], kwargs)
    return Prepared(leaves, _to(kwargs, device))


def split_batch(inputs: Any, task: str | None) -> list[Any] | None:
    """The samples of a batch input, or ``None`` for a single input.

    A list that is not a list of token ids is a batch; so are a tensor with a batch dimension
    larger than one and a dict whose tensors have one (each sample keeps only the positions
    its attention mask keeps).
    """
    if isinstance(inputs, list) and inputs \
            and all(isinstance(i, numbers.Number) and not isinstance(i, bool) for i in inputs):
        return None  # token ids (or numbers that are not: prepare() says so)
    if isinstance(inputs, list):
        if not inputs:
            raise InputError("inputs is an empty list (a batch without samples)")
        return inputs
    if isinstance(inputs, Tensor):
        single = {True: 4, False: 3}[task == "image-classification" or inputs.dim() == 4] \
            if inputs.is_floating_point() else 2
        if inputs.dim() == single and inputs.shape[0] > 1:
            return list(inputs.unbind(0)) if not inputs.is_floating_point() else \
                [x[None] for x in inputs.unbind(0)]
        return None
    if isinstance(inputs, Mapping):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim() >= 2}
        if len(sizes) != 1 or next(iter(sizes)) <= 1:
            return None
        mask = inputs.get("attention_mask")
        main = next((k for k in ("input_ids", "inputs_embeds") if isinstance(inputs.get(k),
                                                                              Tensor)), None)
        if main is not None:
            _check_mask(inputs, inputs[main].shape[:2], main)
        out = []
        for b in range(next(iter(sizes))):
            keep = mask[b].bool() if isinstance(mask, Tensor) else None
            sample = {}
            for k, v in inputs.items():
                if not isinstance(v, Tensor) or v.dim() < 2:
                    sample[k] = v
                    continue
                v = v[b]
                if keep is not None and v.dim() >= 1 and v.shape[0] == keep.shape[0]:
                    v = v[keep]
                sample[k] = v[None]
            out.append(sample)
        return out
    return None


def collate(model: nn.Module, items: Sequence[Prepared]) -> Prepared | None:
    """One batch from prepared single samples, padded on the right, or ``None`` where the
    samples cannot share a forward pass.

    Samples of one explained keyword (``inputs_embeds``, ``pixel_values`` or the positional
    input) with the same keyword arguments are stacked; samples of different lengths are padded
    with zeros after their last token, and the attention mask (ones where a sample has none)
    marks the padding, so that no real token attends to it. Different lengths need a model
    that takes ``attention_mask``; other shapes must agree.

    Returns
    -------
    Prepared or None
        The batch, with :attr:`Prepared.lengths` the real length of each sample, ids and
        tokens of every sample; ``None`` if the samples do not fit in one batch.
    """
    first = items[0]
    names = [tuple(it.leaves) for it in items]
    keys = [tuple(sorted(it.kwargs)) for it in items]
    if any(it.call is not None or len(it.leaves) != 1 for it in items) \
            or len(set(names)) != 1 or len(set(keys)) != 1:
        return None
    if len(items) == 1:
        return first
    name = names[0][0]
    leaves = [it.leaf for it in items]
    if any(x.shape[0] != 1 for x in leaves):
        return None
    shapes = {tuple(x.shape[2:]) for x in leaves}
    lengths = [x.shape[1] for x in leaves] if leaves[0].dim() >= 2 else [1] * len(leaves)
    if len(shapes) != 1:
        return None
    ragged = len(set(lengths)) > 1
    if ragged and (name == "pixel_values" or not _accepts(model, "attention_mask")):
        return None
    width = max(lengths)
    kwargs: dict[str, Any] = {}
    for key in keys[0]:
        values = [it.kwargs[key] for it in items]
        if all(isinstance(v, Tensor) and v.dim() >= 2 and v.shape[0] == 1
               and v.shape[1] == n for v, n in zip(values, lengths)):
            kwargs[key] = torch.cat([_pad(v, width) for v in values])
        elif all(v is values[0] or (not isinstance(v, Tensor) and v == values[0])
                 for v in values):
            kwargs[key] = values[0]
        else:
            return None
    if ragged and "attention_mask" not in kwargs:
        device = leaves[0].device
        kwargs["attention_mask"] = torch.stack([
            torch.arange(width, device=device) < n for n in lengths]).long()
    leaf = make_leaf(torch.cat([_pad(x.detach(), width) for x in leaves]))
    ids = None
    if all(it.ids is not None for it in items):
        ids = torch.cat([_pad(it.ids, width) for it in items])
    tokens = [t for it in items for t in it.tokens] if all(it.tokens for it in items) else None
    return Prepared({name: leaf}, kwargs, ids, tokens, first.image, lengths=lengths)


def _pad(x: Tensor, width: int) -> Tensor:
    """``x`` padded with zeros along dimension 1 to ``width``."""
    if x.dim() < 2 or x.shape[1] == width:
        return x
    pad = x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], dim=1)


def per_sample(value: Any, n: int) -> list[Any]:
    """``value`` for each of ``n`` samples: a list must have one entry per sample; anything
    else is repeated."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"a list of targets or contrasts for a batch needs one per sample "
                             f"({n}), got {len(value)}")
        return value
    return [value] * n


def progress(items: Iterable[Any], show: bool, desc: str = "explain",
             total: int | None = None) -> Iterable[Any]:
    """``items`` with a tqdm progress bar on stderr when ``show`` (and more than one item)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if not show or (total is not None and total < 2):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="input", total=total, file=sys.stderr)
