"""Evaluation: synthetic tasks with ground truth, and faithfulness metrics.

- :mod:`~lrp_explicit.evaluation.vision` — 32×32 images of glyphs, one of which decides the
  class (its box is the ground truth), a tiny torchvision ViT trained on them, and the
  relevance mass accuracy of pixel heatmaps (formerly ``lrp_explicit.vision_task``, which
  still imports);
- :mod:`~lrp_explicit.evaluation.text` — subject–verb agreement with attractors (the subject is
  the ground truth), tiny LLaMA, GPT-2 and BERT models trained on it, and the contrastive verb
  logit difference explained for a whole batch in one pass;
- :mod:`~lrp_explicit.evaluation.metrics` — token metrics against a ground truth (PG2, MRR,
  RMA, PTA) and helpers for token deletion curves (MoRF / LeRF, AUC).

Every explanation here runs through :func:`lrp_explicit.pipeline.attribute`. The benchmark
``benchmarks/faithfulness.py`` and the example ``examples/vision_task_rma.py`` use these
modules.
"""
from . import metrics, text, vision
from .metrics import (best_rank, curve_on_grid, deleted_inputs, deletion_auc, deletion_order,
                      mass_accuracy, pointing_game, ranks, reciprocal_rank, sign_agreement,
                      token_metrics)

__all__ = ["metrics", "text", "vision", "token_metrics", "pointing_game", "reciprocal_rank",
           "mass_accuracy", "sign_agreement", "ranks", "best_rank", "deletion_order",
           "deleted_inputs", "deletion_auc", "curve_on_grid"]
