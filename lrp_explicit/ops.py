"""The op table: which functional call gets which LRP rule.

Stock models do most of their work in functional calls (``a + b``, ``torch.matmul``,
``F.softmax``, ``F.scaled_dot_product_attention``, ``torch.addmm``, ``F.layer_norm`` …). This
module maps each such torch function to a canonical op name (:data:`OP_NAMES`) and each name to
a *handler* that calls the matching Function of :mod:`lrp_explicit.functional`.

A handler has the signature ``handler(func, args, kwargs, epsilon) -> output``: ``func`` is the
intercepted torch function, ``args``/``kwargs`` its arguments (at least one tensor argument is on
the relevance path), ``epsilon`` the composite's ε (``None`` for the dtype default). It must
return exactly what ``func(*args, **kwargs)`` returns in the forward. A handler may raise
:class:`NoRule` to declare this particular call unruled.

:data:`ATTNLRP_OPS` and :data:`CPLRP_OPS` are the two shipped tables; a
:class:`~lrp_explicit.Composite` takes one and lets users override entries by name.
"""
from __future__ import annotations

import dis
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import functional as lf

__all__ = ["OP_NAMES", "PASS_THROUGH", "ATTNLRP_OPS", "CPLRP_OPS", "NoRule", "Handler",
           "on_path", "GATE_ATTR", "name_transformers_ops", "ATTENTION_MODES", "attention_ops",
           "INPLACE"]

#: An op-table handler: ``handler(func, args, kwargs, epsilon)`` computes the intercepted call
#: ``func(*args, **kwargs)`` through an LRP Function (or raises :class:`NoRule` to leave it to
#: plain autograd).
Handler = Callable[[Callable, tuple, dict, "float | None"], Any]
T = torch.Tensor

#: Attribute set on outputs of element-wise activations; CP-LRP holds such gates constant.
GATE_ATTR = "_lrp_gate"


class NoRule(Exception):
    """Raised by a handler when this particular call has no rule (e.g. ``a / b`` with both
    operands on the relevance path)."""


def on_path(x: Any) -> bool:
    """True if ``x`` is a tensor on the relevance path (it requires grad)."""
    return isinstance(x, Tensor) and x.requires_grad


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _call(func, args, kwargs):
    return lambda *_: func(*args, **kwargs)


# ---------------------------------------------------------------------------- add / subtract


_SUB = {torch.sub, torch.subtract, T.sub, T.subtract, T.__sub__, T.sub_, T.__isub__}
_RSUB = {T.__rsub__, torch.rsub}
_INPLACE = {T.add_, T.__iadd__, T.sub_, T.__isub__, T.mul_, T.__imul__, T.div_, T.__idiv__,
            T.__itruediv__}


def _add(func, args, kwargs, epsilon):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    if func in _RSUB:  # other - alpha * self
        coef_a, coef_b = -alpha, 1.0
    elif func in _SUB:
        coef_a, coef_b = 1.0, -alpha
    else:
        coef_a, coef_b = 1.0, alpha
    if func in _INPLACE:
        return _inplace(func, args, kwargs, a, b, coef_a, coef_b, epsilon)
    return lf.AddEpsilonFunction.apply(a, b, coef_a, coef_b, epsilon,
                                       lambda x, y: func(x, y, *args[2:], **kwargs))


class _AddInplaceFunction(torch.autograd.Function):
    """In-place ``a += c·b`` with the ε-rule; ``a``'s old value is ``z − c·b``."""

    @staticmethod
    def forward(ctx, a, b, coef_b, epsilon, op):
        op(a, b)
        ctx.mark_dirty(a)
        ctx.coef_b, ctx.epsilon = coef_b, epsilon
        # a copy of the output: a later in-place update (``a += c; a += d``) must not change it
        lf._save(ctx, b if isinstance(b, Tensor) else None, a.clone())
        ctx.other = None if isinstance(b, Tensor) else b
        return a

    @staticmethod
    def backward(ctx, relevance):
        b, z = lf._saved(ctx)
        other = b if b is not None else ctx.other
        part_b = other * ctx.coef_b
        g = lf._divide(relevance, z, ctx.epsilon)
        r_a = g * (z - part_b)
        r_b = lf._sum_to(g * part_b, b) if ctx.needs_input_grad[1] else None
        return r_a, r_b, None, None, None


class _UniformInplaceFunction(torch.autograd.Function):
    """In-place ``a *= b`` / ``a /= b``: identity to ``a`` (constant ``b``) or ½ each."""

    @staticmethod
    def forward(ctx, a, b, op):
        ctx.b_meta = (b.shape, b.dtype) if isinstance(b, Tensor) else None
        op(a, b)
        ctx.mark_dirty(a)
        return a

    @staticmethod
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[1]:
            return relevance, None, None
        half = relevance / 2
        shape, dtype = ctx.b_meta
        return half, half.sum_to_size(shape).to(dtype), None


