"""The :class:`Composite`: binds rules to a model's modules and functional ops, and unbinds them."""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .. import dispatch
from ..errors import CompositeError, UnruledOpError
from ..ops import ATTNLRP_OPS, OP_NAMES, Handler
from .adapters import check_adapters, check_quantised, loads_weights

__all__ = ["Composite", "CompositeError", "carrier"]

RuleFactory = Callable[[nn.Module], nn.Module]


_carriers: dict[int, "Composite"] = {}  # id(model) -> the composite registered on it
_carriers_lock = threading.Lock()


class Composite:
    """Map module types, module-name patterns and functional ops to LRP rules.

    Parameters
    ----------
    modules : dict
        Keys are module classes (matched through the class hierarchy, the most specific entry
        wins) or ``fnmatch`` patterns of qualified module names (``"layers.*.mlp.act"``; they
        take precedence over classes). Values are rule factories, typically a class of
        :mod:`lrp_explicit.rules` or a ``functools.partial`` of one, called with the module.
    ops : dict, optional
        Op-table entries ``{op name: handler}`` merged over :data:`lrp_explicit.ops.ATTNLRP_OPS`;
        a value of ``None`` removes the entry (calls of that op are then unruled).
    strict : bool
        Raise :class:`lrp_explicit.UnruledOpError` for an op on the relevance path without a
        rule, instead of warning once per (op, module path).
    epsilon : float, optional
        ε-stabiliser for all rules; ``None`` takes the default of each tensor's dtype.
    name : str, optional
        A label shown in messages and ``repr``.
    validate : callable, optional
        Called with the model by :meth:`register` before anything changes; it raises (e.g.
        ``NotImplementedError``) for a configuration the rules cannot explain.
    zennit : zennit.core.Composite, optional
        A zennit composite (e.g. ``LayerMapComposite([(nn.Linear, Gamma(0.25))])``) that shares
        the backward pass: :meth:`register` registers it on the model first, and every module
        it hooks is left to it (no rule of ours, no op dispatch inside); our rules handle the
        rest (attention, norms, activations, residuals, functional ops). :meth:`remove`
        removes it too. Both work in relevance space, so their relevances compose.
    detect : callable, optional
        ``detect(name, module)`` returns a rule factory for a module no entry of ``modules``
        matches, or ``None`` (e.g. :class:`~lrp_explicit.composites.detect.Detector`, which finds
        norms and activations from the module itself).

    Examples
    --------
    >>> comp = Composite({nn.Linear: rules.EpsilonRule, nn.GELU: rules.IdentityRule})
    >>> with comp.context(model):
    ...     x = inputs.requires_grad_()
    ...     y = model(x)[0, target]
    ...     y.backward(y.detach())
    >>> relevance = x.grad
    """

    def __init__(
        self,
        modules: Mapping[type | str, RuleFactory],
        ops: Mapping[str, Handler | None] | None = None,
        strict: bool = False,
        epsilon: float | None = None,
        name: str | None = None,
        validate: Callable[[nn.Module], None] | None = None,
        zennit: Any = None,
        detect: Callable[[str, nn.Module], RuleFactory | None] | None = None,
    ) -> None:
        self.module_rules = dict(modules)
        self.detect = detect
        for key, factory in self.module_rules.items():
            if not isinstance(key, (type, str)) or not callable(factory):
                raise TypeError(f"module rules map a class or a name pattern to a rule factory; "
                                f"got {key!r}: {factory!r}")
        unknown = set(ops or {}) - set(OP_NAMES.values())
        if unknown:
            raise ValueError(f"unknown op names {sorted(unknown)}; the op table knows "
                             f"{sorted(set(OP_NAMES.values()))}")
        table = dict(ATTNLRP_OPS)
        for key, handler in (ops or {}).items():
            if handler is None:
                table.pop(key, None)
            else:
                table[key] = handler
        self.ops: dict[str, Handler] = table
        self.strict = strict
        self.epsilon = epsilon
        self.name = name or "composite"
        self.validate = validate
        core = sys.modules.get("zennit.core")
        if zennit is not None and (core is None or not isinstance(zennit, core.Composite)):
            raise TypeError("zennit= takes a zennit composite (zennit.core.Composite, e.g. "
                            f"zennit.composites.LayerMapComposite), got {type(zennit).__name__}")
        self.zennit = zennit
        self.zennit_modules: set[int] = set()  # ids of the modules the zennit composite hooks
        self.model: nn.Module | None = None
        self.unruled: Counter[tuple[str, str]] = Counter()
        self._undo: list[Callable[[], None]] = []
        #: The thread of the library's pass that owns the model now (set by
        #: :func:`lrp_explicit.pipeline.attribute`); other threads' forwards and ``train()``
        #: calls on the model are refused meanwhile.
        self.pass_thread: int | None = None
        #: The thread that registered the composite: the model's forward (its root) from other
        #: threads is refused while it is registered, except during a pass of theirs.
        self.register_thread: int | None = None

    def __repr__(self) -> str:
        state = "registered" if self.model is not None else "not registered"
        extra = f", zennit {type(self.zennit).__name__}" if self.zennit is not None else ""
        return f"Composite({self.name!r}, {len(self.module_rules)} module rules{extra}, {state})"

    # ------------------------------------------------------------------ matching

    def rule_for(self, name: str, module: nn.Module) -> RuleFactory | None:
        """The rule factory for ``module`` at qualified name ``name``, or ``None``."""
        for key, factory in self.module_rules.items():
            if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
                return factory
        for cls in type(module).__mro__:
            factory = self.module_rules.get(cls)
            if factory is not None:
                return factory
        if self.detect is not None:
            return self.detect(name, module)
        return None

    def make_rule(self, factory: RuleFactory, module: nn.Module) -> nn.Module:
        """Wrap ``module`` with ``factory``; a rule without its own ε takes the composite's."""
        rule = factory(module)
        if getattr(rule, "epsilon", 0) is None:
            rule.epsilon = self.epsilon
        rule.eval()
        return rule

    # ------------------------------------------------------------------ register / remove

    def register(self, model: nn.Module) -> nn.Module:
        """Bind the rules to ``model`` in place and return it.

        Matching child modules are replaced by their rule wrappers, parameters are frozen
        (``requires_grad=False``), every module is put in eval mode, and the op dispatch is
        activated for this model's forward only. A zennit composite given as ``zennit=`` is
        registered first; the modules it hooks keep their zennit rules and get none of ours.

        All or nothing: every reason to refuse is checked before anything changes, and a
        registration that fails half-way (also by an interrupt) is undone.

        Raises
        ------
        CompositeError
            If ``model`` already carries a composite, a module of it belongs to another
            registered composite (a registered submodule, or a registered model it is part
            of), this composite is registered elsewhere, the zennit composite is already
            registered on a model, the model holds tensors the rules cannot compute on
            (inference parameters, tensors on the meta device that no accelerate hook loads),
            or adapters or quantised weights the rules are not verified for
            (:mod:`~lrp_explicit.composites.adapters`).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"register() needs an nn.Module, got {type(model).__name__}")
        if self.validate is not None:
            self.validate(model)
        with _carriers_lock:
            if self.model is not None:
                raise CompositeError(f"{self!r} is already registered on a model; call remove() "
                                     "first or create another composite")
            if self.zennit is not None and self.zennit.handles:
                raise CompositeError(
                    f"the zennit composite {type(self.zennit).__name__} is already registered on "
                    "a model; remove it first (register() registers it and remove() removes it)")
            other = _carriers.get(id(model))
            if other is not None:
                raise CompositeError(
                    f"{type(model).__name__} already carries {other!r}; remove it first")
            taken = dispatch.owner(model)
            if taken is not None:
                name, owner = taken
                what = type(model).__name__
                host = type(getattr(owner, "model", None)).__name__
                raise CompositeError(
                    f"{what} is part of {host}, which carries {owner!r}; remove that composite "
                    "first" if not name else
                    f"module {name!r} of {what} carries {owner!r}; remove that composite first")
            _check_tensors(model)
            check_adapters(model)
            check_quantised(model)
            _carriers[id(model)] = self
            self.model = model
        try:
            self._bind(model)
        except BaseException:
            self.remove()
            raise
        return model

    def _bind(self, model: nn.Module) -> None:
        self.register_thread = threading.get_ident()
        self._guard_forward(model)  # first: a forward of another thread starting now is refused
        if _running_elsewhere(model):  # one that started before is found on its stack
            raise CompositeError(
                f"another thread is running a forward of {type(model).__name__}; "
                "registering now would change the model under it: train and explain the model "
                "one after the other")
        # the parameter guards go last at remove(), after the flags are back
        self._guard_parameters(model)
        _wait_for_backward(model)  # one already running may not see the guards: let it end
        # By owner and name: accelerate's hooks replace offloaded parameters at every forward.
        flags = [((m, k), p.requires_grad) for m in model.modules()
                 for k, p in m._parameters.items() if p is not None]
        self._undo.append(lambda: _each(flags, _restore_flag))
        modes = [(m, m.training) for m in model.modules()]
        self._undo.append(lambda: _each(modes, lambda m, t: m.train(t) if m.training != t
                                        else None))
        for p in model.parameters():
            p.requires_grad_(False)
        self.zennit_modules = set()
        if self.zennit is not None:
            self.zennit.register(model)  # on the user's module tree, before any rule wrapper
            self._undo.append(self.zennit.remove)
            hooks = self.zennit.hook_refs
            for module in model.modules():
                if any(getattr(h, "__self__", None) in hooks
                       for h in module._forward_pre_hooks.values()):
                    self.zennit_modules.add(id(module))

        wrappers: dict[int, nn.Module] = {}
        opaque: set[int] = set()
        if id(model) in self.zennit_modules:  # the whole model is zennit's
            opaque.update(id(m) for m in model.modules())
        else:
            self._wrap_children(model, "", wrappers, opaque)
        self._wrap_checkpointing(model)
        self._run_eagerly(model)
        model.eval()
        dispatch.bind(self, model, opaque)
        self._undo.append(lambda: dispatch.unbind(self))
        self._guard_train(model)
        self.unruled.clear()

    def refuse_other_threads(self, what: str, root: bool = False) -> None:
        """Raise :class:`CompositeError` if a pass of the library owns the model and this is
        another thread; with ``root`` (the model's own forward) also if another thread
        registered the composite and no pass of this thread runs. A backward pass is let
        through: checkpointed layers recompute their forward in it, possibly in autograd's
        device thread."""
        owner = self.pass_thread
        if owner is None and root:
            owner = self.register_thread
        if owner is None or owner == threading.get_ident() \
                or torch._C._current_graph_task_id() != -1:
            return
        name = type(self.model).__name__ if self.model is not None else "the model"
        doing = "explained" if self.pass_thread is not None else "registered for explanation"
        raise CompositeError(
            f"{name} is being {doing} by another thread ({self.name}); {what} from this "
            "thread is refused until that ends: run training and explanations of one model "
            "one after the other (see the docs' section on threads)")

    def _guard_parameters(self, model: nn.Module) -> None:
        """A gradient that reaches the model's parameters while it is registered is refused.

        Registering freezes the parameters, so no graph built since holds them: such a
        gradient comes from a backward pass through a graph built before (another thread
        training the model), and autograd would silently drop it.
        """
        name = type(model).__name__

        def refuse(grad: Any) -> None:
            raise CompositeError(
                f"a backward pass reached the parameters of {name} while it carries {self!r} "
                "(is another thread training it?); its gradients would be lost: train and "
                "explain the model one after the other")

        params = [p for p in model.parameters() if p.requires_grad]
        before = [(p, p._backward_hooks) for p in params]
        handles = [p.register_hook(refuse) for p in params]

        def restore() -> None:
            _each([(h, None) for h in handles], lambda h, _: h.remove())
            for p, hooks in before:  # no empty hook dictionary left where there was none
                if hooks is None and not p._backward_hooks:
                    p._backward_hooks = None

        self._undo.append(restore)

    def _guard_train(self, model: nn.Module) -> None:
        """``model.train()`` from a thread other than the one that registered the composite is
        refused while the model is registered (that thread would train a model whose
        parameters are frozen and whose mode the rules own), and any ``train()`` from another
        thread during a pass. The registering thread may switch modes (transformers
        checkpoints layers only in training mode); :meth:`remove` restores the mode."""
        inner = model.train
        previous = model.__dict__.get("train")

        @functools.wraps(inner)
        def train(mode: bool = True) -> nn.Module:
            self.refuse_other_threads("train()")
            if mode and threading.get_ident() != self.register_thread:
                raise CompositeError(
                    f"{type(model).__name__} carries {self!r}; train() from another thread is "
                    "refused while it is registered (remove() first; it restores the model's "
                    "mode)")
            return inner(mode)

        self._replace_method(model, "train", train, previous)

    def _guard_forward(self, model: nn.Module) -> None:
        """Drop this thread's frames when an interrupt ends the model's forward.

        PyTorch calls always-call forward hooks only for an ``Exception``: a
        ``KeyboardInterrupt`` would leave the root's frame (and those inside it) on the
        thread's stack, and the rules on every later functional call of that thread. The
        model's ``forward`` is wrapped (an instance attribute, removed again by
        :meth:`remove`; its signature is the original's) so that any ``BaseException``
        unwinds the stack to where it was before the root was entered.
        """
        inner = model.forward
        previous = model.__dict__.get("forward")

        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            self.refuse_other_threads("a forward pass", root=True)
            mark = dispatch.depth()  # the root's own frame is already on it
            try:
                return inner(*args, **kwargs)
            except BaseException as err:
                if not isinstance(err, Exception):
                    dispatch.unwind(max(mark - 1, 0))
                raise

        self._replace_method(model, "forward", forward, previous)

    def _replace_method(self, model: nn.Module, name: str, method: Callable[..., Any],
                        previous: Any) -> None:
        """Set ``method`` as the instance attribute ``name`` of ``model``; the undo step puts
        back ``previous`` (an instance attribute the model had) or removes it."""
        setattr(model, name, method)

        def restore() -> None:
            if previous is None:
                model.__dict__.pop(name, None)
            else:
                setattr(model, name, previous)

        self._undo.append(restore)

    def _wrap_children(self, parent: nn.Module, prefix: str, wrappers: dict[int, nn.Module],
                       opaque: set[int]) -> None:
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}{child_name}"
            if id(child) in self.zennit_modules:  # zennit's: no rule, no dispatch inside
                opaque.update(id(m) for m in child.modules())
                continue
            if id(child) in wrappers:  # a module shared between parents: reuse its wrapper
                wrapper = wrappers[id(child)]
            else:
                factory = self.rule_for(name, child)
                if factory is None:
                    self._wrap_children(child, name + ".", wrappers, opaque)
                    continue
                wrapper = self.make_rule(factory, child)
                wrappers[id(child)] = wrapper
                opaque.update(id(m) for m in wrapper.modules())
            setattr(parent, child_name, wrapper)
            self._undo.append(lambda p=parent, n=child_name, c=child: setattr(p, n, c))

    def _wrap_checkpointing(self, model: nn.Module) -> None:
        """Run checkpointed functions under this composite's op rules.

        transformers checkpoints a layer's ``forward`` (not ``__call__``), so when the backward
        recomputes it no module hook marks the layer itself; wrapping the checkpointed function
        keeps the rules on for the layer's own functional code during the recomputation.
        """
        for name, module in model.named_modules():
            original = module.__dict__.get("_gradient_checkpointing_func")
            if original is None:
                continue

            def checkpoint(function, *args, _original=original, _path=name, **kwargs):
                def run(*inner_args, **inner_kwargs):
                    with self.op_rules(_path):
                        return function(*inner_args, **inner_kwargs)

                return _original(run, *args, **kwargs)

            module._gradient_checkpointing_func = checkpoint
            self._undo.append(
                lambda m=module, f=original: setattr(m, "_gradient_checkpointing_func", f))

    def _run_eagerly(self, model: nn.Module) -> None:
        """Modules compiled with ``module.compile()`` run their plain ``__call__`` while
        registered: the rules and the op dispatch need Python to run op by op."""
        for module in model.modules():
            compiled = module.__dict__.get("_compiled_call_impl")
            if compiled is not None:
                module._compiled_call_impl = None
                self._undo.append(
                    lambda m=module, c=compiled: setattr(m, "_compiled_call_impl", c))

    def remove(self) -> None:
        """Undo :meth:`register`: the very same module objects, ``requires_grad`` flags and
        train/eval modes are restored and no hook or mode is left behind.

        Every undo step runs, even when one of them fails or an interrupt arrives; this
        thread's frames of the composite left by an interrupted forward are dropped. The
        first failure is raised at the end (an interrupt as it is).
        """
        if self.model is None:
            dispatch.drop(self)
            return
        failures: list[BaseException] = []
        try:
            while self._undo:
                step = self._undo.pop()
                try:
                    step()
                except BaseException as err:  # noqa: B902 - finish the others, then raise
                    failures.append(err)
        finally:
            dispatch.unbind(self)  # idempotent: also when its own undo step did not run
            self.zennit_modules = set()
            with _carriers_lock:
                _carriers.pop(id(self.model), None)
                self.model = None
                self.register_thread = None
        if failures:
            first = failures[0]
            if not isinstance(first, Exception):
                raise first
            raise CompositeError(f"remove() could not undo {len(failures)} step(s) of "
                                 f"{self!r}: {first}") from first

    @contextlib.contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        """Register on ``model`` for the duration of a ``with`` block, then remove."""
        self.register(model)
        try:
            yield model
        finally:
            self.remove()

    @contextlib.contextmanager
    def op_rules(self, label: str = "<op_rules>") -> Iterator[None]:
        """Apply this composite's op table to functional code outside the model's forward.

        Use it for post-processing that is part of the explained function, e.g. pooling and a
        cosine similarity computed on the model's outputs.
        """
        mark = dispatch.depth()
        dispatch.enter(self, label)
        try:
            yield
        finally:
            dispatch.unwind(mark)  # the frame of ``enter`` and any left above it

    # ------------------------------------------------------------------ unruled ops

    def report_unruled(self, op: str, path: str) -> None:
        """Count an op on the relevance path without rule; warn the first time for each
        ``(op, path)``, or raise :class:`~lrp_explicit.UnruledOpError` in strict mode."""
        key = (op, path)
        first = key not in self.unruled
        self.unruled[key] += 1
        if self.strict:
            raise UnruledOpError(
                f"no LRP rule for {op} on the relevance path in module '{path}' "
                f"({self.name}, strict mode)")
        if first:
            dispatch.warn_unruled(op, path)


def _each(pairs: list, step: Callable[[Any, Any], Any]) -> None:
    """``step`` on every pair, also after one fails; the first failure is raised at the end."""
    failure: BaseException | None = None
    for a, b in pairs:
        try:
            step(a, b)
        except BaseException as err:  # noqa: B902 - finish the others, then raise
            failure = failure or err
    if failure is not None:
        raise failure


_CALLS = {code for code in (getattr(getattr(nn.Module, name, None), "__code__", None)
                            for name in ("_call_impl", "_wrapped_call_impl")) if code is not None}


_BACKWARD = getattr(getattr(torch.autograd.graph, "_engine_run_backward", None), "__code__",
                    None)
#: Seconds :meth:`Composite.register` waits for another thread's backward pass through the
#: model's parameters to end (it ends at once: the guards just installed refuse it).
BACKWARD_WAIT = 10.0


def _reaches(roots: Any, params: set[int]) -> bool:
    """Whether the autograd graph behind ``roots`` (tensors or gradient edges) accumulates into
    a parameter whose id is in ``params``."""
    stack = [getattr(r, "grad_fn", None) or getattr(r, "node", None) for r in roots or ()]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
        if variable is not None and id(variable) in params:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _backward_elsewhere(model: nn.Module) -> bool:
    """Whether another thread is running a backward pass whose graph reaches ``model``'s
    parameters (found on that thread's stack)."""
    if _BACKWARD is None:
        return False
    params = {id(p) for p in model.parameters()}
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        while frame is not None:
            if frame.f_code is _BACKWARD:
                if _reaches(frame.f_locals.get("t_outputs"), params):
                    return True
                break
            frame = frame.f_back
    return False


def _wait_for_backward(model: nn.Module) -> None:
    """Wait until no other thread runs a backward pass through ``model``'s parameters.

    autograd's engine runs without the interpreter lock: a backward already running may have
    read a parameter's hooks before the guards were installed and then find it frozen, and
    drop its gradient without a word. Any backward that reaches a guard now raises, so the
    wait is short; after :data:`BACKWARD_WAIT` seconds registering is refused.
    """
    deadline = time.monotonic() + BACKWARD_WAIT
    while _backward_elsewhere(model):
        if time.monotonic() > deadline:
            raise CompositeError(
                f"another thread is running a backward pass through {type(model).__name__}'s "
                "parameters; registering now would lose its gradients: train and explain the "
                "model one after the other")
        time.sleep(0.001)


def _running_elsewhere(model: nn.Module) -> bool:
    """Whether another thread is running ``model``'s forward now (found on that thread's
    stack; a call of a submodule alone, such as the input embeddings, does not count)."""
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        while frame is not None:
            if frame.f_code in _CALLS and frame.f_locals.get("self") is model:
                return True
            frame = frame.f_back
    return False


def _restore_flag(place: tuple[nn.Module, str], flag: bool) -> None:
    param = place[0]._parameters.get(place[1])
    if param is not None and param.requires_grad != flag:
        param.requires_grad_(flag)


def _check_tensors(model: nn.Module) -> None:
    """Refuse models whose tensors the rules cannot compute on, naming the first one.

    Inference parameters cannot take part in a graph that the backward pass needs;
    inference buffers (rotary frequencies, position ids) only feed constants and are fine.
    """
    loaded = {name for name, module in model.named_modules() if loads_weights(module)}
    for kind, named in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta and not _offloaded(name, loaded):
                raise CompositeError(
                    f"{type(model).__name__}: {kind} {name!r} is on the meta device (not "
                    "loaded, and no accelerate hook loads it); the rules would compute on a "
                    "tensor without data. Load the weights, or offload them with accelerate "
                    "(cpu_offload, disk_offload, device_map), whose hooks bring them in")
            if kind == "parameter" and tensor.is_inference():
                raise CompositeError(
                    f"{type(model).__name__}: {kind} {name!r} is an inference tensor (the model "
                    "was created or loaded under torch.inference_mode()); LRP needs autograd. "
                    "Create the model outside inference_mode, or give it ordinary tensors: "
                    "model.load_state_dict({k: v.clone() for k, v in "
                    "model.state_dict().items()}, assign=True)")


def _offloaded(name: str, loaded: set[str]) -> bool:
    """True if a module named in ``loaded`` (accelerate hooks that load weights) holds the
    tensor at qualified name ``name`` or is one of its ancestors."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in loaded for i in range(len(parts)))


def carrier(model: nn.Module) -> Composite | None:
    """The composite registered on ``model``, if any."""
    return _carriers.get(id(model))
