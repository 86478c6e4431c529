"""``explain()``: explain one prediction (or a batch) of a model and return an
:class:`Explanation` that renders itself as a heatmap.

The task follows the model's head (:func:`task_of`): a causal LM explains the next token (or a
given token, or a given continuation), a masked LM the token at the ``[MASK]``, a sequence or
image classifier a class, a sentence encoder (a Hugging Face base model) the cosine similarity
of two texts after pooling. The relevance is initialised with the explained logit (the explicit
convention: after ``y.backward(y)`` the gradient of an input *is* its relevance) and summed per
token (``inputs_embeds``) or per pixel (``pixel_values``, over the channels).

``core`` runs the explanation through :func:`lrp_explicit.pipeline.attribute`; ``result``
holds :class:`Explanation`. Inputs and targets are prepared by :mod:`lrp_explicit.pipeline`.
"""
from ..pipeline import SOFTMAX, TASKS, task_of
from .core import cosine, explain, mean_pool
from .result import Explanation

__all__ = ["explain", "Explanation", "task_of", "TASKS", "SOFTMAX", "mean_pool", "cosine"]