#: In-place ops of augmented assignments (``a += b`` reaches the dispatch as ``Tensor.add_``)
#: and the out-of-place op each stands for.
_AUGMENTED = {T.__iadd__: T.add, T.__isub__: T.sub, T.__imul__: T.mul, T.__idiv__: T.div,
              T.__itruediv__: T.div, T.add_: T.add, T.sub_: T.sub, T.mul_: T.mul,
              T.div_: T.div}
_BINARY_OP = dis.opmap.get("BINARY_OP")  # Python ≥ 3.11: the argument names the operator
_INPLACE_ARGS = {i for i, (name, _) in enumerate(getattr(dis, "_nb_ops", ()))
                 if name.startswith("NB_INPLACE_")}
_INPLACE_OPCODES = {dis.opmap[n] for n in ("INPLACE_ADD", "INPLACE_SUBTRACT",
                                           "INPLACE_MULTIPLY", "INPLACE_TRUE_DIVIDE")
                    if n in dis.opmap}  # Python 3.10
_OWN_MODULES = ("lrp_explicit.", "torch.")


def _augmented_assignment() -> bool:
    """True if the in-place op being dispatched is an augmented assignment (``a += b``) of the
    calling code, not a method call (``a.add_(b)``): the two reach the dispatch as the same
    function, but only the first rebinds the name to the result. Read from the instruction the
    calling frame is executing; used only where autograd refuses the in-place update."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_OWN_MODULES):
        frame = frame.f_back
    if frame is None:
        return False
    code, index = frame.f_code.co_code, frame.f_lasti
    if index < 0 or index + 1 >= len(code):
        return False
    if code[index] == _BINARY_OP:
        return code[index + 1] in _INPLACE_ARGS
    return code[index] in _INPLACE_OPCODES


_writable = lf.writable


def _inplace(func, args, kwargs, a, b, coef_a, coef_b, epsilon):
    if not on_path(a):
        raise NoRule  # a constant updated in place by a path tensor: no rule for that
    if not _writable(a):
        if func not in _AUGMENTED or not _augmented_assignment():
            raise NoRule  # ``a.add_(b)``: the caller may keep ``a``; autograd refuses it
        # ``a += b`` rebinds the name to what ``__iadd__`` returns: the out-of-place result
        # is the same value, and the leaf (e.g. CTRL's ``inputs_embeds *= √d``) stays intact
        plain = _AUGMENTED[func]
        op = lambda x, y: plain(x, y, *args[2:], **kwargs)  # noqa: E731
        if plain in (T.mul, T.div):
            return lf.UniformFunction.apply(op, a, b)
        return lf.AddEpsilonFunction.apply(a, b, coef_a, coef_b, epsilon, op)
    op = lambda x, y: func(x, y, *args[2:], **kwargs)  # noqa: E731
    if func in (T.mul_, T.__imul__, T.div_, T.__idiv__, T.__itruediv__):
        return _UniformInplaceFunction.apply(a, b, op)
    return _AddInplaceFunction.apply(a, b, coef_b, epsilon, op)


class _IndexAddFunction(torch.autograd.Function):
    """``index_add`` (``z = a + α·source`` scattered along ``dim`` at ``index``) with the
    ε-rule: ``R_a = a ⊙ R ⊘ s(z)``, ``R_source = α·source ⊙ (R ⊘ s(z))`` gathered at
    ``index``. In place (``index_add_``) ``a`` is marked dirty; its old value is
    ``z − α·source``."""

    @staticmethod
    def forward(ctx, a, source, dim, index, alpha, epsilon, op, inplace):
        z = op(a, source)
        if inplace:
            ctx.mark_dirty(a)
        ctx.dim, ctx.alpha, ctx.epsilon = dim, alpha, epsilon
        old = None if inplace or not ctx.needs_input_grad[0] else a
        # a copy: the output may be updated in place again (a loop over experts)
        lf._save(ctx, source, index, z.clone() if inplace else z, old)
        return z

    @staticmethod
    def backward(ctx, relevance):
        source, index, z, old = lf._saved(ctx)
        g = lf._divide(relevance, z, ctx.epsilon)
        r_a = r_source = None
        if ctx.needs_input_grad[0]:
            if old is None:
                old = z.index_add(ctx.dim, index, source, alpha=-ctx.alpha)
            r_a = (g * old).to(z.dtype)
        if ctx.needs_input_grad[1]:
            r_source = (g.index_select(ctx.dim, index) * source * ctx.alpha).to(source.dtype)
        return r_a, r_source, None, None, None, None, None, None


def _index_add(func, args, kwargs, epsilon):
    """``index_add``/``index_add_`` sum contributions into ``a``: the ε-rule of a sum (plain
    autograd would copy the whole relevance to every contribution). MoE experts use it."""
    a, dim = args[0], _arg(args, kwargs, 1, "dim")
    index, source = _arg(args, kwargs, 2, "index"), _arg(args, kwargs, 3, "source")
    alpha = kwargs.get("alpha", args[4] if len(args) > 4 else 1)
    if "out" in kwargs or not isinstance(dim, int) or not isinstance(source, Tensor):
        raise NoRule
    inplace = func is T.index_add_
    return _IndexAddFunction.apply(a, source, dim, index, alpha, epsilon,
                                   lambda x, y: func(x, dim, index, y, alpha=alpha), inplace)


# ---------------------------------------------------------------------------- mul / div / neg


def _mark_gate(out: Tensor) -> Tensor:
    setattr(out, GATE_ATTR, True)
    return out


def _mul_uniform(func, args, kwargs, epsilon):
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if func in _INPLACE:
        return _inplace(func, args, kwargs, a, b, 1.0, 1.0, epsilon)
    if on_path(a) != on_path(b) and any(isinstance(t, Tensor) and t.is_complex() for t in (a, b)):
        return _complex_product(func, args, kwargs, a, b, epsilon)
    return lf.UniformFunction.apply(lambda x, y: func(x, y, *args[2:], **kwargs), a, b)


def _complex_product(func, args, kwargs, a, b, epsilon):
    """A complex path tensor times a complex constant (Llama 4's rotary embedding multiplies
    by ``exp(iθ)``): in real arithmetic a 2 × 2 linear map of each (re, im) pair, which mixes
    the two parts, so the ε-rule of a linear map (as the real rotary form ``q cos +
    rotate_half(q) sin`` gets from its ops), not the identity of a real scaling."""
    path, other = (a, b) if on_path(a) else (b, a)
    if not (path.is_complex() and (isinstance(other, complex) or isinstance(other, Tensor)
                                   and other.is_complex())):
        return lf.UniformFunction.apply(lambda x, y: func(x, y, *args[2:], **kwargs), a, b)
    rest = args[2:]
    kwargs = {k: v for k, v in kwargs.items() if k != "other"}

    def fn(t: Tensor) -> Tensor:
        z = torch.view_as_complex(t)
        return torch.view_as_real(func(z, b, *rest, **kwargs) if path is a
                                  else func(a, z, *rest, **kwargs))

    return torch.view_as_complex(lf.bilinear_uniform(fn, torch.view_as_real(path),
                                                     epsilon=epsilon))


def _mul_gate_constant(func, args, kwargs, epsilon):
    """CP-LRP: a product of a gate (activation output) and a signal holds the gate constant."""
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if on_path(a) and on_path(b):
        gate_a, gate_b = getattr(a, GATE_ATTR, False), getattr(b, GATE_ATTR, False)
        if gate_a != gate_b:
            a, b = (lf.stop(a), b) if gate_a else (a, lf.stop(b))
            args = (a, b) + tuple(args[2:])
            kwargs = {k: v for k, v in kwargs.items() if k != "other"}
    return _mul_uniform(func, args, kwargs, epsilon)


_RDIV = {T.__rdiv__, T.__rtruediv__}


def _div(func, args, kwargs, epsilon):
    """``x / c`` is a scaling and ``c / x`` an element-wise function of ``x``: both take the
    identity rule. A denominator on the relevance path next to a numerator on it is held
    constant, as the standard deviation of a norm is (e.g. MoE routing weights ``w / Σw``)."""
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if kwargs.get("rounding_mode") is not None:
        raise NoRule
    if on_path(a) and on_path(b):
        if func in _RDIV:  # other / self: self is the denominator
            a = lf.stop(a)
        else:
            b = lf.stop(b)
        args = (a, b) + tuple(args[2:])
        kwargs = {k: v for k, v in kwargs.items() if k != "other"}
    if func in _INPLACE:
        return _inplace(func, args, kwargs, a, b, 1.0, 1.0, epsilon)
    path = a if on_path(a) else b
    if path is a:
        fn = lambda x: func(x, b, *args[2:], **kwargs)  # noqa: E731
    else:
        fn = lambda x: func(a, x, *args[2:], **kwargs)  # noqa: E731
    return lf.UniformFunction.apply(fn, path)


def _only_path(func, args, kwargs) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The one argument of a call on the relevance path (positional or keyword) and the call as
    a function of it; :class:`NoRule` unless exactly one argument is on the path."""
    where = [i for i, x in enumerate(args) if on_path(x)]
    keys = [k for k, v in kwargs.items() if on_path(v)]
    if len(where) + len(keys) != 1:
        raise NoRule
    if keys:
        key = keys[0]
        return kwargs[key], lambda x: func(*args, **{**kwargs, key: x})
    i = where[0]
    return args[i], lambda x: func(*args[:i], x, *args[i + 1:], **kwargs)


