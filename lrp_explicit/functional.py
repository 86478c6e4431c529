"""Explicit LRP rules as :class:`torch.autograd.Function` objects.

Every Function here computes its forward with the plain PyTorch op, so the output is bit for
bit what the op returns, and replaces the backward by an LRP rule: the "gradient" that flows
backward is relevance. After ``y.backward(R)`` the relevance of a leaf ``x`` is ``x.grad``.

The rules (``s(z) = z + ε·sign(z)`` with ``sign(0) = +1``):

=====================  ===========================================================
ε-linear               ``R_x = x ⊙ ((R ⊘ s(z)) W)``; the bias absorbs its share
uniform-ε matmul       ``R_A = ½ A ⊙ ((R ⊘ s(z)) Bᵀ)``, ``R_B = ½ B ⊙ (Aᵀ (R ⊘ s(z)))``;
                       a constant operand leaves the full ε-rule to the other
ε-add                  ``R_a = a ⊙ R ⊘ s(z)``; a constant operand absorbs its share
uniform mul            ``R_a = R_b = ½ R``; a constant factor gives the identity
identity               ``R_x = R`` for element-wise functions
softmax                Gradient×Input: ``R_x = x ⊙ (R − s ⊙ Σ R)``; masked inputs get 0
layer norm             σ held constant: ``g = (R ⊘ s(y)) ⊙ w / σ``, ``R_x = x ⊙ (g − mean g)``
RMS norm               σ held constant: ``R_x = R ⊙ y ⊘ s(y)`` (``= R`` as ε → 0)
ε-reduction            ``R_i = x_i ⊙ R ⊘ s(z)`` for sums and means
stop                   ``R_x = 0``: the output is a constant for autograd
=====================  ===========================================================

Relevance is summed over broadcast dimensions so that every operand receives relevance of its
own shape, and operands that do not require grad receive ``None``.

Every ``epsilon`` argument defaults to ``None``: :func:`default_epsilon` of the stabilised
tensor's dtype (float32 ``1e-11``, float64 ``1e-12``, bfloat16 ``1e-6``, float16 ``2⁻¹⁴``),
small enough that float32 relevance stays within about 1e-6 relative of float64's.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_EPSILON",
    "default_epsilon",
    "stabilize",
    "linear_epsilon",
    "addmm_epsilon",
    "matmul_uniform",
    "bilinear_uniform",
    "add_epsilon",
    "mul_uniform",
    "identity",
    "softmax",
    "scaled_dot_product_attention",
    "layer_norm",
    "rms_norm",
    "sum_epsilon",
    "mean_epsilon",
    "cumsum_epsilon",
    "logsumexp",
    "stop",
    "alias",
    "writable",
    "preserve_saved",
]

#: Default ε per dtype (of the tensor that is stabilised), absolute. The ε only has to keep
#: ``R ⊘ s(z)`` finite at exact zeros: the relevance reaching ``z`` is a multiple of the same
#: saved ``z`` (the rules downstream multiply by their input; only the identity rule of an
#: activation with ``f(0) ≠ 0`` breaks that), so ``R ⊘ z`` is accurate even where ``z`` is
#: small, and a larger ε only distorts: it removes the share ``ε / (|z| + ε)`` of ``R``.
#: Each value is at or a decade below the largest ε at which the relevance still sits at the
#: dtype's round-off floor, measured against float64 on random-init LLaMA, GPT-2, BERT, Qwen3,
#: Gemma 3 and the real MiniLM (``benchmarks/precision.py``, ``docs/precision.md``):
#:
#: - float64 ``1e-12``: moves the relevance by at most ~2e-8 relative against ε → 0;
#: - float32 ``1e-11``: within ~1e-6 of float64 (the old 1e-6: 1.4e-4 to 4.5e-3);
#: - bfloat16 ``1e-6``: at bfloat16's own round-off floor (1e-3 to 1e-1 on these models; the
#:   old 1e-3 was up to 26 times worse); the half-precision rules divide in float32;
#: - float16 ``2⁻¹⁴`` (its smallest normal number): ``1 / ε = 16384`` keeps ``R / ε`` inside
#:   float16's range (65504) for ``|R| < 4`` where ``z`` is exactly 0; a smaller ε would be
#:   more accurate but closer to overflow (its range, not its resolution, sets this one).
#:
#: A relative ε (a fraction of ``max |z|``) was measured too and is not used: the dtype
#: minimum of additive attention masks dominates ``max |z|`` and wipes out the relevance of
#: those sums, and it costs a reduction per rule. ``epsilon=`` overrides the default.
DEFAULT_EPSILON: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-11,
    torch.bfloat16: 1e-6,
    torch.float16: 2.0 ** -14,
}


def default_epsilon(dtype: torch.dtype) -> float:
    """Return the default ε-stabiliser for tensors of ``dtype``.

    The values are in :data:`DEFAULT_EPSILON` (float64 ``1e-12``, float32 ``1e-11``,
    bfloat16 ``1e-6``, float16 ``2⁻¹⁴``); a dtype not listed gets ``1e-6``. They stabilise
    exact zeros without measurably changing the relevance: float32 relevance stays within
    about 1e-6 relative of float64's (``docs/precision.md``). The ε-rules of half-precision
    tensors divide in float32 with the ε of the half-precision dtype.
    """
    return DEFAULT_EPSILON.get(dtype, 1e-6)


def _eps(epsilon: float | None, dtype: torch.dtype) -> float:
    return default_epsilon(dtype) if epsilon is None else epsilon


def stabilize(z: Tensor, epsilon: float | None = None) -> Tensor:
    """Sign-aware stabiliser ``s(z) = z + ε·sign(z)`` with ``sign(0) = +1``.

    Parameters
    ----------
    z : Tensor
        The denominator to stabilise.
    epsilon : float, optional
        The stabiliser; ``None`` takes :func:`default_epsilon` of ``z.dtype``.
    """
    eps = _eps(epsilon, z.dtype)
    # |z| + ε with the sign of z: exact, and several times faster on CPU than torch.where;
    # adding 0.0 turns −0.0 into +0.0, so both zeros get +ε
    t = z + 0.0
    return t.abs().add_(eps).copysign_(t)


def _divide(relevance: Tensor, z: Tensor, epsilon: float | None) -> Tensor:
    """``R ⊘ s(z)``; in float32 for half-precision inputs (the callers cast back).

    For the ε-rules of sums and products only: ``s`` is computed as ``z + copysign(ε, z)`` (one
    temporary, two passes), which gives −ε rather than +ε at ``z = −0.0``.
    That changes no relevance: a sum or product is −0.0 only if every contribution ``z_i`` is
    a zero, and ``R_i = z_i ⊙ R ⊘ s(z)`` is then a zero of either sign. :func:`stabilize`
    itself keeps ``sign(−0.0) = +1``.
    """
    if z.dtype in _HALF:
        epsilon = default_epsilon(z.dtype) if epsilon is None else epsilon
        relevance, z = relevance.float(), z.float()
    eps = torch.tensor(_eps(epsilon, z.dtype), dtype=z.dtype)
    s = torch.copysign(eps, z).add_(z)
    if s.shape == relevance.shape and s.dtype == relevance.dtype and not torch.is_grad_enabled():
        return torch.div(relevance, s, out=s)  # the denominator is a temporary: reuse it
    return relevance / s


def _ratio(z: Tensor, epsilon: float | None) -> Tensor:
    """``z ⊘ s(z) = |z| ⊘ (|z| + ε)`` (0 at z = 0), in float32 for half-precision ``z``: the
    factor by which the ε-rule of a linear map scales relevance, in three passes."""
    eps = _eps(epsilon, z.dtype)
    a = _accurate(z).abs()
    return a.div_(a + eps)


_HALF = (torch.float16, torch.bfloat16)
_PLAIN = (Tensor, torch.nn.Parameter)  # weights that are not a quantised tensor subclass


def _accurate(t: Tensor) -> Tensor:
    """``t`` in float32 if it is half precision: rules with cancellations (the centring of
    LayerNorm, ``R − s ⊙ Σ R`` of softmax) run in float32 there and cast back."""
    return t.float() if t.dtype in _HALF else t


def _sum_to(relevance: Tensor, like: Tensor) -> Tensor:
    """Sum ``relevance`` over broadcast dimensions to the shape and dtype of ``like``."""
    if relevance.shape != like.shape:
        relevance = relevance.sum_to_size(like.shape)
    return relevance.to(like.dtype)


def _needs(ctx, index: int) -> bool:
    return ctx.needs_input_grad[index]


#: Attribute of a rule's backward node holding copies of its saved tensors, made by
#: :func:`preserve_saved` before an in-place update would change them.
_PRESERVED = "_lrp_saved"


def _saved(ctx) -> tuple:
    """The tensors ``ctx`` saved: the copies :func:`preserve_saved` made, if any."""
    saved = getattr(ctx, _PRESERVED, None)
    return ctx.saved_tensors if saved is None else saved


def writable(t: Tensor) -> bool:
    """False if autograd refuses an in-place update of the relevance-path tensor ``t``: a leaf
    that requires grad (the explained input itself), a view of one, or a view made where
    in-place updates of it are forbidden (inside a custom Function, under no-grad)."""
    if t.is_leaf:
        return not t.requires_grad
    base = t._base
    if base is None:
        return True
    if base.is_leaf and base.requires_grad:
        return False
    return _creation_meta is None or _creation_meta(t) == _DEFAULT_CREATION


_creation_meta = getattr(torch._C._autograd, "_get_creation_meta", None)
_DEFAULT_CREATION = getattr(getattr(torch._C._autograd, "CreationMeta", None), "DEFAULT", None)


class AliasFunction(torch.autograd.Function):
    """``t`` again: a new tensor that shares ``t``'s storage and version counter but is no
    view, so code may update it in place exactly where it may update ``t``; the relevance
    passes unchanged. Observers (the audit's ledger) hand these to the model in place of
    module inputs and outputs: a tensor hook on one sees the relevance of the value it had,
    also after an in-place update (on a view it would not fire at all)."""

    @staticmethod
    def forward(ctx, t):
        return t.detach()

    @staticmethod
    def backward(ctx, relevance):
        return relevance


def alias(t: Tensor) -> Tensor:
    """An alias of ``t`` for observers (:class:`AliasFunction`); a tensor that autograd does
    not let code update in place (a leaf that requires grad, see :func:`writable`) gets a
    view, which keeps that protection, and so does any tensor while grad is disabled."""
    if not torch.is_grad_enabled() or not writable(t):
        return t.view_as(t)  # (without grad a Function's output would not require grad)
    return AliasFunction.apply(t)


_SAVERS = "_lrp_savers"  # attribute of a relevance-path tensor: weak references to the
_COPIED = "_lrp_copied"  # rules that saved it; of a rule: the indices of its copied tensors


def _save(ctx, *tensors: Tensor | None) -> None:
    """``ctx.save_for_backward(*tensors)``, and a weak reference to ``ctx`` on every saved
    relevance-path input (on its base, for a view), so that :func:`preserve_saved` finds the
    rule if code updates that tensor in place later."""
    ctx.save_for_backward(*tensors)
    ref = None
    for t in tensors:
        if t is not None and t.requires_grad:
            base = t._base if t._base is not None else t
            ref = ref or weakref.ref(ctx)
            savers = base.__dict__.get(_SAVERS)
            if savers is None:
                base.__dict__[_SAVERS] = [ref]
            else:
                savers.append(ref)


def _own_node(node) -> bool:
    cls = getattr(type(node), "_forward_cls", None)
    return cls is not None and (getattr(cls, "__module__", None) or "").startswith("lrp_explicit")


def _preserve_node(node, ptr: int) -> None:
    """Copy the tensors ``node`` saved that live in the storage at ``ptr`` (once each)."""
    saved = getattr(node, _PRESERVED, None)
    if saved is None:
        try:
            saved = tuple(None if s is None else s.detach() for s in node.saved_tensors)
        except RuntimeError:  # already modified (an update the dispatch did not see) or freed
            return
    copied = getattr(node, _COPIED, frozenset())
    shared = {i for i, s in enumerate(saved) if s is not None and i not in copied
              and s.untyped_storage().data_ptr() == ptr}
    if shared:
        setattr(node, _PRESERVED, tuple(s.clone() if i in shared else s
                                        for i, s in enumerate(saved)))
        setattr(node, _COPIED, copied | shared)


def preserve_saved(t: Tensor) -> None:
    """Keep what rules saved of ``t`` before ``t`` is updated in place.

    Rules save tensors for the backward: their output (ε-linear, LayerNorm, RMSNorm, ε-sums …)
    and their inputs. Modeling code may update such a tensor in place afterwards
    (``out += residual`` in Falcon, ``tensor *= mask`` in XLM), which autograd reports as a
    modified saved tensor. Called by the dispatch before every in-place op on the relevance
    path, this copies the tensors that share ``t``'s storage and that were saved by the rule
    whose output ``t`` is (or is a view of) or by the rules that took it as an input
    (remembered by :func:`_save`); the rules' backward reads the copies. Nothing is copied
    unless such an update happens.
    """
    base = t._base if t._base is not None else t
    ptr = base.untyped_storage().data_ptr()
    node = base.grad_fn
    while node is not None and getattr(type(node), "_forward_cls", None) is AliasFunction:
        node = node.next_functions[0][0]  # an alias shares the storage of what it aliases
    if node is not None and _own_node(node):
        _preserve_node(node, ptr)
    savers = base.__dict__.get(_SAVERS)
    if savers:
        for ref in savers:
            saver = ref()
            if saver is not None:
                _preserve_node(saver, ptr)
        savers.clear()  # copied: a later update of the same tensor finds nothing to do


# --------------------------------------------------------------------------------------------
# ε-rule for affine maps and the uniform-ε rule for products of two relevance-path operands
# --------------------------------------------------------------------------------------------


def _matmul_grads(a: Tensor, b: Tensor, g: Tensor, need_a: bool, need_b: bool):
    """Vector-Jacobian products of ``torch.matmul(a, b)`` at cotangent ``g``, per operand shape."""
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    if a.dim() == 1 and b.dim() == 1:
        g2 = g.reshape(1, 1)
    elif a.dim() == 1:
        g2 = g.unsqueeze(-2)
    elif b.dim() == 1:
        g2 = g.unsqueeze(-1)
    else:
        g2 = g
    grad_a = grad_b = None
    if need_a:
        grad_a = (g2 @ b2.mT).sum_to_size(a2.shape).reshape(a.shape)
    if need_b:
        grad_b = (a2.mT @ g2).sum_to_size(b2.shape).reshape(b.shape)
    return grad_a, grad_b


def _product_relevance(a: Tensor, b: Tensor, g: Tensor, need_a: bool, need_b: bool,
                       scale: float = 1.0):
    """Uniform-ε relevance of the factors of ``scale · (a @ b)`` given ``g = R ⊘ s(z)``: half
    each when both are on the path, all to the one that is otherwise."""
    share = scale * (0.5 if (need_a and need_b) else 1.0)
    grad_a, grad_b = _matmul_grads(a, b, g.to(a.dtype), need_a, need_b)
    # the products are temporaries: multiply in place
    r_a = None if grad_a is None else _scaled(grad_a.mul_(a), share)
    r_b = None if grad_b is None else _scaled(grad_b.mul_(b), share)
    return r_a, r_b


def _scaled(t: Tensor, factor: float) -> Tensor:
    """``t`` times ``factor`` in place, skipping the pass when ``factor`` is 1."""
    return t if factor == 1.0 else t.mul_(factor)


class MatmulUniformFunction(torch.autograd.Function):
    """``torch.matmul`` (or ``bmm``/``mm``) with the uniform-ε rule (AttnLRP Prop. 3.3)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, epsilon: float | None, op: Callable = torch.matmul):
        z = op(a, b)
        ctx.epsilon, ctx.op = epsilon, op
        # z is recomputed in the backward, not saved: code may update the product in place
        # (T5's attention before transformers 5.15 adds the position bias with
        # ``scores += position_bias``), which plain autograd's matmul allows; it also keeps the
        # largest tensor of an eager attention (the L × S scores) out of the saved state
        _save(ctx, a, b)
        return z

    @staticmethod
    def backward(ctx, relevance: Tensor):
        a, b = _saved(ctx)
        g = _divide(relevance, ctx.op(a, b), ctx.epsilon)
        return (*_product_relevance(a, b, g, _needs(ctx, 0), _needs(ctx, 1)), None, None)


