"""Tests of the explicit LRP rules in :mod:`lrp_explicit.functional`.

Every rule is checked against its formula written out here with plain torch ops on detached
float64 tensors (the stabiliser ``s(z) = z + ε·sign(z)``, ``sign(0) = +1``, is written here too,
never taken from the library). A visible ε (0.1) is used where the point is the formula, so that
a missing or mis-signed stabiliser shows; the dtype default is used where the point is
conservation. Forward outputs must equal the plain torch ops bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lrp_explicit.functional as lf

F64 = torch.float64
EPS = 0.1  # a visible stabiliser for the formula checks
RTOL = 1e-10
ATOL = 1e-14


# ------------------------------------------------------------------------------------- helpers


def s(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference stabiliser ``z + ε·sign(z)`` with ``sign(0) = +1``."""
    sign = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    return z + eps * sign


def leaf(*shape, requires_grad=True, dtype=F64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def d(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(F64)


def assert_rel(got, ref, rtol=RTOL, atol=ATOL):
    """``max|got − ref| <= rtol·max|ref| + atol``, same shape, and no NaN."""
    assert got is not None, "relevance is None"
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.detach().to(F64), ref.detach().to(F64)
    assert not torch.isnan(got).any(), "NaN in relevance"
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * scale + atol, f"max abs err {err:.3e} vs max |ref| {scale:.3e}"


def explain(y: torch.Tensor, R: torch.Tensor | None = None) -> torch.Tensor:
    """Backpropagate relevance ``R`` (default: a fixed random tensor) from ``y``; return ``R``."""
    if R is None:
        R = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    y.backward(R)
    return d(R)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------- ε-linear


def test_linear_epsilon_input_relevance_with_bias():
    """R_x = x ⊙ ((R ⊘ s(z)) W) for batched x; the bias (not requiring grad) absorbs."""
    x, W, b = leaf(2, 3, 5), leaf(4, 5, requires_grad=False), leaf(4, requires_grad=False)
    z = lf.linear_epsilon(x, W, b, EPS)
    R = explain(z)
    z_ref = d(x) @ d(W).mT + d(b)
    assert_rel(d(x.grad), d(x) * ((R / s(z_ref, EPS)) @ d(W)))
    assert W.grad is None and b.grad is None


def test_linear_epsilon_bias_absorbs_its_share():
    """A bias requiring grad gets Σ_batch b ⊙ R ⊘ s(z); x and bias together carry Σ R z ⊘ s(z)."""
    x, W, b = leaf(2, 3, 5), leaf(4, 5, requires_grad=False), leaf(4)
    z = lf.linear_epsilon(x, W, b, EPS)
    R = explain(z)
    G = R / s(d(z), EPS)
    assert_rel(d(b.grad), (d(b) * G).sum((0, 1)))
    assert_rel(x.grad.sum() + b.grad.sum(), (R * d(z) / s(d(z), EPS)).sum())


def test_linear_epsilon_weight_on_path_shares_half():
    """Weight requiring grad: R_x = ½ x ⊙ (G W), R_W = ½ W ⊙ Σ_batch Gᵀ x with G = R ⊘ s(z)."""
    x, W = leaf(2, 3, 5), leaf(4, 5)
    z = lf.linear_epsilon(x, W, None, EPS)
    R = explain(z)
    G = R / s(d(x) @ d(W).mT, EPS)
    assert_rel(d(x.grad), 0.5 * d(x) * (G @ d(W)))
    assert_rel(d(W.grad), 0.5 * d(W) * torch.einsum("bto,bti->oi", G, d(x)))


def test_linear_epsilon_default_epsilon_float64():
    """ε=None in float64 uses the tiny default (1e-12): R_x = x ⊙ ((R ⊘ s(z)) W)."""
    x, W = leaf(3, 5), leaf(4, 5, requires_grad=False)
    z = lf.linear_epsilon(x, W)
    R = explain(z)
    assert_rel(d(x.grad), d(x) * ((R / s(d(x) @ d(W).mT, 1e-12)) @ d(W)))


# ---------------------------------------------------------------------------- uniform matmul


def _matmul_ref(a, b, R, eps, share):
    """Reference R_a, R_b for torch.matmul via explicit broadcasting of 1-D/batch operands."""
    a, b = d(a), d(b)
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    z2 = a2 @ b2
    R2 = R.reshape(z2.shape)
    G = R2 / s(z2, eps)
    ra = share * a2 * (G @ b2.mT).sum_to_size(a2.shape)
    rb = share * b2 * (a2.mT @ G).sum_to_size(b2.shape)
    return ra.reshape(a.shape), rb.reshape(b.shape)


@pytest.mark.parametrize(
    "shape_a, shape_b",
    [
        ((4, 5), (5, 6)),
        ((2, 3, 4, 5), (5, 6)),
        ((1, 3, 4, 5), (2, 1, 5, 6)),
        ((5,), (5, 6)),
        ((4, 5), (5,)),
        ((5,), (2, 5, 6)),
        ((2, 4, 5), (5,)),
    ],
    ids=["2d", "batch@2d", "bcast-batch", "vec@mat", "mat@vec", "vec@batch", "batch@vec"],
)
def test_matmul_uniform_both_on_path(shape_a, shape_b):
    """R_a = ½ a ⊙ ((R ⊘ s(z)) bᵀ), R_b = ½ b ⊙ (aᵀ (R ⊘ s(z))), summed to each operand's shape."""
    a, b = leaf(*shape_a), leaf(*shape_b)
    z = lf.matmul_uniform(a, b, EPS)
    # same tensors as the wrapper got: torch.matmul's kernel choice depends on requires_grad
    assert torch.equal(z, torch.matmul(a, b))
    R = explain(z)
    ra, rb = _matmul_ref(a, b, R, EPS, 0.5)
    assert_rel(d(a.grad), ra)
    assert_rel(d(b.grad), rb)


def test_matmul_uniform_vector_dot_vector():
    """1-D @ 1-D (a dot product, 0-d output): R_a = ½ a ⊙ b·R ⊘ s(z), R_b = ½ b ⊙ a·R ⊘ s(z)."""
    a, b = leaf(5), leaf(5)
    z = lf.matmul_uniform(a, b, EPS)
    R = explain(z)
    G = R / s(d(a) @ d(b), EPS)
    assert_rel(d(a.grad), 0.5 * d(a) * d(b) * G)
    assert_rel(d(b.grad), 0.5 * d(b) * d(a) * G)


@pytest.mark.parametrize("constant", ["a", "b"])
def test_matmul_uniform_constant_operand(constant):
    """A constant operand gets no relevance (grad None); the other gets the full ε-rule."""
    a = leaf(2, 4, 5, requires_grad=constant != "a")
    b = leaf(5, 6, requires_grad=constant != "b")
    z = lf.matmul_uniform(a, b, EPS)
    R = explain(z)
    ra, rb = _matmul_ref(a, b, R, EPS, 1.0)
    if constant == "a":
        assert a.grad is None
        assert_rel(d(b.grad), rb)
    else:
        assert b.grad is None
        assert_rel(d(a.grad), ra)


def test_matmul_uniform_conserves():
    """Σ R_a + Σ R_b = Σ R z ⊘ s(z) exactly, and = Σ R to 1e-10 with the float64 default ε."""
    a, b = leaf(2, 4, 5), leaf(5, 6)
    z = lf.matmul_uniform(a, b, EPS)
    R = explain(z)
    assert_rel(a.grad.sum() + b.grad.sum(), (R * d(z) / s(d(z), EPS)).sum())
    a2, b2 = d(a).requires_grad_(), d(b).requires_grad_()
    z2 = lf.matmul_uniform(a2, b2)
    z2.backward(z2.detach())  # explain the output itself: R = z, no tiny-denominator blow-up
    assert_rel(a2.grad.sum() + b2.grad.sum(), z2.detach().sum())


# ------------------------------------------------------------------------------------- addmm


@pytest.mark.parametrize("c_shape", [(6,), (4, 6)])
def test_addmm_epsilon_all_on_path(c_shape):
    """z = β c + α m1 m2: R_c = β c ⊙ G (summed to c), R_m = ½ α m ⊙ (…) with G = R ⊘ s(z)."""
    beta, alpha = 0.5, 2.0
    c, m1, m2 = leaf(*c_shape), leaf(4, 5), leaf(5, 6)
    z = lf.addmm_epsilon(c, m1, m2, beta=beta, alpha=alpha, epsilon=EPS)
    assert torch.equal(z, torch.addmm(d(c), d(m1), d(m2), beta=beta, alpha=alpha))
    R = explain(z)
    z_ref = beta * d(c) + alpha * d(m1) @ d(m2)
    G = R / s(z_ref, EPS)
    assert_rel(d(c.grad), (beta * d(c) * G).sum_to_size(c_shape))
    assert_rel(d(m1.grad), 0.5 * alpha * d(m1) * (G @ d(m2).mT))
    assert_rel(d(m2.grad), 0.5 * alpha * d(m2) * (d(m1).mT @ G))
    assert_rel(c.grad.sum() + m1.grad.sum() + m2.grad.sum(), (R * z_ref / s(z_ref, EPS)).sum())


def test_addmm_epsilon_constant_weight_and_bias():
    """GPT-2 Conv1D use: only the input on the path gets the full ε-rule; c and m2 get None."""
    c, m1, m2 = leaf(6, requires_grad=False), leaf(4, 5), leaf(5, 6, requires_grad=False)
    z = lf.addmm_epsilon(c, m1, m2, epsilon=EPS)
    R = explain(z)
    G = R / s(d(c) + d(m1) @ d(m2), EPS)
    assert_rel(d(m1.grad), d(m1) * (G @ d(m2).mT))
    assert c.grad is None and m2.grad is None


# --------------------------------------------------------------------------------------- add


def test_add_epsilon_broadcast_both_on_path():
    """R_a = a ⊙ R ⊘ s(z), R_b = Σ_rows b ⊙ R ⊘ s(z) for a (4,5) + b (5,)."""
    a, b = leaf(4, 5), leaf(5)
    z = lf.add_epsilon(a, b, EPS)
    R = explain(z)
    G = R / s(d(a) + d(b), EPS)
    assert_rel(d(a.grad), d(a) * G)
    assert_rel(d(b.grad), (d(b) * G).sum(0))


def test_add_epsilon_constant_operand_absorbs():
    """A constant operand gets None; the other gets only its own share a ⊙ R ⊘ s(z)."""
    a, b = leaf(4, 5), leaf(5, requires_grad=False)
    z = lf.add_epsilon(a, b, EPS)
    R = explain(z)
    assert b.grad is None
    assert_rel(d(a.grad), d(a) * R / s(d(a) + d(b), EPS))


def test_add_epsilon_python_scalar():
    """``a + 3.0``: the scalar absorbs; R_a = a ⊙ R ⊘ s(a + 3)."""
    a = leaf(4, 5)
    z = lf.add_epsilon(a, 3.0, EPS)
    assert torch.equal(z, d(a) + 3.0)
    R = explain(z)
    assert_rel(d(a.grad), d(a) * R / s(d(a) + 3.0, EPS))


def test_add_epsilon_sign_of_zero_is_positive():
    """z = a + (−a) = 0 exactly: s(0) = +ε, so R_a = a ⊙ R / ε and R_b = −a ⊙ R / ε."""
    a = leaf(3, 4)
    b = (-d(a)).requires_grad_()
    z = lf.add_epsilon(a, b, EPS)
    assert (z == 0).all()
    R = explain(z)
    assert_rel(d(a.grad), d(a) * R / EPS)
    assert_rel(d(b.grad), -d(a) * R / EPS)


def test_a_sum_updated_in_place_keeps_its_rule():
    """``z = a + b; z += c`` (BERT's embeddings in transformers 4) under the op rules: plain
    autograd allows the in-place update of a sum, so the rule of the first sum must not save
    the sum it returned; both ε-rules apply, one after the other."""
    from lrp_explicit import composites

    a, b, c = leaf(4, 5), leaf(4, 5), leaf(5, requires_grad=False)
    with composites.get("attnlrp", epsilon=EPS, strict=True).op_rules():
        z = a + b
        z += c
    z1 = d(a) + d(b)
    assert torch.equal(z, z1 + d(c))
    R = explain(z)
    R1 = z1 * R / s(z1 + d(c), EPS)  # the share of a + b in the second sum
    assert_rel(d(a.grad), d(a) * R1 / s(z1, EPS))
    assert_rel(d(b.grad), d(b) * R1 / s(z1, EPS))


# ------------------------------------------------------------------------------ mul, identity


def test_mul_uniform_both_on_path():
    """R_a = ½ R and R_b = Σ_rows ½ R for a (4,5) ⊙ b (5,)."""
    a, b = leaf(4, 5), leaf(5)
    z = lf.mul_uniform(a, b)
    R = explain(z)
    assert_rel(d(a.grad), 0.5 * R)
    assert_rel(d(b.grad), 0.5 * R.sum(0))
    assert_rel(a.grad.sum() + b.grad.sum(), R.sum())


@pytest.mark.parametrize("other", ["tensor", "scalar"])
def test_mul_uniform_constant_factor_is_identity(other):
    """A constant factor (tensor or Python number) gives the identity rule R_a = R."""
    a = leaf(4, 5)
    b = leaf(5, requires_grad=False) if other == "tensor" else 2.5
    z = lf.mul_uniform(a, b)
    R = explain(z)
    assert torch.equal(d(a.grad), R)
    if other == "tensor":
        assert b.grad is None


@pytest.mark.parametrize("fn", [F.gelu, F.silu, torch.tanh], ids=["gelu", "silu", "tanh"])
def test_identity_rule_passes_relevance_unchanged(fn):
    """Element-wise activations: x.grad equals R exactly, and the output equals fn(x)."""
    x = leaf(3, 7)
    y = lf.identity(fn, x)
    assert torch.equal(y, fn(d(x)))
    R = explain(y)
    assert torch.equal(x.grad, R)


# ----------------------------------------------------------------------------------- softmax


def _softmax_ref(x, R, dim):
    xs = d(x)
    sm = torch.softmax(xs, dim)
    out = xs * (R - sm * R.sum(dim, keepdim=True))
    return torch.where(xs <= torch.finfo(F64).min, torch.zeros_like(out), out)


@pytest.mark.parametrize("dim", [-1, 0])
def test_softmax_gradient_times_input(dim):
    """R_x = x ⊙ (R − s ⊙ Σ_dim R)."""
    x = leaf(4, 6)
    y = lf.softmax(x, dim)
    assert torch.equal(y, torch.softmax(d(x), dim))
    R = explain(y)
    assert_rel(d(x.grad), _softmax_ref(x, R, dim))


@pytest.mark.parametrize("masking", ["neg_inf", "finfo_min_additive"])
def test_softmax_masked_inputs_get_zero(masking):
    """Masked inputs (−inf, or scores + finfo.min) get exactly 0; no NaN, even in a fully
    masked row; the unmasked entries follow the formula."""
    scores = torch.randn(4, 6, dtype=F64)
    masked = torch.zeros(4, 6, dtype=torch.bool)
    masked[0, 1] = masked[1, 4:] = masked[2, :5] = True
    masked[3] = True  # a fully masked row
    if masking == "neg_inf":
        x = scores.masked_fill(masked, float("-inf"))
    else:
        x = scores + torch.zeros(4, 6, dtype=F64).masked_fill(masked, torch.finfo(F64).min)
    x.requires_grad_()
    y = lf.softmax(x, -1)
    R = explain(y)
    assert not torch.isnan(x.grad).any()
    assert (x.grad[masked] == 0).all()
    rows = slice(0, 3)  # rows with unmasked entries
    ref = _softmax_ref(x[rows], R[rows], -1)
    assert_rel(d(x.grad[rows]), ref)


def test_softmax_dtype_argument_half_input():
    """softmax(x_fp16, dtype=float32): output float32 (bit-equal to torch), relevance in the
    input dtype (float16) and equal to the formula within float16 rounding."""
    x = torch.randn(3, 8, dtype=torch.float16).requires_grad_()
    y = lf.softmax(x, -1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.softmax(x.detach(), -1, dtype=torch.float32))
    R = torch.randn(3, 8, dtype=torch.float32)
    y.backward(R)
    assert x.grad.dtype == torch.float16
    sm = torch.softmax(d(x), -1)
    ref = d(x) * (d(R) - sm * d(R).sum(-1, keepdim=True))
    assert_rel(d(x.grad), ref, rtol=4e-3, atol=0.0)  # two float16 roundings


# --------------------------------------------------------------------------- normalisations


@pytest.mark.parametrize("shape", [(8,), (4, 8)])
def test_layer_norm_constant_std(shape):
    """g = (R ⊘ s(y)) ⊙ w / σ, R_x = x ⊙ (g − mean g) over the normalised dims (bias absorbs)."""
    x = leaf(3, 4, 8)
    w, b = leaf(*shape, requires_grad=False), leaf(*shape, requires_grad=False)
    y = lf.layer_norm(x, shape, w, b, 1e-5, EPS)
    assert torch.equal(y, F.layer_norm(d(x), shape, d(w), d(b), 1e-5))
    R = explain(y)
    dims = tuple(range(-len(shape), 0))
    xs = d(x)
    mu = xs.mean(dims, keepdim=True)
    sigma = torch.sqrt(((xs - mu) ** 2).mean(dims, keepdim=True) + 1e-5)
    y_ref = (xs - mu) / sigma * d(w) + d(b)
    g = R / s(y_ref, EPS) * d(w) / sigma
    assert_rel(d(x.grad), xs * (g - g.mean(dims, keepdim=True)))


def test_layer_norm_without_weight_and_bias_conserves():
    """No affine part: R_x = x ⊙ (g − mean g) with g = R ⊘ s(y) / σ; Σ R_x = Σ R y ⊘ s(y)."""
    x = leaf(5, 8)
    y = lf.layer_norm(x, (8,), None, None, 1e-5, EPS)
    R = explain(y)
    xs = d(x)
    sigma = torch.sqrt(xs.var(-1, unbiased=False, keepdim=True) + 1e-5)
    g = R / s(d(y), EPS) / sigma
    assert_rel(d(x.grad), xs * (g - g.mean(-1, keepdim=True)))
    assert_rel(x.grad.sum(), (R * d(y) / s(d(y), EPS)).sum())


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_constant_std(offset):
    """Forward = F.rms_norm(x, (d,), w + offset, eps) bit for bit; R_x = R ⊙ y ⊘ s(y)."""
    x, w = leaf(3, 4, 8), leaf(8, requires_grad=False)
    y = lf.rms_norm(x, w, 1e-6, offset, EPS)
    assert torch.equal(y, F.rms_norm(d(x), (8,), d(w) + offset, 1e-6))
    R = explain(y)
    xs = d(x)
    y_ref = xs / torch.sqrt((xs * xs).mean(-1, keepdim=True) + 1e-6) * (d(w) + offset)
    assert_rel(d(x.grad), R * y_ref / s(y_ref, EPS))
    assert x.grad.shape == x.shape


def test_rms_norm_default_epsilon_is_identity():
    """With the float64 default ε, R_x = R to 1e-10 (y is far from 0)."""
    x = leaf(2, 8)
    w = torch.full((8,), 2.0, dtype=F64)
    x.data = x.data.abs() + 0.5  # |y| >= ~0.5 so ε/|y| is negligible
    y = lf.rms_norm(x, w, 1e-6)
    R = explain(y)
    assert_rel(d(x.grad), R)


# -------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("is_mean", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dim", [1, -1, (0, 2), None])
def test_reduction_epsilon(dim, keepdim, is_mean):
    """R_i = x_i ⊙ R ⊘ s(z) for sum, (x_i / n) ⊙ R ⊘ s(z) for mean."""
    x = leaf(3, 4, 5)
    wrapper, plain = (lf.mean_epsilon, torch.mean) if is_mean else (lf.sum_epsilon, torch.sum)
    if dim is None:
        y = wrapper(x, epsilon=EPS)
        y_plain = plain(d(x))
    else:
        y = wrapper(x, dim, keepdim, EPS)
        y_plain = plain(d(x), dim, keepdim)
    assert torch.equal(y, y_plain)
    R = explain(y)
    dims = tuple(range(3)) if dim is None else ((dim,) if isinstance(dim, int) else dim)
    n = math.prod(x.shape[i] for i in dims)
    z = d(x).sum(dims, keepdim=True) / (n if is_mean else 1)
    share = d(x) / n if is_mean else d(x)
    assert_rel(d(x.grad), share * R.reshape(z.shape) / s(z, EPS))


@pytest.mark.parametrize("wrapper, plain", [(lf.sum_epsilon, torch.sum),
                                            (lf.mean_epsilon, torch.mean)], ids=["sum", "mean"])
def test_reduction_dim_none_keepdim_true_matches_torch(wrapper, plain):
    """dim=None, keepdim=True keeps every dim as size 1, as torch.sum/torch.mean do."""
    x = leaf(3, 4)
    y = wrapper(x, None, True)
    expected = plain(d(x), dim=None, keepdim=True)
    assert y.shape == expected.shape
    assert torch.equal(y, expected)


# -------------------------------------------------------------------------------------- stop


def test_stop_is_constant():
    """stop(x) equals x, does not require grad, and later rules treat it as a constant."""
    x = leaf(3, 4)
    y = lf.stop(x)
    assert torch.equal(y, d(x)) and not y.requires_grad
    z = lf.mul_uniform(x, lf.stop(x))  # the stopped factor is constant: identity to x
    R = explain(z)
    assert torch.equal(d(x.grad), R)


# --------------------------------------------------------------------------------- attention


def _attention_ref(q, k, v, R, mask=None, is_causal=False, scale=None, gqa=False,
                   eps=EPS, hold=False):
    """Hand-written AttnLRP (or CP-LRP with ``hold``) decomposition of sdpa; float64."""
    q, k, v = d(q), d(k), d(v)
    groups = q.shape[-3] // k.shape[-3] if gqa else 1
    ke, ve = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    S = q @ ke.mT
    pre = S * scale
    x = pre
    if is_causal:
        L, Sk = S.shape[-2:]
        x = x.masked_fill(~torch.ones(L, Sk, dtype=torch.bool).tril(), float("-inf"))
    additive = mask is not None and mask.dtype != torch.bool
    if mask is not None:
        x = x + mask if additive else x.masked_fill(~mask, float("-inf"))
    A = torch.nan_to_num(torch.softmax(x, -1), nan=0.0)
    out = A @ ve
    G = R / s(out, eps)

    def group_sum(r, like):
        if groups > 1:
            r = r.unflatten(-3, (-1, groups)).sum(-3)
        return r.sum_to_size(like.shape)

    refs = {"out": out}
    refs["v"] = group_sum((1.0 if hold else 0.5) * ve * (A.mT @ G), v)
    if hold:
        return refs
    R_A = 0.5 * A * (G @ ve.mT)
    R_x = x * (R_A - A * R_A.sum(-1, keepdim=True))
    R_x = torch.where(x <= torch.finfo(F64).min, torch.zeros_like(R_x), R_x)
    R_pre = pre * R_x / s(x, eps) if additive else R_x
    GS = R_pre / s(S, eps)  # identity through the scaling
    refs["q"] = (0.5 * q * (GS @ ke)).sum_to_size(q.shape)
    refs["k"] = group_sum(0.5 * ke * (GS.mT @ q), k)
    return refs


def _qkv(L=5, Sk=6, heads=4, kv_heads=4, E=8):
    return leaf(2, heads, L, E), leaf(2, kv_heads, Sk, E), leaf(2, kv_heads, Sk, E)


def _bool_mask(L=5, Sk=6):
    mask = torch.rand(L, Sk) > 0.4
    mask[:, 0] = True  # every row attends somewhere
    return mask


def _additive_mask(L=5, Sk=6):
    m = torch.zeros(2, 1, L, Sk, dtype=F64)
    m[..., 0, 3:] = m[..., 2, 1] = m[1, ..., 4, :2] = torch.finfo(F64).min
    return m


ATTENTION_CASES = {
    "plain": dict(),
    "bool_mask": dict(mask=_bool_mask),
    "additive_mask": dict(mask=_additive_mask),
    "causal": dict(is_causal=True),
    "causal_square": dict(is_causal=True, L=6),
    "scale": dict(scale=0.3),
    "gqa": dict(gqa=True, kv_heads=2),
    "gqa_bool_mask": dict(gqa=True, kv_heads=2, mask=_bool_mask),
}


@pytest.mark.parametrize("hold", [False, True], ids=["attnlrp", "cplrp"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_against_decomposition(case, hold):
    """sdpa relevance equals the hand-written decomposition; forward equals F.sdpa; with
    hold_weights (CP-LRP) all relevance goes to v and q, k get None."""
    cfg = dict(ATTENTION_CASES[case])
    L = cfg.pop("L", 5)
    kv_heads = cfg.pop("kv_heads", 4)
    q, k, v = _qkv(L=L, kv_heads=kv_heads)
    mask = cfg.pop("mask", None)
    mask = mask(L=L) if mask is not None else None
    kw = dict(attn_mask=mask, is_causal=cfg.get("is_causal", False), scale=cfg.get("scale"),
              enable_gqa=cfg.get("gqa", False))
    out = lf.scaled_dot_product_attention(q, k, v, **kw, epsilon=EPS, hold_weights=hold,
                                          exact=True)
    assert torch.equal(out, F.scaled_dot_product_attention(d(q), d(k), d(v), **kw))
    R = explain(out)
    ref = _attention_ref(q, k, v, R, mask=mask, hold=hold, **cfg)
    assert_rel(d(out), ref["out"], rtol=1e-12)  # the reference decomposes the same forward
    assert_rel(d(v.grad), ref["v"])
    if hold:
        assert q.grad is None and k.grad is None
    else:
        assert_rel(d(q.grad), ref["q"])
        assert_rel(d(k.grad), ref["k"])


@pytest.mark.parametrize("hold", [False, True], ids=["attnlrp", "cplrp"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_backward_in_row_blocks(case, hold, monkeypatch):
    """The backward processes the query rows in blocks (ATTENTION_BLOCK weights, at least
    ATTENTION_ROWS rows); blocks of one or two rows give the same relevance as the reference."""
    monkeypatch.setattr(lf, "ATTENTION_ROWS", 1)
    for block in (1, 2 * 4 * 6 * 2):  # one row per block; two rows (the last block is short)
        monkeypatch.setattr(lf, "ATTENTION_BLOCK", block)
        test_attention_against_decomposition(case, hold)


@pytest.mark.parametrize("case", ["plain", "bool_mask", "additive_mask", "causal", "gqa"])
def test_attention_equals_composition_of_primitive_rules(case):
    """The fused sdpa rule equals chaining the library's own primitives: matmul_uniform(q, kᵀ),
    identity scaling, masking (ε-add with a constant mask, or masked_fill), softmax,
    matmul_uniform(A, v)."""
    gqa = case == "gqa"
    q, k, v = _qkv(kv_heads=2 if gqa else 4)
    mask = {"bool_mask": _bool_mask, "additive_mask": _additive_mask}.get(case)
    mask = mask() if mask else None
    causal = case == "causal"
    R = torch.randn(2, 4, 5, 8, dtype=F64)
    out = lf.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=gqa, epsilon=EPS, exact=True)
    out.backward(R)
    q2, k2, v2 = (d(t).requires_grad_() for t in (q, k, v))
    ke = k2.repeat_interleave(2, -3) if gqa else k2
    ve = v2.repeat_interleave(2, -3) if gqa else v2
    pre = lf.mul_uniform(lf.matmul_uniform(q2, ke.mT, EPS), 1 / math.sqrt(8))
    if causal:
        pre = pre.masked_fill(~torch.ones(5, 6, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        pre = pre.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        pre = lf.add_epsilon(pre, mask, EPS)
    out2 = lf.matmul_uniform(lf.softmax(pre, -1), ve, EPS)
    out2.backward(R)
    for got, ref in ((q, q2), (k, k2), (v, v2)):
        assert_rel(d(got.grad), d(ref.grad))


def test_attention_fully_masked_bool_row_has_no_nan():
    """A query row with no key to attend: output and all relevances stay finite."""
    q, k, v = _qkv()
    mask = _bool_mask()
    mask[2] = False
    out = lf.scaled_dot_product_attention(q, k, v, attn_mask=mask, epsilon=EPS)
    R = explain(out)
    assert torch.isfinite(out).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[..., 2, :] == 0).all()  # that query received no relevance
    ref = _attention_ref(q, k, v, R, mask=mask)
    assert_rel(d(v.grad), ref["v"])
    assert_rel(d(k.grad), ref["k"])


# ------------------------------------------------------------------- forward bit-identity


def _forward_cases():
    """(name, wrapper(t), plain(t)) with ``t`` a dict of inputs of the tested dtype/device."""
    return [
        ("linear", lambda t: lf.linear_epsilon(t["x"], t["W"], t["b"]),
         lambda t: F.linear(t["x"], t["W"], t["b"])),
        ("matmul", lambda t: lf.matmul_uniform(t["a"], t["bm"]),
         lambda t: torch.matmul(t["a"], t["bm"])),
        ("addmm", lambda t: lf.addmm_epsilon(t["c"], t["m1"], t["m2"], 0.5, 2.0),
         lambda t: torch.addmm(t["c"], t["m1"], t["m2"], beta=0.5, alpha=2.0)),
        ("add", lambda t: lf.add_epsilon(t["a"], t["c"]), lambda t: torch.add(t["a"], t["c"])),
        ("mul", lambda t: lf.mul_uniform(t["a"], t["c"]), lambda t: torch.mul(t["a"], t["c"])),
        ("gelu", lambda t: lf.identity(F.gelu, t["x"]), lambda t: F.gelu(t["x"])),
        ("softmax", lambda t: lf.softmax(t["x"], -1), lambda t: torch.softmax(t["x"], -1)),
        ("softmax_f32", lambda t: lf.softmax(t["x"], -1, dtype=torch.float32),
         lambda t: torch.softmax(t["x"], -1, dtype=torch.float32)),
        ("sdpa", lambda t: lf.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
         lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"])),
        ("sdpa_causal",
         lambda t: lf.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True),
         lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)),
        ("sdpa_mask",
         lambda t: lf.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["mask"]),
         lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["mask"])),
        ("sdpa_gqa",
         lambda t: lf.scaled_dot_product_attention(t["q"], t["kg"], t["vg"], enable_gqa=True),
         lambda t: F.scaled_dot_product_attention(t["q"], t["kg"], t["vg"], enable_gqa=True)),
        ("layer_norm", lambda t: lf.layer_norm(t["x"], (8,), t["w"], t["bw"], 1e-5),
         lambda t: F.layer_norm(t["x"], (8,), t["w"], t["bw"], 1e-5)),
        ("rms_norm", lambda t: lf.rms_norm(t["x"], t["w"], 1e-6),
         lambda t: F.rms_norm(t["x"], (8,), t["w"], 1e-6)),
        ("sum", lambda t: lf.sum_epsilon(t["x"], 1), lambda t: torch.sum(t["x"], 1)),
        ("mean", lambda t: lf.mean_epsilon(t["x"], (0, 2), True),
         lambda t: torch.mean(t["x"], (0, 2), True)),
        ("mean_all", lambda t: lf.mean_epsilon(t["x"]), lambda t: torch.mean(t["x"])),
    ]


FORWARD_CASES = _forward_cases()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_forward_is_bit_identical(dtype, device):
    """Each wrapper's output equals the plain torch op bit for bit (inputs requiring grad)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device).requires_grad_()

    mask = (torch.rand(5, 6, generator=g) > 0.3).to(device)
    mask[:, 0] = True
    t = dict(x=r(3, 4, 8), W=r(6, 8), b=r(6), a=r(3, 4, 5), bm=r(5, 6), c=r(5), m1=r(4, 5),
             m2=r(5, 5), q=r(2, 4, 5, 8), k=r(2, 4, 6, 8), v=r(2, 4, 6, 8), kg=r(2, 2, 6, 8),
             vg=r(2, 2, 6, 8), mask=mask, w=r(8), bw=r(8))
    failures = []
    for name, wrapper, plain in FORWARD_CASES:
        got, expected = wrapper(t), plain(t)
        if got.dtype != expected.dtype or not torch.equal(got.detach(), expected.detach()):
            failures.append(name)
    assert not failures, f"forward differs from the plain op for {failures}"


# ---------------------------------------------------------------------------- conservation


def test_conservation_bias_free_chain():
    """x → linear → gelu → linear → LayerNorm (no bias) → matmul with a second x-path →
    ε-add residual → RMSNorm → sum over tokens: Σ R_x = Σ y to 1e-10 (float64, default ε)."""
    T, D, H = 6, 8, 16
    x = leaf(T, D)
    W1, W2, W3 = (leaf(*s_, requires_grad=False) for s_ in ((H, D), (D, H), (D, D)))
    ln_w, rms_w = leaf(D, requires_grad=False), leaf(D, requires_grad=False)
    h = lf.linear_epsilon(x, W1)
    h = lf.identity(F.gelu, h)
    h = lf.linear_epsilon(h, W2)
    h = lf.layer_norm(h, (D,), ln_w, None)
    p = lf.linear_epsilon(x, W3)  # second relevance path from x
    a = lf.matmul_uniform(h, p.mT)  # (T, T), both operands on the path
    m = lf.mul_uniform(lf.matmul_uniform(a, x), 1.0 / T)  # constant scaling: identity rule
    r = lf.add_epsilon(m, x)  # residual
    n = lf.rms_norm(r, rms_w)
    y = lf.sum_epsilon(n, 0)
    y.backward(y.detach())
    assert_rel(x.grad.sum(), y.detach().sum())


def test_mul_uniform_conserves_with_broadcast():
    """Σ R_a + Σ R_b = Σ R for a gate product with broadcasting."""
    a, b = leaf(2, 4, 5), leaf(4, 1)
    z = lf.mul_uniform(a, b)
    R = explain(z)
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    assert_rel(a.grad.sum() + b.grad.sum(), R.sum())


# -------------------------------------------------------------------------- default epsilon


def test_default_epsilon_per_dtype():
    """Tiny in float64; larger in half precision than in float32."""
    eps64 = lf.default_epsilon(torch.float64)
    eps32 = lf.default_epsilon(torch.float32)
    assert 0 < eps64 <= 1e-10
    assert eps32 > eps64
    assert lf.default_epsilon(torch.float16) > eps32
    assert lf.default_epsilon(torch.bfloat16) > eps32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                         ids=["float16", "bfloat16"])
def test_zero_output_half_precision_is_finite(dtype):
    """A linear output that is exactly 0 in half precision gives finite relevance (default ε):
    R_x = x ⊙ (R / ε_default) W."""
    x = torch.tensor([[1.0, 1.0]], dtype=dtype, requires_grad=True)
    W = torch.tensor([[1.0, -1.0]], dtype=dtype)
    z = lf.linear_epsilon(x, W)
    assert (z == 0).all()
    z.backward(torch.ones_like(z))
    assert torch.isfinite(x.grad).all()
    eps = lf.default_epsilon(dtype)
    expected = torch.tensor([[1.0, -1.0]], dtype=F64) / eps
    assert_rel(d(x.grad), expected, rtol=2e-2, atol=0.0)  # ε itself is rounded to half


@pytest.mark.parametrize("constant", ["v", "k", "q"])
def test_attention_with_a_constant_operand_gives_the_full_rule_to_the_other(constant):
    """As for matmul_uniform: a constant factor leaves the full ε-rule to the other one."""
    q, k, v = _qkv(kv_heads=4)
    leaves = {"q": q, "k": k, "v": v}
    leaves[constant] = d(leaves[constant])
    R = torch.randn(2, 4, 5, 8, dtype=F64)
    out = lf.scaled_dot_product_attention(leaves["q"], leaves["k"], leaves["v"], epsilon=EPS,
                                          exact=True)
    out.backward(R)
    chain = {n: d(t).requires_grad_(n != constant) for n, t in leaves.items()}
    pre = lf.mul_uniform(lf.matmul_uniform(chain["q"], chain["k"].mT, EPS), 1 / math.sqrt(8))
    out2 = lf.matmul_uniform(lf.softmax(pre, -1), chain["v"], EPS)
    out2.backward(R)
    for name in "qkv":
        if name == constant:
            assert leaves[name].grad is None
        else:
            assert_rel(d(leaves[name].grad), d(chain[name].grad))


# ------------------------------------------------------------------- fused attention path


def _padding_mask(side, L=5, Sk=6):
    """Key padding of the second sample on ``side`` (boolean, broadcast over heads and rows)."""
    mask = torch.ones(2, 1, 1, Sk, dtype=torch.bool)
    mask[1, ..., :2] = side == "right"
    mask[1, ..., -2:] = side == "left"
    return mask


FUSED_CASES = dict(ATTENTION_CASES, padding_left=dict(mask=lambda L: _padding_mask("left", L)),
                   padding_right=dict(mask=lambda L: _padding_mask("right", L)),
                   gqa_causal_scale=dict(gqa=True, kv_heads=2, is_causal=True, scale=0.7))


@pytest.mark.parametrize("hold", [False, True], ids=["attnlrp", "cplrp"])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_attention_equals_the_exact_decomposition(case, hold):
    """One standard sdpa backward (the default) gives the relevance of the exact rule
    decomposition up to the ε on q kᵀ it drops: 1e-8 relative in float64 at the default ε,
    for every mask kind, causal, custom scale and GQA; the forward is the fused op's."""
    cfg = dict(FUSED_CASES[case])
    L = cfg.pop("L", 5)
    kv_heads = cfg.pop("kv_heads", 4)
    mask = cfg.pop("mask", None)
    mask = mask(L=L) if mask is not None else None
    kw = dict(attn_mask=mask, is_causal=cfg.get("is_causal", False), scale=cfg.get("scale"),
              enable_gqa=cfg.get("gqa", False), hold_weights=hold)
    R = torch.randn(2, 4, L, 8, dtype=F64)
    grads = []
    for exact in (False, True):
        torch.manual_seed(7)
        q, k, v = _qkv(L=L, kv_heads=kv_heads)
        out = lf.scaled_dot_product_attention(q, k, v, **kw, exact=exact)
        if not exact:
            plain = {k_: v_ for k_, v_ in kw.items() if k_ != "hold_weights"}
            assert torch.equal(out, F.scaled_dot_product_attention(d(q), d(k), d(v), **plain))
        out.backward(R)
        grads.append([t.grad for t in (q, k, v)])
    for fused, exact in zip(*grads):
        if exact is None:
            assert fused is None
        else:
            assert_rel(d(fused), d(exact), rtol=1e-8, atol=0.0)


def test_fused_attention_drops_only_the_epsilon_on_the_scores():
    """With a large ε the fused path differs from the exact one for q and k (the ε on q kᵀ),
    never for v, whose rule has no such term; with CP-LRP nothing differs at all."""
    torch.manual_seed(3)
    q, k, v = _qkv()
    R = torch.randn(2, 4, 5, 8, dtype=F64)
    runs = {}
    for exact in (False, True):
        leaves = [d(t).requires_grad_() for t in (q, k, v)]
        lf.scaled_dot_product_attention(*leaves, epsilon=EPS, exact=exact).backward(R)
        runs[exact] = [t.grad for t in leaves]
    assert_rel(d(runs[False][2]), d(runs[True][2]), rtol=1e-12)
    assert float((runs[False][0] - runs[True][0]).norm() / runs[True][0].norm()) > 1e-3
    held = [d(t).requires_grad_() for t in (q, k, v)]
    lf.scaled_dot_product_attention(*held, epsilon=EPS, hold_weights=True).backward(R)
    ref = _attention_ref(q, k, v, R, hold=True)
    assert_rel(d(held[2].grad), ref["v"])


@pytest.mark.parametrize("constant", ["v", "k", "q"])
def test_fused_attention_with_a_constant_operand(constant):
    """A constant operand leaves the full rule to the others on the fused path too."""
    q, k, v = _qkv(kv_heads=4)
    R = torch.randn(2, 4, 5, 8, dtype=F64)
    grads = []
    for exact in (False, True):
        leaves = {n: d(t).requires_grad_(n != constant) for n, t in zip("qkv", (q, k, v))}
        lf.scaled_dot_product_attention(*leaves.values(), exact=exact).backward(R)
        grads.append(leaves)
    for name in "qkv":
        if name == constant:
            assert grads[0][name].grad is None
        else:
            assert_rel(d(grads[0][name].grad), d(grads[1][name].grad), rtol=1e-8, atol=0.0)


def test_fused_attention_runs_the_fused_kernel_backward():
    """On CPU without a mask the forward and the backward are the flash kernel's: the
    attention weights (softmax over L × S) are never formed in the LRP backward."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(1, 2, 64, 16).requires_grad_() for _ in range(3))
    out = lf.scaled_dot_product_attention(q, k, v, is_causal=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(torch.randn_like(out))
    names = {e.name for e in prof.events()}
    assert any("flash_attention" in n and "backward" in n for n in names), sorted(names)
    assert not any(n in ("aten::softmax", "aten::_softmax", "aten::bmm", "aten::baddbmm")
                   for n in names)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