def _identity(func, args, kwargs, epsilon):
    """Element-wise function of one path tensor (activations, scaling, negation)."""
    x, call = _only_path(func, args, {k: v for k, v in kwargs.items() if k != "inplace"})
    return lf.UniformFunction.apply(call, x)


def _affine(func, args, kwargs, epsilon):
    """A map affine in its one path tensor, every other argument constant (a convolution's
    input, average pooling, batch norm in eval mode, a triangular solve's right-hand side): the
    ε-rule ``R_x = x ⊙ Jᵀ(R ⊘ s(z))`` through one vector-Jacobian product; constant terms (a
    bias, a running mean) absorb their shares."""
    x, call = _only_path(func, args, kwargs)
    return lf.bilinear_uniform(call, x, epsilon=epsilon)


def _activation(func, args, kwargs, epsilon):
    return _mark_gate(_identity(func, args, kwargs, epsilon))


# ---------------------------------------------------------------------------- products


def _matmul(func, args, kwargs, epsilon):
    a, b = args[0], _arg(args, kwargs, 1, "other", _arg(args, kwargs, 1, "mat2"))
    if func is T.__rmatmul__:
        a, b = b, a
    return lf.MatmulUniformFunction.apply(a, b, epsilon, lambda x, y: func(*args, **kwargs))


