"""What a composite checks before it binds: PEFT adapters, accelerate's offloading hooks and
quantised weights.

The rules see an adapter through the modules and ops it runs: a LoRA layer is its base
``nn.Linear`` plus the linear maps ``lora_B ∘ lora_A`` added to it, and every one of them gets
the ε-rule, so that the relevance equals the merged model's (``merge_and_unload``). This holds
for the PEFT kinds in :data:`VERIFIED_ADAPTERS` (each is checked against its merged model in
the tests); any other PEFT layer, and prompt learning (virtual tokens that are no input), is
refused by :func:`check_adapters` with the module it found.

Offloaded weights (accelerate's ``cpu_offload``, ``disk_offload``, ``device_map`` with
``"cpu"``/``"disk"``) live on the meta device between forwards; the hook of their module loads
them for its forward, and the rules run inside that hook (:func:`loads_weights`), so they are
accepted. Quantised weights are tensor subclasses: those of :data:`VERIFIED_QUANTISERS` are
explained with the ε-rule on the layer's own output (one vector-Jacobian product of the
quantised layer); others are refused by :func:`check_quantised`.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import CompositeError

__all__ = ["VERIFIED_ADAPTERS", "VERIFIED_QUANTISERS", "adapter_kind", "check_adapters",
           "loads_weights", "check_quantised"]

#: PEFT tuner kinds (``peft.tuners.<kind>``) whose layers the rules explain exactly: the
#: relevance equals that of the merged model (LoRA includes rsLoRA and DoRA).
VERIFIED_ADAPTERS = frozenset({"lora", "ia3", "loha", "lokr", "vera", "boft", "oft",
                               "fourierft", "randlora", "shira", "vblora", "miss", "ln_tuning"})

#: Libraries whose quantised weight tensors the ε-rule explains through the layer's own
#: output (a vector-Jacobian product of the quantised layer in the backward).
VERIFIED_QUANTISERS = frozenset({"torchao", "optimum.quanto"})

_PEFT_TUNERS = "peft.tuners."


def adapter_kind(module: nn.Module) -> str | None:
    """The PEFT tuner kind of an adapter layer (``"lora"``, ``"ia3"``, …), else ``None``."""
    where = type(module).__module__
    if not where.startswith(_PEFT_TUNERS) or not hasattr(type(module), "adapter_layer_names"):
        return None
    return where[len(_PEFT_TUNERS):].split(".", 1)[0]


def check_adapters(model: nn.Module) -> None:
    """Refuse PEFT adapters the rules cannot explain exactly.

    Raises
    ------
    CompositeError
        For prompt learning (prefix, prompt or p-tuning: virtual tokens that carry relevance
        but are no input) and for a PEFT layer whose kind is not in
        :data:`VERIFIED_ADAPTERS`, naming the module; merging the adapter
        (``model.merge_and_unload()``) gives a model that can be explained.
    """
    config = _peft_config(model)
    if config is not None and getattr(config, "is_prompt_learning", False):
        kind = getattr(getattr(config, "peft_type", None), "value", None) or type(config).__name__
        raise CompositeError(
            f"{type(model).__name__} uses prompt learning ({kind}): its virtual tokens would "
            "take relevance that no input token gets; explain the base model "
            "(model.get_base_model()) or an adapter kind that can be merged")
    for name, module in model.named_modules():
        kind = adapter_kind(module)
        if kind is not None and kind not in VERIFIED_ADAPTERS:
            raise CompositeError(
                f"module {name!r} is a PEFT {kind!r} adapter layer ({type(module).__name__}), "
                "which the rules are not verified for (supported: "
                f"{', '.join(sorted(VERIFIED_ADAPTERS))}); merge it first: "
                "model = model.merge_and_unload()")


def _peft_config(model: nn.Module) -> Any:
    if not type(model).__module__.startswith("peft."):
        return None
    try:
        return model.active_peft_config
    except (AttributeError, KeyError, ValueError):
        return None


def loads_weights(module: nn.Module) -> bool:
    """True if an accelerate hook on ``module`` loads its offloaded weights for its forward."""
    hook = module.__dict__.get("_hf_hook")
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return any(getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None
               for h in hooks)


def check_quantised(model: nn.Module) -> None:
    """Refuse weights quantised by a library the rules are not verified for.

    A weight is quantised when it is a tensor subclass (not ``Tensor`` / ``nn.Parameter``)
    defined outside torch.

    Raises
    ------
    CompositeError
        Naming the module, the weight's class and its library.
    """
    for name, module in model.named_modules():
        for key, param in module._parameters.items():
            if param is None or type(param) in (Tensor, nn.Parameter):
                continue
            where = type(param).__module__
            if where.split(".", 1)[0] == "torch" or any(
                    where == v or where.startswith(v + ".") for v in VERIFIED_QUANTISERS):
                continue
            library = where.split(".", 1)[0]
            raise CompositeError(
                f"module {name or '<root>'!r} holds {key!r} as a {type(param).__name__} of "
                f"{library!r}, a quantiser the rules are not verified for (supported: "
                f"{', '.join(sorted(VERIFIED_QUANTISERS))}); quantise with one of them or "
                "explain the unquantised model")
