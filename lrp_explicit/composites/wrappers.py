"""Models inside wrappers: what family detection and the pipeline look through.

A *transparent* wrapper runs the model it holds with the same arguments and returns its output:
``nn.DataParallel`` and ``DistributedDataParallel`` (``.module``), a compiled module
(``torch.compile``: ``._orig_mod``) and a PEFT model (``.base_model.model``). :func:`unwrap`
returns the model inside them. Any other module that holds Hugging Face models (a user's
``nn.Module`` calling one) is not transparent, but its family is theirs: :func:`hf_models` finds
them.
"""
from __future__ import annotations

from torch import nn

__all__ = ["unwrap", "hf_models", "model_type"]


def _inner(model: nn.Module) -> nn.Module | None:
    """The model a transparent wrapper runs, or ``None``."""
    children = model._modules
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return children.get("module")
    if "_orig_mod" in children and type(model).__name__ == "OptimizedModule":
        return children["_orig_mod"]
    if type(model).__name__.startswith("Peft"):
        base = children.get("base_model")
        # A tuner (LoraModel …) holds the model as ``.model``; with prompt learning the base
        # model is the Hugging Face model itself.
        tuner = isinstance(base, nn.Module) and type(base).__module__.startswith("peft.")
        inner = base._modules.get("model") if tuner else None
        return inner if inner is not None else base
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside transparent wrappers (``DataParallel``, ``DistributedDataParallel``,
    ``torch.compile``, PEFT), or ``model`` itself."""
    seen = {id(model)}
    while True:
        inner = _inner(model)
        if inner is None or id(inner) in seen:
            return model
        seen.add(id(inner))
        model = inner


def model_type(module: nn.Module) -> str | None:
    """``config.model_type`` of a Hugging Face model (its own config, not one a wrapper
    forwards), else ``None``."""
    config = module.__dict__.get("config")
    kind = getattr(config, "model_type", None)
    return kind if isinstance(kind, str) and kind else None


def hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost Hugging Face models in ``model`` (itself, or modules inside it that are
    not inside another one), with their qualified names (``""`` for ``model``)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name == f or name.startswith(f + ".") for f, _ in found if f) \
                or (found and found[0][0] == ""):
            continue
        if model_type(module) is not None:
            found.append((name, module))
    return found