def _einsum(func, args, kwargs, epsilon):
    equation, *operands = args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if len(operands) != 2 or not all(isinstance(t, Tensor) for t in operands):
        raise NoRule
    return lf.bilinear_uniform(lambda x, y: torch.einsum(equation, x, y), *operands,
                               epsilon=epsilon)


def _linear(func, args, kwargs, epsilon):
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    return lf.linear_epsilon(x, weight, bias, epsilon)


def _addmm(func, args, kwargs, epsilon):
    c, m1, m2 = args[0], _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    return lf.addmm_epsilon(c, m1, m2, beta, alpha, epsilon)


def _grouped_mm(func, args, kwargs, epsilon):
    """Grouped matrix products of MoE experts (``torch._grouped_mm``, transformers' fallback op):
    linear in each operand, so the uniform-ε rule through one vector-Jacobian product; with the
    expert weights frozen this is the ε-rule of the input."""
    rest = list(args[2:]) + list(kwargs.values())
    if len(args) < 2 or any(on_path(t) for t in rest):
        raise NoRule
    return lf.bilinear_uniform(lambda x, w: func(x, w, *args[2:], **kwargs), args[0], args[1],
                               epsilon=epsilon)


def name_transformers_ops() -> None:
    """Name the custom ops of transformers' MoE integration (``transformers::grouped_mm_fallback``)
    once it is imported; the MoE family files call this when they build a composite."""
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        OP_NAMES.setdefault(fallback, "grouped_mm")


# ---------------------------------------------------------------------------- softmax, attention


def _softmax_args(args, kwargs):
    dim = _arg(args, kwargs, 1, "dim")
    dtype = kwargs.get("dtype")
    if dtype is None and len(args) > 2 and isinstance(args[2], torch.dtype):
        dtype = args[2]
    if dim is None:
        raise NoRule
    return args[0], dim, dtype


def _softmax_gxi(func, args, kwargs, epsilon):
    x, dim, dtype = _softmax_args(args, kwargs)
    return lf.softmax(x, dim, dtype)


def _softmax_stop(func, args, kwargs, epsilon):
    """CP-LRP: the attention weights are constants."""
    return lf.stop(func(*args, **kwargs))


def _sdpa(hold_weights: bool, exact: bool = False) -> Handler:
    def handler(func, args, kwargs, epsilon):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                 "enable_gqa")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        if bound.get("dropout_p", 0.0):
            raise NoRule
        return lf.scaled_dot_product_attention(
            bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
            bool(bound.get("is_causal", False)), bound.get("scale"),
            bool(bound.get("enable_gqa", False)), epsilon, hold_weights, exact)

    handler.__name__ = ("sdpa_cp" if hold_weights else "sdpa_attnlrp") + ("_exact" if exact else "")
    return handler


#: How the sdpa rule computes its backward: ``"fused"`` (one standard backward of the fused
#: kernel, the default) or ``"exact"`` (the rule decomposition with the ε on ``q kᵀ``).
ATTENTION_MODES = ("fused", "exact")


