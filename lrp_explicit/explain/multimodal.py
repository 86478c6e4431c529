"""Image and text explained together: the image–text similarity of a dual encoder (CLIP,
SigLIP, SigLIP 2) and the next token of a vision–language model (LLaVA, Gemma 3, Qwen2-VL,
Qwen2.5-VL, Qwen3-VL), with relevance on the pixels *and* the text tokens from one backward
pass. Models that take flattened patches (Qwen-VL with ``image_grid_thw``, SigLIP 2 with
``spatial_shapes``) get pixels cut as their image processors cut them, and their relevance put
back on the picture.

Both run :func:`~lrp_explicit.pipeline.attribute` on one prepared input with two leaves:

- dual encoders (``"image-text-similarity"``): the pixels (``pixel_values``) and the token
  embeddings of the text. The text towers take only ids (CLIP pools at the end-of-text token
  found in them, SigLIP at the last token), so the model runs on the ids and a forward hook on
  its token embedding hands the explained embeddings (equal in value) to the tower. The
  explained score of a pair is its entry of ``logits_per_image`` (``exp(s)`` times the cosine
  of the projected embeddings, plus SigLIP's bias); a batch of pairs explains the diagonal, one
  score per pair.
- vision–language models (``"image-text-to-text"``): the pixels and the prompt's embeddings
  (image placeholder tokens included: the model scatters the image features over them), the
  model run on the ids with the same hook. The explained score is the logit of the next token
  (the prediction, a given token, or each token of the model's own generation).
- :func:`prepare_image_text` makes the same two leaves of a dict of model inputs for
  :func:`lrp_explicit.audit` and :func:`lrp_explicit.check`.

The result, :class:`ImageTextExplanation`, holds an :class:`~lrp_explicit.explain.Explanation`
of the pixels and one of the text tokens and shows them side by side.
"""
from __future__ import annotations

import inspect
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import heatmaps
from ..composites import Composite, unwrap
from ..errors import InputError
from ..pipeline import Prepared, Target, attribute, check_finite, make_leaf
from ..pipeline.inputs import MAPPING_PREPARERS
from ..pipeline.targets import (SOFTMAX, as_index, logit_relevance, plain_spec, token_ids,
                                token_name)
from .common import model_name, vocabulary
from . import store
from .result import _CLASS_OF, _KIND_OF, Explanation, _latent_of, _latent_record

__all__ = ["IMAGE_TEXT_SIMILARITY", "IMAGE_TEXT_TO_TEXT", "ImageTextExplanation",
           "explain_image_text", "explain_vision_language", "overlay", "prepare_image_text"]

#: The task of a dual image–text encoder (CLIP).
IMAGE_TEXT_SIMILARITY = "image-text-similarity"
#: The task of a vision–language model that writes text about an image (LLaVA).
IMAGE_TEXT_TO_TEXT = "image-text-to-text"


def overlay(image: Tensor, relevance: Tensor, strength: float = 0.85) -> Tensor:
    """The heatmap of ``relevance`` ``(H, W)`` drawn over ``image`` ``(H, W, 3)`` in [0, 1]:
    each pixel blended with its relevance colour, the more the larger ``|relevance|`` is."""
    norm = heatmaps.normalise(relevance)
    heat = heatmaps.colours(norm).to(torch.float64) / 255
    alpha = (norm.abs().sqrt() * strength).unsqueeze(-1)
    return (image.detach().cpu().to(torch.float64) * (1 - alpha) + heat * alpha).clamp(0, 1)


