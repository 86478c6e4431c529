"""Public names of 0.1.0 keep working after the restructuring of 0.2.0: every name that a module
listed in ``__all__`` then is importable from the same module now (some are re-exports of their
new home, e.g. ``lrp_explicit.vision_task`` of ``lrp_explicit.evaluation.vision``)."""
from __future__ import annotations

import importlib

import pytest

#: ``__all__`` of every module of lrp_explicit 0.1.0 (read from its source).
PUBLIC_0_1 = {'lrp_explicit': ['ABSORBERS', 'AuditReport', 'CheckResult', 'Composite',
                  'CompositeError',
                  'Explanation', 'UnruledOpError', 'UnruledOpWarning', '__version__', 'audit',
                  'check', 'composites', 'explain', 'functional', 'ops', 'rules', 'testing',
                  'zero_bias'],
 'lrp_explicit.audit': ['ABSORBERS', 'AuditReport', 'CheckResult', 'INPUTS', 'Leak',
                        'ModuleRecord', 'ROOT', 'TARGET', 'UnruledOp', 'audit', 'check',
                        'documented', 'zero_bias'],
 'lrp_explicit.cli': ['CLIError', 'COMMANDS', 'build_parser', 'main'],
 'lrp_explicit.composites': ['Composite', 'CompositeError', 'UnknownModelError', 'available',
                             'carrier', 'family_of', 'get', 'register', 'unregister'],
 'lrp_explicit.composites.base': ['Composite', 'CompositeError'],
 'lrp_explicit.composites.generic': ['ACTIVATIONS', 'attnlrp', 'cp_lrp', 'module_rules'],
 'lrp_explicit.composites.hf': ['base_rules', 'check_experts_implementation',
                                'register_family'],
 'lrp_explicit.composites.torchvision_vit': ['attnlrp', 'cp_lrp'],
 'lrp_explicit.dispatch': ['RuleMode', 'UnruledOpError', 'UnruledOpWarning', 'op_name'],
 'lrp_explicit.explain': ['Explanation', 'SOFTMAX', 'TASKS', 'cosine', 'explain', 'mean_pool',
                          'task_of'],
 'lrp_explicit.explain.core': ['cosine', 'explain', 'mean_pool'],
 'lrp_explicit.explain.inputs': ['TASKS', 'task_of'],
 'lrp_explicit.explain.result': ['Explanation'],
 'lrp_explicit.functional': ['DEFAULT_EPSILON', 'add_epsilon', 'addmm_epsilon',
                             'bilinear_uniform', 'default_epsilon', 'identity', 'layer_norm',
                             'linear_epsilon', 'matmul_uniform', 'mean_epsilon', 'mul_uniform',
                             'rms_norm', 'scaled_dot_product_attention', 'softmax', 'stabilize',
                             'stop', 'sum_epsilon'],
 'lrp_explicit.heatmaps': ['RenderError', 'clean_tokens', 'colour', 'html_page', 'latex',
                           'normalise', 'pdf', 'png', 'terminal'],
 'lrp_explicit.ops': ['ATTNLRP_OPS', 'CPLRP_OPS', 'GATE_ATTR', 'Handler', 'NoRule', 'OP_NAMES',
                      'PASS_THROUGH', 'name_transformers_ops', 'on_path'],
 'lrp_explicit.rules': ['EpsilonRule', 'IdentityRule', 'MultiheadAttentionRule', 'NormRule',
                        'PassRule', 'Rule', 'SoftmaxRule', 'StopRule', 'UniformEpsilonRule',
                        'UniformRule', 'zennit_hooked'],
 'lrp_explicit.testing': ['assert_conserves'],
 'lrp_explicit.vision_task': ['CLASSES', 'GLYPH', 'IMAGE_SIZE', 'METHODS', 'RANDOM_BASELINE',
                              'TaskConfig', 'accuracy', 'box_mask', 'build_model', 'cache_dir',
                              'evaluate', 'explain', 'gamma_composite', 'load_model',
                              'make_batch', 'normalize', 'relevance_mass_accuracy', 'train']}


@pytest.mark.parametrize("module", sorted(PUBLIC_0_1))
def test_old_public_names_import(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC_0_1[module] if not hasattr(mod, name)]
    assert missing == []


def test_moved_names_are_the_new_objects():
    from lrp_explicit import errors, pipeline, vision_task
    from lrp_explicit.composites import base
    from lrp_explicit.evaluation import vision
    from lrp_explicit.explain import inputs

    assert base.CompositeError is errors.CompositeError
    assert importlib.import_module("lrp_explicit.dispatch").UnruledOpError is errors.UnruledOpError
    assert inputs.task_of is pipeline.task_of and inputs.TASKS is pipeline.TASKS
    assert vision_task.make_batch is vision.make_batch