def attention_ops(mode: str, cp_lrp: bool = False) -> dict[str, Handler]:
    """Op-table entries for ``F.scaled_dot_product_attention`` in ``mode`` (see
    :data:`ATTENTION_MODES` and :func:`lrp_explicit.functional.scaled_dot_product_attention`).

    Raises
    ------
    ValueError
        For an unknown mode.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    return {"sdpa": _sdpa(hold_weights=cp_lrp, exact=mode == "exact")}


# ---------------------------------------------------------------------------- norms, reductions


def _layer_norm(func, args, kwargs, epsilon):
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    if on_path(weight) or on_path(bias):
        raise NoRule
    return lf.LayerNormFunction.apply(x, tuple(shape), weight, bias, eps, epsilon,
                                      lambda t: func(t, *args[1:], **kwargs))


def _rms_norm(func, args, kwargs, epsilon):
    if any(on_path(t) for t in list(args[1:]) + list(kwargs.values())):
        raise NoRule
    return lf.RMSNormFunction.apply(args[0], lambda t: func(t, *args[1:], **kwargs), epsilon)


def _reduction(func, args, kwargs, epsilon):
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    if isinstance(dim, torch.dtype):  # torch.sum(x, dtype) form
        dim = None
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    is_mean = func in (torch.mean, T.mean)
    if dim is not None and not isinstance(dim, int):
        dim = tuple(dim)
        if not dim:  # sum over an empty dim list reduces everything
            dim = None
    return lf.ReductionEpsilonFunction.apply(
        x, dim, keepdim, epsilon, lambda t: func(t, *args[1:], **kwargs), is_mean)


def _vector_norm(func, args, kwargs, epsilon):
    """The Euclidean norm (``p=2``/``"fro"``); other orders have no rule."""
    x = args[0]
    if func is torch.linalg.vector_norm:
        order, dim, keepdim = (_arg(args, kwargs, 1, "ord", 2), _arg(args, kwargs, 2, "dim"),
                               _arg(args, kwargs, 3, "keepdim", False))
    else:
        order, dim, keepdim = (_arg(args, kwargs, 1, "p", "fro"), _arg(args, kwargs, 2, "dim"),
                               _arg(args, kwargs, 3, "keepdim", False))
    if order not in (2, 2.0, "fro", None) or kwargs.get("dtype") is not None:
        raise NoRule
    if dim is not None and not isinstance(dim, int):
        dim = tuple(dim)
    return lf.VectorNormFunction.apply(x, dim, bool(keepdim), epsilon,
                                       lambda t: func(t, *args[1:], **kwargs))


# ---------------------------------------------------------------------------- more ops of the zoo


def _batched_addmm(func, args, kwargs, epsilon):
    """``baddbmm``/``addbmm`` (``z = β·c + α·Σ m1 m2``; BLOOM adds its ALiBi bias to the
    attention scores this way): the ε-rule of ``addmm``. ``c`` is a summand of the ε-add rule
    (a constant one, as the ALiBi bias, absorbs its share); the product takes the uniform-ε
    rule, half to each matrix when both are on the relevance path, all to the one that is
    otherwise. ``addbmm`` also sums over the batch: one more sum of the same ε-rule."""
    c = args[0]
    m1 = args[1] if len(args) > 1 else kwargs.get("batch1", kwargs.get("mat1"))
    m2 = args[2] if len(args) > 2 else kwargs.get("batch2", kwargs.get("mat2"))
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if "out" in kwargs or len(args) > 3 or not all(isinstance(t, Tensor) for t in (c, m1, m2)):
        raise NoRule
    return lf.AddmmEpsilonFunction.apply(c, m1, m2, beta, alpha, epsilon, func)


def _convolution(func, args, kwargs, epsilon):
    """Functional convolutions (``F.conv1d``/``conv2d``/``conv3d`` and the transposed ones,
    as the short causal convolution of state-space layers calls them): linear in the input
    with the weight frozen, so the ε-rule of an affine map (the bias absorbs its share). A
    weight on the relevance path too makes the convolution bilinear: uniform-ε, half to each."""
    x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    if not (on_path(x) and on_path(weight)):
        return _affine(func, args, kwargs, epsilon)
    tail = args[2:]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("input", "weight")}
    if any(on_path(t) for t in list(tail) + list(kwargs.values())):
        raise NoRule  # a bias on the path: not linear in the input and weight
    return lf.bilinear_uniform(lambda t, w: func(t, w, *tail, **kwargs), x, weight,
                               epsilon=epsilon)


def _cumsum(func, args, kwargs, epsilon):
    """``cumsum``: every output is a partial sum, so the ε-rule of each sum, summed over the
    sums an input enters: ``R_s = x_s ⊙ Σ_{t≥s} R_t ⊘ s(z_t)`` (a reversed cumulative sum,
    no loop). The SSMs and linear attention use it for their decay; position ids built by a
    cumsum of the mask are off the relevance path."""
    dim = _arg(args, kwargs, 1, "dim")
    if "out" in kwargs or not isinstance(dim, int):
        raise NoRule
    return lf.CumsumEpsilonFunction.apply(args[0], dim, epsilon,
                                          lambda t: func(t, *args[1:], **kwargs))


def _logsumexp(func, args, kwargs, epsilon):
    """``logsumexp`` (attention sinks of Granite-SWA, routers' z-losses) is ``exp`` (identity),
    a sum (ε-rule) and ``log`` (identity): ``R_i = exp(x_i) ⊙ R ⊘ s(Σ exp x)``, i.e. the
    relevance is shared in proportion to the softmax of the inputs."""
    dim = _arg(args, kwargs, 1, "dim")
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    if "out" in kwargs or dim is None or (not isinstance(dim, int) and not len(dim)):
        raise NoRule
    dim = dim if isinstance(dim, int) else tuple(dim)
    return lf.LogSumExpFunction.apply(args[0], dim, keepdim, epsilon,
                                      lambda t: func(t, *args[1:], **kwargs))


def _extremum(func, args, kwargs, epsilon):
    """``maximum``/``minimum`` (``fmax``/``fmin``): with one constant operand an element-wise
    function of the other (a clamp; RWKV's and xLSTM's stabilisers), so the identity rule; with
    both operands on the path each element comes from one of them, and the relevance goes to
    the winner (ties: half each), as the layout rule of ``max`` does: plain autograd."""
    a, b = args[0], _arg(args, kwargs, 1, "other")
    if "out" in kwargs:
        raise NoRule
    if on_path(a) and on_path(b):
        return func(*args, **kwargs)
    return _identity(func, args, kwargs, epsilon)


def _statistic(func, args, kwargs, epsilon):
    """``var``/``std`` are the statistic of a norm written in modeling code
    (``(x − μ) * rsqrt(var + eps)``): held constant as in the constant-std norm rule (AttnLRP
    Prop. 3.4), so the product gives ``x − μ`` the identity. ``var_mean``/``std_mean`` return
    the mean too: it takes the ε-rule of a mean."""
    out = func(*args, **kwargs)
    if func not in _WITH_MEAN:
        return lf.stop(out)
    x, dim = args[0], _arg(args, kwargs, 1, "dim")
    if dim is not None and not isinstance(dim, int):
        dim = tuple(dim) or None
    keepdim = out[1].dim() == x.dim()
    mean = lf.ReductionEpsilonFunction.apply(x, dim, keepdim, epsilon,
                                             lambda t: func(t, *args[1:], **kwargs)[1], True)
    return lf.stop(out[0]), mean


_WITH_MEAN = {torch.var_mean, torch.std_mean}


def _scatter(func, args, kwargs, epsilon):
    """``scatter``/``scatter_`` places values (Llama 4's router writes its top-k scores into a
    constant): layout, plain autograd moves the relevance (the overwritten entries get none).
    With ``reduce=`` it sums or multiplies instead: no rule."""
    if "reduce" in kwargs or len(args) > 4:
        raise NoRule
    return func(*args, **kwargs)


def _identity_inplace(func, args, kwargs, epsilon):
    """In-place element-wise functions (``x.exp_()``, ``x.clamp_(…)``, ``F.relu_``): the
    identity rule, as their out-of-place forms."""
    a = args[0]
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    if not on_path(a) or any(on_path(t) for t in list(args[1:]) + list(kwargs.values())) \
            or not _writable(a):
        raise NoRule
    out = _UniformInplaceFunction.apply(a, None, lambda x, _: func(x, *args[1:], **kwargs))
    return _mark_gate(out)


def _batch_norm(func, args, kwargs, epsilon):
    """``F.batch_norm`` in eval mode (running statistics): an affine map of each channel,
    ``z = (x − μ) / σ ⊙ w + b``, so the ε-rule of an affine map (the running mean and the bias
    absorb their shares). In training mode the statistics are of the batch: no rule."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training")
    bound = {**dict(zip(names, args)), **kwargs}
    if bound.get("training", False) or bound.get("running_mean") is None:
        raise NoRule
    return _affine(func, args, kwargs, epsilon)


