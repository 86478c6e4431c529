"""The one attribution pass that every entry point runs.

:func:`attribute` takes prepared inputs (:func:`~lrp_explicit.pipeline.prepare`), a target
function and a composite, and does, in this order: register the composite (unless the model
carries it already), install the recorders and observers, run one forward pass with grad
enabled, resolve the target under the composite's op rules, one backward pass from the initial
relevance, read the relevance of every explained input (and of the recorded modules), and
restore the model, also when anything raises.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, Union

import torch
from torch import Tensor, nn

from .. import composites, dispatch
from ..composites import Composite, carrier
from ..errors import CompositeError, UnknownCompositeError
from ..rules import Rule
from .inputs import Prepared
from .targets import Target, tensors

__all__ = ["attribute", "Attribution", "Observer", "Recorder", "resolve_composite",
           "check_finite", "grad_enabled", "TARGET"]

#: Label of the functional code that turns the model's output into the explained tensor.
TARGET = "<target>"

TargetFunction = Callable[[Any], Union[Target, "tuple[Tensor, Tensor]"]]


class Observer(Protocol):
    """Something that watches one attribution pass (the conservation ledger of
    :func:`lrp_explicit.audit` is one).

    The pipeline calls :meth:`install` after the composite is registered and before the
    forward pass, :meth:`before_backward` with the explained tensor, and :meth:`remove` at the
    end, also on error.
    """

    def install(self, model: nn.Module) -> None:
        """Put hooks on the (registered) model."""

    def before_backward(self, explained: Tensor) -> None:
        """Look at the graph of the explained tensor before the backward pass."""

    def remove(self) -> None:
        """Take every hook away."""


@dataclass
class Attribution:
    """The result of one attribution pass.

    Attributes
    ----------
    relevances : list of dict of str to Tensor or None
        For each prepared input, the relevance of each explained leaf (its gradient after
        ``y.backward(initial)``, the explicit-LRP convention); ``None`` where no relevance
        reached it.
    latent : dict of str to Tensor
        Relevance at the first on-path output of each recorded module (``name`` for its first
        call, ``name#k`` for call ``k ≥ 1``).
    output : Any
        The model's output (a list of outputs for several prepared inputs).
    target : Target
        The explained tensor, its initial relevance and the target function's ``info``.
    composite : Composite or None
        The composite used (``None``: plain gradient).
    unruled : collections.Counter
        ``(op, module path) → calls`` of ops without rule met in this pass.
    """

    relevances: list[dict[str, Tensor | None]]
    latent: dict[str, Tensor]
    output: Any
    target: Target
    composite: Composite | None
    unruled: Counter = field(default_factory=Counter)

    @property
    def relevance(self) -> dict[str, Tensor | None]:
        """The relevance of the first (usually the only) prepared input's leaves."""
        return self.relevances[0]


def resolve_composite(spec: str | Composite | None, model: nn.Module, *,
                      family: str | None = None, **options: Any) -> Composite:
    """The composite for ``model``: a registry name looked up (with ``family`` and factory
    ``options``), or a :class:`~lrp_explicit.Composite` as given.

    Raises
    ------
    UnknownCompositeError
        For an unknown composite name (a ``KeyError`` and a ``ValueError``; the message lists
        the available ones).
    TypeError
        For options with a ready composite, or a ``spec`` of another type.
    """
    if isinstance(spec, Composite):
        if options or family is not None:
            raise TypeError("options and family apply to a composite name, not to a Composite "
                            "instance")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"composite must be a name or a Composite, not {type(spec).__name__}")
    try:
        return composites.get(spec, model, family=family, **options)
    except KeyError as err:
        names = sorted({n for names in composites.available().values() for n in names})
        raise UnknownCompositeError(f"no composite {spec!r}; available: {', '.join(names)}") \
            from err