def matmul_uniform(a: Tensor, b: Tensor, epsilon: float | None = None) -> Tensor:
    """``torch.matmul(a, b)`` with the uniform-ε rule.

    Both operands on the relevance path share the relevance half and half (AttnLRP Prop. 3.3);
    if one operand does not require grad, the other receives the full ε-rule.

    Parameters
    ----------
    a, b : Tensor
        Operands of :func:`torch.matmul` (1-D operands and broadcast batch dimensions allowed).
    epsilon : float, optional
        ε-stabiliser; ``None`` takes :func:`default_epsilon` of the dtype.
    """
    return MatmulUniformFunction.apply(a, b, epsilon)


class LinearEpsilonFunction(torch.autograd.Function):
    """``F.linear`` with the ε-rule; a weight on the relevance path shares uniformly with ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, epsilon: float | None):
        z = F.linear(x, weight, bias)
        ctx.epsilon = epsilon
        _save(ctx, x, weight, bias, z)
        return z

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x, weight, bias, z = _saved(ctx)
        g = _divide(relevance, z, ctx.epsilon).to(x.dtype)
        r_x, r_wt = _product_relevance(x, weight.mT, g, _needs(ctx, 0), _needs(ctx, 1))
        r_b = _sum_to(bias * g, bias) if _needs(ctx, 2) else None
        return r_x, None if r_wt is None else r_wt.mT, r_b, None


def linear_epsilon(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, epsilon: float | None = None
) -> Tensor:
    """``F.linear(x, weight, bias)`` with the ε-rule ``R_x = x ⊙ ((R ⊘ s(z)) W)``.

    The bias absorbs its share ``b ⊙ R ⊘ s(z)`` (relevance only reaches it when it requires
    grad). A weight that requires grad is treated as a second relevance-path operand and
    shares the relevance uniformly with ``x``. A quantised weight (a tensor subclass such as
    torchao's ``Int8Tensor``) keeps its own kernel: ``z`` is the quantised layer's output and
    ``(R ⊘ s(z)) W`` one vector-Jacobian product of it.
    """
    if type(weight) not in _PLAIN and not weight.requires_grad:
        return bilinear_uniform(lambda t: F.linear(t, weight, bias), x, epsilon=epsilon)
    return LinearEpsilonFunction.apply(x, weight, bias, epsilon)


class AddmmEpsilonFunction(torch.autograd.Function):
    """``torch.addmm(c, m1, m2, beta=β, alpha=α)`` with the ε-rule (GPT-2's ``Conv1D``); with
    ``op=torch.baddbmm`` the batched form (``nn.MultiheadAttention``'s masked scores)."""

    @staticmethod
    def forward(ctx, c, m1, m2, beta, alpha, epsilon, op: Callable = torch.addmm):
        z = op(c, m1, m2, beta=beta, alpha=alpha)
        ctx.beta, ctx.alpha, ctx.epsilon = beta, alpha, epsilon
        _save(ctx, c, m1, m2, z)
        return z

    @staticmethod
    def backward(ctx, relevance):
        c, m1, m2, z = _saved(ctx)
        g = _divide(relevance, z, ctx.epsilon).to(m1.dtype)
        r_1, r_2 = _product_relevance(m1, m2, g, _needs(ctx, 1), _needs(ctx, 2), ctx.alpha)
        r_c = _sum_to(c * g * ctx.beta, c) if _needs(ctx, 0) else None
        return r_c, r_1, r_2, None, None, None, None


def addmm_epsilon(
    c: Tensor,
    m1: Tensor,
    m2: Tensor,
    beta: float = 1.0,
    alpha: float = 1.0,
    epsilon: float | None = None,
) -> Tensor:
    """``torch.addmm(c, m1, m2)`` with the ε-rule: ``c`` absorbs its share, the product
    follows :func:`matmul_uniform`."""
    return AddmmEpsilonFunction.apply(c, m1, m2, beta, alpha, epsilon)


class BilinearUniformFunction(torch.autograd.Function):
    """Uniform-ε rule for any function ``fn`` linear in each of its tensor inputs.

    The backward takes the vector-Jacobian product of ``fn`` at ``R ⊘ s(z)`` (one recomputation
    of ``fn``), multiplies by each input and divides by the number of inputs on the relevance
    path. With one input on the path this is the ε-rule of a module linear in its input.
    """

    @staticmethod
    def forward(ctx, fn: Callable, epsilon: float | None, *inputs: Tensor):
        z = fn(*inputs)
        ctx.fn, ctx.epsilon = fn, epsilon
        _save(ctx, z, *inputs)
        return z

    @staticmethod
    def backward(ctx, relevance):
        z, *inputs = _saved(ctx)
        needs = ctx.needs_input_grad[2:]
        count = sum(needs)
        g = _divide(relevance, z, ctx.epsilon).to(z.dtype)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
            out = ctx.fn(*leaves)
            wanted = [t for t, n in zip(leaves, needs) if n]
            grads = iter(torch.autograd.grad(out, wanted, g, allow_unused=True))
        result = []
        for t, n in zip(inputs, needs):
            if not n:
                result.append(None)
                continue
            grad = next(grads)
            result.append(None if grad is None else (t * grad).div_(count))
        return (None, None, *result)


def bilinear_uniform(fn: Callable[..., Tensor], *inputs: Tensor,
                     epsilon: float | None = None) -> Tensor:
    """Apply ``fn(*inputs)`` (linear in each input) with the uniform-ε rule.

    Used for ``einsum`` with two operands and for modules linear in their input (``Conv2d``
    and the like): ``R_i = x_i ⊙ VJP_i(R ⊘ s(z)) / n`` for the ``n`` inputs on the path.
    """
    return BilinearUniformFunction.apply(fn, epsilon, *inputs)


# --------------------------------------------------------------------------------------------
# Element-wise rules: ε-add, uniform mul, identity
# --------------------------------------------------------------------------------------------


class AddEpsilonFunction(torch.autograd.Function):
    """``z = c_a·a + c_b·b`` with the ε-rule; the forward calls ``op`` (add, sub, rsub, …)."""

    @staticmethod
    def forward(ctx, a, b, coef_a: float, coef_b: float, epsilon, op: Callable):
        z = op(a, b)
        ctx.coef_a, ctx.coef_b, ctx.epsilon = coef_a, coef_b, epsilon
        # z is recomputed from the operands in the backward, not saved: code may update the sum
        # in place (``x = a + b; x += c``, as BERT's embeddings do in transformers 4), which
        # plain autograd's add (it saves nothing) allows and a saved z would forbid. In half
        # precision the sum is recomputed in float32: z rounded to half precision makes a/z
        # meaningless where a and b nearly cancel.
        ctx.half = z.dtype in _HALF and all(isinstance(t, Tensor) for t in (a, b))
        ctx.needs = (_needs(ctx, 0), _needs(ctx, 1))
        ctx.numbers = tuple(None if isinstance(t, Tensor) else t for t in (a, b))
        _save(ctx, *(t if isinstance(t, Tensor) else None for t in (a, b)))
        return z

    @staticmethod
    def backward(ctx, relevance):
        a, b = _saved(ctx)
        if ctx.half:
            a32, b32 = a.float() * ctx.coef_a, b.float() * ctx.coef_b
            g = _divide(relevance.float(), a32 + b32, ctx.epsilon)
        else:
            terms = [(t if t is not None else number) if coef == 1.0
                     else (t if t is not None else number) * coef
                     for t, number, coef in zip((a, b), ctx.numbers, (ctx.coef_a, ctx.coef_b))]
            g = _divide(relevance, terms[0] + terms[1], ctx.epsilon)
        need_a, need_b = ctx.needs
        r_a = _sum_to(_scaled(g * a, ctx.coef_a), a) if need_a else None
        # g is not needed after this: multiply in place where the shapes allow it
        if need_b:
            r_b = g.mul_(b) if g.shape == b.shape and g.dtype == b.dtype else g * b
            r_b = _sum_to(_scaled(r_b, ctx.coef_b), b)
        else:
            r_b = None
        return r_a, r_b, None, None, None, None


def add_epsilon(a: Tensor, b: Tensor | float, epsilon: float | None = None) -> Tensor:
    """``a + b`` with the ε-rule ``R_a = a ⊙ R ⊘ s(z)``, ``R_b = b ⊙ R ⊘ s(z)``.

    An operand that does not require grad (a mask, a position embedding, a bias, a Python
    number) absorbs its share of the relevance.
    """
    return AddEpsilonFunction.apply(a, b, 1.0, 1.0, epsilon, torch.add)


class UniformFunction(torch.autograd.Function):
    """``z = op(*inputs)`` with relevance split equally among the inputs on the path.

    With one input on the path this is the identity rule (``R_x = R``); with two it is the
    uniform rule of gate products (AttnLRP Prop. 3.2). Relevance is summed back over
    broadcast dimensions.
    """

    @staticmethod
    def forward(ctx, op: Callable, *inputs):
        ctx.shapes = [(t.shape, t.dtype) if isinstance(t, Tensor) else None for t in inputs]
        return op(*inputs)

    @staticmethod
    def backward(ctx, relevance):
        needs = ctx.needs_input_grad[1:]
        count = sum(needs)
        share = relevance if count == 1 else relevance / count
        result = []
        for need, meta in zip(needs, ctx.shapes):
            if not need:
                result.append(None)
                continue
            shape, dtype = meta
            r = share.sum_to_size(shape) if share.shape != shape else share
            result.append(r.to(dtype))
        return (None, *result)


def mul_uniform(a: Tensor, b: Tensor | float) -> Tensor:
    """``a * b`` with the uniform rule: ``R_a = R_b = ½ R`` when both are on the relevance path,
    the identity to the other operand when one factor is constant."""
    return UniformFunction.apply(torch.mul, a, b)


def identity(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)`` with the identity rule ``R_x = R`` (element-wise activations, scaling).

    Parameters
    ----------
    fn : callable
        An element-wise function of ``x``; it runs without grad, so its output is exact.
    x : Tensor
        The input on the relevance path.
    """
    return UniformFunction.apply(fn, x)


# --------------------------------------------------------------------------------------------
# Softmax (Gradient×Input) and scaled dot-product attention
# --------------------------------------------------------------------------------------------


def _softmax_relevance(x: Tensor, s: Tensor, relevance: Tensor, dim: int) -> Tensor:
    """``x ⊙ (R − s ⊙ Σ_dim R)`` with 0 at masked inputs (−inf or the dtype's minimum)."""
    relevance, s = _accurate(relevance), _accurate(s)
    out = relevance - s * relevance.sum(dim, keepdim=True)
    out = out.mul_(x).to(x.dtype)
    return out.masked_fill_(x <= torch.finfo(x.dtype).min, 0.0)


class SoftmaxFunction(torch.autograd.Function):
    """``torch.softmax`` with the Gradient×Input rule (AttnLRP Prop. 3.1)."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, dtype: torch.dtype | None):
        s = torch.softmax(x, dim, dtype=dtype)
        ctx.dim = dim
        _save(ctx, x, s)
        return s

    @staticmethod
    def backward(ctx, relevance):
        x, s = _saved(ctx)
        return _softmax_relevance(x, s, relevance, ctx.dim), None, None


def softmax(x: Tensor, dim: int, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.softmax(x, dim, dtype=dtype)`` with ``R_x = x ⊙ (R − s ⊙ Σ_dim R)``.

    Masked positions (``x`` equal to −inf or to the dtype's minimum) receive 0, never NaN.
    """
    return SoftmaxFunction.apply(x, dim, dtype)


#: The backward of :class:`AttentionFunction` processes the query rows in blocks of about
#: this many attention weights (1 MiB in float32) …
ATTENTION_BLOCK = 1 << 18
#: … and of at least this many rows (the matrix products stay efficient).
ATTENTION_ROWS = 64


def _accumulate(acc: Tensor | None, part: Tensor, length: int) -> Tensor:
    """``acc + part`` over the first ``part.shape[-2]`` of ``length`` rows (``acc`` may be None)."""
    if acc is None:
        if part.shape[-2] == length:
            return part
        acc = part.new_zeros(*part.shape[:-2], length, part.shape[-1])
    acc[..., :part.shape[-2], :].add_(part)
    return acc


def _batched(t: Tensor, lead: torch.Size) -> Tensor:
    """``t`` (``(*lead', n, d)``, ``lead'`` broadcastable to ``lead``) as ``(prod(lead), n, d)``:
    a view where the strides allow it."""
    return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


class AttentionFunction(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` decomposed into the rules in its backward.

    The forward calls the fused op (exact output). The backward recomputes the attention
    weights ``A = softmax(q kᵀ·scale + mask)`` and applies: uniform-ε to ``A v`` (or, with
    ``hold_weights``, the ε-rule to ``v`` alone as in CP-LRP), Gradient×Input to the softmax,
    ε-add with the additive mask absorbing its share, identity to the scaling and uniform-ε
    to ``q kᵀ``. Grouped-query heads sum their relevance back over the group.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa, epsilon, hold_weights):
        kwargs = {"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale}
        if enable_gqa:
            kwargs["enable_gqa"] = True
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        ctx.is_causal, ctx.scale, ctx.epsilon, ctx.hold = is_causal, scale, epsilon, hold_weights
        _save(ctx, q, k, v, attn_mask, out)
        return out

    @staticmethod
    def backward(ctx, relevance):
        q, k, v, mask, out = _saved(ctx)
        need_q, need_k, need_v = _needs(ctx, 0), _needs(ctx, 1), _needs(ctx, 2)
        if ctx.hold:
            need_q = need_k = False
        groups = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.dim() >= 3 else 1
        ke = k.repeat_interleave(groups, dim=-3) if groups > 1 else k
        ve = v.repeat_interleave(groups, dim=-3) if groups > 1 else v
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        eps = ctx.epsilon
        weights_on_path = need_q or need_k
        additive = mask is not None and mask.dtype != torch.bool

        # the denominator is the fused kernel's own output (what the relevance was computed
        # for); a recomputed A·v differs by round-off, which R ⊘ s(z) amplifies near z = 0.
        # Only a mask can leave a row with no key (NaN output).
        if mask is not None:
            out = out.nan_to_num(0.0)
        g = _divide(relevance, out, eps).to(q.dtype)
        if need_v and weights_on_path:
            g.mul_(0.5)  # uniform-ε on A·v: half to v, half to A (g is a fresh temporary)
        # the softmax rule needs Σ_j R_A[i, j] = Σ_j A_ij (g vᵀ)_ij = Σ_d g_id (A v)_id: a row
        # sum of g ⊙ out, so R_A itself is never formed
        total = (_accurate(g) * _accurate(out)).sum(-1, keepdim=True) if weights_on_path \
            else None

        # The matrices are processed as a batch (leading dimensions flattened), so that baddbmm
        # fuses the scaling, the causal mask and the softmax's row sums into the products. The
        # query rows are processed in blocks (the rules act row by row): memory is bounded
        # whatever the sequence length, and with a causal mask a block only meets the keys its
        # rows can see.
        length, source = q.shape[-2], k.shape[-2]
        lead = torch.broadcast_shapes(q.shape[:-2], ke.shape[:-2])
        q3, k3, v3, g3 = (_batched(t, lead) for t in (q, ke, ve, g))
        t3 = _batched(total, lead) if weights_on_path else None
        rows = min(length, max(ATTENTION_ROWS,
                               ATTENTION_BLOCK // max(1, q3.shape[0] * source)))
        row_mask = mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1
        column_mask = mask is not None and mask.shape[-1] != 1
        low = q.dtype in _HALF
        e = abs(scale) * _eps(eps, q.dtype)  # ε on q kᵀ, in units of x = scale · q kᵀ
        parts_q: list[Tensor] = []
        acc_k = acc_v = None
        for start in range(0, length, rows):
            stop = min(length, start + rows)
            width = min(source, stop) if ctx.is_causal else source
            qb, gb = q3[:, start:stop], g3[:, start:stop]
            kb, vb = k3[:, :width], v3[:, :width]
            if ctx.is_causal:  # top-left aligned, as in F.scaled_dot_product_attention
                bias = torch.full((stop - start, width), float("-inf"), dtype=q.dtype,
                                  device=q.device).triu_(start + 1)
                x = torch.baddbmm(bias, qb, kb.mT, alpha=scale)  # scale · q kᵀ, −inf above
            else:
                x = torch.baddbmm(qb.new_zeros(()), qb, kb.mT, beta=0.0, alpha=scale)
            if mask is not None:
                mb = mask[..., start:stop, :] if row_mask else mask
                mb = mb[..., :width] if column_mask else mb
                x4 = x.view(*lead, stop - start, width)
                if additive:
                    pre, x = x, (x4 + mb).view(-1, stop - start, width)
                else:
                    x4.masked_fill_(~mb, float("-inf"))
            weights = torch.softmax(x, -1, dtype=torch.float32 if low else None).to(q.dtype)
            if mask is not None:
                weights.nan_to_num_(0.0)  # fully masked rows: 0, not NaN
            if need_v:
                acc_v = _accumulate(acc_v, weights.mT @ gb, source)
            if not weights_on_path:
                continue
            # softmax as Gradient×Input: R_x = x ⊙ (R_A − A ⊙ Σ R_A) = x ⊙ A ⊙ (g vᵀ − Σ)
            tb = t3[:, start:stop]
            if low:
                d = (gb @ vb.mT).float().sub_(tb).mul_(weights.float())
            else:
                d = torch.baddbmm(tb.neg(), gb, vb.mT).mul_(weights)
            if scale == 0:  # x = 0 (plus the mask): no relevance reaches q kᵀ
                gs = d.zero_()
            elif additive:  # the additive mask absorbs its share, then identity through scaling
                r_x = d.mul_(x).to(x.dtype).masked_fill_(x <= torch.finfo(x.dtype).min, 0.0)
                # pre = scale · q kᵀ, so s(pre) with |scale|·ε is scale · s(q kᵀ)
                gs = _divide(pre * _divide(r_x, x, eps), pre, e)
            else:
                # x ⊙ d ⊘ s(q kᵀ) = scale · d ⊙ |x| ⊘ (|x| + |scale|·ε) in one fused pass,
                # d − e·d ⊘ (|x| + e); where masked, x = −inf and d = 0, so 0. The scale is
                # applied to the small products below.
                gs = d.addcdiv_(d, _accurate(x).abs_().add_(e), value=-e)
            gs = gs.to(q.dtype)
            if need_q:
                parts_q.append(gs @ kb)
            if need_k:
                acc_k = _accumulate(acc_k, gs.mT @ qb, source)

        r_q = r_k = r_v = None
        # uniform-ε through q kᵀ: half each when both are on the path
        factor = 0.5 if (need_q and need_k) else 1.0
        if need_q:
            grad_q = parts_q[0] if len(parts_q) == 1 else torch.cat(parts_q, -2)
            r_q = _sum_to(q * _scaled(grad_q.view(*lead, length, -1), factor * scale), q)
        if need_k:
            r_k = ke * _scaled(acc_k.view(*lead, source, -1), factor * scale)
            if groups > 1:
                r_k = r_k.unflatten(-3, (-1, groups)).sum(-3)
            r_k = _sum_to(r_k, k)
        if need_v:
            r_v = ve * acc_v.view(*lead, source, -1)
            if groups > 1:
                r_v = r_v.unflatten(-3, (-1, groups)).sum(-3)
            r_v = _sum_to(r_v, v)
        return r_q, r_k, r_v, None, None, None, None, None, None


def _fully_masked_row(mask: Tensor | None) -> bool:
    """True if some query row of ``mask`` (boolean: True attends; additive: the dtype's
    minimum or −inf masks) attends to no key."""
    if mask is None:
        return False
    if mask.dtype == torch.bool:
        return not bool(mask.any(-1).all())
    return not bool((mask > torch.finfo(mask.dtype).min).any(-1).all())


class FusedAttentionFunction(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` whose LRP backward is one standard sdpa backward.

    With AttnLRP's rules (uniform-ε on ``A v``, softmax as Gradient×Input, the additive mask
    absorbing its share, identity through the scale, uniform on ``q kᵀ``) the relevance of
    ``o = sdpa(q, k, v)`` is, with ``g = R ⊘ s(o)`` and ``(dq, dk, dv)`` the standard backward
    of the fused op for the output gradient ``½ g``::

        R_q = ½ q ⊙ dq,   R_k = ½ k ⊙ dk,   R_v = v ⊙ dv

    (``R_A ⊘ A = ½ g vᵀ`` is the gradient of ``A``; the softmax rule gives ``x ⊙ dS`` with
    ``dS`` the softmax backward of it; the mask's share cancels in ``R_z ⊘ z = scale · dS``;
    so ``R_q = ½ q ⊙ (scale · dS k) = ½ q ⊙ dq``). Operands off the relevance path take no
    half: with constant weights (CP-LRP, or ``q`` and ``k`` constant) the output gradient is
    ``g`` and ``R_v = v ⊙ dv``. The one term dropped against
    :class:`AttentionFunction` is the ε on ``q kᵀ``, whose effect is bounded by ``ε·|dS|``.
    The forward keeps the fused op's own graph (flash or memory-efficient kernels where the
    device has them, so the ``L × S`` weights are never formed), and the backward runs it once.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa, epsilon, hold_weights):
        kwargs = {"attn_mask": attn_mask, "is_causal": is_causal, "scale": scale}
        if enable_gqa:
            kwargs["enable_gqa"] = True
        need = [ctx.needs_input_grad[i] and not (hold_weights and i < 2) for i in range(3)]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), need)]
            out = F.scaled_dot_product_attention(*leaves, **kwargs)
        ctx.graph = (leaves, out, need)
        ctx.epsilon, ctx.masked = epsilon, attn_mask is not None
        _save(ctx, q, k, v)
        return out.detach()

    @staticmethod
    def backward(ctx, relevance):
        q, k, v = _saved(ctx)
        leaves, out, need = ctx.graph
        del ctx.graph
        if not out.requires_grad or not any(need):
            return (None,) * 9
        o = out.detach()
        if ctx.masked:
            o = o.nan_to_num(0.0)
        g = _divide(relevance, o, ctx.epsilon).to(o.dtype)
        weights_on_path = need[0] or need[1]
        if need[2] and weights_on_path:
            g.mul_(0.5)  # uniform-ε on A·v: half to v, half to the weights
        wanted = [t for t, n in zip(leaves, need) if n]
        grads = iter(torch.autograd.grad(out, wanted, g))
        half = 0.5 if (need[0] and need[1]) else 1.0  # uniform on q kᵀ
        r = []
        for t, n, factor in zip((q, k, v), need, (half, half, 1.0)):
            if not n:
                r.append(None)
                continue
            d = next(grads)
            if ctx.masked:
                d = d.nan_to_num(0.0)
            r.append(_scaled(t * d, factor).to(t.dtype))
        return r[0], r[1], r[2], None, None, None, None, None, None


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    epsilon: float | None = None,
    hold_weights: bool = False,
    exact: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` (no dropout) with the AttnLRP rules.

    Parameters
    ----------
    q, k, v, attn_mask, is_causal, scale, enable_gqa
        As for :func:`torch.nn.functional.scaled_dot_product_attention`; ``attn_mask`` may be
        boolean (``True`` attends) or additive.
    epsilon : float, optional
        ε-stabiliser of ``R ⊘ s(o)`` at the output and, on the exact path, of ``q kᵀ``
        (``|scale|·ε`` on the scaled scores); ``None`` takes :func:`default_epsilon` of the
        dtype of ``q``.
    hold_weights : bool
        Hold the attention weights constant (CP-LRP): all relevance goes to ``v``.
    exact : bool
        Decompose the backward into the rules, ε on ``q kᵀ`` included
        (:class:`AttentionFunction`); by default one standard backward of the fused kernel
        gives the same relevance without that ε (:class:`FusedAttentionFunction`). Attention
        with a query row that attends to nothing always takes the exact path (its relevance
        is 0 there, not NaN).
    """
    if hold_weights:  # q and k are constants: cut them off the graph (no None relevance
        q, k = q.detach(), k.detach()  # reaches their producers, e.g. zennit-hooked layers)
    if exact or _fully_masked_row(attn_mask):
        function = AttentionFunction
    else:
        function = FusedAttentionFunction
    return function.apply(q, k, v, attn_mask, is_causal, scale, enable_gqa, epsilon,
                          hold_weights)


# --------------------------------------------------------------------------------------------
# Normalisation layers with the standard deviation held constant
# --------------------------------------------------------------------------------------------


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm with σ held constant and the ε-rule on the remaining linear map: ``g = (R ⊘
    s(y)) ⊙ w / σ``, ``R_x = x ⊙ (g − mean(g))``, with ``w`` the weight of the affine map after
    the normalisation (the bias absorbs its share)."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, epsilon, op):
        y = op(x) if op is not None else F.layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.dims = tuple(range(-len(normalized_shape), 0))
        ctx.eps, ctx.epsilon = eps, epsilon
        _save(ctx, x, weight, y)
        return y

    @staticmethod
    def backward(ctx, relevance):
        x, weight, y = _saved(ctx)
        dims, dtype = ctx.dims, x.dtype
        x, y, relevance = _accurate(x), _accurate(y), _accurate(relevance)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        eps = default_epsilon(dtype) if ctx.epsilon is None else ctx.epsilon
        # not _divide: a LayerNorm output of −0.0 is no sum of zeros (keep sign(−0.0) = +1)
        g = relevance / stabilize(y, eps) * torch.rsqrt(var + ctx.eps)
        if weight is not None:
            g = g * weight
        r_x = (g - g.mean(dim=dims, keepdim=True)).mul_(x)
        return r_x.to(dtype), None, None, None, None, None, None


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    epsilon: float | None = None,
) -> Tensor:
    """``F.layer_norm`` with σ held constant: ``g = (R ⊘ s(y)) ⊙ w / σ``,
    ``R_x = x ⊙ (g − mean(g))``. The bias and the centring absorb their shares."""
    return LayerNormFunction.apply(x, tuple(normalized_shape), weight, bias, eps, epsilon, None)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with σ held constant: a diagonal linear map, so ``R_x = R ⊙ y ⊘ s(y)``."""

    @staticmethod
    def forward(ctx, x, op, epsilon):
        y = op(x)
        ctx.epsilon = epsilon
        _save(ctx, y)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, relevance):
        (y,) = _saved(ctx)
        r_x = _ratio(y, ctx.epsilon).mul_(relevance)  # R ⊙ y ⊘ s(y)
        return r_x.to(ctx.dtype), None, None


def rms_norm(
    x: Tensor,
    weight: Tensor | None = None,
    eps: float | None = 1e-6,
    offset: float = 0.0,
    epsilon: float | None = None,
) -> Tensor:
    """``F.rms_norm`` over the last dimension with scale ``offset + weight`` and σ held constant.

    ``offset=1.0`` gives the ``(1 + w)`` scale of Gemma-style norms. The relevance passes
    unchanged up to the ε-stabiliser: ``R_x = R ⊙ y ⊘ s(y)``.
    """
    if weight is not None and offset:
        weight = weight + offset
    shape = (x.shape[-1],)

    def op(t):
        return F.rms_norm(t, shape, weight, eps)

    return RMSNormFunction.apply(x, op, epsilon)


def norm_rule(x: Tensor, op: Callable[[Tensor], Tensor], kind: str, *, weight=None, eps=1e-5,
              epsilon: float | None = None, normalized_shape: Sequence[int] | None = None,
              bias=None):
    """Apply a norm module's own forward ``op`` with the constant-std rule of ``kind``.

    ``kind`` is ``"layer"`` (centring, needs the effective ``weight`` and ``bias`` of the
    module's affine map, ``eps`` and ``normalized_shape``) or ``"rms"``. Used by
    :class:`lrp_explicit.rules.NormRule` for modules of any class.
    """
    if kind == "rms":
        return RMSNormFunction.apply(x, op, epsilon)
    shape = tuple(normalized_shape or (x.shape[-1],))
    return LayerNormFunction.apply(x, shape, weight, bias, eps, epsilon, op)


# --------------------------------------------------------------------------------------------
# ε-reductions and stop
# --------------------------------------------------------------------------------------------


def _reduced_dims(x: Tensor, dim) -> tuple[int, ...]:
    """The non-negative dimensions a reduction over ``dim`` (``None``: all) removes."""
    if dim is None:
        return tuple(range(x.dim()))
    return tuple(d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim))


def _unreduce(g: Tensor, x: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    """Put back the reduced dimensions of ``g`` so it broadcasts against ``x``."""
    if not keepdim and g.dim() != x.dim():
        for d in sorted(dims):
            g = g.unsqueeze(d)
    return g


class ReductionEpsilonFunction(torch.autograd.Function):
    """``sum``/``mean`` over ``dim`` with the ε-rule ``R_i = (x_i / n) ⊙ R ⊘ s(z)``."""

    @staticmethod
    def forward(ctx, x, dim, keepdim, epsilon, op, is_mean):
        z = op(x)
        dims = _reduced_dims(x, dim)
        ctx.dims, ctx.keepdim, ctx.epsilon = dims, keepdim, epsilon
        ctx.scale = 1.0 / math.prod(x.shape[d] for d in dims) if is_mean else 1.0
        _save(ctx, x, z)
        return z

    @staticmethod
    def backward(ctx, relevance):
        x, z = _saved(ctx)
        g = _unreduce(_divide(relevance, z, ctx.epsilon), x, ctx.dims, ctx.keepdim)
        r_x = x * g
        if ctx.scale != 1.0:
            r_x = r_x.mul_(ctx.scale)
        return r_x.to(x.dtype), None, None, None, None, None


def sum_epsilon(
    x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False,
    epsilon: float | None = None,
) -> Tensor:
    """``torch.sum(x, dim, keepdim)`` with the ε-rule ``R_i = x_i ⊙ R ⊘ s(z)``."""
    return ReductionEpsilonFunction.apply(
        x, dim, keepdim, epsilon, lambda t: torch.sum(t, dim, keepdim), False
    )


def mean_epsilon(
    x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False,
    epsilon: float | None = None,
) -> Tensor:
    """``torch.mean(x, dim, keepdim)`` with the ε-rule ``R_i = (x_i / n) ⊙ R ⊘ s(z)``."""
    return ReductionEpsilonFunction.apply(
        x, dim, keepdim, epsilon, lambda t: torch.mean(t, dim, keepdim), True
    )


class _ReductionFunction(torch.autograd.Function):
    """Base of the rules of a reduction ``y = op(x)`` over ``dim`` whose backward needs the
    input and the output (subclasses write the backward)."""

    @staticmethod
    def forward(ctx, x, dim, keepdim, epsilon, op):
        y = op(x)
        ctx.dims, ctx.keepdim, ctx.epsilon = _reduced_dims(x, dim), keepdim, epsilon
        _save(ctx, x, y)
        return y


class VectorNormFunction(_ReductionFunction):
    """Euclidean norm ``‖x‖ = sqrt(Σ x_i²)`` as identity ∘ ε-sum ∘ identity:
    ``R_i = x_i² ⊙ R ⊘ s(Σ x²)``."""

    @staticmethod
    def backward(ctx, relevance):
        x, y = _saved(ctx)
        g = _unreduce(_divide(relevance, y * y, ctx.epsilon), x, ctx.dims, ctx.keepdim)
        return (x * x * g).to(x.dtype), None, None, None, None


class CumsumEpsilonFunction(torch.autograd.Function):
    """Running sum ``z_t = Σ_{s≤t} x_s`` along ``dim`` with the ε-rule of every partial sum:
    ``R_s = x_s ⊙ Σ_{t≥s} R_t ⊘ s(z_t)`` (a reversed cumulative sum of ``R ⊘ s(z)``)."""

    @staticmethod
    def forward(ctx, x, dim, epsilon, op):
        z = op(x)
        ctx.dim, ctx.epsilon = dim, epsilon
        _save(ctx, x, z)
        return z

    @staticmethod
    def backward(ctx, relevance):
        x, z = _saved(ctx)
        g = _divide(relevance, z, ctx.epsilon)
        dim = ctx.dim
        # Σ_{t≥s} g_t as a cumulative sum of the reversed sequence (no cancellation of a
        # total minus a prefix)
        later = g.flip(dim).cumsum(dim).flip(dim)
        return (later * x).to(x.dtype), None, None, None


def cumsum_epsilon(x: Tensor, dim: int, epsilon: float | None = None) -> Tensor:
    """``torch.cumsum(x, dim)`` with the ε-rule of a running sum:
    ``R_s = x_s ⊙ Σ_{t≥s} R_t ⊘ s(z_t)``."""
    return CumsumEpsilonFunction.apply(x, dim, epsilon, lambda t: torch.cumsum(t, dim))


class LogSumExpFunction(_ReductionFunction):
    """``y = log Σ_i exp(x_i)`` over ``dim`` as identity ∘ ε-sum ∘ identity (the rules of its
    three steps): ``R_i = exp(x_i) ⊙ R ⊘ s(Σ exp x) = exp(x_i − y) ⊙ R / (1 + ε·exp(−y))``.
    The second form is the first without overflow; a reduction over only ``−inf`` gives 0."""

    @staticmethod
    def backward(ctx, relevance):
        x, y = _saved(ctx)
        dtype = x.dtype
        x, y, relevance = _accurate(x), _accurate(y), _accurate(relevance)
        eps = _eps(ctx.epsilon, dtype)
        g = relevance / torch.exp(-y).mul_(eps).add_(1.0)
        g, y = (_unreduce(t, x, ctx.dims, ctx.keepdim) for t in (g, y))
        share = torch.exp(x - y).nan_to_num_(0.0)  # exp(x_i) / Σ exp(x); 0 for all −inf
        return share.mul_(g).to(dtype), None, None, None, None


def logsumexp(x: Tensor, dim: int | Sequence[int], keepdim: bool = False,
              epsilon: float | None = None) -> Tensor:
    """``torch.logsumexp(x, dim, keepdim)`` with ``R_i = exp(x_i) ⊙ R ⊘ s(Σ exp x)``."""
    return LogSumExpFunction.apply(x, dim, keepdim, epsilon,
                                   lambda t: torch.logsumexp(t, dim, keepdim))


class StopFunction(torch.autograd.Function):
    """The stop rule: the output is marked non-differentiable, so it is a constant for autograd
    and any later rule treats it as such (a constant operand absorbs or yields its share)."""

    @staticmethod
    def forward(ctx, x):
        y = x.detach()  # shares storage; a view would stay differentiable
        ctx.mark_non_differentiable(y)
        return y

    @staticmethod
    def backward(ctx, relevance):  # pragma: no cover - never called: the output is constant
        return None


def stop(x: Tensor) -> Tensor:
    """Return ``x`` as a constant for the relevance (``R_x = 0``); values are unchanged."""
    return StopFunction.apply(x)
