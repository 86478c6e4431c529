"""Moved to :mod:`lrp_explicit.evaluation.vision`; this alias keeps old imports working.

``from lrp_explicit import vision_task as vt`` gives the very objects of
:mod:`lrp_explicit.evaluation.vision` (``vt.make_batch``, ``vt.load_model``, ``vt.explain``,
``vt.CLASSES`` …). New code imports ``from lrp_explicit.evaluation import vision``.
"""
from .evaluation.vision import *  # noqa: F401,F403
from .evaluation.vision import (CLASSES, GLYPH, IMAGE_SIZE, MEAN, METHODS,  # noqa: F401
                                RANDOM_BASELINE, STD, TaskConfig, accuracy, box_mask,
                                build_model, cache_dir, evaluate, explain, gamma_composite,
                                load_model, make_batch, normalize, relevance_mass_accuracy,
                                train)
from .evaluation.vision import __all__  # noqa: F401
