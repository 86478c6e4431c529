"""Moved: the task of a model and input preparation are in :mod:`lrp_explicit.pipeline` (one
pipeline for every entry point). This module keeps the old imports working."""
from ..pipeline.inputs import TASKS, task_of

__all__ = ["TASKS", "task_of"]