def _solve_triangular(func, args, kwargs, epsilon):
    """``torch.linalg.solve_triangular(A, B)`` is linear in its right-hand side ``B``: the matrix
    ``A`` is held constant and ``B`` takes the ε-rule (the UT transform of a gated delta-net,
    whose matrix is made of keys, β and the decay; MambaLRP holds such parameters constant)."""
    matrix, rhs = _arg(args, kwargs, 0, "A"), _arg(args, kwargs, 1, "B")
    if len(args) > 2 or "out" in kwargs or not isinstance(rhs, Tensor):
        raise NoRule
    options = {k: v for k, v in kwargs.items() if k not in ("A", "B")}
    if on_path(matrix):
        matrix = lf.stop(matrix)
    if not on_path(rhs):
        return func(matrix, rhs, **options)
    return _affine(func, (matrix, rhs), options, epsilon)


# ---------------------------------------------------------------------------- the tables

_ACTIVATIONS = [
    F.gelu, F.silu, F.relu, torch.relu, T.relu, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu,
    F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.tanh, F.sigmoid, F.logsigmoid,
    torch.tanh, T.tanh, torch.sigmoid, T.sigmoid, torch.exp, T.exp, torch.erf, T.erf,
    torch.sqrt, T.sqrt, torch.rsqrt, T.rsqrt, torch.abs, T.abs, torch.square, T.square,
    torch.reciprocal, T.reciprocal, torch.log, T.log, torch.sin, T.sin, torch.cos, T.cos,
    torch.clamp, T.clamp, torch.clip, T.clip, torch.pow, T.pow, T.__pow__, T.__rpow__,
    # element-wise too (Mamba's inverse softplus, soft-capping, clamps written as functions)
    torch.expm1, T.expm1, torch.log1p, T.log1p, torch.clamp_min, T.clamp_min, torch.clamp_max,
    T.clamp_max, torch.nan_to_num, T.nan_to_num, F.softsign, torch.exp2, T.exp2,
]

