"""Rules found from a module itself: is a module of unknown class a norm?

:func:`classify` probes a leaf module's own forward; :class:`Detector` is the module-rule
fallback a :class:`~lrp_explicit.Composite` consults (``detect=``) for a module no table names.
Every composite built by :func:`~lrp_explicit.composites.variants.variant` has one, so the
registered families and the automatic composite (:mod:`~lrp_explicit.composites.auto`) find
norms the same way.
"""
from __future__ import annotations

import inspect
import threading
from functools import partial

import torch
from torch import Tensor, nn

from .. import dispatch, rules
from .base import RuleFactory

__all__ = ["classify", "Detector"]



_PROBE_SHAPE = (2, 3)  # batch and positions of a probe input; the last dimension is the width
_FREE_WIDTH = 16  # width of the probe for modules without weights
# relative tolerances of the invariance tests; modeling code often computes a norm's statistic
# in float32 whatever the model's precision (LLaMA's RMSNorm), hence 1e-5 in float64
_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


def _single_input(module: nn.Module) -> bool:
    """True if ``module.forward`` takes exactly one tensor argument (and nothing else)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _probe(module: nn.Module, x: Tensor, shape: tuple[int, ...] | None = None) -> Tensor | None:
    """``module.forward(x)`` without gradients, or ``None`` if it fails or returns no finite
    tensor of ``shape`` (by default the input's)."""
    try:
        with torch.no_grad():
            y = module.forward(x)
    except Exception:  # noqa: BLE001 - any failure means "not this kind of module"
        return None
    expected = x.shape if shape is None else shape
    if not isinstance(y, Tensor) or tuple(y.shape) != tuple(expected) \
            or not torch.isfinite(y).all():
        return None
    return y


def _close(a: Tensor, b: Tensor, tolerance: float) -> bool:
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return bool(((a - b).abs().max() / scale) <= tolerance)


def _norm_kind(module: nn.Module, width: int, dtype: torch.dtype, device: torch.device,
               generator: torch.Generator) -> str | None:
    """``"layer"`` or ``"rms"`` if ``module`` behaves as a norm over the last dimension.

    A norm's output does not change when its input is scaled (probed at a magnitude where the
    stabilising ``eps`` is negligible), yet changes when the input changes; a LayerNorm's is
    also unchanged by a shift of every element. A saturated element-wise function (``tanh`` of
    a large input) passes the first test and fails the second.
    """
    tolerance = _TOLERANCE[dtype]
    x = torch.randn(*_PROBE_SHAPE, width, generator=generator, dtype=torch.float64) * 1e3
    x = x.to(device=device, dtype=dtype)
    y = _probe(module, x)
    if y is None or y.abs().max() == 0:
        return None
    scaled = _probe(module, x * 2.5)
    if scaled is None or not _close(scaled, y, tolerance):
        return None
    nudge = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x) * 10.0
    moved = _probe(module, x + nudge)
    if moved is None or _close(moved, y, 1e-3):
        return None
    shifted = _probe(module, x + 1e3)
    return "layer" if shifted is not None and _close(shifted, y, tolerance) else "rms"


def _is_statistic(module: nn.Module, width: int, dtype: torch.dtype, device: torch.device,
                  generator: torch.Generator) -> bool:
    """True if ``module`` returns a scale statistic of its input over the last dimension (one
    value per row, the standard deviation or its inverse): scaling the input by ``c`` scales
    the output by ``c`` or ``1 / c``. Modeling code multiplies the input by it to normalise."""
    x = torch.randn(*_PROBE_SHAPE, width, generator=generator, dtype=torch.float64) * 1e3
    x = x.to(device=device, dtype=dtype)
    shape = (*_PROBE_SHAPE, 1)
    y, scaled = _probe(module, x, shape), _probe(module, x * 2.5, shape)
    if y is None or scaled is None or y.abs().min() == 0:
        return False
    tolerance = _TOLERANCE[dtype]
    return _close(scaled, y * 2.5, tolerance) or _close(scaled, y / 2.5, tolerance)


