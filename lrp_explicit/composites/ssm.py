"""State-space and linear-attention families: Mamba, Falcon-Mamba, Mamba 2, the gated delta-nets
(Qwen3-Next, Qwen3.5 and Qwen3.5-MoE, LaraMini),
the hybrids that reuse their mixers (Jamba, Zamba, Bamba, Nemotron-H, Zamba 2, Granite-hybrid,
Falcon-H1) and OLMo-hybrid (a gated delta-net).

The rules follow MambaLRP (Rezaei Jafari et al., NeurIPS 2024): the parameters a selective
layer computes from its own input (the step Δ, B, C and with them the decay ``exp(Δ·A)``; the
gates β and the decay ``g`` of a gated delta-net) are held constant, so the scan is linear in the
signal it carries and the shared op table explains it (ε through the recurrence's sums and
products with constants, the convolution ε, the SiLU gate product uniform under AttnLRP and
the gate constant under CP-LRP, the skip ``D·x`` an ε-sum). ``docs/ssm.md`` has the details.

Only what cannot be found from the model itself is listed here, each entry with the reason
(:data:`MIXERS`, :data:`GATED_NORMS`); single-input norms and activations are found by the
automatic detector, linear layers and the functional code by the shared tables.
"""
from __future__ import annotations

import importlib
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..rules.ssm import GatedNormRule, Held, HeldParametersRule
from .hf import base_rules, check_experts_implementation
from .variants import register_variants

__all__ = ["MIXERS", "GATED_NORMS", "module_rules", "check_mixers"]

_WHY_X_PROJ = ("x_proj is an ordinary linear layer; only the modeling code says that its whole "
               "output is [Δ_low, B, C], the parameters of the scan, not the signal")
_WHY_MAMBA2 = ("Δ is one section of in_proj's output and B, C two sections of the convolution's, "
               "cut by split in the forward; nothing but the modeling code tells the sections "
               "apart")
_WHY_DELTA = ("in_proj_ba (in_proj_b and in_proj_a, b_proj and a_proj) are ordinary linear "
              "layers; only the modeling code says they make β and the decay g; the "
              "l2-normalisation of queries and keys is a function (rsqrt of a sum of squares), "
              "not a module the detector can probe")


def _mamba2_splits(mixer: nn.Module) -> dict[tuple[int, ...], frozenset[int]]:
    groups = mixer.n_groups * mixer.ssm_state_size
    return {
        # gate, x·B·C, Δ = in_proj(x).split(...): Δ held
        (mixer.intermediate_size, mixer.conv_dim, mixer.num_heads): frozenset({2}),
        # x, B, C = split(conv(x·B·C)): B and C held
        (mixer.intermediate_size, groups, groups): frozenset({1, 2}),
    }


def _zamba_splits(mixer: nn.Module) -> dict[tuple[int, ...], frozenset[int]]:
    # Δ_low, B, C = split(x_proj_weight @ x): the whole product is parameters
    sizes = (mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size)
    return {sizes: frozenset({0, 1, 2})}


_WHY_ZAMBA = ("Zamba's x_proj is a weight per head multiplied in the forward, not a module; only "
              "the modeling code says the split of its product is [Δ_low, B, C]")

#: Mamba 1: the whole output of ``x_proj`` is [Δ_low, B, C].
_X_PROJ = Held(children=("x_proj",), why=_WHY_X_PROJ)
#: Mamba 2 and the hybrids that reuse its mixer: Δ, B, C are sections of two splits.
_MAMBA2 = Held(splits=_mamba2_splits, why=_WHY_MAMBA2)


def _delta_net(*children: str) -> Held:
    """A gated delta-net whose β and decay come from ``children`` (the l2-norm of queries and
    keys, ``rsqrt`` of a sum of squares, held as a norm's statistic)."""
    return Held(children=children, outputs=frozenset({torch.rsqrt, torch.Tensor.rsqrt}),
                why=_WHY_DELTA)


_MODELS = "transformers.models."

#: Mixer classes (``module:Class``) and what each computes from its input and holds constant.
MIXERS: dict[str, Held] = {
    _MODELS + "mamba.modeling_mamba:MambaMixer": _X_PROJ,
    _MODELS + "falcon_mamba.modeling_falcon_mamba:FalconMambaMixer": _X_PROJ,
    _MODELS + "jamba.modeling_jamba:JambaMambaMixer": _X_PROJ,
    _MODELS + "zamba.modeling_zamba:ZambaMambaMixer": Held(splits=_zamba_splits, why=_WHY_ZAMBA),
    _MODELS + "mamba2.modeling_mamba2:Mamba2Mixer": _MAMBA2,
    # the hybrids reuse Mamba 2's mixer under their own class names
    _MODELS + "bamba.modeling_bamba:BambaMixer": _MAMBA2,
    _MODELS + "nemotron_h.modeling_nemotron_h:NemotronHMamba2Mixer": _MAMBA2,
    _MODELS + "zamba2.modeling_zamba2:Zamba2MambaMixer": _MAMBA2,
    _MODELS + "granitemoehybrid.modeling_granitemoehybrid:GraniteMoeHybridMambaLayer": _MAMBA2,
    _MODELS + "falcon_h1.modeling_falcon_h1:FalconH1Mixer": _MAMBA2,
    _MODELS + "qwen3_next.modeling_qwen3_next:Qwen3NextGatedDeltaNet": _delta_net("in_proj_ba"),
    _MODELS + "qwen3_5.modeling_qwen3_5:Qwen3_5GatedDeltaNet":
        _delta_net("in_proj_b", "in_proj_a"),
    _MODELS + "qwen3_5_moe.modeling_qwen3_5_moe:Qwen3_5MoeGatedDeltaNet":
        _delta_net("in_proj_b", "in_proj_a"),
    _MODELS + "lara_mini.modeling_lara_mini:LaraMiniGatedDeltaNet":
        _delta_net("in_proj_b", "in_proj_a"),
    _MODELS + "olmo_hybrid.modeling_olmo_hybrid:OlmoHybridGatedDeltaNet":
        _delta_net("b_proj", "a_proj"),
}

