"""The conservation ledger: module hooks in the forward pass and node hooks in the backward pass
that measure the relevance crossing every module boundary and every autograd node.

:class:`Ledger` is an observer of the attribution pipeline
(:func:`lrp_explicit.pipeline.attribute`): installed after the composite, shown the explained
tensor before the backward pass (it then hooks every node of the graph), removed at the end.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor, nn

from .. import functional as lf
from ..rules import Rule
from .bias import is_bias
from .report import ROOT

__all__ = ["Ledger", "Call", "Node"]

_LINEAR = {"LinearEpsilonFunction", "AddmmEpsilonFunction", "BilinearUniformFunction",
           "LayerNormFunction"}
_ADD = {"AddEpsilonFunction", "_AddInplaceFunction", "_IndexAddFunction"}
_EPSILON = {"MatmulUniformFunction", "ReductionEpsilonFunction", "RMSNormFunction",
            "VectorNormFunction", "UniformFunction", "_UniformInplaceFunction", "StopFunction"}
_CONSTANT_NODES = ("MaskedFill", "Where", "IndexPut", "MaskedScatter")
_seq_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)


def _next_seq() -> int:
    """The sequence number the next autograd node of this thread will get."""
    if _seq_nr is not None:
        return _seq_nr()
    probe = torch.zeros((), requires_grad=True)  # pragma: no cover - older torch
    return probe.view(()).grad_fn._sequence_nr() + 1


@dataclass(eq=False)
class Call:
    """One call of a hooked module during the explained forward."""

    name: str
    module: nn.Module
    parent: "Call | None"
    index: int
    start: int
    end: int = -1
    alias_nodes: list = field(default_factory=list)
    out_sum: list = field(default_factory=list)
    in_sum: list = field(default_factory=list)
    max_abs: list = field(default_factory=list)
    nonfinite_out: list = field(default_factory=list)
    nonfinite_in: list = field(default_factory=list)
    in_orders: list = field(default_factory=list)
    forward_out: Tensor | None = None
    forward_in: Tensor | None = None
    has_path: bool = False


@dataclass(eq=False)
class Node:
    """One autograd node of the explained graph: its owner module call, absorber kind and the
    relevance balance measured by its hook."""

    node: Any
    owner: Call | None
    kind: str | None
    live: tuple[bool, ...]
    name: str
    order: int = -1
    balance: Any = None
    finite_out: list = field(default_factory=list)
    finite_in: list = field(default_factory=list)


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor], depth: int = 0) -> Any:
    """Apply ``fn`` to the tensors in ``obj`` (tuples, lists, dicts, ``ModelOutput``), rebuilding
    containers only where something changed; mutable mappings are updated in place."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if depth >= 4:
        return obj
    if isinstance(obj, (tuple, list)):
        items = [_map_tensors(o, fn, depth + 1) for o in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, Mapping):
        items = {k: _map_tensors(v, fn, depth + 1) for k, v in obj.items()}
        changed = {k: v for k, v in items.items() if v is not obj[k]}
        if not changed:
            return obj
        if type(obj) is dict:
            return items
        if isinstance(obj, MutableMapping):
            for k, v in changed.items():
                obj[k] = v
        return obj
    return obj


