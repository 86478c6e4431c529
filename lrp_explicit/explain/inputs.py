"""Inputs of :func:`lrp_explicit.explain`: the task of a model, batches, and one sample turned
into model keyword arguments with a leaf that requires grad."""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

__all__ = ["TASKS", "task_of"]

#: Tasks :func:`lrp_explicit.explain` knows; :func:`task_of` picks one from the model's head.
TASKS = ("causal-lm", "masked-lm", "classification", "token-classification",
         "image-classification", "similarity")
_SUFFIXES = {"causal-lm": ("ForCausalLM", "LMHeadModel"), "masked-lm": ("ForMaskedLM",),
             "classification": ("ForSequenceClassification",),
             "token-classification": ("ForTokenClassification",),
             "image-classification": ("ForImageClassification",)}


def task_of(model: nn.Module) -> str | None:
    """The task of a Hugging Face head (by class name: ``…ForCausalLM``, ``…ForMaskedLM``, …);
    ``"similarity"`` for a Hugging Face base model with a vocabulary (a sentence encoder);
    ``None`` for other models (decided by the output's shape: ``(batch, classes)`` is a
    classification, ``(batch, tokens, classes)`` a per-position one)."""
    name = type(model).__name__
    for task, suffixes in _SUFFIXES.items():
        if name.endswith(suffixes):
            return task
    config = getattr(model, "config", None)
    if config is not None and name.endswith("Model") and getattr(config, "vocab_size", None):
        return "similarity"
    return None


@dataclass
class _Item:
    """One prepared input: the explained leaf, the other keyword arguments, what to show."""

    leaf: Tensor
    key: str | None  # keyword of the leaf; None: positional
    kwargs: dict[str, Any]
    ids: Tensor | None
    tokens: list[str] | None
    image: Tensor | None = None


def _is_image(obj: Any) -> bool:
    return hasattr(obj, "convert") and hasattr(obj, "size") and hasattr(obj, "mode")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _prepare(model: nn.Module, inp: Any, tokenizer: Any, task: str | None) -> _Item:
    """Turn one input into model keyword arguments with a leaf that requires grad."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    hf = getattr(model, "config", None) is not None
    kwargs: dict[str, Any] = {}
    ids = None
    if isinstance(inp, str) or (isinstance(inp, tuple) and all(isinstance(s, str) for s in inp)):
        if tokenizer is None:
            raise ValueError("text input needs a tokenizer: explain(model, text, tokenizer=...)")
        texts = (inp,) if isinstance(inp, str) else inp
        if not all(t.strip() for t in texts):
            raise ValueError("the text is empty")
        enc = tokenizer(*texts, return_tensors="pt")
        ids = enc["input_ids"]
        kwargs = {k: v for k, v in enc.items() if k == "attention_mask"
                  or (k == "token_type_ids" and _accepts(model, k))}
    elif _is_image(inp):
        if tokenizer is None:
            raise ValueError("an image needs its image processor: explain(model, image, "
                             "tokenizer=processor)")
        return _prepare(model, {"pixel_values": tokenizer(images=inp.convert("RGB"),
                                                          return_tensors="pt")["pixel_values"]},
                        None, task)
    elif isinstance(inp, (list, tuple)) and inp and all(isinstance(i, int) for i in inp):
        ids = torch.tensor([list(inp)])
    elif isinstance(inp, Tensor) and not inp.is_floating_point():
        ids = inp if inp.dim() == 2 else inp.reshape(1, -1)
    elif isinstance(inp, Tensor):
        if not hf:
            return _Item(_leaf(inp, device), None, {}, None, None)
        key = "pixel_values" if task == "image-classification" or inp.dim() == 4 \
            else "inputs_embeds"
        return _prepare(model, {key: inp}, tokenizer, task)
    elif isinstance(inp, Mapping):
        kwargs = {k: v for k, v in inp.items()}
        ids = kwargs.pop("input_ids", None)
        for key in ("inputs_embeds", "pixel_values"):
            if ids is None and isinstance(kwargs.get(key), Tensor):
                x = kwargs.pop(key)
                x = x[None] if x.dim() == (2 if key == "inputs_embeds" else 3) else x
                leaf = _leaf(x, device)
                image = _display(x[0]) if key == "pixel_values" else None
                tokens = None if key == "pixel_values" else [str(i) for i in range(x.shape[1])]
                return _Item(leaf, key, _to(kwargs, device), None, tokens, image)
        if ids is None:
            raise ValueError("a dict input needs input_ids, inputs_embeds or pixel_values")
        ids = ids if ids.dim() == 2 else ids.reshape(1, -1)
    else:
        raise TypeError(f"cannot explain an input of type {type(inp).__name__}: give text, "
                        "token ids, embeddings, pixel values, a dict of model inputs or a list")
    if ids.shape[0] != 1:
        raise ValueError(f"one input at a time here, got a batch of {ids.shape[0]}")
    if ids.numel() == 0:
        raise ValueError("the input has no tokens")
    get = getattr(model, "get_input_embeddings", None)
    if get is None or get() is None:
        raise TypeError("token ids need a model with get_input_embeddings(); pass embeddings")
    embedding = get()
    size = getattr(embedding, "num_embeddings", None)
    if size is not None and (ids.min() < 0 or ids.max() >= size):
        raise ValueError(f"token ids outside the vocabulary of {size}")
    with torch.no_grad():
        x = embedding(ids.to(device))
    tokens = (list(tokenizer.convert_ids_to_tokens(ids[0].tolist())) if tokenizer is not None
              else [str(i) for i in ids[0].tolist()])
    return _Item(_leaf(x, device), "inputs_embeds", _to(kwargs, device), ids[0].cpu(), tokens)


def _leaf(x: Tensor, device: torch.device) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"cannot explain a {x.dtype} tensor")
    return x.detach().to(device).clone().requires_grad_(True)


def _to(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}


def _display(pixels: Tensor) -> Tensor:
    """``(C, H, W)`` pixel values as ``(H, W, 3)`` in [0, 1] (min-max rescaled)."""
    x = pixels.detach().float().cpu()
    x = x.expand(3, *x.shape[1:]) if x.shape[0] == 1 else x[:3]
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    return x.permute(1, 2, 0).contiguous()


def _forward(model: nn.Module, item: _Item, task: str | None) -> Any:
    kwargs = dict(item.kwargs)
    if task == "causal-lm" and _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if item.key is None:
        return model(item.leaf, **kwargs)
    return model(**{item.key: item.leaf}, **kwargs)


def _batch(inputs: Any, task: str | None) -> list[Any] | None:
    """The samples of a batch input, or ``None`` for a single input."""
    if isinstance(inputs, list) and not all(isinstance(i, int) for i in inputs):
        if not inputs:
            raise ValueError("the batch is empty")
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


def _per_item(value: Any, n: int) -> list[Any]:
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"a list of targets or contrasts for a batch needs one per sample "
                             f"({n}), got {len(value)}")
        return value
    return [value] * n


def _progress(items: list[Any], show: bool) -> Any:
    if not show or len(items) < 2:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return items
    return tqdm(items, desc="explain", unit="input", file=sys.stderr)