@dataclass
class ImageTextExplanation:
    """What ``explain`` returns for an image with a text: the relevance of the pixels and of the
    text tokens for one score, from one backward pass.

    Attributes
    ----------
    image : Explanation
        The pixels: relevance ``(H, W)`` summed over the channels; its ``image`` is the input
        (CLIP) or the heatmap drawn over the input (vision–language models).
    text : Explanation
        The text tokens (a vision–language model's image placeholder tokens left out: the
        image features replace their embeddings, so they hold no relevance).
    score : float
        The explained score: the pair's ``logits_per_image`` entry (CLIP) or the next token's
        logit (with a contrast: the weighted sum of the logits).
    label : str
        The score in words.
    task : str
        ``"image-text-similarity"`` or ``"image-text-to-text"``.
    target, prediction : int or None
        The explained token and the model's own choice (vision–language models).
    contrast : int, str or None
        The contrasted token or ``"softmax"``.
    latent : dict of str to Tensor
        Relevance recorded at modules' outputs (``record=``).
    composite, model : str
        Names shown in the views.
    """

    image: Explanation
    text: Explanation
    score: float
    label: str
    task: str
    target: int | None = None
    prediction: int | None = None
    contrast: int | str | None = None
    latent: dict[str, Tensor] = field(default_factory=dict)
    composite: str = ""
    model: str = ""

    def __repr__(self) -> str:
        tokens = len(self.text.tokens or [])
        return (f"ImageTextExplanation({self.task}, {self.label}, score={self.score:.4g}, "
                f"pixels={tuple(self.image.relevance.shape)}, tokens={tokens})")

    def __str__(self) -> str:
        return self.to_terminal(color=False)

    @property
    def total(self) -> float:
        """The relevance of the pixels and of the text tokens together."""
        return float(self.image.relevance.double().sum() + self.text.relevance.double().sum())

    @property
    def title(self) -> str:
        """The score in words."""
        return f"{self.label} · score {self.score:.4g}"

    @property
    def subtitle(self) -> str:
        """Model, composite and the relevance of each part."""
        parts = [p for p in (self.model, self.composite) if p]
        image = float(self.image.relevance.double().sum())
        text = float(self.text.relevance.double().sum())
        return " · ".join(parts + [f"image {image:.4g} + text {text:.4g} = {image + text:.4g}"])

    def patches(self, size: int) -> Tensor:
        """The pixel relevance summed over ``size × size`` patches: ``(H/size, W/size)``."""
        h, w = self.image.relevance.shape
        if h % size or w % size:
            raise ValueError(f"a {h}×{w} image does not split into {size}×{size} patches")
        r = self.image.relevance.reshape(h // size, size, w // size, size)
        return r.sum((1, 3))

    # ------------------------------------------------------------------ views

    def to_html_fragment(self, cmap: Any = None) -> str:
        """The image heatmap beside the text heatmap, as one HTML fragment."""
        return ('<div style="display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start">'
                f"<div>{self.image.to_html_fragment(cmap=cmap)}</div>"
                f'<div style="flex:1;min-width:18em">{self.text.to_html_fragment(cmap=cmap)}'
                "</div></div>")

    def _repr_html_(self) -> str:
        return self.to_html_fragment()

    def to_html(self, cmap: Any = None) -> str:
        """A self-contained HTML page: the image heatmap beside the text heatmap."""
        return heatmaps.html_document([self.to_html_fragment(cmap)], self.title)

    def to_terminal(self, color: bool | None = None, width: int | None = None,
                    cmap: Any = None) -> str:
        """The image heatmap, then the text heatmap, as terminal text."""
        return "\n".join([self.image.to_terminal(color=color, width=width, cmap=cmap),
                          self.text.to_terminal(color=color, width=width, cmap=cmap)])

    def to_png(self, path: str | os.PathLike | None = None, dpi: int = 100,
               cmap: Any = None) -> bytes:
        """The image heatmap beside the text heatmap, as one PNG."""
        from PIL import Image

        left = Image.open(io.BytesIO(self.image.to_png(dpi=dpi, cmap=cmap))).convert("RGB")
        right = Image.open(io.BytesIO(self.text.to_png(dpi=dpi, cmap=cmap))).convert("RGB")
        both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)),
                         "white")
        both.paste(left, (0, 0))
        both.paste(right, (left.width, 0))
        buffer = io.BytesIO()
        both.save(buffer, format="PNG")
        data = buffer.getvalue()
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields: both parts' :meth:`~lrp_explicit.explain.Explanation.to_dict`."""
        return {"task": self.task, "label": self.label, "score": self.score,
                "target": self.target, "prediction": self.prediction,
                "contrast": self.contrast, "composite": self.composite, "model": self.model,
                "image": self.image.to_dict(), "text": self.text.to_dict()}

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write a record (``.lrp``, read back by :func:`lrp_explicit.load`), ``.html``,
        ``.png``, ``.json`` or ``.txt`` (by suffix unless ``format``)."""
        path = Path(path)
        kind = (format or path.suffix.lstrip(".") or "html").lower()
        if kind == "lrp":
            store.write(path, RECORD_KIND, *self._record(""))
        elif kind == "html":
            path.write_text(self.to_html(), encoding="utf-8")
        elif kind == "png":
            path.write_bytes(self.to_png())
        elif kind == "json":
            path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        elif kind in ("txt", "text"):
            path.write_text(self.to_terminal(color=False) + "\n", encoding="utf-8")
        else:
            raise ValueError(f"unknown format {kind!r}; use lrp, html, png, json or txt")
        return path

    def _record(self, prefix: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        image_meta, tensors = self.image._record(f"{prefix}image/")
        text_meta, text_tensors = self.text._record(f"{prefix}text/")
        tensors.update(text_tensors)
        names, latent = _latent_record(self.latent, prefix)
        tensors.update(latent)
        meta = {name: getattr(self, name) for name in _OWN_FIELDS}
        meta.update(image=image_meta, text=text_meta, latent=names)
        return store.jsonable(meta), tensors

    @classmethod
    def _from_record(cls, meta: dict[str, Any], tensors: dict[str, Tensor],
                     prefix: str = "") -> "ImageTextExplanation":
        return cls(image=Explanation._from_record(meta["image"], tensors, f"{prefix}image/"),
                   text=Explanation._from_record(meta["text"], tensors, f"{prefix}text/"),
                   latent=_latent_of(meta.get("latent", []), tensors, prefix),
                   **{name: meta[name] for name in _OWN_FIELDS})


#: The ``"kind"`` of an :class:`ImageTextExplanation` record.
RECORD_KIND = "image-text"
_OWN_FIELDS = ("score", "label", "task", "target", "prediction", "contrast", "composite",
               "model")
store.register_reader(RECORD_KIND, lambda meta, tensors:
                      ImageTextExplanation._from_record(meta, tensors))
_KIND_OF[ImageTextExplanation] = RECORD_KIND
_CLASS_OF[RECORD_KIND] = ImageTextExplanation


# ============================================================================ inputs


def _is_image(obj: Any) -> bool:
    return hasattr(obj, "convert") and hasattr(obj, "size") and hasattr(obj, "mode")


def _parts(tokenizer: Any) -> tuple[Any, Any]:
    """The text tokenizer and the image processor of a processor, a tokenizer or an image
    processor."""
    if tokenizer is None:
        return None, None
    if hasattr(tokenizer, "image_processor"):
        return getattr(tokenizer, "tokenizer", None), tokenizer.image_processor
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None, tokenizer
    return tokenizer, None


def _device(model: nn.Module) -> torch.device:
    return next(unwrap(model).parameters()).device


def _dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in unwrap(model).parameters() if p.is_floating_point())


def _pixels(model: nn.Module, image: Any, processor: Any) -> Tensor:
    """``(1, C, H, W)`` pixel values in the model's dtype."""
    if _is_image(image):
        if processor is None:
            raise ValueError("an image needs its processor: explain(model, (image, text), "
                             "tokenizer=processor)")
        image = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    if not isinstance(image, Tensor) or not image.is_floating_point():
        raise TypeError("the image is a PIL image or a float tensor of pixel values, not "
                        f"{type(image).__name__}")
    image = image[None] if image.dim() == 3 else image
    if image.dim() != 4 or image.shape[0] != 1:
        raise InputError(f"pixel values have shape {tuple(image.shape)}; give one image "
                         "(channels, height, width)")
    return image.to(_device(model), _dtype(model))