#: In-place element-wise functions (identity rule).
_ACTIVATIONS_INPLACE = [
    f for f in (getattr(T, n, None) for n in (
        "exp_", "sigmoid_", "tanh_", "relu_", "clamp_", "clamp_min_", "clamp_max_", "clip_",
        "abs_", "sqrt_", "rsqrt_", "square_", "erf_", "log_", "neg_", "reciprocal_", "pow_",
        "expm1_", "log1p_", "sin_", "cos_", "nan_to_num_", "exp2_"))
    if f is not None
] + [torch.relu_, F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_]

#: In-place ops whose target may be a tensor a rule saved (see
#: :func:`lrp_explicit.functional.preserve_saved`): every ``Tensor.<name>_`` method, the
#: augmented assignments and ``__setitem__``, less the few that change no value.
INPLACE: frozenset = frozenset(
    [getattr(T, n) for n in dir(T) if n.endswith("_") and not n.startswith("_")
     and n not in ("requires_grad_", "share_memory_", "retain_grad_", "record_stream_")
     and callable(getattr(T, n, None))]
    + [T.__iadd__, T.__isub__, T.__imul__, T.__idiv__, T.__itruediv__, T.__setitem__,
       *_ACTIVATIONS_INPLACE])

#: torch function -> canonical op name
OP_NAMES: dict[Callable, str] = {}


def _names(name: str, funcs) -> None:
    for f in funcs:
        OP_NAMES[f] = name


_names("add", [torch.add, T.add, T.__add__, T.__radd__, T.add_, T.__iadd__,
               *_SUB, *_RSUB])
_names("mul", [torch.mul, torch.multiply, T.mul, T.multiply, T.__mul__, T.__rmul__, T.mul_,
               T.__imul__])
_names("div", [torch.div, torch.divide, torch.true_divide, T.div, T.divide, T.true_divide,
               T.__truediv__, T.__div__, T.div_, T.__idiv__, T.__itruediv__, *_RDIV])
_names("scale", [torch.neg, torch.negative, T.neg, T.negative, T.__neg__])
_names("matmul", [torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.bmm, T.bmm,
                  torch.mm, T.mm, torch.mv, T.mv])
_names("einsum", [torch.einsum])
_names("linear", [F.linear])
_names("addmm", [torch.addmm, T.addmm])
_names("batch_norm", [F.batch_norm, torch.batch_norm])
_names("solve_triangular", [torch.linalg.solve_triangular])
# x / max(‖x‖, eps) with the norm held constant (as a norm's statistic): the identity
_names("normalize", [F.normalize])
# average pooling (Gemma 3's projector pools the patch features): linear, no bias: ε-rule
_names("average_pool", [F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d,
                        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                        torch.adaptive_avg_pool1d])
_names("index_add", [torch.index_add, T.index_add, T.index_add_])
_names("grouped_mm", [torch._grouped_mm] if hasattr(torch, "_grouped_mm") else [])
_names("softmax", [torch.softmax, T.softmax, F.softmax, torch.nn.functional.softmax])
_names("sdpa", [F.scaled_dot_product_attention])
_names("layer_norm", [F.layer_norm])
_names("rms_norm", [F.rms_norm])
_names("sum", [torch.sum, T.sum, torch.mean, T.mean])
_names("activation", _ACTIVATIONS)
_names("norm", [torch.norm, T.norm, torch.linalg.vector_norm])
_names("batched_addmm", [torch.baddbmm, T.baddbmm, torch.addbmm, T.addbmm])
_names("convolution", [F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
                       F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d])