class Recorder:
    """Keeps the relevance at the outputs of chosen modules during one pass.

    Parameters
    ----------
    patterns : sequence of str or type
        ``fnmatch`` patterns of qualified module names, or module classes (matched against
        the module a rule wraps).
    """

    def __init__(self, patterns: Sequence[str | type] | str | type) -> None:
        self.patterns = [patterns] if isinstance(patterns, (str, type)) else list(patterns)
        self.latent: dict[str, Tensor] = {}
        self._pending: list[tuple[str, Tensor]] = []
        self._handles: list[Any] = []

    def _matches(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules to hook (not those inside a rule wrapper); raises if a pattern matches
        none."""
        inside: set[int] = set()
        chosen: list[tuple[str, nn.Module]] = []
        used: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in inside:
                continue
            if isinstance(module, Rule):
                inside.update(id(m) for m in module.modules() if m is not module)
            if not name:
                continue
            hits = [i for i, p in enumerate(self.patterns) if self._wants_one(p, name, module)]
            if hits:
                used.update(hits)
                chosen.append((name, module))
        unmatched = [p if isinstance(p, str) else p.__name__
                     for i, p in enumerate(self.patterns) if i not in used]
        if unmatched:
            raise ValueError(f"record={unmatched!r} matches no module of {type(model).__name__}")
        return chosen

    @staticmethod
    def _wants_one(pattern: str | type, name: str, module: nn.Module) -> bool:
        original = module.module if isinstance(module, Rule) else module
        return fnmatch.fnmatchcase(name, pattern) if isinstance(pattern, str) \
            else isinstance(original, pattern)

    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` if a pattern matches no module of ``model`` (as
        :meth:`install` does, without hooking anything)."""
        self._matches(model)

    def install(self, model: nn.Module) -> None:
        """Hook the matching modules of ``model`` (not those inside a rule wrapper).

        Raises
        ------
        ValueError
            When a pattern matches no module (the message names the patterns).
        """
        for name, module in self._matches(model):
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        calls = [0]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = next((t for t in tensors(output) if t.requires_grad), None)
            if out is None or not torch.is_grad_enabled():
                return
            key = name if calls[0] == 0 else f"{name}#{calls[0]}"
            calls[0] += 1
            self._pending.append((key, out))

            def keep(grad: Tensor) -> None:
                self.latent[key] = grad.detach().clone()

            out.register_hook(keep)

        return hook

    def before_backward(self, explained: Tensor) -> None:
        """Nothing to do before the backward pass."""

    def finish(self) -> dict[str, Tensor]:
        """The recorded relevance in forward order; zeros for outputs that received none."""
        got = self.latent
        self.latent = {key: got[key] if key in got else torch.zeros_like(out.detach())
                       for key, out in self._pending}
        self._pending = []
        return self.latent

    def remove(self) -> None:
        """Remove the module hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _graph_leaves(explained: Tensor) -> list[Tensor]:
    """Leaf tensors (not parameters) that the graph of ``explained`` reaches."""
    leaves: list[Tensor] = []
    seen: set[int] = set()
    stack = [explained.grad_fn] if explained.grad_fn is not None else []
    nodes = []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)  # keeps the node alive, so that ids stay unique
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            if not isinstance(variable, nn.Parameter) and not any(variable is t for t in leaves):
                leaves.append(variable)
            continue
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return leaves


def attribute(model: nn.Module, inputs: Prepared | Sequence[Prepared],
              target: TargetFunction, composite: Composite | None, *,
              record: Sequence[str | type] | str | type = (),
              observers: Iterable[Observer] = (), label: str = TARGET) -> Attribution:
    """Explain ``target`` of ``model`` on ``inputs`` in one forward and one backward pass.

    Parameters
    ----------
    model : nn.Module
        The model; it is left exactly as it was (composite, hooks and observers removed, also
        on error).
    inputs : Prepared or sequence of Prepared
        Prepared inputs (:func:`~lrp_explicit.pipeline.prepare`); several are run one after
        the other in the same pass (the two texts of a similarity), and the target function
        then receives the list of outputs.
    target : callable
        ``target(output)`` returns a :class:`~lrp_explicit.pipeline.Target` (or a pair
        ``(explained, initial relevance)``); it runs under the composite's op rules, so
        pooling or similarities computed there are explained by the rules too.
    composite : Composite or None
        A composite (:func:`resolve_composite`), registered here unless the model carries it
        already; ``None`` runs plain autograd (the relevance is then the gradient).
    record : sequence of str or type
        Modules whose output relevance is kept in :attr:`Attribution.latent` (see
        :class:`Recorder`).
    observers : iterable of Observer
        Installed after the composite and before the forward pass, shown the explained tensor
        before the backward pass, removed at the end.
    label : str
        Module path shown for unruled ops of the target function.

    Returns
    -------
    Attribution

    Raises
    ------
    CompositeError
        If the model carries another composite, or another thread changed the model during
        the pass (trained it, ran a backward pass through its parameters, switched it to
        training mode): the result would mix two states of the model.
    ValueError
        If the explained tensor does not depend on any explained input.

    Notes
    -----
    The model is the pass's: passes over one model from several threads run one after the
    other (a lock per model), and while a pass registered the composite, another thread's
    forward, ``train()`` or backward through the model's parameters raises
    :class:`CompositeError` (see the docs' section on threads).
    """
    with _owned(model):
        return _attribute(model, inputs, target, composite, record=record,
                          observers=observers, label=label)


_owners_lock = threading.Lock()
_owners: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _owned(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s pass lock: passes over one model run one after the other, also when
    they come from several threads (re-entrant within one thread)."""
    model = _uncompiled(model)
    with _owners_lock:
        lock = _owners.get(model)
        if lock is None:
            lock = _owners[model] = threading.RLock()
    with lock:
        yield


def _guard_rules(model: nn.Module, composite: Composite) -> list[Any]:
    """For the pass: a rule wrapper called by another thread (a forward that began before the
    pass) raises :class:`CompositeError` (:meth:`Composite.refuse_other_threads`)."""
    def guard(module: nn.Module, args: Any) -> None:
        composite.refuse_other_threads("a forward pass")

    return [m.register_forward_pre_hook(guard) for m in model.modules() if isinstance(m, Rule)]


def _state(model: nn.Module) -> tuple[list[tuple[Tensor, int]], list[bool]]:
    """The version counter of every parameter and the mode of every module."""
    return [(p, p._version) for p in model.parameters()], [m.training for m in model.modules()]


def _check_untouched(model: nn.Module, state: tuple[list[tuple[Tensor, int]], list[bool]],
                     cause: BaseException | None = None) -> None:
    """Refuse the result if another thread changed the weights or modes during the pass."""
    name = type(model).__name__
    versions, modes = state
    if any(p._version != v for p, v in versions):
        raise CompositeError(f"the weights of {name} changed during its explanation (another "
                             "thread trained it?); the result would mix two models: explain "
                             "again when training is not running") from cause
    if [m.training for m in model.modules()] != modes:
        raise CompositeError(f"{name} was switched to training mode during its explanation "
                             "(by another thread?); explain again when training is not running")


def _attribute(model: nn.Module, inputs: Prepared | Sequence[Prepared],
               target: TargetFunction, composite: Composite | None, *,
               record: Sequence[str | type] | str | type = (),
               observers: Iterable[Observer] = (), label: str = TARGET) -> Attribution:
    items = [inputs] if isinstance(inputs, Prepared) else list(inputs)
    owner = carrier(model)
    if composite is not None and owner is not None and owner is not composite:
        raise CompositeError(f"{type(model).__name__} carries {owner!r}; remove it or pass "
                             "that composite")
    if composite is None and owner is not None:
        raise CompositeError(f"{type(model).__name__} carries {owner!r}; remove it to take "
                             "plain gradients")
    before = Counter(composite.unruled) if composite is not None and owner is composite \
        else Counter()
    recorder = Recorder(record)
    watchers = [recorder, *observers]
    installed: list[Any] = []
    registered = composite is not None and owner is None
    mark = dispatch.depth()
    if registered:
        composite.register(model)
    thread = composite.pass_thread if composite is not None else None
    if composite is not None:
        composite.pass_thread = threading.get_ident()
    before_pass = _state(model) if composite is not None else ([], [])
    guards = _guard_rules(model, composite) if composite is not None else []
    try:
        for watcher in watchers:
            watcher.install(model)
            installed.append(watcher)
        with grad_enabled(), _eager_if_compiled(model):
            runner = _uncompiled(model)
            outputs = [item.run(runner) for item in items]
            output = outputs[0] if isinstance(inputs, Prepared) else outputs
            if composite is not None:
                with composite.op_rules(label):
                    explained = _as_target(target(output))
            else:
                explained = _as_target(target(output))
            y = explained.explained
            if not y.requires_grad:
                raise ValueError(f"the explained output of {type(model).__name__} does not "
                                 "depend on any explained input (explain from embeddings, not "
                                 "token ids)")
            leaves = [item.leaves or {f"input{i}": t for i, t in enumerate(_graph_leaves(y))}
                      for item in items]
            for watcher in watchers:
                watcher.before_backward(y)
            grads: list[dict[str, list[Tensor]]] = [{k: [] for k in named} for named in leaves]
            handles = [leaf.register_hook(lambda g, box=box[key]: box.append(g.detach().clone()))
                       for named, box in zip(leaves, grads) for key, leaf in named.items()]
            try:
                y.backward(explained.initial)
            except RuntimeError as err:
                if composite is not None and "modified by an inplace operation" in str(err):
                    _check_untouched(model, before_pass, err)  # weights changed meanwhile?
                raise
            finally:
                for handle in handles:
                    handle.remove()
        latent = recorder.finish()
        if composite is not None:
            _check_untouched(model, before_pass)
    finally:
        # Runs on every exit, an interrupt included (PyTorch's always-call module hooks run
        # only for an Exception): frames an interrupted forward left go first, then the hooks,
        # then the composite; each step runs even if one before it fails.
        try:
            dispatch.unwind(mark)
        finally:
            try:
                _remove_all(reversed(installed))
            finally:
                try:
                    if registered:
                        composite.remove()
                finally:
                    for guard in guards:
                        guard.remove()
                    if composite is not None:
                        composite.pass_thread = thread
    relevances = [{k: (sum(v[1:], v[0]) if v else None) for k, v in box.items()} for box in grads]
    unruled = Counter(composite.unruled) - before if composite is not None else Counter()
    return Attribution(relevances, latent, output, explained, composite, unruled)


_stance_lock = threading.Lock()
_stance: list[Any] = []  # the force_eager context while passes over compiled models run


def _compiled(model: nn.Module) -> bool:
    return any(type(m).__name__ == "OptimizedModule" or
               m.__dict__.get("_compiled_call_impl") is not None for m in model.modules())


@contextlib.contextmanager
def _eager_if_compiled(model: nn.Module) -> Iterator[None]:
    """The compiler's ``force_eager`` stance for a pass over a model with compiled parts.

    The stance is global: it is set when the first such pass (of any thread) starts and reset
    when the last one ends, so that concurrent passes never leave it set.
    """
    if not _compiled(model):
        yield
        return
    with _stance_lock:
        if not _stance:
            context = torch.compiler.set_stance("force_eager")
            context.__enter__()
            _stance.append(context)
        _stance.append(None)
    try:
        yield
    finally:
        with _stance_lock:
            _stance.pop()
            if len(_stance) == 1:
                _stance.pop().__exit__(None, None, None)


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) holds, run eagerly: the
    rules and hooks need Python to run op by op, and calling the wrapper while hooks are
    registered makes torch warn."""
    while type(model).__name__ == "OptimizedModule" and "_orig_mod" in model._modules:
        model = model._modules["_orig_mod"]
    return model


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on, also inside ``torch.no_grad()`` and ``torch.inference_mode()``.

    The entry points (:func:`~lrp_explicit.explain`, :func:`~lrp_explicit.audit`,
    :func:`~lrp_explicit.check`) run their whole pass in it, so that they can be called from
    code that runs without gradients. Tensors made inside ``inference_mode`` before the call
    (inputs, embeddings) are copied into ordinary tensors where they become leaves; a model
    whose parameters are inference tensors is refused by :meth:`Composite.register`.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _remove_all(watchers: Iterable[Observer]) -> None:
    """Remove every watcher, also after one fails; the first failure is raised at the end."""
    failure: BaseException | None = None
    for watcher in watchers:
        try:
            watcher.remove()
        except BaseException as err:  # noqa: B902 - remove the others, then raise
            failure = failure or err
    if failure is not None:
        raise failure


def _as_target(value: Any) -> Target:
    if isinstance(value, Target):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return Target(*value)
    raise TypeError("a target function returns a Target or a pair (explained, initial "
                    f"relevance), not {type(value).__name__}")


def check_finite(value: float | Tensor, what: str) -> None:
    """Raise ``ValueError`` if ``value`` (a score or a relevance tensor) has NaN or Inf.

    The message says how many values are non-finite and what to check.
    """
    if isinstance(value, Tensor):
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"the {what} has {bad} NaN or infinite values of {value.numel()} "
                             "(check the model's dtype and the composite's epsilon)")
    elif not math.isfinite(value):
        raise ValueError(f"the explained {what} is {value}")
