"""Op-level rule dispatch: a ``TorchFunctionMode`` active only inside registered models.

While a module of a registered model runs its forward (and only then), a
:class:`RuleMode` is on this thread's torch-function mode stack. It sees every functional call
and routes those with a tensor argument on the relevance path (one that requires grad:
parameters are frozen at registration) to the handler that the composite's op table names
(:mod:`lrp_explicit.ops`). Layout ops pass through. Any other call whose output lands on the
relevance path is an *unruled op*: a warning once per (op, module path), or
:class:`UnruledOpError` in strict mode. A foreign ``torch.autograd.Function`` (one not defined in
torch, lrp_explicit or zennit) is invisible to the mode as a call; it is found through the
``grad_fn`` of its output when that output reaches an op, a module or a module's return value of
a registered model: one proven element-wise by a probe gets the identity rule (a hook on that
node), any other is reported as the unruled op ``<Function>.apply``. Outputs of op handlers
and module rules are trusted: a user-defined rule may well be a custom Function. Before an
in-place op on the relevance path, what a rule saved of the updated tensor is copied
(:func:`lrp_explicit.functional.preserve_saved`).

Entering and leaving modules is tracked by global module hooks (installed while at least one
composite is registered). Each thread keeps its own stack of frames, so other threads and other
models are untouched. Inside a module bound to a module-level rule, inside a module of a model
without composite, and inside opaque modules, the dispatch is suspended.

PyTorch runs the ``always_call`` forward hook that pops a frame only when a forward raises an
``Exception``; a ``KeyboardInterrupt`` (or any other ``BaseException``) skips it. Frames left
behind that way are dropped by whoever is in charge of the pass: :func:`unwind` (the pipeline's
``finally``), :func:`drop` (``Composite.remove``), and on the next entry into the same model's
root. Frames of a composite that was removed meanwhile (in another thread) are dead: the mode
passes every call through unchanged and the next module entry of that thread clears them.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import torch
from torch import nn
from torch.nn.modules import module as _module_mod
from torch.overrides import TorchFunctionMode

from .errors import CompositeError, UnruledOpError, UnruledOpWarning
from .functional import preserve_saved
from .ops import INPLACE, OP_NAMES, PASS_THROUGH, Handler, NoRule

__all__ = ["UnruledOpError", "UnruledOpWarning", "RuleSource", "RuleMode", "op_name", "bind",
           "unbind", "enter", "leave", "hooks_installed", "warn_unruled", "owner", "depth",
           "unwind", "drop", "TRUSTED_FUNCTION_MODULES", "proves_elementwise"]


class RuleSource(Protocol):
    """What the dispatch needs from a composite (:class:`lrp_explicit.Composite` implements it).

    Attributes
    ----------
    ops : Mapping[str, Handler]
        The op table: op name (:data:`lrp_explicit.ops.OP_NAMES`) to handler.
    epsilon : float or None
        ε-stabiliser handed to the handlers (``None``: the dtype's default).
    """

    ops: Mapping[str, Handler]
    epsilon: float | None

    def rule_for(self, name: str, module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
        """The module-rule factory for ``module`` at path ``name``, or ``None``."""

    def make_rule(self, factory: Callable[[nn.Module], nn.Module],
                  module: nn.Module) -> nn.Module:
        """``module`` wrapped by ``factory``, configured like the source's own rules."""

    def report_unruled(self, op: str, path: str) -> None:
        """An op on the relevance path without rule: warn once, count, or raise when strict."""


def op_name(func: Any) -> str:
    """A readable name for a torch function, e.g. ``torch.cumsum`` or ``Tensor.cumsum``."""
    owner = getattr(func, "__self__", None)
    if owner is not None and type(owner).__name__ == "getset_descriptor":
        return f"Tensor.{owner.__name__}"
    name = getattr(func, "__name__", None) or repr(func)
    qual = getattr(func, "__qualname__", name)
    if qual.startswith(("TensorBase.", "_TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}"


@dataclass
class _Frame:
    module: Any
    composite: "RuleSource | None"  # None: dispatch suspended
    path: str
    rule_factory: Any = None  # the module's output is recomputed through this rule
    token: Any = None  # the binding it belongs to (None: an ``enter`` frame, always live)


class _State(threading.local):
    def __init__(self) -> None:
        self.frames: list[_Frame] = []
        self.mode: RuleMode | None = None  # set while this thread's mode is on its stack
        self.epoch = 0  # the value of ``_epoch`` when this thread last cleared dead frames


_state = _State()
_lock = threading.Lock()
_tokens: dict[int, "_Token"] = {}  # id(source) -> the token of its current binding
_epoch = 0  # counts unbinds: a thread whose epoch differs may hold dead frames


class _Token:
    """Identifies one binding of a composite (a new one at every :func:`bind`)."""

    __slots__ = ("source",)

    def __init__(self, source: "RuleSource") -> None:
        self.source = source


class _Binding(NamedTuple):
    """A module of a registered model: its composite, qualified name, whether the dispatch
    stays out of it (module rules, zennit-hooked modules), and the token of the binding."""

    module: nn.Module
    source: "RuleSource"
    path: str
    opaque: bool
    token: "_Token | None" = None


_modules: dict[int, _Binding] = {}  # id(module) -> its binding
_ROOT = "<root>"  # the path of a registered model itself
_hook_handles: list = []


#: Modules whose autograd Functions are never reported as unruled.
TRUSTED_FUNCTION_MODULES = ("torch", "lrp_explicit", "zennit")
_SEEN_ATTR = "_lrp_seen"  # set on a foreign Function's backward node once seen
_foreign_names: dict[type, str | None] = {}  # node type -> "<Function>.apply" or None
_elementwise: dict[type, bool] = {}  # foreign node type -> proven element-wise
_PROBE_MASKS = 3  # random halves (and their complements) changed by the locality probe


def proves_elementwise(fn: Callable[[torch.Tensor], Any], like: torch.Tensor) -> bool:
    """True if ``fn`` (a foreign Function's ``apply``, a module's ``forward``) is proven
    element-wise on tensors like ``like``.

    Probed without gradients, on positive random inputs of ``like``'s shape, dtype and device:
    ``fn(x)`` must take the one tensor and return a tensor of its shape, and each output element
    must depend on its own input element only: changing a random half of the inputs (then the
    other half, three times over) leaves the outputs of the unchanged half bit for bit as they
    were. A function that needs other arguments, mixes elements (a reduction, a softmax, a
    shift) or fails is not element-wise.
    """
    generator = torch.Generator().manual_seed(0)

    def sample() -> torch.Tensor:
        return (torch.rand(like.shape, generator=generator, dtype=torch.float64) + 0.5).to(
            device=like.device, dtype=like.dtype)

    try:
        with torch.no_grad():
            x = sample()
            y = fn(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                return False
            for _ in range(_PROBE_MASKS):
                half = torch.rand(x.shape, generator=generator) < 0.5
                for changed in (half, ~half):
                    moved = fn(torch.where(changed.to(x.device), sample(), x))
                    kept = ~changed.to(x.device)
                    if not torch.equal(moved[kept].nan_to_num(), y[kept].nan_to_num()):
                        return False
    except Exception:  # noqa: BLE001 - any failure means "not proven element-wise"
        return False
    return True


def _identity_hook(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
    """Backward hook of an element-wise foreign Function: the identity rule ``R_x = R``."""
    if len(grad_inputs) != 1 or len(grad_outputs) != 1:
        return None
    (grad_input,), (grad_output,) = grad_inputs, grad_outputs
    if grad_input is None or grad_output is None or grad_output.shape != grad_input.shape:
        return None
    return (grad_output.to(grad_input.dtype),)


def _foreign_name(tensor: torch.Tensor, rule: bool = True) -> str | None:
    """``"<Function>.apply"`` if ``tensor`` was made by a foreign autograd Function not yet seen.

    A foreign Function with one tensor input that is proven element-wise
    (:func:`proves_elementwise`, e.g. BLOOM's ``GeLUFunction``, RecurrentGemma's
    ``SqrtBoundDerivative``) gets the identity rule instead (unless ``rule`` is False: the
    output of a module rule, whose Functions are the rule): a hook on its backward node
    replaces the input gradient it computes by the relevance at its output.
    """
    node = tensor.grad_fn
    if node is None:
        return None
    kind = type(node)
    name = _foreign_names.get(kind, "")
    if name == "":
        cls = getattr(kind, "_forward_cls", None)
        root = (getattr(cls, "__module__", None) or "").split(".")[0]
        name = None if cls is None or root in TRUSTED_FUNCTION_MODULES \
            else f"{cls.__qualname__}.apply"
        _foreign_names[kind] = name
    if name is None or getattr(node, _SEEN_ATTR, False):
        return None
    setattr(node, _SEEN_ATTR, True)
    if rule and len(node.next_functions) == 1:
        proven = _elementwise.get(kind)
        if proven is None:
            proven = _elementwise[kind] = proves_elementwise(kind._forward_cls.apply, tensor)
        if proven:
            node.register_hook(_identity_hook)
            return None
    return name


def _report_foreign(composite: "RuleSource", values: Any, path: str,
                    trusted: bool = False) -> bool:
    """Report foreign Functions behind the relevance-path tensors in ``values`` (a tensor or a
    flat tuple/list/dict of them, one level of nesting); with ``trusted`` only mark them as
    seen. Returns True if any of the tensors is on the relevance path (one pass over the
    arguments serves both questions: this runs for every intercepted call)."""
    if isinstance(values, torch.Tensor):
        values = (values,)
    elif isinstance(values, dict):
        values = tuple(values.values())
    elif not isinstance(values, (tuple, list)):
        return False
    found = False
    for value in values:
        if isinstance(value, torch.Tensor):
            if not value.requires_grad:
                continue
            found = True
            node = value.grad_fn
            if node is None or _foreign_names.get(type(node), "") is None:
                continue  # a leaf, or a node of a trusted Function (the common case)
            name = _foreign_name(value, rule=not trusted)
            if name is not None and not trusted:
                composite.report_unruled(name, path)
        elif isinstance(value, (tuple, list)):
            found = _report_foreign(composite, value, path, trusted) or found
    return found


def _output_on_path(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, (list, tuple)):
        return any(_output_on_path(o) for o in out)
    return False


_T = torch.Tensor
#: Attribute reads that the mode hands straight back (the bookkeeping of hooks and rules reads
#: ``requires_grad`` and ``grad_fn`` of every tensor it sees).
_METADATA = frozenset([_T.requires_grad.__get__, _T.grad_fn.__get__, _T.shape.__get__,
                       _T.dtype.__get__, _T.device.__get__, _T.is_leaf.__get__,
                       _T.ndim.__get__, _T.dim, _T.size, _T.numel, _T.is_floating_point,
                       _T.is_contiguous, _T.stride, _T.__len__])


class RuleMode(TorchFunctionMode):
    """Routes functional calls on the relevance path to the top frame's composite."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _METADATA:  # attribute reads: no relevance flows through them
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        frames = _state.frames
        if _state.epoch != _epoch:  # a composite was removed: this thread may hold dead frames
            _clear_dead()
        composite = frames[-1].composite if frames else None
        if composite is None or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        path = frames[-1].path
        on = _report_foreign(composite, args, path)
        if kwargs:
            on = _report_foreign(composite, kwargs, path) or on
        if on and func in INPLACE and isinstance(args[0], torch.Tensor) \
                and args[0].requires_grad:
            preserve_saved(args[0])  # a rule may have saved the tensor this op changes
        if func in PASS_THROUGH:
            return func(*args, **kwargs)
        name = OP_NAMES.get(func)
        if name is not None and on:
            handler = composite.ops.get(name)
            if handler is not None:
                try:
                    out = handler(func, args, kwargs, composite.epsilon)
                except NoRule:
                    pass
                else:
                    _report_foreign(composite, out, path, trusted=True)  # a rule's own Function
                    return out
        out = func(*args, **kwargs)
        if _output_on_path(out):
            composite.report_unruled(op_name(func), path)
        return out


def _push(frame: _Frame) -> None:
    _state.frames.append(frame)
    if _state.mode is None:
        mode = RuleMode()
        mode.__enter__()
        _state.mode = mode


def _exit_mode() -> None:
    """Take this thread's mode off its torch-function mode stack (wherever it is on it)."""
    mode, _state.mode = _state.mode, None
    if mode is None:
        return
    size = torch._C._len_torch_function_stack()
    above = []
    while size > 0:
        top = torch._C._pop_torch_function_stack()
        size -= 1
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):  # modes entered after ours stay where they were
        torch._C._push_on_torch_function_stack(other)


def _pop() -> None:
    frames = _state.frames
    frames.pop()
    if not frames and _state.mode is not None:
        _exit_mode()


def depth() -> int:
    """The number of frames on this thread's stack (a mark for :func:`unwind`)."""
    return len(_state.frames)


def unwind(mark: int, exit_mode: bool = True) -> None:
    """Drop this thread's frames above ``mark`` (left by a forward that an interrupt ended);
    the mode goes with the last frame."""
    frames = _state.frames
    del frames[mark:]
    if not frames and _state.mode is not None and exit_mode:
        _exit_mode()


def drop(source: "RuleSource") -> None:
    """Drop this thread's frames of ``source`` and every frame above the first of them (all
    stale: they belong to a forward that an interrupt ended); the mode goes with the last."""
    frames = _state.frames
    first = next((i for i, f in enumerate(frames) if f.composite is source
                  or (f.token is not None and f.token.source is source)), None)
    unwind(len(frames) if first is None else first)


def _clear_dead(exit_mode: bool = False) -> None:
    """Drop this thread's frames from the first one whose binding is gone (its composite was
    removed, perhaps by another thread)."""
    _state.epoch = _epoch
    frames = _state.frames
    first = next((i for i, f in enumerate(frames) if f.token is not None
                  and _tokens.get(id(f.token.source)) is not f.token), None)
    unwind(len(frames) if first is None else first, exit_mode)


def _transparent(module: nn.Module) -> bool:
    """True for a module rule that lets the op rules in (``Rule.transparent``; read from the
    class first, so that other modules cost no failed attribute lookup)."""
    flag = getattr(type(module), "transparent", False)
    if isinstance(flag, property):
        flag = module.transparent
    return flag is True


def _pre_hook(module, args):
    entry = _modules.get(id(module))
    frames = _state.frames
    if _state.epoch != _epoch:
        _clear_dead(exit_mode=True)
    if entry is not None:
        if entry.path == _ROOT and frames:
            # the root of a model cannot be inside its own forward: frames of this binding are
            # left over from a forward that an interrupt ended
            stale = next((i for i, f in enumerate(frames) if f.token is entry.token), None)
            if stale is not None:
                unwind(stale, exit_mode=False)
        if torch.is_grad_enabled():
            _report_foreign(entry.source, args, entry.path)
        # a module rule may let the op rules in (Rule.transparent)
        opaque = entry.opaque and not _transparent(module)
        _push(_Frame(module, None if opaque else entry.source, entry.path, token=entry.token))
        return
    if not frames:
        if _state.mode is not None:  # frames were cleared while the mode was in use
            _exit_mode()
        return
    top = frames[-1]
    name = type(module).__name__
    if top.composite is None or next(module.parameters(), None) is not None:
        # inside an opaque module, or another model (it has weights of its own): hands off
        _push(_Frame(module, None, name, token=top.token))
        return
    # A parameterless module object that is not a child of the model but is called by its
    # forward (e.g. ``gelu = get_activation("gelu")`` at module level): part of the computation.
    factory = top.composite.rule_for(name, module) if torch.is_grad_enabled() else None
    if factory is not None:
        _push(_Frame(module, None, f"{top.path}/{name}", rule_factory=factory, token=top.token))
    else:
        _push(_Frame(module, top.composite, f"{top.path}/{name}", token=top.token))


def _post_hook(module, args, output):
    frames = _state.frames
    if frames and frames[-1].module is module:
        frame = frames[-1]
        entry = _modules.get(id(module))
        if entry is not None and torch.is_grad_enabled():
            # inside a module rule (opaque) a custom Function is the rule itself
            _report_foreign(entry.source, output, entry.path, trusted=entry.opaque)
        _pop()
        if frame.rule_factory is not None and output is not None:
            composite = frames[-1].composite if frames else None
            rule = composite.make_rule(frame.rule_factory, module) if composite \
                else frame.rule_factory(module)
            return rule.forward(*args)


def enter(composite: "RuleSource", path: str) -> None:
    """Activate ``composite``'s op rules on this thread until :func:`leave`."""
    _push(_Frame(None, composite, path))


def leave() -> None:
    """Undo the matching :func:`enter` (nothing to do if its frame was dropped already)."""
    if _state.frames:
        _pop()


def owner(model: torch.nn.Module, source: "RuleSource | None" = None
          ) -> "tuple[str, RuleSource] | None":
    """The first module of ``model`` (its qualified name, ``""`` for ``model`` itself, and
    composite) that belongs to a registered composite other than ``source``, or ``None``."""
    for name, mod in model.named_modules(remove_duplicate=False):
        entry = _modules.get(id(mod))
        if entry is not None and entry.source is not source:
            return name, entry.source
    return None


def bind(composite: "RuleSource", model: torch.nn.Module, opaque: set[int]) -> None:
    """Start dispatching for every module of ``model``; ``opaque`` holds ids of modules whose
    inside the dispatch must not touch (module-level rules).

    All or nothing: a module that belongs to another registered composite raises
    :class:`~lrp_explicit.CompositeError` before anything is bound.
    """
    with _lock:
        taken = owner(model, composite)
        if taken is not None:
            name, other = taken
            raise CompositeError(f"module {name or '<root>'!r} of {type(model).__name__} already "
                                 f"belongs to {other!r}; remove that composite first")
        token = _Token(composite)
        bindings = {id(mod): _Binding(mod, composite, name or _ROOT, id(mod) in opaque, token)
                    for name, mod in model.named_modules(remove_duplicate=False)}
        if not _hook_handles:
            handles = [_module_mod.register_module_forward_pre_hook(_pre_hook)]
            try:
                handles.append(
                    _module_mod.register_module_forward_hook(_post_hook, always_call=True))
            finally:
                _hook_handles.extend(handles)
        _modules.update(bindings)
        _tokens[id(composite)] = token


def unbind(composite: "RuleSource") -> None:
    """Stop dispatching for ``composite``; the global hooks go when no composite is left.
    Frames of it that other threads still hold are dead from now on."""
    global _epoch
    with _lock:
        for key in [k for k, v in _modules.items() if v.source is composite]:
            del _modules[key]
        if _tokens.pop(id(composite), None) is not None:
            _epoch += 1
        if not _modules:
            while _hook_handles:
                _hook_handles.pop().remove()
    drop(composite)


def hooks_installed() -> bool:
    """True while the global module hooks of the dispatch are installed."""
    return bool(_hook_handles)


def warn_unruled(op: str, path: str) -> None:
    """Warn (:class:`UnruledOpWarning`) that ``op`` in module ``path`` has no rule."""
    warnings.warn(
        f"lrp_explicit: no LRP rule for {op} on the relevance path in module '{path}'; "
        "plain autograd is used there, so the relevance through it is a gradient, not LRP. "
        "Add a rule to the composite's op table or a module rule (strict=True raises).",
        UnruledOpWarning,
        stacklevel=4,
    )