def _is_elementwise(module: nn.Module, dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator) -> bool:
    """True if ``module`` maps each element of its input on its own (the probe of foreign
    autograd Functions, :func:`lrp_explicit.dispatch.proves_elementwise`) and is not the
    identity."""
    x = torch.randn(*_PROBE_SHAPE, _FREE_WIDTH, generator=generator, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    y = _probe(module, x)
    return y is not None and not torch.equal(y, x) \
        and dispatch.proves_elementwise(module.forward, x)


def classify(module: nn.Module, seed: int = 0) -> str | None:
    """What a module of unknown class is, found from its weights and its forward.

    Parameters
    ----------
    module : nn.Module
        A leaf module (one without child modules).
    seed : int
        Seed of the probe inputs.

    Returns
    -------
    str or None
        ``"layer"`` (a centring norm: LayerNorm rule), ``"rms"`` (a scaling norm: RMSNorm
        rule), ``"statistic"`` (a module without weights returning the standard deviation of
        its input's rows or its inverse, by which modeling code then scales the input: held
        constant, as the constant-std rule holds a norm's), ``"elementwise"`` (an activation)
        or ``None`` (left to the op table: its functional calls are ruled one by one).

    Notes
    -----
    Only modules whose ``forward`` takes one tensor are probed, on a copy-free call of their
    own ``forward`` without gradients (hooks do not run). A norm has 1-D weights of one width
    (or none); an activation has no weights beyond scalars. Weights on the meta device
    (offloaded) or in a precision too coarse to probe are judged by the class name alone
    (``…RMSNorm``, ``…LayerNorm``).
    """
    if next(module.children(), None) is not None or not _single_input(module):
        return None
    params = [p for p in module.parameters(recurse=False)]
    tensors = params + [b for b in module.buffers(recurse=False) if b.is_floating_point()]
    if any(t.is_meta for t in tensors) or any(t.dtype not in _TOLERANCE for t in tensors):
        return _kind_by_name(module) if _norm_shaped(params) else None
    dtype = tensors[0].dtype if tensors else torch.float64
    device = tensors[0].device if tensors else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    if _norm_shaped(params):
        width = params[0].shape[0] if params else _declared_width(module)
        kind = _norm_kind(module, width, dtype, device, generator)
        if kind is not None:
            return kind
        if not params and _is_statistic(module, width, dtype, device, generator):
            return "statistic"
    if all(p.numel() == 1 for p in params) and _is_elementwise(module, dtype, device, generator):
        return "elementwise"
    return None


def _declared_width(module: nn.Module) -> int:
    """The width a module without weights says it normalises (``normalized_shape``), or a
    probe width."""
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    return _FREE_WIDTH


def _norm_shaped(params: list[Tensor]) -> bool:
    """Weights a norm over the last dimension can have: none, or 1-D ones of one width."""
    return all(p.dim() == 1 for p in params) and len({p.shape[0] for p in params}) <= 1


def _kind_by_name(module: nn.Module) -> str | None:
    try:
        return rules.NormRule.infer_kind(module)
    except TypeError:
        return None


class Detector:
    """The module-rule fallback of the automatic composite: the norm rule for a module whose
    class is in no table and that :func:`classify` finds to be a norm (cached per class and
    weight layout), and the stop rule for a module returning a norm's statistic (its output is
    held constant). Activation classes come from the tables of :func:`known_rules`;
    element-wise modules of other classes stay under the op table.

    Parameters
    ----------
    cp_lrp : bool
        CP-LRP (no effect on norms and activations; kept for the repr).
    """

    def __init__(self, cp_lrp: bool) -> None:
        self.cp_lrp = cp_lrp
        self._cache: dict[tuple, RuleFactory | None] = {}
        self._lock = threading.Lock()
        #: what was found, by class name (shown by :meth:`found`)
        self.kinds: dict[str, str] = {}

    def __call__(self, name: str, module: nn.Module) -> RuleFactory | None:
        layout = tuple((k, tuple(p.shape)) for k, p in module._parameters.items()
                       if p is not None)
        key = (type(module), layout)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        kind = classify(module)
        factory: RuleFactory | None
        # an element-wise module of unknown class keeps its functional calls under the op table
        # (identity for its activations, uniform for its products: the same relevance), so a
        # custom autograd Function inside it is still seen and named
        if kind in ("layer", "rms"):
            factory = partial(rules.NormRule, kind=kind)
        elif kind == "statistic":
            factory = rules.StopRule
        else:
            factory = None
        with self._lock:
            self._cache[key] = factory
            if factory is not None:
                self.kinds[type(module).__name__] = kind
        return factory

    def found(self) -> dict[str, str]:
        """The module classes found so far and what they were found to be."""
        return dict(self.kinds)