def _stats(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    finite = torch.isfinite(t)
    total = t.sum(dtype=torch.float64)
    big = torch.where(finite, t.abs(), 0).amax() if t.numel() else t.new_zeros(())
    return total, big, ~finite.all()


class Ledger:
    """Module hooks (forward) and tensor/node hooks (backward) of one audit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[Call] = []
        self.done: list[Call] = []
        self.stack: list[Call] = []
        self.handles: list = []
        self.counter = itertools.count()
        self.names: dict[int, tuple[str, nn.Module]] = {}
        self.nodes: list[Node] = []
        self.alias_of: dict[int, tuple[Call, bool]] = {}

    # ------------------------------------------------------------------ forward hooks

    def install(self, model: nn.Module | None = None) -> None:
        """Hook every module of the (registered) model, not those inside a rule wrapper."""
        skip: set[int] = set()
        for name, module in self.model.named_modules():
            if id(module) in skip:
                continue
            if isinstance(module, Rule):
                skip.update(id(m) for m in module.modules() if m is not module)
            self.names[id(module)] = (name or ROOT, module)
            self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            # first of the forward hooks: hooks registered before the audit (transformers'
            # capture of hidden states, installed at a model's first forward) must see the
            # alias, or relevance would reach the raw output past it
            self.handles.append(module.register_forward_hook(self._post, prepend=True))

    def before_backward(self, explained: Tensor) -> None:
        """Hook every node of the graph of ``explained``, then drop the module hooks."""
        self.nodes, _ = self.hook_graph([explained.grad_fn])
        self.remove()

    def remove(self) -> None:
        """Remove the module hooks (the node hooks go with the graph)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, module, args, kwargs):
        name, _ = self.names[id(module)]
        call = Call(name, module, self.stack[-1] if self.stack else None, len(self.calls),
                     _next_seq())
        self.calls.append(call)
        self.stack.append(call)
        memo: dict[int, Tensor] = {}
        with torch._C.DisableTorchFunction():
            args, kwargs = _map_tensors((args, kwargs), lambda t: self._alias(t, call, memo, True))
        return (args, kwargs) if memo else None

    def _post(self, module, args, output):
        call = self.stack.pop()
        call.end = _next_seq()  # before the output aliases: they belong to no module
        self.done.append(call)
        memo: dict[int, Tensor] = {}
        with torch._C.DisableTorchFunction():
            output = _map_tensors(output, lambda t: self._alias(t, call, memo, False))
        return output if memo else None

    def _alias(self, t: Tensor, call: Call, memo: dict[int, Tensor], is_input: bool) -> Tensor:
        """A private alias of an on-path input or output, so that its gradient is exactly the
        relevance crossing this module's boundary (not that of other users of ``t``)."""
        if not t.requires_grad:
            return t
        if id(t) in memo:
            return memo[id(t)]
        alias = lf.alias(t)  # not a view: it may be updated in place (Falcon, XLM)
        alias.__dict__.update(t.__dict__)  # keep tags (e.g. CP-LRP gates)
        memo[id(t)] = alias
        call.has_path = True
        call.alias_nodes.append(alias.grad_fn)
        self.alias_of[id(alias.grad_fn)] = (call, is_input)
        finite = torch.isfinite(t).all()
        if is_input:
            call.forward_in = finite if call.forward_in is None else call.forward_in & finite
            alias.register_hook(self._input_hook(call))
        else:
            call.forward_out = finite if call.forward_out is None else call.forward_out & finite
            alias.register_hook(self._output_hook(call))
        return alias

    # ------------------------------------------------------------------ backward hooks

    def _output_hook(self, call: Call):
        def hook(grad: Tensor | None) -> None:
            if grad is None:
                return
            total, big, bad = _stats(grad)
            call.out_sum.append(total)
            call.max_abs.append(big)
            call.nonfinite_out.append(bad)
        return hook

    def _input_hook(self, call: Call):
        def hook(grad: Tensor | None) -> None:
            if grad is None:
                return
            total, big, bad = _stats(grad)
            call.in_sum.append(total)
            call.max_abs.append(big)
            call.nonfinite_in.append(bad)
            call.in_orders.append((next(self.counter), bad))
        return hook

    # ------------------------------------------------------------------ the graph

    def hook_graph(self, roots: Sequence[Any]) -> tuple[list[Node], list[Tensor]]:
        """Hook every node reachable from ``roots``; return the nodes and the leaves."""
        aliases = {id(n) for c in self.calls for n in c.alias_nodes}
        starts = [c.start for c in self.calls]
        bias_cache: dict[int, bool] = {}
        nodes: list[Node] = []
        leaves: list[Tensor] = []
        seen: dict[int, Any] = {}  # holds the node objects, so that their ids stay unique
        stack = [r for r in roots if r is not None]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            edges = node.next_functions
            stack.extend(n for n, _ in edges if n is not None)
            if type(node).__name__ == "AccumulateGrad":
                if not any(node.variable is t for t in leaves):
                    leaves.append(node.variable)
                continue
            self._hook_sideways(node, edges, starts)
            if id(node) in aliases:
                continue
            entry = self._classify(node, edges, starts, bias_cache)
            node.register_hook(self._node_hook(entry))
            nodes.append(entry)
        return nodes, leaves

    def _hook_sideways(self, node: Any, edges: Any, starts: list[int]) -> None:
        """Relevance that leaves a module through the output of one of its submodules, used
        outside it (transformers' captured hidden states: LLaVA reads a vision layer's output
        that the encoder does not return) crosses the boundary of every module between that
        submodule and the user: count it as relevance at their outputs. Likewise relevance
        that reaches an explained input where a module uses it, not through the model's
        arguments: count it as relevance at the inputs of that module and those around it."""
        crossings = []
        mine = self.alias_of.get(id(node))
        user = mine[0] if mine is not None else self._owner(node._sequence_nr(), starts)
        for j, (child, _) in enumerate(edges):
            if child is None:
                continue
            produced = self.alias_of.get(id(child))
            if produced is not None and not produced[1]:
                around = set()
                call = user
                while call is not None:
                    around.add(id(call))
                    call = call.parent
                crossed = []
                call = produced[0].parent
                while call is not None and id(call) not in around:
                    crossed.append(call)
                    call = call.parent
                if crossed:
                    crossings.append((j, crossed, False))
            elif type(child).__name__ == "AccumulateGrad" \
                    and not isinstance(child.variable, nn.Parameter):
                # an explained input used inside a module (a dual encoder's text embeddings
                # handed to its tower by a hook): it enters the user and all modules around it
                call = user.parent if mine is not None and mine[1] else user
                crossed = []
                while call is not None:
                    crossed.append(call)
                    call = call.parent
                if crossed:
                    crossings.append((j, crossed, True))
        if not crossings:
            return

        def hook(grad_inputs, grad_outputs) -> None:
            for j, crossed, entering in crossings:
                if grad_inputs[j] is None:
                    continue
                total = grad_inputs[j].sum(dtype=torch.float64)
                for call in crossed:
                    (call.in_sum if entering else call.out_sum).append(total)

        node.register_hook(hook)

    def _owner(self, seq: int, starts: list[int]) -> Call | None:
        i = bisect.bisect_right(starts, seq) - 1
        call = self.calls[i] if i >= 0 else None
        while call is not None and not seq < call.end:
            call = call.parent
        return call

    def _classify(self, node, edges, starts, bias_cache) -> Node:
        owner = self._owner(node._sequence_nr(), starts)
        live = tuple(n is not None for n, _ in edges)
        cls = getattr(type(node), "_forward_cls", None)
        name = type(node).__name__
        kind: str | None
        if cls is None:
            constant = name.startswith(_CONSTANT_NODES) or (name.startswith("Cat")
                                                            and not all(live))
            kind = "constant" if constant else f"autograd:{name}"
        elif not (cls.__module__ or "").startswith("lrp_explicit"):
            name = cls.__qualname__
            kind = f"function:{name}"
        else:
            fn = cls.__name__
            name = fn
            if fn == "SoftmaxFunction":
                kind = "softmax"
            elif fn in ("AttentionFunction", "FusedAttentionFunction"):
                kind = None  # decided in the hook: softmax unless q and k get nothing
            elif fn in _LINEAR:
                module = owner.module if owner is not None else None
                if module is not None and id(module) not in bias_cache:
                    bias_cache[id(module)] = _has_bias(module)
                kind = "bias" if module is None or bias_cache[id(module)] else "epsilon"
            elif fn in _ADD:
                kind = "constant" if sum(live) < 2 else "epsilon"
            elif fn in _EPSILON:
                kind = "epsilon"
            else:
                kind = f"rule:{fn}"
        return Node(node, owner, kind, live, name)

    def _node_hook(self, entry: Node):
        def hook(grad_inputs, grad_outputs) -> None:
            entry.order = next(self.counter)
            passed = [g for g, on in zip(grad_inputs, entry.live) if on and g is not None]
            received = [g for g in grad_outputs if g is not None]
            entry.balance = (sum((g.sum(dtype=torch.float64) for g in received), 0.0)
                             - sum((g.sum(dtype=torch.float64) for g in passed), 0.0))
            entry.finite_out = [torch.isfinite(g).all() for g in received]
            entry.finite_in = [torch.isfinite(g).all() for g in passed]
            if entry.kind is None:
                qk = [g for g, on in list(zip(grad_inputs, entry.live))[:2] if on and g is not None]
                entry.kind = "softmax" if qk else "epsilon"
        return hook


def _has_bias(module: nn.Module) -> bool:
    """True if ``module`` (or the module its rule wraps) has a non-zero bias parameter."""
    inner = module.module if isinstance(module, Rule) else module
    return any(is_bias(n) and bool(p.detach().ne(0).any())
               for n, p in inner.named_parameters(recurse=False))


