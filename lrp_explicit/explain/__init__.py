"""``explain()``: explain one prediction (or a batch) of a model and return an
:class:`Explanation` that renders itself as a heatmap.

The task follows the model's head (:func:`task_of`): a causal LM explains the next token (or a
given token, or a given continuation), a masked LM the token at the ``[MASK]``, a sequence or
image classifier a class, a sentence encoder (a Hugging Face base model) the cosine similarity
of two texts after pooling. The relevance is initialised with the explained logit (the explicit
convention: after ``y.backward(y)`` the gradient of an input *is* its relevance) and summed per
token (``inputs_embeds``) or per pixel (``pixel_values``, over the channels).

``inputs`` prepares inputs, ``targets`` the initial relevance, ``result`` holds
:class:`Explanation`, ``core`` runs the explanation.
"""
from .core import cosine, explain, mean_pool
from .inputs import TASKS, task_of
from .result import Explanation
from .targets import SOFTMAX

__all__ = ["explain", "Explanation", "task_of", "TASKS", "SOFTMAX", "mean_pool", "cosine"]