def _ids(text: Any, tokenizer: Any) -> Tensor:
    """``(L,)`` token ids of a text (with the tokenizer's special tokens) or of given ids."""
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("text needs a tokenizer (or a processor)")
        if not text.strip():
            raise ValueError("the text is empty")
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    elif isinstance(text, (list, tuple)) and text and all(as_index(i) is not None for i in text):
        ids = torch.tensor([as_index(i) for i in text])
    elif isinstance(text, Tensor) and not text.is_floating_point():
        ids = text
    else:
        raise TypeError(f"the text is a string or token ids, not {type(text).__name__}")
    ids = ids.reshape(-1) if ids.dim() == 2 and ids.shape[0] == 1 else ids
    if ids.dim() != 1 or ids.numel() == 0:
        raise InputError(f"token ids of shape {tuple(ids.shape)}: give one text")
    return ids.cpu()


def _pair(inputs: Any) -> tuple[Any, Any]:
    if isinstance(inputs, Mapping):
        image = inputs.get("pixel_values", inputs.get("image"))
        text = inputs.get("input_ids", inputs.get("text"))
        if image is not None and any(k in inputs for k in ("image_grid_thw", "spatial_shapes")):
            image = {k: v for k, v in inputs.items() if k not in ("input_ids", "text")}
        if image is None or text is None:
            raise ValueError("a dict input needs pixel_values (or image) and input_ids (or "
                             f"text), got keys {sorted(inputs)}")
        return image, text
    if isinstance(inputs, tuple) and len(inputs) == 2:
        return inputs
    raise TypeError("explain an image with a text: pass a pair (image, text) or a dict with "
                    f"pixel_values and input_ids, not {type(inputs).__name__}")


def _batch(inputs: Any) -> tuple[list[Any], bool]:
    if isinstance(inputs, list):
        if not inputs:
            raise InputError("inputs is an empty list (a batch without samples)")
        return inputs, True
    return [inputs], False