_names("cumsum", [torch.cumsum, T.cumsum])
_names("logsumexp", [torch.logsumexp, T.logsumexp])
_names("extremum", [torch.maximum, T.maximum, torch.minimum, T.minimum, torch.fmax, T.fmax,
                    torch.fmin, T.fmin])
_names("statistic", [torch.var, T.var, torch.std, T.std, *_WITH_MEAN])
_names("activation_inplace", _ACTIVATIONS_INPLACE)
_names("scatter", [T.scatter, torch.scatter, T.scatter_])

#: Layout and selection ops whose plain autograd already moves relevance correctly.
PASS_THROUGH: frozenset = frozenset([
    T.view, T.view_as, T.reshape, T.reshape_as, torch.reshape, T.transpose, torch.transpose,
    T.permute, torch.permute, T.t, torch.t, T.contiguous, T.clone, torch.clone, T.detach,
    torch.detach, T.to, T.type, T.type_as, T.float, T.double, T.half, T.bfloat16,
    T.squeeze, torch.squeeze, T.unsqueeze, torch.unsqueeze, T.flatten, torch.flatten,
    T.unflatten, torch.unflatten, T.expand, T.expand_as, T.repeat, T.repeat_interleave,
    torch.repeat_interleave, T.narrow, torch.narrow, T.select, torch.select, T.__getitem__,
    T.__setitem__, T.split, torch.split, T.chunk, torch.chunk, T.unbind, torch.unbind,
    torch.cat, torch.concat, torch.concatenate, torch.stack, T.index_select,
    torch.index_select, T.gather, torch.gather, torch.where, T.where, T.masked_fill,
    torch.masked_fill, T.masked_fill_, T.masked_scatter, torch.masked_scatter, T.diagonal,
    torch.diagonal, F.pad, F.dropout, T.roll, torch.roll, T.flip,
    torch.flip, T.movedim, torch.movedim, T.swapaxes, torch.swapaxes, T.tril, torch.tril,
    T.triu, torch.triu, torch.max, T.max, torch.min, T.min, torch.amax, T.amax, torch.amin,
    T.amin, torch.topk, T.topk, torch.sort, T.sort, T.T.__get__, T.mT.__get__,
    T.H.__get__, T.mH.__get__, T.data.__get__, T.real.__get__, T.requires_grad_,
    T.__len__, T.dim, T.size, T.__iter__,
    # more layout: splits, in-place copies and fills (the overwritten values get no relevance,
    # the copied source all of its own), scatters of values into a tensor, windows
    torch.tensor_split, T.tensor_split, torch.split_with_sizes, T.split_with_sizes,
    torch.hsplit, T.hsplit, torch.vsplit, T.vsplit, torch.dsplit, T.dsplit, T.unsafe_split,
    torch.unsafe_split, T.copy_, T.fill_, T.zero_, T.index_fill_, T.index_fill,
    torch.index_fill, T.masked_scatter_, T.index_copy_, T.index_copy, torch.index_copy,
    T.take_along_dim, torch.take_along_dim, T.unfold,
    T.moveaxis, torch.moveaxis, T.squeeze_, T.unsqueeze_, T.transpose_, T.t_,
    torch.atleast_1d, torch.atleast_2d, torch.atleast_3d, T.resolve_conj, T.resolve_neg,
    torch.view_as_real, torch.view_as_complex,
    # max pooling routes the relevance to each window's winner, as its gradient does; unfold
    # copies windows (im2col)
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
    torch.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices, F.unfold,
])

_COMMON: dict[str, Handler] = {
    "add": _add,
    "div": _div,
    "scale": _identity,
    "matmul": _matmul,
    "einsum": _einsum,
    "linear": _linear,
    "addmm": _addmm,
    "index_add": _index_add,
    "grouped_mm": _grouped_mm,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "sum": _reduction,
    "norm": _vector_norm,
    "activation": _activation,
    "batched_addmm": _batched_addmm,
    "convolution": _convolution,
    "average_pool": _affine,
    "batch_norm": _batch_norm,
    "normalize": _identity,
    "cumsum": _cumsum,
    "logsumexp": _logsumexp,
    "extremum": _extremum,
    "statistic": _statistic,
    "activation_inplace": _identity_inplace,
    "scatter": _scatter,
    "solve_triangular": _solve_triangular,
}

#: AttnLRP (Achtibat et al. 2024): uniform rules for products, softmax as Gradient×Input.
ATTNLRP_OPS: dict[str, Handler] = {
    **_COMMON,
    "mul": _mul_uniform,
    "softmax": _softmax_gxi,
    "sdpa": _sdpa(hold_weights=False),
}

#: CP-LRP (Ali et al. 2022): attention weights and gates held constant.
CPLRP_OPS: dict[str, Handler] = {
    **_COMMON,
    "mul": _mul_gate_constant,
    "softmax": _softmax_stop,
    "sdpa": _sdpa(hold_weights=True),
}

