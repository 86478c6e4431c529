"""Evaluation: synthetic tasks with ground truth, and faithfulness metrics.

- :mod:`~lrp_explicit.evaluation.vision` — 32×32 images of glyphs, one of which decides the
  class (its box is the ground truth), a tiny torchvision ViT trained on them, and the
  relevance mass accuracy of pixel heatmaps (formerly ``lrp_explicit.vision_task``, which
  still imports);
- :mod:`~lrp_explicit.evaluation.text` — subject–verb agreement with attractors (the subject is
  the ground truth), tiny LLaMA, GPT-2 and BERT models trained on it, and the contrastive verb
  logit difference explained for a whole batch in one pass;
- :mod:`~lrp_explicit.evaluation.marked` — agreement with a *marked* noun among attractors and
  same-number distractors: a harder task on which no method is at the ceiling (the marker and
  the marked noun are the ground truth), with Integrated Gradients among the baselines;
- :mod:`~lrp_explicit.evaluation.metrics` — token metrics against a ground truth (PG2, MRR,
  RMA, PTA) and the building blocks of perturbation curves (deletion and insertion, MoRF /
  LeRF, replacement embeddings, AUC, the area between the curves);
- :mod:`~lrp_explicit.evaluation.results` — :func:`evaluate` (also
  ``lrp_explicit.evaluate``): all of those metrics on a dataset of explanations (a run of
  :func:`lrp_explicit.explain_dataset`), with a table and a plot;
- :mod:`~lrp_explicit.evaluation.ablation` — :func:`ablate` (also ``lrp_explicit.ablate``):
  remove the latent units an explanation finds most relevant, and as many random ones, and
  compare the change of the explained score.

Every explanation here runs through :func:`lrp_explicit.pipeline.attribute`. The benchmark
``benchmarks/faithfulness.py`` and the example ``examples/vision_task_rma.py`` use these
modules.
"""
from . import ablation, metrics, results, text, vision
from .ablation import Ablation, ablate
from .metrics import (area_between, best_rank, curve_on_grid, deleted_inputs, deletion_auc,
                      deletion_order, inserted_inputs, mass_accuracy, perturbed_embeddings,
                      pointing_game, random_orders, ranks, reciprocal_rank, sign_agreement,
                      token_metrics)
from .results import Evaluation, compare, evaluate, replacement_embedding

__all__ = ["metrics", "results", "text", "marked", "vision", "ablation", "evaluate", "Evaluation",
           "compare", "ablate", "Ablation",
           "replacement_embedding", "token_metrics", "pointing_game", "reciprocal_rank",
           "mass_accuracy", "sign_agreement", "ranks", "best_rank", "deletion_order",
           "deleted_inputs", "inserted_inputs", "perturbed_embeddings", "area_between",
           "random_orders", "deletion_auc", "curve_on_grid"]
