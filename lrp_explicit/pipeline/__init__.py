"""The one attribution pipeline: inputs → leaves, target → initial relevance, composite, one
forward and one backward pass, relevance read, model restored.

Every entry point (:func:`lrp_explicit.explain`, :func:`lrp_explicit.audit`,
:func:`lrp_explicit.check`, the evaluation tasks and the benchmarks) calls :func:`attribute`;
:mod:`~lrp_explicit.pipeline.inputs` prepares inputs, :mod:`~lrp_explicit.pipeline.targets`
builds targets and their initial relevance.
"""
from .core import (TARGET, Attribution, Observer, Recorder, attribute, check_finite,
                   grad_enabled, resolve_composite)
from .inputs import (TASKS, Prepared, collate, embed, make_leaf, per_sample, prepare,
                     progress, split_batch, task_of)
from .targets import SOFTMAX, Target, TargetSpec, main_output, output_target, tensors

__all__ = ["attribute", "Attribution", "Observer", "Recorder", "resolve_composite",
           "check_finite", "grad_enabled", "TARGET", "Prepared", "prepare", "make_leaf", "embed",
           "task_of", "TASKS", "split_batch", "collate", "per_sample", "progress", "Target",
           "TargetSpec", "SOFTMAX", "main_output", "output_target", "tensors"]