def _names(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return list(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def _display(pixels: Tensor) -> Tensor:
    """``(C, H, W)`` pixel values as an ``(H, W, 3)`` picture in [0, 1] (min-max rescaled)."""
    x = pixels.detach().to("cpu", torch.float64)
    x = x.expand(3, *x.shape[1:]) if x.shape[0] == 1 else x[:3]
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    return x.permute(1, 2, 0).contiguous()


def _pad_ids(rows: list[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    width = max(r.shape[0] for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :r.shape[0]], mask[b, :r.shape[0]] = r, 1
    return ids, mask


def _latent_row(latent: dict[str, Tensor], b: int, size: int) -> dict[str, Tensor]:
    return {k: (v[b] if v.dim() >= 1 and v.shape[0] == size else v).detach().cpu()
            for k, v in latent.items()}


# ============================================================================ image layouts

#: Pixels as ``(batch, channels, height, width)`` (CLIP, SigLIP, LLaVA, Gemma 3).
DENSE = "dense"
#: Flattened patches of all images, ``(patches, channels · frames · p · p)``, with their grid
#: ``image_grid_thw`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
GRID = "grid"
#: Flattened patches ``(batch, patches, p · p · channels)`` with ``spatial_shapes`` and
#: ``pixel_attention_mask`` (SigLIP 2).
NAFLEX = "naflex"
#: The image arguments besides ``pixel_values`` of each layout.
_IMAGE_KEYS = {DENSE: (), GRID: ("image_grid_thw",),
               NAFLEX: ("spatial_shapes", "pixel_attention_mask")}


@dataclass
class _Image:
    """One image as the model takes it: ``pixels`` in its layout (dense ``(1, C, H, W)``,
    grid ``(patches, D)``, naflex ``(1, patches, D)``) and the other image arguments."""

    pixels: Tensor
    kwargs: dict[str, Tensor] = field(default_factory=dict)


def _layout(model: nn.Module) -> str:
    """How the model takes its pixels (:data:`DENSE`, :data:`GRID` or :data:`NAFLEX`)."""
    vision = getattr(getattr(unwrap(model), "config", None), "vision_config", None)
    if vision is None:
        return DENSE
    if hasattr(vision, "temporal_patch_size") and hasattr(vision, "spatial_merge_size"):
        return GRID
    if str(getattr(vision, "model_type", "")).startswith("siglip2"):
        return NAFLEX
    return DENSE


def _vision(model: nn.Module) -> Any:
    return unwrap(model).config.vision_config


def _to_patches(model: nn.Module, x: Tensor) -> _Image:
    """Pixels ``(C, H, W)`` as the model's image processor lays them out: the same values in
    the same order (Qwen-VL: each frame repeated ``temporal_patch_size`` times, patches grouped
    by ``spatial_merge_size`` blocks; SigLIP 2: row-major patches of ``(p, p, C)``)."""
    layout, vision = _layout(model), _vision(model)
    channels, height, width = x.shape
    p = vision.patch_size
    block = p * (vision.spatial_merge_size if layout == GRID else 1)
    if height % block or width % block:
        raise InputError(f"a {height}×{width} image does not split into {block}×{block} blocks "
                         "of patches; resize it (or pass the processor's output)")
    h, w = height // p, width // p
    if layout == GRID:
        m, frames = vision.spatial_merge_size, vision.temporal_patch_size
        patches = x[None].expand(frames, channels, height, width)
        patches = patches.reshape(1, frames, channels, h // m, m, p, w // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(h * w, -1)
        grid = torch.tensor([[1, h, w]], device=x.device)
        return _Image(patches.contiguous(), {"image_grid_thw": grid})
    patches = x.reshape(channels, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(1, h * w, -1)
    return _Image(patches.contiguous(), {
        "spatial_shapes": torch.tensor([[h, w]], device=x.device),
        "pixel_attention_mask": torch.ones(1, h * w, dtype=torch.long, device=x.device)})


def _to_grid(model: nn.Module, image: _Image, values: Tensor, relevance: bool) -> Tensor:
    """``values`` of the shape of ``image.pixels`` back on the picture: relevance ``(H, W)``
    summed over channels (and repeated frames), or the pixels ``(C, H, W)`` (first frame)."""
    layout = _layout(model)
    if layout == DENSE:
        return values[0].sum(0) if relevance else values[0]
    vision = _vision(model)
    p = vision.patch_size
    if layout == GRID:
        m, frames = vision.spatial_merge_size, vision.temporal_patch_size
        t, h, w = (int(v) for v in image.kwargs["image_grid_thw"][0])
        x = values.reshape(t, h // m, w // m, m, m, -1, frames, p, p)
        x = x.sum((0, 6)) if relevance else x[0, :, :, :, :, :, 0]   # (h/m, w/m, m, m, C, p, p)
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, h * p, w * p)
    else:
        h, w = (int(v) for v in image.kwargs["spatial_shapes"][0])
        x = values[0, :h * w].reshape(h, w, p, p, -1).permute(4, 0, 2, 1, 3)
        x = x.reshape(-1, h * p, w * p)
    return x.sum(0) if relevance else x


def _image(model: nn.Module, image: Any, processor: Any) -> _Image:
    """One image in the model's layout from a PIL image (with the processor), a dict of the
    processor's image outputs, pixel values ``(C, H, W)`` or, for dense layouts,
    ``(1, C, H, W)``."""
    layout = _layout(model)
    if _is_image(image):
        if processor is None:
            raise ValueError("an image needs its processor: explain(model, (image, text), "
                             "tokenizer=processor)")
        image = processor(images=image.convert("RGB"), return_tensors="pt")
    if isinstance(image, Mapping):
        missing = [k for k in ("pixel_values",) + _IMAGE_KEYS[layout] if k not in image]
        if missing:
            raise InputError(f"the image needs {', '.join(missing)} (as the model's processor "
                             f"returns them), got keys {sorted(image)}")
        if layout == DENSE:
            image = image["pixel_values"]
        else:
            kwargs = {k: torch.as_tensor(image[k]).to(_device(model)) for k in _IMAGE_KEYS[layout]}
            first = kwargs[_IMAGE_KEYS[layout][0]]
            if first.shape[0] != 1:
                raise InputError(f"{_IMAGE_KEYS[layout][0]} has shape {tuple(first.shape)}: "
                                 "give one image per sample")
            pixels = torch.as_tensor(image["pixel_values"]).to(_device(model), _dtype(model))
            return _Image(pixels, kwargs)
    if layout == DENSE:
        return _Image(_pixels(model, image, None))
    if not isinstance(image, Tensor) or not image.is_floating_point():
        raise TypeError("the image is a PIL image, the processor's output or a float tensor of "
                        f"pixel values, not {type(image).__name__}")
    image = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
    if image.dim() != 3:
        raise InputError(f"pixel values have shape {tuple(image.shape)}; give one image "
                         "(channels, height, width), or the processor's output (flattened "
                         "patches with their grid) as a dict")
    return _to_patches(model, image.to(_device(model), _dtype(model)))


def _stack(model: nn.Module, images: Sequence[_Image]) -> tuple[Tensor, dict[str, Tensor]]:
    """The pixels and image arguments of several images in one call (grid layouts concatenate
    the patches of all images; the others stack along the batch)."""
    pixels = torch.cat([im.pixels for im in images])
    keys = _IMAGE_KEYS[_layout(model)]
    return pixels, {k: torch.cat([im.kwargs[k] for im in images]) for k in keys}


def _unstack(model: nn.Module, images: Sequence[_Image], values: Tensor) -> list[Tensor]:
    """``values`` of the shape of :func:`_stack`'s pixels, split back into one per image."""
    if _layout(model) == GRID:
        return list(values.split([im.pixels.shape[0] for im in images]))
    return [values[b:b + 1] for b in range(len(images))]


def _groups(keys: Sequence[Any], size: int) -> list[list[int]]:
    """Indices of the samples that share a pass: the same key, at most ``size`` per pass."""
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    return [idx[s:s + size] for idx in by_key.values() for s in range(0, len(idx), size)]


def _safe_ids(embedding: nn.Module, ids: Tensor) -> Tensor:
    """``ids`` with those beyond the embedding table as 0 (Gemma 3 does so for an image token
    outside its vocabulary before it looks the embeddings up)."""
    size = getattr(embedding, "num_embeddings", None)
    return ids if size is None else ids.masked_fill(ids >= size, 0)


def _hooked(model: nn.Module, embedding: nn.Module, ids: Tensor, pixels: Tensor,
            kwargs: Mapping[str, Any]) -> Prepared:
    """Pixels and text embeddings as leaves, the model run on the ids: the first call of its
    token ``embedding`` returns the embeddings leaf (equal in value), so everything the model
    derives from the ids (CLIP's pooling, M-RoPE positions, image placeholders, token types)
    stays as it is."""
    with torch.no_grad():
        text = embedding(_safe_ids(embedding, ids))
    leaves = {"pixel_values": make_leaf(pixels), "inputs_embeds": make_leaf(text)}

    def run(runner: nn.Module) -> Any:
        fired: list[bool] = []

        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if fired:
                return out
            fired.append(True)
            return leaves["inputs_embeds"]

        handle = embedding.register_forward_hook(hook)
        try:
            return runner(input_ids=ids, pixel_values=leaves["pixel_values"], **kwargs)
        finally:
            handle.remove()

    return Prepared(leaves, {"input_ids": ids, **kwargs}, call=run)


# ============================================================================ CLIP, SigLIP


def _token_embedding(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    text = getattr(inner, "text_model", inner)
    embeddings = getattr(text, "embeddings", None)
    module = getattr(embeddings, "token_embedding", None)
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"{type(inner).__name__} has no text token embedding "
                        "(text_model.embeddings.token_embedding)")
    return module


#: Dual encoders whose text tower pools at the last position (SigLIP, SigLIP 2): a padded
#: text would pool at a pad token, so only texts of one length share a pass.
_POOL_AT_END = ("siglip", "siglip2")


def _pools_at_end(model: nn.Module) -> bool:
    return getattr(getattr(unwrap(model), "config", None), "model_type", None) in _POOL_AT_END


def _clip_input(model: nn.Module, images: Sequence[_Image], ids: Tensor,
                mask: Tensor) -> Prepared:
    """Pixels and text embeddings as leaves; the model runs on the ids with the embeddings
    handed to its text tower by a forward hook (they equal the looked-up ones)."""
    device = _device(model)
    pixels, kwargs = _stack(model, images)
    return _hooked(model, _token_embedding(model), ids.to(device), pixels,
                   {"attention_mask": mask.to(device), **kwargs})


def explain_image_text(model: nn.Module, inputs: Any, target: Any = None,
                       composite: Composite | None = None, contrast: Any = None,
                       tokenizer: Any = None, *, record: Sequence[str] = (),
                       batch_size: int = 8) -> ImageTextExplanation | list[ImageTextExplanation]:
    """Explain the image–text similarity of a dual encoder (``CLIPModel``, ``SiglipModel``,
    ``Siglip2Model``): relevance of the pixels and of the text tokens for the pair's
    ``logits_per_image`` entry, in one backward pass.

    Parameters
    ----------
    model : nn.Module
        A ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model``.
    inputs : tuple, dict or list
        A pair ``(image, text)``: a PIL image (with the processor as ``tokenizer``), pixel
        values ``(C, H, W)`` (SigLIP 2: cut into its patches here) or the processor's image
        outputs as a dict, and a text (with a tokenizer or processor) or token ids; or a dict
        with ``pixel_values`` (SigLIP 2: with ``spatial_shapes`` and
        ``pixel_attention_mask``) and ``input_ids``; a list of pairs is a batch (CLIP: texts
        padded on the right; SigLIP pools at the last token, so only texts of one length share
        a pass; each pair gets the relevance it gets alone).
    target, contrast
        Must be ``None``: a pair has one similarity.
    composite : Composite
        The resolved composite.
    tokenizer : processor or tokenizer, optional
        A ``CLIPProcessor`` / ``SiglipProcessor`` (text and images) or a tokenizer (text).
    record : sequence of str
        Module-name patterns whose output relevance is kept.
    batch_size : int
        Pairs per pass.

    Returns
    -------
    ImageTextExplanation or list of ImageTextExplanation
        The image part's relevance is per pixel ``(H, W)``, SigLIP 2's patches put back on
        the picture (:meth:`ImageTextExplanation.patches` sums them per patch).
    """
    if composite is None:
        raise TypeError("explain_image_text needs a resolved composite")
    if target is not None or contrast is not None:
        raise ValueError("an image–text similarity has no target or contrast (got "
                         f"target={target!r}, contrast={contrast!r})")
    text_tokenizer, processor = _parts(tokenizer)
    samples, batched = _batch(inputs)
    pairs = []
    for sample in samples:
        image, text = _pair(sample)
        pairs.append((_image(model, image, processor), _ids(text, text_tokenizer)))
    config = getattr(unwrap(model).config, "text_config", None)
    pad = getattr(config, "pad_token_id", None) or 0
    at_end, layout = _pools_at_end(model), _layout(model)
    keys = [(t.shape[0] if at_end else None,
             tuple(im.pixels.shape) if layout == NAFLEX else None) for im, t in pairs]
    out: list[ImageTextExplanation | None] = [None] * len(pairs)
    for group in _groups(keys, batch_size):
        chunk = [pairs[i] for i in group]
        ids, mask = _pad_ids([t for _, t in chunk], pad)
        item = _clip_input(model, [im for im, _ in chunk], ids, mask)

        def similarity(output: Any) -> Target:
            y = output.logits_per_image.diagonal()
            for value in y.detach().tolist():
                check_finite(value, "similarity")
            return Target(y, y.detach())

        result = attribute(model, item, similarity, composite, record=record,
                           label="similarity")
        pixels, text = result.relevance["pixel_values"], result.relevance["inputs_embeds"]
        if pixels is None or text is None:
            raise ValueError("no relevance reached the image or the text")
        scores = result.target.explained.detach()
        per_image = _unstack(model, [im for im, _ in chunk], pixels.detach())
        for b, (i, (im, t)) in enumerate(zip(group, chunk)):
            n = t.shape[0]
            image_r = _to_grid(model, im, per_image[b], True).cpu()
            text_r = text[b, :n].detach().sum(-1).cpu()
            check_finite(image_r, "relevance")
            check_finite(text_r, "relevance")
            score = float(scores[b])
            label = "similarity of the image and the text"
            common = dict(score=score, target=None, label=label, task=IMAGE_TEXT_SIMILARITY,
                          composite=composite.name, model=model_name(model))
            out[i] = ImageTextExplanation(
                image=Explanation(tokens=None, relevance=image_r,
                                  image=_display(_to_grid(model, im, im.pixels, False)),
                                  **common),
                text=Explanation(tokens=_names(text_tokenizer, t.tolist()), relevance=text_r,
                                 ids=t.tolist(), **common),
                score=score, label=label, task=IMAGE_TEXT_SIMILARITY,
                latent=_latent_row(result.latent, b, len(chunk)), composite=composite.name,
                model=model_name(model))
    return out if batched else out[0]  # type: ignore[return-value]


# ======================================================================= LLaVA, Gemma 3, Qwen-VL


@dataclass
class _Row:
    image: _Image             # the image in the model's layout
    ids: Tensor               # (L,) prompt ids, image placeholders expanded
    token: int | None         # the explained token (None: the prediction)
    contrast: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def _vlm_sample(model: nn.Module, sample: Any, tokenizer: Any) -> tuple[_Image, Tensor]:
    """The image in the model's layout and the prompt ids ``(L,)`` (image tokens expanded)."""
    text_tokenizer, processor = _parts(tokenizer)
    if isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[1], str) \
            and tokenizer is not None and hasattr(tokenizer, "image_processor"):
        image, text = sample
        enc = tokenizer(images=image.convert("RGB") if _is_image(image) else image, text=text,
                        return_tensors="pt")
        return _image(model, enc, None), enc["input_ids"].reshape(-1).cpu()
    image, text = _pair(sample)
    return _image(model, image, processor), _ids(text, text_tokenizer)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _token_types(model: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    """The token types a vision–language model's processor returns beside the ids, derived
    from them: Qwen-VL's ``mm_token_type_ids`` (1 image, 2 video: its M-RoPE positions need
    them) and Gemma 3's ``token_type_ids`` (1 image: image tokens attend to each other both
    ways)."""
    config = unwrap(model).config
    image = getattr(config, "image_token_id", None)
    if image is None:
        return {}
    if _accepts(model, "mm_token_type_ids"):
        types = (ids == image).long()
        video = getattr(config, "video_token_id", None)
        if video is not None:
            types = types + 2 * (ids == video).long()
        return {"mm_token_type_ids": types}
    if getattr(config, "model_type", None) == "gemma3":
        return {"token_type_ids": (ids == image).long()}
    return {}


def _vlm_kwargs(model: nn.Module, ids: Tensor, mask: Tensor | None,
                images: Sequence[_Image]) -> tuple[Tensor, dict[str, Any]]:
    """Pixels and the other arguments of one pass (ids ``(batch, L)`` on the device)."""
    pixels, kwargs = _stack(model, images)
    kwargs.update(_token_types(model, ids))
    if mask is not None:
        kwargs["attention_mask"] = mask
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return pixels, kwargs


def _vlm_input(model: nn.Module, rows: list[_Row]) -> Prepared:
    """Pixels and prompt embeddings as leaves; the model runs on the ids (its image
    placeholders, token types and M-RoPE positions come from them) with the embeddings handed
    over by a hook on its input embedding. Rows of different lengths are padded on the right
    and masked."""
    device = _device(model)
    config = getattr(unwrap(model).config, "text_config", None)
    ids, mask = _pad_ids([r.ids for r in rows], getattr(config, "pad_token_id", None) or 0)
    ragged = len({r.ids.shape[0] for r in rows}) > 1
    ids = ids.to(device)
    pixels, kwargs = _vlm_kwargs(model, ids, mask.to(device) if ragged else None,
                                 [r.image for r in rows])
    return _hooked(model, unwrap(model).get_input_embeddings(), ids, pixels, kwargs)


def _rope_positions(model: nn.Module, ids: Tensor, kwargs: Mapping[str, Any]) -> Tensor | None:
    """The M-RoPE positions a Qwen-VL model computes from the ids (its own ``get_rope_index``),
    for a pass on embeddings; ``None`` for other models."""
    inner = getattr(unwrap(model), "model", None)
    rope_index = getattr(inner, "get_rope_index", None)
    if rope_index is None or "mm_token_type_ids" not in kwargs:
        return None
    names = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask",
             "second_per_grid_ts")
    return rope_index(input_ids=ids, **{k: kwargs[k] for k in names if k in kwargs})[0]


def prepare_image_text(model: nn.Module, inputs: Mapping[str, Any], task: str) -> Prepared:
    """The pixels and the text embeddings of a dict of model inputs (``input_ids``,
    ``pixel_values`` and what the processor returned beside them) as leaves of one pass, for
    :func:`lrp_explicit.audit` and :func:`lrp_explicit.check` on an image–text model.

    A vision–language model runs on the embeddings (both leaves are then arguments of the
    model, where the audit's ledger sees them enter) with what it would derive from the ids
    passed alongside: the token types (Gemma 3, Qwen-VL) and Qwen-VL's M-RoPE positions, from
    its own ``get_rope_index``; its output equals that of the model run on the dict. A dual
    encoder's text tower takes only ids: its embeddings are handed over by a hook."""
    device = _device(model)
    ids = torch.as_tensor(inputs["input_ids"]).to(device)
    ids = ids[None] if ids.dim() == 1 else ids
    pixels = torch.as_tensor(inputs["pixel_values"]).to(device, _dtype(model))
    if _layout(model) == DENSE and pixels.dim() == 3:
        pixels = pixels[None]
    kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()
              if k not in ("input_ids", "pixel_values")}
    if task == IMAGE_TEXT_SIMILARITY:
        return _hooked(model, _token_embedding(model), ids, pixels, kwargs)
    for key, value in _token_types(model, ids).items():
        kwargs.setdefault(key, value)
    if "position_ids" not in kwargs:
        positions = _rope_positions(model, ids, kwargs)
        if positions is not None:
            kwargs["position_ids"] = positions
    if _accepts(model, "use_cache"):
        kwargs.setdefault("use_cache", False)
    embedding = unwrap(model).get_input_embeddings()
    with torch.no_grad():
        text = embedding(_safe_ids(embedding, ids))
    leaves = {"inputs_embeds": make_leaf(text), "pixel_values": make_leaf(pixels)}
    return Prepared(leaves, kwargs, ids=ids.cpu())


def _next_token(rows: list[_Row], tokenizer: Any, size: int):
    def resolve(output: Any) -> Target:
        logits = output.logits
        init = torch.zeros_like(logits)
        for b, row in enumerate(rows):
            k = row.ids.shape[0] - 1
            z = logits[b, k].detach()
            prediction = int(z.argmax())
            token = prediction if row.token is None else row.token
            _, suffix = logit_relevance(
                logits, (b, k), token, row.contrast, lambda i: token_name(tokenizer, i),
                lambda c: token_ids(c, tokenizer, size, "contrast", several=False)[0],
                out=init)
            score = float(init[b, k].double().sum())
            check_finite(score, "score")
            row.info = {"score": score, "target": token, "prediction": prediction,
                        "label": f"next token {token_name(tokenizer, token)}" + suffix}
        return Target(logits, init)

    return resolve


def explain_vision_language(model: nn.Module, inputs: Any, target: Any = None,
                            composite: Composite | None = None, contrast: Any = None,
                            tokenizer: Any = None, *, record: Sequence[str] = (),
                            generate: int | None = None,
                            generation_kwargs: Mapping[str, Any] | None = None,
                            batch_size: int = 8
                            ) -> ImageTextExplanation | list[ImageTextExplanation]:
    """Explain a next token of a vision–language model (LLaVA, Gemma 3, Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL) over the image's pixels and the prompt's tokens together, in one backward pass.

    The model runs on the prompt's ids, with the explained embeddings handed over by a hook on
    its input embedding, so that what it derives from the ids (image placeholders, Qwen's
    M-RoPE positions) stays; the token types a processor returns beside the ids (Qwen's
    ``mm_token_type_ids``, Gemma 3's ``token_type_ids``) are derived from them.

    Parameters
    ----------
    model : nn.Module
        A vision–language ``…ForConditionalGeneration``.
    inputs : tuple, dict or list
        A pair ``(image, prompt)``: with the model's processor as ``tokenizer``, a PIL image
        and the prompt text (with its image placeholder, e.g. ``"USER: <image>\\nWhat is
        shown? ASSISTANT:"``); without one, pixel values ``(C, H, W)`` (Qwen-VL: cut into its
        flattened patches here, as its image processor does) and token ids in which the image
        token already stands once per image feature. A dict with ``pixel_values`` and
        ``input_ids`` (a processor's output, with ``image_grid_thw`` for Qwen-VL) works too. A
        list is a batch (prompts padded on the right and masked).
    target : int or str, optional
        The explained token (an id or a one-token text); default: the model's prediction.
    composite : Composite
        The resolved composite.
    contrast : int, str, optional
        Another token or ``"softmax"`` (the logit difference, or the softmax-style weights).
    tokenizer : processor or tokenizer, optional
        The model's processor (text and images) or its tokenizer (to name tokens).
    record : sequence of str
        Module-name patterns whose output relevance is kept.
    generate : int, optional
        Generate up to ``generate`` tokens (greedy unless ``generation_kwargs`` say otherwise) and
        explain each from the image, the prompt and the tokens generated before it (one
        :class:`ImageTextExplanation` per generated token, all in one pass).
    generation_kwargs : dict, optional
        Further keyword arguments of ``model.generate``.
    batch_size : int
        Rows per pass.

    Returns
    -------
    ImageTextExplanation or list of ImageTextExplanation
        The image part's relevance is per pixel ``(H, W)`` (Qwen-VL's patches put back on the
        picture; :meth:`ImageTextExplanation.patches` sums them per patch), its picture the
        heatmap drawn over the image (:func:`overlay`); the text part leaves the image
        placeholder tokens out.
    """
    if composite is None:
        raise TypeError("explain_vision_language needs a resolved composite")
    target, contrast = plain_spec(target), plain_spec(contrast)
    text_tokenizer, _ = _parts(tokenizer)
    size = vocabulary(model)
    samples, batched = _batch(inputs)
    token = None
    if target is not None:
        if generate is not None:
            raise ValueError("generate= explains the generated tokens: give no target")
        token = token_ids(target, text_tokenizer, size, "target", several=False)[0]
    rows: list[_Row] = []
    for sample in samples:
        image, ids = _vlm_sample(model, sample, tokenizer)
        if generate is None:
            rows.append(_Row(image, ids, token, contrast))
            continue
        if isinstance(generate, bool) or as_index(generate) is None or int(generate) < 1:
            raise ValueError(f"generate must be a positive int, got {generate!r}")
        options = {"max_new_tokens": int(generate), "do_sample": False, **(generation_kwargs or {})}
        prompt = ids[None].to(_device(model))
        pixels, kwargs = _vlm_kwargs(model, prompt, None, [image])
        kwargs.pop("use_cache", None)
        with torch.no_grad():
            out = unwrap(model).generate(input_ids=prompt, pixel_values=pixels,
                                         **kwargs, **options)
        new = [int(i) for i in out[0, ids.shape[0]:].tolist()]
        rows += [_Row(image, torch.cat([ids, torch.tensor(new[:i], dtype=ids.dtype)]), t,
                      contrast) for i, t in enumerate(new)]
    image_token = getattr(unwrap(model).config, "image_token_id", None)
    out_rows: list[ImageTextExplanation] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        result = attribute(model, _vlm_input(model, chunk),
                           _next_token(chunk, text_tokenizer, size), composite, record=record)
        pixels, text = result.relevance["pixel_values"], result.relevance["inputs_embeds"]
        if pixels is None or text is None:
            raise ValueError("no relevance reached the image or the text")
        per_image = _unstack(model, [r.image for r in chunk], pixels.detach())
        for b, row in enumerate(chunk):
            keep = row.ids != image_token if image_token is not None \
                else torch.ones_like(row.ids, dtype=torch.bool)
            n = row.ids.shape[0]
            image_r = _to_grid(model, row.image, per_image[b], True).cpu()
            text_r = text[b, :n].detach().sum(-1).cpu()[keep]
            check_finite(image_r, "relevance")
            check_finite(text_r, "relevance")
            info = row.info
            common = dict(score=info["score"], target=info["target"], label=info["label"],
                          task=IMAGE_TEXT_TO_TEXT, prediction=info["prediction"],
                          composite=composite.name, model=model_name(model))
            kept = row.ids[keep].tolist()
            out_rows.append(ImageTextExplanation(
                image=Explanation(tokens=None, relevance=image_r,
                                  image=overlay(_display(_to_grid(model, row.image,
                                                                  row.image.pixels, False)),
                                                image_r), **common),
                text=Explanation(tokens=_names(text_tokenizer, kept), relevance=text_r,
                                 ids=kept, **common),
                score=info["score"], label=info["label"], task=IMAGE_TEXT_TO_TEXT,
                target=info["target"], prediction=info["prediction"],
                contrast=None if contrast is None else (
                    SOFTMAX if isinstance(contrast, str) and contrast.lower() == SOFTMAX
                    else token_ids(contrast, text_tokenizer, size, "contrast",
                                   several=False)[0]),
                latent=_latent_row(result.latent, b, len(chunk)), composite=composite.name,
                model=model_name(model)))
    return out_rows if batched or generate is not None else out_rows[0]


# a dict of model inputs given to audit / check explains pixels and text together
MAPPING_PREPARERS[IMAGE_TEXT_SIMILARITY] = MAPPING_PREPARERS[IMAGE_TEXT_TO_TEXT] = \
    prepare_image_text