#: Gated RMSNorms ``norm(x, gate)``: two inputs, and which one is the gate is a convention of
#: the modeling code, so the detector (which probes single-input modules) cannot find them.
GATED_NORMS: tuple[str, ...] = (
    "transformers.models.mamba2.modeling_mamba2:Mamba2RMSNormGated",
    "transformers.models.bamba.modeling_bamba:BambaRMSNormGated",
    "transformers.models.nemotron_h.modeling_nemotron_h:NemotronHRMSNormGated",
    "transformers.models.zamba2.modeling_zamba2:Zamba2RMSNormGated",
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid:GraniteMoeHybridRMSNormGated",
    "transformers.models.falcon_h1.modeling_falcon_h1:FalconH1RMSNormGated",
    "transformers.models.qwen3_next.modeling_qwen3_next:Qwen3NextRMSNormGated",
    "transformers.models.qwen3_5.modeling_qwen3_5:Qwen3_5RMSNormGated",
    "transformers.models.olmo_hybrid.modeling_olmo_hybrid:OlmoHybridRMSNormGated",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe:Qwen3_5MoeRMSNormGated",
    "transformers.models.lara_mini.modeling_lara_mini:LaraMiniRMSNormGated",
)

#: family -> the model types it serves and the modeling modules it needs
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mamba": (("mamba", "falcon_mamba"), ("mamba", "falcon_mamba")),
    "mamba2": (("mamba2",), ("mamba2",)),
    # hybrids: attention (and MoE) layers beside the mixers take the shared rules
    "jamba": (("jamba",), ("jamba",)),
    "zamba": (("zamba",), ("zamba",)),
    "bamba": (("bamba",), ("bamba",)),
    "nemotron_h": (("nemotron_h",), ("nemotron_h",)),
    "zamba2": (("zamba2",), ("zamba2",)),
    "granitemoehybrid": (("granitemoehybrid",), ("granitemoehybrid",)),
    "falcon_h1": (("falcon_h1",), ("falcon_h1",)),
    "qwen3_next": (("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"),
                   ("qwen3_next", "qwen3_5", "qwen3_5_moe")),
    "lara_mini": (("lara_mini",), ("lara_mini",)),
    "olmo_hybrid": (("olmo_hybrid",), ("olmo_hybrid",)),
}


def _load(spec: str) -> type | None:
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # an older transformers without the class
        return None


def module_rules(cp_lrp: bool, modules: tuple[str, ...] = ()) -> dict[Any, Callable]:
    """The module rules of the state-space families for AttnLRP or CP-LRP (``cp_lrp``):
    :func:`~lrp_explicit.composites.hf.base_rules`, the mixers of :data:`MIXERS` (those of the
    transformers modeling ``modules``, all if empty) and the gated norms."""
    table: dict[Any, Callable] = base_rules(cp_lrp)
    wanted = tuple(f"transformers.models.{m}." for m in modules)
    for spec, held in MIXERS.items():
        cls = _load(spec) if not wanted or spec.startswith(wanted) else None
        if cls is not None:
            table[cls] = partial(HeldParametersRule, held=held)
    for spec in GATED_NORMS:
        cls = _load(spec) if not wanted or spec.startswith(wanted) else None
        if cls is not None:
            table[cls] = partial(GatedNormRule, hold_gate=cp_lrp)
    return table


def check_mixers(model: nn.Module) -> None:
    """Refuse a model with a selective mixer this module does not know (a module with an
    ``A_log`` parameter, the log of the decay every such mixer has, of a class not in
    :data:`MIXERS`, e.g. from another transformers version) or whose held children are missing:
    its input-dependent parameters would silently take relevance. Also checks the experts
    implementation (:func:`~lrp_explicit.composites.hf.check_experts_implementation`)."""
    check_experts_implementation(model)
    known = {cls: held for cls, held in ((_load(spec), held) for spec, held in MIXERS.items())
             if cls is not None}
    for name, module in model.named_modules():
        if "A_log" not in module._parameters:
            continue
        held = known.get(type(module))
        if held is None:
            raise UnsupportedModelError(
                f"{name} ({type(module).__name__}) computes state-space parameters from its "
                "input, and no rule knows where: lrp_explicit.composites.ssm.MIXERS has no entry "
                "for this class")
        missing = [c for c in held.children if not isinstance(getattr(module, c, None), nn.Module)]
        if missing:
            raise UnsupportedModelError(
                f"{name} ({type(module).__name__}) has no child {missing[0]!r}, where its "
                "parameters are held (a different transformers version?)")


for _family, (_types, _modules) in FAMILIES.items():
    register_variants(_family, partial(module_rules, modules=_modules), model_types=_types,
                      validate=check_mixers)
