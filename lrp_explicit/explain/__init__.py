"""``explain()``: explain one prediction (or a batch) of a model and return an
:class:`Explanation` that renders itself as a heatmap.

The task follows the model's head (:func:`task_of`): a causal LM explains the next token (or a
given token, or a given continuation), a masked LM the token at the ``[MASK]``, a sequence or
image classifier a class, a sentence encoder (a Hugging Face base model) the cosine similarity
of two texts after pooling. The relevance is initialised with the explained logit (the explicit
convention: after ``y.backward(y)`` the gradient of an input *is* its relevance) and summed per
token (``inputs_embeds``) or per pixel (``pixel_values``, over the channels).

With ``generate=N`` a causal LM generates and each generated token is explained from the
tokens before it (:class:`GenerationExplanation`, :mod:`~lrp_explicit.explain.generate`); a
batch gives an :class:`ExplanationBatch`. Every result knows the text of its tokens and their
words (:mod:`~lrp_explicit.explain.words`), shows itself in notebooks, terminals and files, and
saves as a record that :func:`load` reads back (:mod:`~lrp_explicit.explain.store`).

Every result also holds the relevance of each latent unit (MLP neurons, attention heads,
residual-stream dimensions: ``units``, ``top_units()``, ``latent_view()`` → a
:class:`LatentView`); ``explain(..., target={module: units})`` explains units instead of a
logit and ``condition=`` keeps only the relevance that flows through chosen units
(:mod:`~lrp_explicit.explain.units`, on the machinery of :mod:`lrp_explicit.latent`).

Encoder–decoders (T5: :mod:`~lrp_explicit.explain.seq2seq`) and image–text models (CLIP,
LLaVA: :mod:`~lrp_explicit.explain.multimodal`, whose results are
:class:`ImageTextExplanation`) are explained by their own modules, which
:mod:`~lrp_explicit.explain.tasks` hands them to.

``core`` runs the explanation through :func:`lrp_explicit.pipeline.attribute`; ``result``
holds the result classes. Inputs and targets are prepared by :mod:`lrp_explicit.pipeline`.
"""
from ..pipeline import SOFTMAX, TASKS, task_of
from .core import cosine, explain, mean_pool
from .multimodal import ImageTextExplanation, overlay
from .result import Explanation, ExplanationBatch, GenerationExplanation
from .store import load
from .units import LatentView
from .words import TokenText

__all__ = ["explain", "Explanation", "ExplanationBatch", "GenerationExplanation", "load",
           "TokenText", "task_of", "TASKS", "SOFTMAX", "mean_pool", "cosine",
           "ImageTextExplanation", "overlay", "LatentView"]
